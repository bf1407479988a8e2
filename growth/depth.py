"""Transformation 6: depth L -> L+1, an identity block inserted at any position.

In a pre-norm block ``x + attn(N1(x))`` and ``x' + mlp(N2(x'))``, zero output
projections (every attention ``out`` kernel and bias, including cross-attention, and the
MLP ``wo`` kernel and bias) make both residual branches exactly 0, so the block is the
identity bit for bit; every other new parameter is free. Blocks at or after the
position are renumbered ``block_{i+1}``. Post-norm blocks are refused (``growth.rules``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from growth.layout import block_index, block_names, default_free, is_attention, is_mlp, modules
from growth.ops import (
    PARAM,
    ROLES,
    Fill,
    Path,
    Step,
    draw_free,
    fold_in,
    is_array,
    path_seed,
    rebox,
    unbox,
)
from growth.rules import GrowthError, choose, traits_of

_TEMPLATE = "block_0"


def _zero_paths(block: Mapping) -> set[Path]:
    """Paths (inside a block) that must be zero for the block to be the identity."""
    zero: set[Path] = set()
    for apath in modules(block, is_attention):
        zero.update(apath + ("out", leaf) for leaf in ("kernel", "bias"))
    for mpath in modules(block, is_mlp):
        zero.update(mpath + ("wo", leaf) for leaf in ("kernel", "bias"))
    if not zero:
        raise GrowthError("The block template has no attention or MLP output projection.")
    return zero


@dataclasses.dataclass(frozen=True)
class DepthGrowth:
    """An identity block inserted as ``block_{position}``, shaped like ``block_0``.

    Attributes:
      position: the index of the new block; blocks at or after it are renumbered.
      zero: paths inside the block that must be zero (its residual output projections).
    """

    position: int
    zero: frozenset[Path]

    def apply(
        self, flats: Sequence[dict[Path, Any]], roles: Sequence[str], key: jax.Array, fill: Fill
    ) -> list[dict[Path, Any]]:
        """Inserts the block into flattened parameter-shaped trees.

        New parameters: the zero paths are 0, every other leaf is free and draws from
        ``fold_in(key, path_seed(path in the block))``. New moments are 0.

        Args:
          flats: ``flatten`` of the parameters and their moments (traced arrays).
          roles: the role of each tree.
          key: the step's key.
          fill: constant, callable or None for the default initializers.

        Returns:
          The grown flat trees.
        """
        outs = []
        for flat, role in zip(flats, roles, strict=True):
            if role not in ROLES:
                raise ValueError(f"Unknown role {role!r}.")
            out: dict[Path, Any] = {}
            new: dict[Path, Any] = {}
            for path, leaf in flat.items():
                index = block_index(path[0])
                if index is not None and index >= self.position:
                    out[(f"block_{index + 1}", *path[1:])] = leaf
                else:
                    out[path] = leaf
                if path[0] == _TEMPLATE:
                    new[(f"block_{self.position}", *path[1:])] = self._new_leaf(
                        path[1:], leaf, role, key, fill
                    )
            out.update(new)
            outs.append(out)
        return outs

    def _new_leaf(self, path: Path, like: Any, role: str, key: jax.Array, fill: Fill) -> Any:
        if not is_array(like):  # e.g. optax.MaskedNode
            return like
        value = unbox(like)
        shape = tuple(value.shape)
        if role != PARAM or path in self.zero:
            return rebox(like, jnp.zeros(shape, value.dtype))
        leaf_key = fold_in(key, path_seed(path))
        return rebox(like, draw_free(leaf_key, shape, value.dtype, default_free(path, shape), fill))


def grow_depth(config: Any, params: Mapping, position: int | None) -> Step:
    """Plans the insertion of an identity block so that it becomes ``block_{position}``.

    Args:
      config: model config with ``num_layers`` and ``norm_placement`` "pre".
      params: the model parameters (their shapes suffice; the new block copies the
        structure of ``block_0``).
      position: 0..L (0 = before the first block, L or None = after the last).

    Returns:
      The step (new config and the map for parameters and optimizer state, whose new
      block is all zeros).

    Raises:
      GrowthError: for post-norm models (not exact), a bad position, or no blocks.
    """
    choose("add_layer", traits_of(config))
    names = block_names(params)
    num_layers = len(names)
    if num_layers == 0:
        raise GrowthError("The model has no block_i to copy the structure of the new block.")
    if num_layers != config.num_layers:
        raise GrowthError(
            f"Parameters have {num_layers} blocks, config.num_layers is {config.num_layers}."
        )
    position = num_layers if position is None else position
    if not 0 <= position <= num_layers:
        raise GrowthError(f"add_layer@{position}: position must be in 0..{num_layers}.")

    zero = frozenset(_zero_paths(params[_TEMPLATE]))
    new_config = dataclasses.replace(config, num_layers=num_layers + 1)
    return Step(new_config, DepthGrowth(position, zero))
