"""Transformations 2-4: attention heads, value size and key/query size.

Kernels: ``query``/``key``/``value`` are ``[embed, heads, kv]``, ``out`` is
``[heads, kv, embed]``; biases, where present, are ``[heads, kv]`` (and ``[embed]`` for
``out``, which none of these transformations touches). Every attention-like module in the
tree is grown (self- and cross-attention alike).

* heads E -> E': new heads' query/key/value (and biases) are free; their ``out`` rows
  are zero, so the new heads add nothing.
* value size v -> v': new value columns (and bias) free; the new ``out`` rows are zero.
* key/query size k -> k': new query columns (and bias) free; new key columns (and key
  bias) zero, so the logits q.k are unchanged; with runtime 1/sqrt(k) scaling the old
  key kernel and key bias are multiplied by sqrt(k'/k) to undo the new temperature.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

from growth.layout import default_free, is_attention, leaf_shape_at, modules
from growth.ops import Free, Op, Pad, Scale, Step, WidthGrowth, Zero
from growth.rules import QK_RESCALE, GrowthError, check_grows, traits_of


def _attention_leaves(params: Mapping, *projections: str) -> list[list[tuple[str, ...]]]:
    """Per projection, the paths of its kernel and bias (if any) in every attention module.

    The attention modules are found once for all the projections.
    """
    found = modules(params, is_attention)
    if not found:
        raise GrowthError("No attention module found (expected query/key/value/out).")
    paths: list[list[tuple[str, ...]]] = [[] for _ in projections]
    for apath in found:
        module = params
        for name in apath:
            module = module[name]
        for out, projection in zip(paths, projections, strict=True):
            out.extend(apath + (projection, leaf) for leaf in sorted(module[projection]))
    return paths


def _check(params: Mapping, path, axis: int, expected: int, field: str) -> tuple[int, ...]:
    shape = leaf_shape_at(params, path)
    if shape[axis] != expected:
        raise GrowthError(f"{'/'.join(path)} has shape {shape}, not {field}={expected}.")
    return shape


def _free_pad(params, path, axis: int, new_size: int) -> Pad:
    shape = leaf_shape_at(params, path)
    value = default_free(path, shape) if path[-1] == "kernel" else Free()
    return Pad(axis, new_size, value)


def grow_num_heads(config: Any, params: Mapping, new_size: int) -> Step:
    """Plans the growth of the number of attention heads to ``new_size``.

    Args:
      config: model config with ``num_heads``.
      params: the model parameters (their shapes suffice).
      new_size: the new number of heads E'.

    Returns:
      The step (new config and the map for parameters and optimizer moments).

    Raises:
      GrowthError: on shrinking or if the parameters do not match the config.
    """
    old = config.num_heads
    check_grows("num_heads", old, new_size)
    plan: dict[tuple[str, ...], tuple[Op, ...]] = {}
    *qkv, out = _attention_leaves(params, "query", "key", "value", "out")
    for paths in qkv:
        for path in paths:
            axis = 1 if path[-1] == "kernel" else 0
            _check(params, path, axis, old, "num_heads")
            plan[path] = (_free_pad(params, path, axis, new_size),)
    for path in out:
        if path[-1] == "kernel":
            _check(params, path, 0, old, "num_heads")
            plan[path] = (Pad(0, new_size, Zero()),)
    return Step(dataclasses.replace(config, num_heads=new_size), WidthGrowth(tuple(plan.items())))


def grow_v_dim(config: Any, params: Mapping, new_size: int) -> Step:
    """Plans the growth of the per-head value size to ``new_size``.

    Args:
      config: model config with ``v_dim``.
      params: the model parameters (their shapes suffice).
      new_size: the new value size v'.

    Returns:
      The step (new config and the map for parameters and optimizer moments).

    Raises:
      GrowthError: on shrinking or if the parameters do not match the config.
    """
    old = config.v_dim
    check_grows("v_dim", old, new_size)
    plan: dict[tuple[str, ...], tuple[Op, ...]] = {}
    values, out = _attention_leaves(params, "value", "out")
    for path in values:
        axis = 2 if path[-1] == "kernel" else 1
        _check(params, path, axis, old, "v_dim")
        plan[path] = (_free_pad(params, path, axis, new_size),)
    for path in out:
        if path[-1] == "kernel":
            _check(params, path, 1, old, "v_dim")
            plan[path] = (Pad(1, new_size, Zero()),)
    return Step(dataclasses.replace(config, v_dim=new_size), WidthGrowth(tuple(plan.items())))


def grow_qk_dim(config: Any, params: Mapping, new_size: int) -> Step:
    """Plans the growth of the per-head key/query size to ``new_size``.

    Args:
      config: model config with ``qk_dim`` and ``attention_scaling``.
      params: the model parameters (their shapes suffice).
      new_size: the new key/query size k'.

    Returns:
      The step (new config and the map for parameters and optimizer moments).

    Raises:
      GrowthError: on shrinking or if the parameters do not match the config.
    """
    old = config.qk_dim
    check_grows("qk_dim", old, new_size)
    rescale = QK_RESCALE[traits_of(config).attention_scaling] and new_size != old
    plan: dict[tuple[str, ...], tuple[Op, ...]] = {}
    queries, keys = _attention_leaves(params, "query", "key")
    for path in queries:
        axis = 2 if path[-1] == "kernel" else 1
        _check(params, path, axis, old, "qk_dim")
        plan[path] = (_free_pad(params, path, axis, new_size),)
    for path in keys:
        axis = 2 if path[-1] == "kernel" else 1
        _check(params, path, axis, old, "qk_dim")
        scale = (Scale(math.sqrt(new_size / old)),) if rescale else ()
        plan[path] = (*scale, Pad(axis, new_size, Zero()))
    return Step(dataclasses.replace(config, qk_dim=new_size), WidthGrowth(tuple(plan.items())))
