"""Growth requests: parsing strings such as ``"mlp_dim=512"`` or ``"add_layer@2"``.

Grammar (whitespace is ignored):

    mlp_dim=INT | num_heads=INT | qk_dim=INT | v_dim=INT   width of one axis (new size)
    hidden=INT[:pad|:replicate]                           residual width (new size)
    add_layer[@POS]                                       identity block before block POS
                                                          (default: after the last block)
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence

from growth.rules import PAD, REPLICATE, TRANSFORMATIONS, GrowthError

_SIZE_KEYS = ("mlp_dim", "num_heads", "qk_dim", "v_dim", "hidden")
_SIZE_RE = re.compile(r"^(?P<key>[a-z_]+)=(?P<value>[+-]?\d+)(?::(?P<method>[a-z_]+))?$")
_LAYER_RE = re.compile(r"^add_layer(?:@(?P<pos>[+-]?\d+))?$")


@dataclasses.dataclass(frozen=True)
class Request:
    """One growth step.

    Attributes:
      kind: one of ``growth.rules.TRANSFORMATIONS``.
      size: the new size for width requests (None for ``add_layer``).
      position: for ``add_layer``, the index the new block gets (None = append).
      method: for ``hidden``, ``"pad"`` or ``"replicate"`` (None = the rule's default).
    """

    kind: str
    size: int | None = None
    position: int | None = None
    method: str | None = None

    def __post_init__(self):
        if self.kind not in TRANSFORMATIONS:
            raise GrowthError(
                f"Unknown growth request {self.kind!r}; expected one of {TRANSFORMATIONS}."
            )
        if self.kind == "add_layer":
            if self.size is not None or self.method is not None:
                raise GrowthError("add_layer takes only a position (add_layer@POS).")
            if self.position is not None and self.position < 0:
                raise GrowthError(f"add_layer position must be >= 0, got {self.position}.")
            return
        if self.position is not None:
            raise GrowthError(f"{self.kind} takes a size, not a position.")
        if not isinstance(self.size, int) or self.size <= 0:
            raise GrowthError(f"{self.kind} needs a positive integer size, got {self.size!r}.")
        if self.method is not None and (
            self.kind != "hidden" or self.method not in (PAD, REPLICATE)
        ):
            raise GrowthError(
                f"Method {self.method!r} is only for hidden growth and must be "
                f"{PAD!r} or {REPLICATE!r}."
            )

    def __str__(self) -> str:
        if self.kind == "add_layer":
            return "add_layer" if self.position is None else f"add_layer@{self.position}"
        return f"{self.kind}={self.size}" + (f":{self.method}" if self.method else "")


def parse_request(text: str | Request) -> Request:
    """Parses one request.

    Args:
      text: e.g. ``"mlp_dim=512"``, ``"hidden=256:replicate"``, ``"add_layer@2"``; a
        ``Request`` is returned as is.

    Returns:
      The parsed request.

    Raises:
      GrowthError: with the grammar, if the text is malformed.
    """
    if isinstance(text, Request):
        return text
    if not isinstance(text, str):
        raise GrowthError(f"A growth request is a string or Request, got {type(text).__name__}.")
    compact = re.sub(r"\s+", "", text)
    match = _LAYER_RE.match(compact)
    if match:
        pos = match.group("pos")
        return Request("add_layer", position=None if pos is None else int(pos))
    match = _SIZE_RE.match(compact)
    if match and match.group("key") in _SIZE_KEYS:
        return Request(
            match.group("key"), size=int(match.group("value")), method=match.group("method")
        )
    raise GrowthError(
        f"Cannot parse growth request {text!r}. Expected one of: "
        + ", ".join(f"{k}=INT" for k in _SIZE_KEYS)
        + " (hidden=INT:pad or hidden=INT:replicate to pick the method), add_layer[@POS]."
    )


def parse_requests(requests: str | Request | Sequence[str | Request]) -> list[Request]:
    """Parses a list of requests, or a single comma-separated string of them.

    Args:
      requests: ``"mlp_dim=512, add_layer@2"``, a ``Request``, or a sequence of either.

    Returns:
      The requests in order.

    Raises:
      GrowthError: if any request is malformed.
    """
    if isinstance(requests, Request):
        return [requests]
    if isinstance(requests, str):
        requests = [part for part in requests.split(",") if part.strip()]
    return [parse_request(r) for r in requests]
