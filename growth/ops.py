"""Elementary per-leaf operations that every expansion is built from.

An expansion is described as data before it touches any array: for each parameter leaf
(addressed by its path in the flattened parameter dict) a short tuple of operations that
grow or rescale it. The same description is then applied to the parameters and, with a
different *role*, to every optimizer-state tree that mirrors the parameters, which is what
keeps parameter growth and optimizer-state growth consistent by construction.

Roles:
  * ``PARAM``: parameters. New free entries come from the initializer (or ``fill``), new
    fixed entries are zero, scalings multiply.
  * ``FIRST_MOMENT``: first-moment-like state (Adam ``mu``, momentum ``trace``). New
    entries are 0, an entry scaled by ``c`` is scaled by ``c``.
  * ``SECOND_MOMENT``: second-moment-like state (Adam ``nu``). New entries are 0, an
    entry scaled by ``c`` is scaled by ``c**2``.

The values of new free entries come from ``growth.draws``; grown leaves are written on the
host (a thread pool for large passes) and handed to JAX by ``growth.transfer``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import queue
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NamedTuple

import flax
import jax
import jax.numpy as jnp
import numpy as np
from flax.core import meta

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
from growth.transfer import aligned_empty, to_device, to_host

PARAM = "param"
FIRST_MOMENT = "first_moment"
SECOND_MOMENT = "second_moment"
ROLES = (PARAM, FIRST_MOMENT, SECOND_MOMENT)

Path = tuple[str, ...]
# The nodes of a parameter tree (``flatten`` descends into them; the rest are leaves).
TREE_NODES = (dict, flax.core.FrozenDict)


@dataclasses.dataclass(frozen=True)
class Zero:
    """New entries that must be exactly zero for the function to be preserved."""


@dataclasses.dataclass(frozen=True)
class Pad:
    """Append ``new_size - old_size`` entries at the end of ``axis``."""

    axis: int
    new_size: int
    value: Free | Zero


@dataclasses.dataclass(frozen=True)
class Scale:
    """Multiply the whole leaf by ``factor``."""

    factor: float


@dataclasses.dataclass(frozen=True, eq=False)
class Tile:
    """Concatenate ``copies`` copies of the leaf along ``axis``.

    Attributes:
      axis: the axis that is replicated.
      copies: the number of copies (the integer widening factor).
      split: None for plain copies, else float proportions of shape
        ``[copies, size_of_axis]`` summing to one over the copies: copy ``j`` of slice
        ``i`` is multiplied by ``split[j, i]``.
    """

    axis: int
    copies: int
    split: np.ndarray | None = None


Op = Pad | Scale | Tile
Plan = Mapping[Path, tuple[Op, ...]]


def _factor(factor: np.ndarray | float, role: str):
    return factor * factor if role == SECOND_MOMENT else factor


def apply_op(x: Any, op: Op, role: str, key: jax.Array, fill: Fill) -> Any:
    """Applies one operation to one array under a role (see module docstring).

    Args:
      x: the leaf: a numpy array, or a traced JAX array (inside ``jit``).
      op: the operation.
      role: PARAM, FIRST_MOMENT or SECOND_MOMENT.
      key: PRNG key for new free entries (used only for PARAM).
      fill: see ``draw_free``.

    Returns:
      The transformed leaf (numpy for numpy input).
    """
    xp = jnp if isinstance(x, jax.core.Tracer) else np
    if isinstance(op, Scale):
        return x * xp.asarray(_factor(op.factor, role), x.dtype)
    axis = op.axis % x.ndim
    if isinstance(op, Tile):
        if op.split is None:
            return xp.concatenate([x] * op.copies, axis=axis)
        bshape = [1] * x.ndim
        bshape[axis] = x.shape[axis]
        parts = [
            x * xp.asarray(_factor(op.split[j], role), x.dtype).reshape(bshape)
            for j in range(op.copies)
        ]
        return xp.concatenate(parts, axis=axis)
    extra = op.new_size - x.shape[axis]
    if extra < 0:
        raise ValueError(f"Pad to {op.new_size} would shrink axis {axis} of {x.shape}.")
    if extra == 0:
        return x
    shape = list(x.shape)
    shape[axis] = extra
    if role == PARAM and isinstance(op.value, Free):
        new = xp.asarray(draw_free(key, tuple(shape), x.dtype, op.value, fill), x.dtype)
        new = new.reshape(shape)
    else:
        new = xp.zeros(shape, x.dtype)
    return xp.concatenate([x, new], axis=axis)


class Stage(NamedTuple):
    """One width step as data: its plan and what its new free entries are drawn from.

    Attributes:
      plan: ``{path: ops}``.
      key: the step's PRNG key; op ``i`` of leaf ``path`` draws from
        ``LeafKey(key, path_seed(path)).op_rng(i)`` (or, with a callable fill, gets
        its ``op_key(i)``).
      fill: see ``draw_free``.
    """

    plan: Plan
    key: jax.Array
    fill: Fill


class _Staged(NamedTuple):
    """One op of a leaf with what its new free entries need (see ``Stage``)."""

    op: Op
    key: LeafKey
    position: int  # of the op in its step's ops for the leaf
    fill: Fill


def _final_shape(shape: tuple[int, ...], ops: Sequence[Op]) -> list[int]:
    final = list(shape)
    for op in ops:
        if isinstance(op, Tile):
            final[op.axis % len(final)] *= op.copies
        elif isinstance(op, Pad):
            axis = op.axis % len(final)
            if op.new_size < final[axis]:
                raise ValueError(
                    f"Pad to {op.new_size} would shrink axis {axis} of {tuple(final)}."
                )
            final[axis] = op.new_size
    return final


def _corner(shape: Sequence[int], axis: int = 0, start: int = 0, stop: int | None = None):
    """Index of the leading ``shape`` corner, with ``axis`` restricted to [start, stop)."""
    index: list[Any] = [slice(0, n) for n in shape]
    if stop is not None:
        index[axis] = slice(start, stop)
    return (*index, Ellipsis)  # Ellipsis: a 0-d view (not a scalar) for 0-d leaves


def _apply_ops_host(
    x: np.ndarray, ops: Sequence[_Staged], role: str, final: tuple[int, ...]
) -> np.ndarray:
    """``apply_op`` for every op, in one aligned output buffer of the final shape.

    The leaf always lives in the leading corner of the buffer: a Pad writes its new
    entries next to it (drawn free entries, or zeros: fixed ones and every new entry of a
    moment), a Scale multiplies it in place, a Tile writes copies 1.. and then scales copy
    0 in place. Every entry of the buffer is in the leaf's first corner or in the block of
    one Pad or Tile copy, so each is written once (the buffer is not zeroed first). Each
    element is computed by the same float32 operations as ``apply_op`` (bit-identical
    results, also for the ops of several steps, each op drawing from its own stream
    ``op_rng``), and the aligned buffer is handed to JAX without a copy.
    """
    out = aligned_empty(final, x.dtype)
    current = list(x.shape)
    out[_corner(current)] = x
    for op, leaf_key, i, fill in ops:
        if isinstance(op, Scale):
            region = out[_corner(current)]
            np.multiply(region, np.asarray(_factor(op.factor, role), x.dtype), out=region)
            continue
        axis = op.axis % x.ndim
        size = current[axis]
        if isinstance(op, Tile):
            region = out[_corner(current)]
            bshape = [1] * x.ndim
            bshape[axis] = size
            for j in reversed(range(op.copies)):  # copy 0 last: it overwrites the source
                target = out[_corner(current, axis, j * size, (j + 1) * size)]
                if op.split is not None:
                    factor = np.asarray(_factor(op.split[j], role), x.dtype).reshape(bshape)
                    np.multiply(region, factor, out=target)
                elif j:
                    target[...] = region
            current[axis] = size * op.copies
            continue
        if op.new_size == size:
            continue
        target = out[_corner(current, axis, size, op.new_size)]
        value = op.value if role == PARAM and isinstance(op.value, Free) else None
        if value is None or not writes_every_entry(value, fill):
            target[...] = 0
        if value is not None:
            key = functools.partial(leaf_key.op_key, i)
            write_new(target, value, fill, key, functools.partial(leaf_key.op_rng, i))
        current[axis] = op.new_size
    return out


# Tasks run on the calling thread alone unless those of at least _LARGE_TASK entries add
# up to _PARALLEL_WORK: small tasks are mostly Python, which holds the lock that threads
# share, and handing them to a worker costs more than it saves.
_LARGE_TASK = 1 << 15
_PARALLEL_WORK = 1 << 18
_executors: dict[int, tuple[ThreadPoolExecutor | None, int]] = {}


def _executor() -> tuple[ThreadPoolExecutor, int] | None:
    """A thread pool with a worker per available core but one, and its number of workers.

    One per process (fork-safe), sized by the cores the process could use when it was
    made; None on a single core. The calling thread is the remaining worker (see
    ``run_tasks``).
    """
    pid = os.getpid()
    if pid not in _executors:
        _executors.clear()
        if hasattr(os, "sched_getaffinity"):
            workers = len(os.sched_getaffinity(0))
        else:
            workers = os.cpu_count() or 1
        helpers = min(workers, 32) - 1
        pool = ThreadPoolExecutor(helpers, thread_name_prefix="growth") if helpers else None
        _executors[pid] = (pool, helpers)
    pool, helpers = _executors[pid]
    return None if pool is None else (pool, helpers)


def run_tasks(tasks: Sequence[Callable[[], Any]], sizes: Sequence[int]) -> list[Any]:
    """Runs host tasks on this thread and the pool's workers, largest first.

    Every thread takes the next task from one shared queue (largest first, so the last
    ones to start are small), which balances uneven leaves and work of different cost per
    entry. Numpy releases the GIL in copies, arithmetic and random draws, so the leaves
    are grown in parallel. Every task writes only its own output and draws from its own
    generator: results do not depend on the schedule.

    Args:
      tasks: thunks.
      sizes: the work of each (e.g. output entries); all zero runs them here, in order
        (for tasks that must not run concurrently).

    Returns:
      The results, in the order of ``tasks``.
    """
    results: list[Any] = [None] * len(tasks)
    executor = _executor()
    large = sum(size for size in sizes if size >= _LARGE_TASK)
    if executor is None or len(tasks) < 2 or large < _PARALLEL_WORK:
        for i, task in enumerate(tasks):
            results[i] = task()
        return results
    pending: queue.SimpleQueue[int] = queue.SimpleQueue()
    for i in sorted(range(len(tasks)), key=lambda i: -sizes[i]):
        pending.put(i)

    def drain() -> None:
        while True:
            try:
                i = pending.get_nowait()
            except queue.Empty:
                return
            results[i] = tasks[i]()

    pool, workers = executor
    helpers = [pool.submit(drain) for _ in range(min(workers, len(tasks) - 1))]
    try:
        drain()
    finally:
        for helper in helpers:
            helper.result()
    return results


def flatten(tree: Mapping) -> dict[Path, Any]:
    """Flattens a nested (possibly frozen) dict into ``{path: leaf}``.

    What ``flax.traverse_util.flatten_dict(flax.core.unfreeze(tree))`` gives (empty dicts
    vanish), without copying the tree first.
    """
    flat: dict[Path, Any] = {}

    def walk(node: Mapping, prefix: Path) -> None:
        for name, child in node.items():
            if isinstance(child, TREE_NODES):
                walk(child, (*prefix, name))
            else:
                flat[(*prefix, name)] = child

    walk(tree, ())
    return flat


def unflatten(flat: Mapping[Path, Any]) -> dict:
    """Inverse of ``flatten`` (always returns plain dicts)."""
    tree: dict = {}
    for path, leaf in flat.items():
        node = tree
        for name in path[:-1]:
            node = node.setdefault(name, {})
        node[path[-1]] = leaf
    return tree


@dataclasses.dataclass
class _Job:
    """A host leaf to grow: its tree, where it goes back (a box, a JAX array), its ops."""

    tree: int
    path: Path
    host: np.ndarray
    ops: list[_Staged]
    role: str
    final: tuple[int, ...]
    box: meta.AxisMetadata | None
    was_jax: bool


def apply_stages(tree: Mapping, stages: Sequence[Stage], role: str) -> dict:
    """Applies the plans of width steps, one after the other, writing each leaf once.

    The result is bit-identical to applying the stages one by one (``apply_plan``), but
    a leaf touched by several stages is copied once, straight into its final shape.

    Args:
      tree: nested dict mirroring the parameters (parameters or an optimizer moment).
      stages: the steps' plans, keys and fills, in order; paths not in any plan are
        returned unchanged.
      role: PARAM, FIRST_MOMENT or SECOND_MOMENT.

    Returns:
      The transformed tree as plain nested dicts; grown JAX leaves are JAX arrays again
      (or noted for a ``growth.transfer.deferred_transfer``), numpy leaves stay numpy.

    Raises:
      KeyError: if a plan names a path that is not in the tree.
    """
    return apply_stages_to_trees([(tree, role)], stages)[0]


def apply_stages_to_trees(
    trees: Sequence[tuple[Mapping, str]], stages: Sequence[Stage]
) -> list[dict]:
    """``apply_stages`` on several trees at once (parameters and their moments).

    The ops of each leaf are gathered once for all trees, the leaves of all trees are
    grown by one ``run_tasks`` and handed to JAX in one transfer: the same results as
    one ``apply_stages`` per tree.

    Args:
      trees: ``(tree, role)`` pairs; every tree mirrors the parameters.
      stages: see ``apply_stages``.

    Returns:
      The transformed trees, in order.

    Raises:
      KeyError: if a plan names a path that is not in a tree.
    """
    for _, role in trees:
        if role not in ROLES:
            raise ValueError(f"Unknown role {role!r}; expected one of {ROLES}.")
    flats = [flatten(tree) for tree, _ in trees]
    draws = any(role == PARAM for _, role in trees)
    staged: dict[Path, list[_Staged]] = {}
    for plan, key, fill in stages:
        for flat in flats:
            missing = [p for p in plan if p not in flat]
            if missing:
                raise KeyError(f"Growth plan names parameters that do not exist: {missing[:5]}")
        keys = leaf_keys(key, [path_seed(path) for path in plan], words=draws)
        for (path, ops), leaf_key in zip(plan.items(), keys, strict=True):
            staged.setdefault(path, []).extend(
                _Staged(op, leaf_key, i, fill) for i, op in enumerate(ops)
            )
    outs = [dict(flat) for flat in flats]
    jobs: list[_Job] = []
    for index, ((_, role), flat) in enumerate(zip(trees, flats, strict=True)):
        for path, leaf_ops in staged.items():
            leaf = flat[path]
            box = leaf if isinstance(leaf, meta.AxisMetadata) else None
            value = leaf.unbox() if box is not None else leaf
            if not leaf_ops or not hasattr(value, "shape"):  # e.g. optax.MaskedNode
                continue
            host, was_jax = to_host(value)
            if isinstance(host, np.ndarray):
                final = tuple(_final_shape(host.shape, [s.op for s in leaf_ops]))
                jobs.append(_Job(index, path, host, leaf_ops, role, final, box, was_jax))
                continue
            for op, leaf_key, i, fill in leaf_ops:  # traced (inside jit): one op at a time
                value = apply_op(value, op, role, leaf_key.op_key(i), fill)
            outs[index][path] = value if box is None else box.replace_boxed(value)
    # A callable fill runs here, in order (it may not be thread-safe).
    serial = draws and any(callable(stage.fill) for stage in stages)
    grown = run_tasks(
        [
            functools.partial(_apply_ops_host, job.host, job.ops, job.role, job.final)
            for job in jobs
        ],
        [0 if serial else math.prod(job.final) for job in jobs],
    )
    to_place = [i for i, job in enumerate(jobs) if job.was_jax]
    placed = dict(zip(to_place, to_device([grown[i] for i in to_place]), strict=True))
    for i, job in enumerate(jobs):
        new = placed.get(i, grown[i])
        outs[job.tree][job.path] = new if job.box is None else job.box.replace_boxed(new)
    return [unflatten(out) for out in outs]


def apply_plan(tree: Mapping, plan: Plan, role: str, key: jax.Array, fill: Fill = None) -> dict:
    """Applies a plan to a parameter-shaped tree.

    Args:
      tree: nested dict mirroring the parameters (parameters or an optimizer moment).
      plan: ``{path: ops}``; paths not in the plan are returned unchanged.
      role: PARAM, FIRST_MOMENT or SECOND_MOMENT.
      key: PRNG key; each leaf draws from ``fold_in(key, crc32(path))``.
      fill: see ``draw_free``.

    Returns:
      The transformed tree as plain nested dicts.

    Raises:
      KeyError: if the plan names a path that is not in the tree.
    """
    return apply_stages(tree, (Stage(plan, key, fill),), role)


def leaf_shape(leaf: Any) -> tuple[int, ...]:
    """Shape of a (possibly boxed) leaf."""
    if isinstance(leaf, meta.AxisMetadata):
        leaf = leaf.unbox()
    return tuple(leaf.shape)


@dataclasses.dataclass(frozen=True, slots=True)
class Abstract:
    """A leaf's shape and dtype (a light ``jax.ShapeDtypeStruct``; a pytree leaf)."""

    shape: tuple[int, ...]
    dtype: Any


def abstract(tree: Mapping) -> dict:
    """The tree with every array leaf replaced by its ``Abstract`` (boxes dropped).

    Width steps are planned from names and shapes only, so several can be planned ahead
    of applying them together (``fuse_steps``).
    """
    out = {}
    for path, leaf in flatten(tree).items():
        value = leaf.unbox() if isinstance(leaf, meta.AxisMetadata) else leaf
        if hasattr(value, "shape"):
            value = Abstract(tuple(value.shape), value.dtype)
        out[path] = value
    return unflatten(out)


def grow_abstract(tree: Mapping, step: Step) -> dict:
    """The shapes of ``abstract(tree)`` after a width step (``abstract`` of its result).

    Raises:
      ValueError: for a step without stages (depth growth) or an op that shrinks.
    """
    if not step.stages:
        raise ValueError("Only width steps (with a plan) can be applied to shapes.")
    flat = flatten(tree)
    for plan, _, _ in step.stages:
        for path, ops in plan.items():
            leaf = flat[path]
            flat[path] = Abstract(tuple(_final_shape(leaf.shape, ops)), leaf.dtype)
    return unflatten(flat)


@dataclasses.dataclass(frozen=True)
class Step:
    """One planned expansion: the new config and how to grow any parameter-shaped tree.

    Attributes:
      config: the model config after this step.
      grow: ``grow(tree, role) -> tree``; the same map for parameters (role PARAM) and
        for optimizer moments (FIRST_MOMENT, SECOND_MOMENT), with the same random draws.
      stages: for width steps, the plan(s) that ``grow`` applies (one per fused step);
        empty for depth growth, which adds leaves.
    """

    config: Any
    grow: Callable[[Mapping, str], dict]
    stages: tuple[Stage, ...] = ()

    def grow_trees(self, trees: Sequence[tuple[Mapping, str]]) -> list[dict]:
        """``[grow(tree, role) for tree, role in trees]``; width steps grow all at once.

        Args:
          trees: ``(tree, role)`` pairs (the parameters and their optimizer moments).

        Returns:
          The grown trees, in order.
        """
        if self.stages:
            return apply_stages_to_trees(trees, self.stages)
        return [self.grow(tree, role) for tree, role in trees]


def plan_step(config: Any, plan: Plan, key: jax.Array, fill: Fill) -> Step:
    """A ``Step`` that applies a fixed plan (all width expansions).

    Args:
      config: the new config.
      plan: ``{path: ops}``.
      key: PRNG key for new free entries.
      fill: see ``draw_free``.

    Returns:
      The step.
    """
    stages = (Stage(plan, key, fill),)
    return Step(config, lambda tree, role: apply_stages(tree, stages, role), stages)


def fuse_steps(steps: Sequence[Step]) -> Step:
    """One step for consecutive width steps: each leaf is written once, in its final shape.

    Bit-identical to applying the steps one after the other (each op keeps its step's key
    and fill), which rewrites a leaf once per step that touches it.

    Args:
      steps: width steps (with stages), in order, each planned on the shapes that the
        previous ones produce (``grow_abstract``).

    Returns:
      The fused step (the config of the last one).

    Raises:
      ValueError: if a step has no stages (depth growth cannot be fused).
    """
    if not steps or any(not step.stages for step in steps):
        raise ValueError("Only width steps (with a plan) can be fused.")
    stages = tuple(stage for step in steps for stage in step.stages)
    return Step(steps[-1].config, lambda tree, role: apply_stages(tree, stages, role), stages)
