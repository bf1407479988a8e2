"""Transformation 5: hidden (residual stream) size h -> h'.

Two exact methods (``growth.rules`` says which applies to which model):

* ``pad`` (RMSNorm; the paper's rule 5): the stream becomes [x, 0]. Leaves writing into
  the stream get zero new entries; leaves reading it get free new input rows; every RMS
  norm gain is multiplied by sqrt(h/h') and eps by h/h', because the mean of x^2 over
  h' entries is h/h' times the mean over h.
* ``replicate`` (any norm, integer factor n = h'/h; LEMON): the stream becomes
  [x, ..., x]. Mean and variance over n*h entries equal those over h, so norms with
  replicated gains and biases return the replicated output. Leaves writing into the
  stream are replicated; leaves reading it are replicated and each copy is multiplied by
  random proportions that sum to one over the copies, so the copies sum back to the old
  product (equal shares would keep the copies identical forever).

h-dependent constants: ``norm_eps`` (rescaled by ``pad``, unchanged by ``replicate``)
and a tied readout (``tie_embeddings``: logits = final_norm(x) E^T with E also written
into the stream). Zero-padding keeps y E^T exact (the new columns of E are 0). With
replication E is replicated as an output-side table, so y' E'^T would count the n copies
n times: the final norm's scale and bias are then split like an input-side matrix
(copies times proportions summing to one), which keeps the logits and breaks the
symmetry too. The models have no other h-dependent constant (no embedding multiplier,
no h^-1/2 logit scale; the runtime attention scale depends on qk_dim, not h).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

from growth.layout import (
    INPUT,
    NORM_BIAS,
    NORM_SCALE,
    OUTPUT,
    TIED_READOUT_NORM,
    EmbedAxis,
    classify,
)
from growth.ops import (
    Free,
    Op,
    Pad,
    Path,
    Scale,
    Step,
    Tile,
    WidthGrowth,
    Zero,
    flatten,
    leaf_shape,
)
from growth.rules import PAD, REPLICATE, GrowthError, check_grows, choose, traits_of


def _embed_leaves(params: Mapping, hidden: int) -> dict[Path, tuple[EmbedAxis, tuple]]:
    """Every leaf with an embed axis, with its side and shape (checked against hidden)."""
    flat = flatten(params)
    found = {}
    for path, leaf in flat.items():
        parent = params
        for name in path[:-1]:
            parent = parent[name]
        where = classify(path, parent)
        if where is None:
            continue
        shape = leaf_shape(leaf)
        if shape[where.axis] != hidden:
            raise GrowthError(
                f"{'/'.join(path)} has shape {shape}; expected hidden={hidden} on axis "
                f"{where.axis}."
            )
        found[path] = (where, shape)
    return found


def _pad_ops(path: Path, where: EmbedAxis, shape: tuple, old: int, new: int) -> tuple[Op, ...]:
    if where.side == OUTPUT:
        return (Pad(where.axis, new, Zero()),)
    if where.side == INPUT:
        return (Pad(where.axis, new, Free(0.0, 1.0 / math.sqrt(new))),)
    if where.side == NORM_SCALE:
        gain = math.sqrt(old / new)
        return (Scale(gain), Pad(where.axis, new, Free(gain, 0.0)))
    # An RMS norm bias is added after the gain: new entries must stay 0 in the stream.
    assert where.side == NORM_BIAS
    return (Pad(where.axis, new, Zero()),)


def _replicate_plan(
    leaves: Mapping[Path, tuple[EmbedAxis, tuple]], copies: int
) -> dict[Path, tuple[Op, ...]]:
    """Tile ops for every leaf; input-side leaves get random split proportions."""
    return {
        path: (Tile(where.axis, copies, split=where.side == INPUT),)
        for path, (where, _) in leaves.items()
    }


def grow_hidden(
    config: Any,
    params: Mapping,
    new_size: int,
    *,
    method: str | None = None,
) -> Step:
    """Plans the growth of the hidden size to ``new_size``.

    Args:
      config: model config with ``hidden``, ``norm``, ``norm_eps``, ``norm_placement``.
      params: the model parameters (their shapes suffice).
      new_size: the new hidden size h'.
      method: ``"pad"`` or ``"replicate"``; None for the model's default rule.

    Returns:
      The step (new config and the map for parameters and optimizer moments).

    Raises:
      GrowthError: on shrinking, a method that is not exact for this model, a
        non-integer factor for replication, or parameters that do not match the config.
    """
    old = config.hidden
    check_grows("hidden", old, new_size)
    rule = choose("hidden", traits_of(config), method)
    if rule.method == REPLICATE and new_size % old:
        raise GrowthError(
            f"Refusing hidden={new_size} for a {config.norm} model with hidden={old}: "
            f"replication needs an integer factor (a multiple of {old}); zero-padding is "
            "not exact under LayerNorm, whose mean subtraction sees the zeros."
        )
    leaves = _embed_leaves(params, old)
    if rule.method == REPLICATE and getattr(config, "tie_embeddings", False):
        tied = [p for p in leaves if p[: len(TIED_READOUT_NORM)] == TIED_READOUT_NORM]
        if not tied:
            raise GrowthError(
                "Replicating the hidden size of a model with tied embeddings needs a "
                f"{'/'.join(TIED_READOUT_NORM)} to absorb the factor; none found."
            )
        for path in tied:
            where, shape = leaves[path]
            leaves[path] = (EmbedAxis(INPUT, where.axis), shape)
    if rule.method == PAD:
        plan = {
            path: _pad_ops(path, where, shape, old, new_size)
            for path, (where, shape) in leaves.items()
        }
    else:
        plan = _replicate_plan(leaves, new_size // old)
    changes: dict[str, Any] = {"hidden": new_size}
    if rule.method == PAD:
        changes["norm_eps"] = config.norm_eps * old / new_size
    new_config = dataclasses.replace(config, **changes)
    return Step(new_config, WidthGrowth(tuple(plan.items())))
