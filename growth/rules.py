"""Which expansion is exact for which kind of model, as data.

A model's growth-relevant traits are its norm type (``rmsnorm`` | ``layernorm``), the
norm placement (``pre`` | ``post``) and the attention scaling (``runtime`` 1/sqrt(k) |
``folded`` into the initialisation). ``RULES`` maps (transformation, norm, placement) to
the methods that preserve the function exactly, the first being the default;
``REFUSED`` gives the reason for every combination that is not exact. Biases need no
table: every bias is grown with its kernel (see the transformation modules).
"""

from __future__ import annotations

import dataclasses
from typing import Any


class GrowthError(ValueError):
    """A growth request that cannot be honoured (malformed, shrinking or not exact)."""


TRANSFORMATIONS = ("mlp_dim", "num_heads", "qk_dim", "v_dim", "hidden", "add_layer")
NORMS = ("rmsnorm", "layernorm")
PLACEMENTS = ("pre", "post")
SCALINGS = ("runtime", "folded")

# Methods.
PAD = "pad"  # append new entries (free on the input side, zero on the output side)
REPLICATE = "replicate"  # hidden only: stream [x, x, ..., x], LEMON-style random split
IDENTITY_BLOCK = "identity_block"  # depth only: a block whose residual branches are 0

_WIDTH = {PAD: "append entries; the new outputs are multiplied by zero rows"}
_HIDDEN_PAD = "zero-pad the residual stream to [x, 0]; RMS norm gains *= sqrt(h/h'), eps *= h/h'"
_HIDDEN_REPLICATE = (
    "replicate the stream to [x, ..., x]; mean and variance over n*h are unchanged; "
    "input-side matrices split with random proportions summing to one"
)


@dataclasses.dataclass(frozen=True)
class Rule:
    """An exact way to apply a transformation to a kind of model.

    Attributes:
      method: PAD, REPLICATE or IDENTITY_BLOCK.
      why: why the function is preserved.
    """

    method: str
    why: str


def _width_rules() -> dict[tuple[str, str, str], tuple[Rule, ...]]:
    table: dict[tuple[str, str, str], tuple[Rule, ...]] = {}
    for transformation in ("mlp_dim", "num_heads", "qk_dim", "v_dim"):
        for norm in NORMS:
            for placement in PLACEMENTS:
                table[(transformation, norm, placement)] = (Rule(PAD, _WIDTH[PAD]),)
    return table


RULES: dict[tuple[str, str, str], tuple[Rule, ...]] = {
    **_width_rules(),
    ("hidden", "rmsnorm", "pre"): (Rule(PAD, _HIDDEN_PAD), Rule(REPLICATE, _HIDDEN_REPLICATE)),
    ("hidden", "rmsnorm", "post"): (Rule(PAD, _HIDDEN_PAD), Rule(REPLICATE, _HIDDEN_REPLICATE)),
    ("hidden", "layernorm", "pre"): (Rule(REPLICATE, _HIDDEN_REPLICATE),),
    ("hidden", "layernorm", "post"): (Rule(REPLICATE, _HIDDEN_REPLICATE),),
    ("add_layer", "rmsnorm", "pre"): (
        Rule(IDENTITY_BLOCK, "x + 0 + 0 = x: the new block's output projections are 0"),
    ),
    ("add_layer", "layernorm", "pre"): (
        Rule(IDENTITY_BLOCK, "x + 0 + 0 = x: the new block's output projections are 0"),
    ),
}

_POST_DEPTH = (
    "a post-norm block computes N(x + branch(x)); with zero branches it still applies "
    "N(N(...)), whose per-token normalisation fixed gains cannot undo, so the new block "
    "is not an identity"
)
REFUSED: dict[tuple[str, str, str, str], str] = {
    ("add_layer", "rmsnorm", "post", IDENTITY_BLOCK): _POST_DEPTH,
    ("add_layer", "layernorm", "post", IDENTITY_BLOCK): _POST_DEPTH,
    ("hidden", "layernorm", "pre", PAD): (
        "LayerNorm subtracts the mean over the hidden axis, which the zero padding "
        "changes; grow by an integer factor (replication) instead"
    ),
    ("hidden", "layernorm", "post", PAD): (
        "LayerNorm subtracts the mean over the hidden axis, which the zero padding "
        "changes; grow by an integer factor (replication) instead"
    ),
}

# Rule 4 (key/query size): rescale the old key kernel (and key bias) by sqrt(k'/k) only
# when the attention divides by sqrt(k) at run time; a folded scale is a constant already
# inside the weights and does not change with k.
QK_RESCALE: dict[str, bool] = {"runtime": True, "folded": False}


@dataclasses.dataclass(frozen=True)
class Traits:
    """The growth-relevant traits of a model config."""

    norm: str
    placement: str
    attention_scaling: str


def traits_of(config: Any) -> Traits:
    """Reads the growth-relevant traits of a model config.

    Args:
      config: a model config with ``norm``, ``norm_placement`` and ``attention_scaling``.

    Returns:
      The traits, validated against NORMS, PLACEMENTS and SCALINGS.

    Raises:
      GrowthError: if a trait is missing or has an unknown value.
    """
    values = {}
    for name, field, allowed in (
        ("norm", "norm", NORMS),
        ("placement", "norm_placement", PLACEMENTS),
        ("attention_scaling", "attention_scaling", SCALINGS),
    ):
        value = getattr(config, field, None)
        if value not in allowed:
            raise GrowthError(
                f"{type(config).__name__}.{field}={value!r}: growth knows only {allowed}."
            )
        values[name] = value
    return Traits(**values)


def choose(transformation: str, traits: Traits, method: str | None = None) -> Rule:
    """The exact rule for a transformation on a model, or a refusal that says why.

    Args:
      transformation: one of TRANSFORMATIONS.
      traits: the model's traits (``traits_of``).
      method: a specific method, or None for the default.

    Returns:
      The rule to apply.

    Raises:
      GrowthError: if no exact rule exists (with the reason).
    """
    key = (transformation, traits.norm, traits.placement)
    rules = RULES.get(key, ())
    if method is None and rules:
        return rules[0]
    for rule in rules:
        if rule.method == method:
            return rule
    reason = REFUSED.get(key + (method or IDENTITY_BLOCK,))
    if reason is None:
        reason = f"method {method!r} is not exact here; exact methods: " + str(
            [r.method for r in rules]
        )
    raise GrowthError(
        f"Refusing {transformation} growth for a {traits.placement}-{traits.norm} model "
        f"(method {method or 'default'}): {reason}."
    )


def exactness_table() -> list[tuple[str, str, str, str, str]]:
    """Every (transformation, norm, placement, method) with 'exact' or the refusal reason.

    Returns:
      Rows ``(transformation, norm, placement, method, verdict)``.
    """
    rows: list[tuple[str, str, str, str, str]] = []
    for (transformation, norm, placement), rules in RULES.items():
        rows.extend((transformation, norm, placement, r.method, "exact") for r in rules)
    rows.extend((*key, reason) for key, reason in REFUSED.items())
    return sorted(rows)


def check_grows(name: str, old: int, new: int) -> None:
    """Refuses shrinking (growth only adds capacity; removing it changes the function).

    Args:
      name: the config field, for the message.
      old: its current value.
      new: the requested value.

    Raises:
      GrowthError: if ``new < old``.
    """
    if new < old:
        raise GrowthError(
            f"Refusing to shrink {name} from {old} to {new}: growth only adds entries "
            "(removing trained ones changes the function)."
        )
