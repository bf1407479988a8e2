"""FLOPs of a path: XLA's cost analysis of its forward pass (the score's compute term).

Scale control can charge a path for its compute as well as its parameters
(`SearchConfig.flops_scale`); the figure is the FLOPs of one example through the path's
forward pass, as XLA counts them, cached by architecture.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np

from evolution.search.paths import candidate
from evolution.system import families


def _shape_signature(tree: Any) -> tuple[Any, ...]:
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    return (treedef, tuple((np.shape(x), np.dtype(x).name) for x in leaves))


# (config, slots, parameter shapes) -> FLOPs per example.
_CACHE: dict[Any, float] = {}


def path_flops(
    config: families.ModelConfig,
    components: Sequence[tuple[str, str]],
    params_of: Callable[[str], Any],
) -> float:
    """FLOPs of one example through a path, from XLA's cost analysis of its forward pass.

    Cached by architecture (config, slots and parameter shapes), so each distinct shape
    is lowered once per process.

    Args:
      config: the path's config (any `evolution.system.families` model).
      components: its (slot, component id) pairs.
      params_of: component id -> parameters (shapes are all that is read).

    Returns:
      The forward pass's FLOPs for a batch of one.
    """
    slots = tuple(slot for slot, _ in components)
    shapes = {
        slot: jax.tree_util.tree_map(
            lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype),
            nn.unbox(params_of(cid)),
        )
        for slot, cid in components
    }
    key = (config, slots, _shape_signature(shapes))
    if key not in _CACHE:
        inputs = families.family_of(config).input_spec(config)
        lowered = jax.jit(functools.partial(candidate.forward, config, slots)).lower(shapes, inputs)
        cost = lowered.cost_analysis()
        if isinstance(cost, list | tuple):  # older JAX: one dict per computation
            cost = cost[0]
        if not cost or "flops" not in cost:
            raise RuntimeError(f"XLA's cost analysis gave no FLOPs for a path of {slots}.")
        _CACHE[key] = float(cost["flops"])
    return _CACHE[key]
