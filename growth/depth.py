"""Transformation 6: depth L -> L+1, an identity block inserted at any position.

In a pre-norm block ``x + attn(N1(x))`` and ``x' + mlp(N2(x'))``, zero output
projections (every attention ``out`` kernel and bias, including cross-attention, and the
MLP ``wo`` kernel and bias) make both residual branches exactly 0, so the block is the
identity bit for bit; every other new parameter is free. Blocks at or after the
position are renumbered ``block_{i+1}``. Post-norm blocks are refused (``growth.rules``).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from growth.draws import (
    Fill,
    Free,
    LeafKey,
    draw_free,
    leaf_keys,
    path_seed,
    write_new,
    writes_every_entry,
)
from growth.layout import block_index, block_names, default_free, is_attention, is_mlp, modules
from growth.ops import (
    FIRST_MOMENT,
    PARAM,
    SECOND_MOMENT,
    Path,
    Step,
    flatten,
    leaf_shape,
    run_tasks,
    unflatten,
)
from growth.rules import GrowthError, choose, traits_of
from growth.transfer import aligned_empty, aligned_zeros, to_device


def _zero_paths(block: Mapping) -> set[tuple[str, ...]]:
    """Paths (inside a block) that must be zero for the block to be the identity."""
    zero: set[tuple[str, ...]] = set()
    for apath in modules(block, is_attention):
        zero.update(apath + ("out", leaf) for leaf in ("kernel", "bias"))
    for mpath in modules(block, is_mlp):
        zero.update(mpath + ("wo", leaf) for leaf in ("kernel", "bias"))
    if not zero:
        raise GrowthError("The block template has no attention or MLP output projection.")
    return zero


def _new_block(template: Mapping, role: str, key: jax.Array, fill: Fill) -> dict:
    """A block shaped like ``template``: free entries drawn (PARAM), fixed ones zero.

    Each free leaf draws from ``LeafKey(key, path_seed(path)).leaf_rng()`` (a callable
    ``fill`` gets its ``leaf_key()``); leaves are drawn on the thread pool when there is
    enough work, into aligned buffers, and all of them go to JAX in one transfer.
    """
    zero = _zero_paths(template)
    out: dict[Path, Any] = {}
    boxes: dict[Path, Any] = {}
    drawn: list[Path] = []  # free leaves drawn by the tasks
    tasks: list[functools.partial[np.ndarray]] = []
    sizes: list[int] = []
    for path, leaf in flatten(template).items():
        boxed = hasattr(leaf, "replace_boxed")
        value = leaf.unbox() if boxed else leaf
        if not hasattr(value, "shape"):  # e.g. optax.MaskedNode
            out[path] = leaf
            continue
        shape, dtype = leaf_shape(value), value.dtype
        if boxed:
            boxes[path] = leaf
        if role != PARAM or path in zero:
            out[path] = aligned_zeros(shape, dtype)
            continue
        free = default_free(path, shape)
        if callable(fill) or isinstance(key, jax.core.Tracer):  # in order, as JAX values
            new = draw_free(LeafKey(key, path_seed(path)).leaf_key(), shape, dtype, free, fill)
            out[path] = jnp.asarray(new, dtype).reshape(shape)
            continue
        drawn.append(path)
        tasks.append(functools.partial(_free_leaf, shape, dtype, free, fill))
        sizes.append(math.prod(shape))
    keys = leaf_keys(key, [path_seed(path) for path in drawn], words=fill is None)
    tasks = [functools.partial(task, leaf_key) for task, leaf_key in zip(tasks, keys, strict=True)]
    out.update(zip(drawn, run_tasks(tasks, sizes), strict=True))
    host = [path for path, leaf in out.items() if isinstance(leaf, np.ndarray)]
    out.update(zip(host, to_device([out[path] for path in host]), strict=True))
    for path, box in boxes.items():
        out[path] = box.replace_boxed(out[path])
    return unflatten(out)


def _free_leaf(
    shape: tuple[int, ...], dtype: Any, value: Free, fill: Fill, leaf_key: LeafKey
) -> np.ndarray:
    """A new free leaf in an aligned buffer: a constant ``fill`` or the default initializer.

    The default draws come from ``leaf_key.leaf_rng()``.
    """
    allocate = aligned_empty if writes_every_entry(value, fill) else aligned_zeros
    out = allocate(shape, dtype)
    write_new(out, value, fill, leaf_key.leaf_key, leaf_key.leaf_rng)
    return out


def grow_depth(
    config: Any, params: Mapping, position: int | None, *, key: jax.Array, fill: Fill
) -> Step:
    """Plans the insertion of an identity block so that it becomes ``block_{position}``.

    Args:
      config: model config with ``num_layers`` and ``norm_placement`` "pre".
      params: the model parameters (the new block copies the structure of ``block_0``).
      position: 0..L (0 = before the first block, L or None = after the last).
      key: PRNG key for the new block's free parameters.
      fill: constant, callable or None for the default initializers (free entries only).

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

    def grow(tree: Mapping, role: str) -> dict:
        if role not in (PARAM, FIRST_MOMENT, SECOND_MOMENT):
            raise ValueError(f"Unknown role {role!r}.")
        out = {}
        for name, value in tree.items():
            index = block_index(name)
            if index is not None and index >= position:
                name = f"block_{index + 1}"
            out[name] = value
        out[f"block_{position}"] = _new_block(tree["block_0"], role, key, fill)
        return out

    new_config = dataclasses.replace(config, num_layers=num_layers + 1)
    return Step(new_config, grow)
