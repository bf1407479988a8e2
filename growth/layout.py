"""Where things live in a parameter tree (the naming contract of docs/architecture.md).

Growth never instantiates a model; it recognises components by their parameter names:

* blocks are the top-level entries ``block_0 .. block_{L-1}``;
* an attention module is any dict with ``query``, ``key``, ``value`` and ``out``
  (kernels ``[embed, heads, kv]`` and ``[heads, kv, embed]``, optional biases);
* an MLP is any dict with ``wo`` and ``wi`` or ``wi_0``/``wi_1`` (kernels
  ``[embed, mlp]`` and ``[mlp, embed]``, optional biases);
* a norm is any dict with a 1-D ``scale`` (optional ``bias``).

For hidden-size growth every leaf that has an ``embed`` axis is classified by *side*:
``INPUT`` leaves read the (normalised) residual stream, ``OUTPUT`` leaves write into it,
``NORM_SCALE``/``NORM_BIAS`` are norm parameters over the stream. Top-level leaves of
the model families (embeddings, positions, heads) are listed in ``TOP_LEVEL``; a leaf
growth does not know is an error, never silently left alone.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping
from typing import Any

from growth.ops import TREE_NODES, Free, Path
from growth.rules import GrowthError

INPUT = "input"
OUTPUT = "output"
NORM_SCALE = "norm_scale"
NORM_BIAS = "norm_bias"

_BLOCK_RE = re.compile(r"^block_(\d+)$")
_QKV = ("query", "key", "value")
_WI = ("wi", "wi_0", "wi_1")


@dataclasses.dataclass(frozen=True)
class EmbedAxis:
    """How a leaf touches the residual stream: which side and along which axis."""

    side: str
    axis: int


# Top-level leaves of the model families, by path (models/vit.py, models/decoder.py,
# models/encoder.py). None: the leaf has no embed axis. Norms anywhere (``final_norm``,
# the encoder's ``embed/norm``) are recognised by their shape, not listed here.
TOP_LEVEL: dict[Path, EmbedAxis | None] = {
    # ViT: patch projection [ph, pw, c, embed] (+ bias), class token [1, 1, embed],
    # positions [tokens, embed], head dense [embed, classes].
    ("embed", "patch", "kernel"): EmbedAxis(OUTPUT, -1),
    ("embed", "patch", "bias"): EmbedAxis(OUTPUT, -1),
    ("cls", "token"): EmbedAxis(OUTPUT, -1),
    ("pos", "embedding"): EmbedAxis(OUTPUT, -1),
    ("head", "dense", "kernel"): EmbedAxis(INPUT, 0),
    ("head", "dense", "bias"): None,
    # Decoder LM: token embedding [vocab, embed] (also the readout when tied), positions
    # (above) and the untied logits projection [embed, vocab].
    ("embed", "embedding"): EmbedAxis(OUTPUT, -1),
    ("logits", "kernel"): EmbedAxis(INPUT, 0),
    ("logits", "bias"): None,
    # Encoder (BERT): word / position / token-type tables [rows, embed] and the head.
    ("embed", "word"): EmbedAxis(OUTPUT, -1),
    ("embed", "position"): EmbedAxis(OUTPUT, -1),
    ("embed", "token_type"): EmbedAxis(OUTPUT, -1),
    ("head", "kernel"): EmbedAxis(INPUT, 0),
    ("head", "bias"): None,
}

# Norms whose output is read only by a tied readout (the decoder's logits = y E^T); with
# replication their output is an input-side quantity (see growth/hidden.py).
TIED_READOUT_NORM = ("final_norm",)


def block_index(name: str) -> int | None:
    """The block number of a top-level name ``block_i``, else None."""
    match = _BLOCK_RE.match(name)
    return int(match.group(1)) if match else None


def block_names(params: Mapping) -> list[str]:
    """The names of the blocks in order, checked to be ``block_0 .. block_{L-1}``.

    Args:
      params: the model parameters (top-level dict).

    Returns:
      ``["block_0", ..., "block_{L-1}"]``.

    Raises:
      GrowthError: if the block numbers are not contiguous from 0.
    """
    indices = sorted(i for i in (block_index(k) for k in params) if i is not None)
    if indices != list(range(len(indices))):
        raise GrowthError(f"Blocks must be numbered block_0..block_{{L-1}}, got {indices}.")
    return [f"block_{i}" for i in indices]


def is_attention(module: Any) -> bool:
    """Whether a sub-tree is an attention module (query, key, value, out)."""
    return isinstance(module, Mapping) and all(k in module for k in (*_QKV, "out"))


def is_mlp(module: Any) -> bool:
    """Whether a sub-tree is an MLP (wo and wi or wi_0/wi_1)."""
    return isinstance(module, Mapping) and "wo" in module and any(k in module for k in _WI)


def is_norm(module: Any) -> bool:
    """Whether a sub-tree is a norm (a 1-D scale, optional bias, nothing else)."""
    return (
        isinstance(module, Mapping)
        and "scale" in module
        and set(module) <= {"scale", "bias"}
        and len(_shape(module["scale"])) == 1
    )


def _shape(leaf: Any) -> tuple[int, ...]:
    leaf = leaf.unbox() if hasattr(leaf, "unbox") else leaf
    return tuple(getattr(leaf, "shape", ()))


def modules(tree: Mapping, predicate) -> list[Path]:
    """Paths of every sub-tree satisfying ``predicate`` (not descending into matches).

    Args:
      tree: a nested dict.
      predicate: e.g. ``is_attention``.

    Returns:
      The matching paths, in sorted order.
    """
    found: list[Path] = []
    _collect(tree, predicate, (), found)
    return found


def _collect(tree: Any, predicate, prefix: Path, found: list[Path]) -> None:
    if predicate(tree):
        found.append(prefix)
    elif isinstance(tree, TREE_NODES):
        for name in sorted(tree):
            child = tree[name]
            if isinstance(child, TREE_NODES):  # leaves are never modules
                _collect(child, predicate, prefix + (name,), found)


def classify(path: Path, parent: Mapping) -> EmbedAxis | None:
    """How a leaf touches the residual stream (for hidden-size growth).

    Args:
      path: the leaf's full path in the parameter tree.
      parent: the dict that holds the leaf (to recognise norms).

    Returns:
      The side and axis, or None if the leaf has no embed axis.

    Raises:
      GrowthError: if the leaf is not part of the naming contract.
    """
    name = path[-1]
    owner = path[-2] if len(path) > 1 else ""
    if block_index(path[0]) is None and path in TOP_LEVEL:
        return TOP_LEVEL[path]
    if is_norm(parent):
        return EmbedAxis(NORM_SCALE if name == "scale" else NORM_BIAS, 0)
    if owner in _QKV:
        return EmbedAxis(INPUT, 0) if name == "kernel" else None
    if owner in _WI:
        return EmbedAxis(INPUT, 0) if name == "kernel" else None
    if owner in ("out", "wo"):
        return EmbedAxis(OUTPUT, -1)
    raise GrowthError(
        f"Hidden growth does not know parameter {'/'.join(path)}; describe it in "
        "growth/layout.py (TOP_LEVEL) so that it is grown, not silently left alone."
    )


def default_free(path: Path, shape: tuple[int, ...]) -> Free:
    """The default initializer of a new free entry of a leaf (when no ``fill`` is given).

    Kernels and embeddings: normal with stddev 1/sqrt(fan_in) (fan_in = first axis);
    norm scales: 1; everything else (biases, positions, tokens): 0.

    Args:
      path: the leaf path.
      shape: the leaf shape (after growth).

    Returns:
      The ``Free`` initializer.
    """
    name = path[-1]
    if name in ("kernel", "embedding") and shape:
        return Free(0.0, 1.0 / math.sqrt(max(shape[0], 1)))
    if name == "scale":
        return Free(1.0, 0.0)
    return Free(0.0, 0.0)


def leaf_shape_at(tree: Mapping, path: Path) -> tuple[int, ...]:
    """Shape of the (possibly boxed) leaf at ``path``."""
    node: Any = tree
    for name in path:
        node = node[name]
    return _shape(node)
