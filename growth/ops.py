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
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import zlib
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NamedTuple

import flax
import jax
import jax.numpy as jnp
import numpy as np
from flax.core import meta

PARAM = "param"
FIRST_MOMENT = "first_moment"
SECOND_MOMENT = "second_moment"
ROLES = (PARAM, FIRST_MOMENT, SECOND_MOMENT)

Path = tuple[str, ...]
# A constant for every free entry, a callable ``(key, shape, dtype) -> array``, or None for
# the default initializer of each leaf.
Fill = float | Callable[[jax.Array, tuple[int, ...], Any], jax.Array] | None


@dataclasses.dataclass(frozen=True)
class Free:
    """New entries whose value does not change the function.

    Attributes:
      mean: default value of the new entries (1 for norm gains, 0 otherwise).
      stddev: standard deviation of the default normal initializer (0 for biases/gains).
    """

    mean: float = 0.0
    stddev: float = 0.0


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


def path_seed(path: Path) -> int:
    """A stable 31-bit integer for a leaf path (used to fold keys per leaf)."""
    return zlib.crc32("/".join(path).encode()) & 0x7FFFFFFF


def numpy_rng(key: jax.Array) -> np.random.Generator:
    """A numpy Generator seeded by a (concrete) JAX PRNG key.

    Surgery runs on the host in numpy: drawing with ``jax.random`` would compile once per
    new shape, which dominates the cost of growing a small model.
    """
    data = np.asarray(jax.random.key_data(key)).astype(np.uint64).ravel()
    return np.random.default_rng(data.tolist())


def draw_free(key: jax.Array, shape: tuple[int, ...], dtype: Any, value: Free, fill: Fill):
    """Values for new free entries.

    Args:
      key: PRNG key for this leaf.
      shape: shape of the block of new entries.
      dtype: dtype of the leaf.
      value: the leaf's default initializer.
      fill: overrides the default: a constant or a callable ``(key, shape, dtype)``.

    Returns:
      An array of ``shape`` and ``dtype`` (numpy unless ``fill`` returns a JAX array or
      the key is traced).
    """
    if callable(fill):
        return fill(key, shape, dtype)
    if fill is not None:
        return np.full(shape, fill, dtype)
    if isinstance(key, jax.core.Tracer):
        traced = jax.random.normal(key, shape, jnp.float32)
        return (value.mean + value.stddev * traced).astype(dtype)
    return _draw_normal(None if value.stddev == 0 else numpy_rng(key), shape, dtype, value)


def _draw_normal(
    rng: np.random.Generator | None, shape: tuple[int, ...], dtype: Any, value: Free
) -> np.ndarray:
    if value.stddev == 0:
        # mean + 0 * noise is exactly mean (a negative noise gives -0.0, and -0.0 + mean
        # == mean, also for mean 0): the same values without drawing the noise.
        return np.full(shape, np.float32(value.mean)).astype(dtype, copy=False)
    assert rng is not None
    noise = rng.standard_normal(shape, dtype=np.float32)
    # In place: the float32 operations of mean + stddev * noise, without temporaries.
    noise *= np.float32(value.stddev)
    noise += np.float32(value.mean)
    return noise.astype(dtype, copy=False)


# Normal draws are made in blocks of about this many entries, which stay in the cache
# between the draw, the scaling and the store into the output.
_DRAW_BLOCK = 1 << 15


def _fill_free(target: np.ndarray, value: Free, rng: Callable[[], np.random.Generator]) -> None:
    """Writes the default initializer's values into a zero block (see ``_draw_normal``).

    The values are bit-identical to ``_draw_normal(rng(), target.shape, dtype, value)``:
    the generator is consumed in C order whatever the blocks, and each entry is computed
    by the same float32 operations. Entries equal to +0.0 are not written (the block is
    zero already), and ``rng`` is called only when noise is needed.

    Args:
      target: a block of a zero-initialised output (any strides).
      value: the leaf's default initializer.
      rng: returns the generator of these entries.
    """
    if value.stddev == 0:
        if value.mean != 0 or math.copysign(1.0, value.mean) < 0:
            target[...] = np.full((), np.float32(value.mean)).astype(target.dtype)
        return
    if target.dtype != np.float32 or target.ndim == 0:
        target[...] = _draw_normal(rng(), target.shape, target.dtype, value)
        return
    generator = rng()
    stddev, mean = np.float32(value.stddev), np.float32(value.mean)
    rows = target.shape[0]
    per_row = target.size // rows if rows else 1
    step = max(1, _DRAW_BLOCK // max(per_row, 1))
    for start in range(0, rows, step):
        block = target[start : start + step]
        noise = generator.standard_normal(block.shape, dtype=np.float32)
        noise *= stddev
        np.add(noise, mean, out=block)


def write_new(
    target: np.ndarray,
    value: Free,
    fill: Fill,
    key: Callable[[], jax.Array],
    rng: Callable[[], np.random.Generator],
) -> None:
    """Writes new free entries into a zero block: what ``draw_free`` gives, bit for bit.

    Args:
      target: the block (zero on entry).
      value: the leaf's default initializer.
      fill: see ``draw_free``.
      key: returns the JAX key of these entries (for a callable ``fill``).
      rng: returns their numpy generator (for the default initializer).
    """
    if fill is None:
        _fill_free(target, value, rng)
    elif callable(fill):
        new = fill(key(), target.shape, target.dtype)
        target[...] = np.asarray(new, target.dtype).reshape(target.shape)
    else:
        target[...] = np.full((), fill, target.dtype)  # np.full's cast, once


@jax.jit
def _op_key_data(key: jax.Array, seed: jax.Array, index: jax.Array) -> jax.Array:
    # One compiled dispatch instead of three eager ones (two fold_ins and key_data).
    return jax.random.key_data(jax.random.fold_in(jax.random.fold_in(key, seed), index))


@jax.jit
def _leaf_key_data(key: jax.Array, seed: jax.Array) -> jax.Array:
    return jax.random.key_data(jax.random.fold_in(key, seed))


@jax.jit
def _op_keys_data(key: jax.Array, seeds: jax.Array, indices: jax.Array) -> jax.Array:
    return jax.vmap(lambda seed, index: _op_key_data(key, seed, index))(seeds, indices)


@jax.jit
def _leaf_keys_data(key: jax.Array, seeds: jax.Array) -> jax.Array:
    return jax.vmap(lambda seed: _leaf_key_data(key, seed))(seeds)


def batch_key_data(
    key: jax.Array, seeds: Sequence[int], indices: Sequence[int] | None = None
) -> np.ndarray:
    """``key_data`` of many leaf keys (or op keys) of one key, in one dispatch.

    Row ``j`` is ``key_data(fold_in(key, seeds[j]))``, or with ``indices``
    ``key_data(fold_in(fold_in(key, seeds[j]), indices[j]))``: the same integer
    arithmetic as one key at a time, bit for bit. Batches are padded to powers of two so
    that few sizes are compiled.
    """
    count = len(seeds)
    size = max(8, 1 << max(count - 1, 0).bit_length())
    padded_seeds = np.zeros(size, np.uint32)
    padded_seeds[:count] = seeds
    if indices is None:
        data = _leaf_keys_data(key, padded_seeds)
    else:
        padded_indices = np.zeros(size, np.uint32)
        padded_indices[:count] = indices
        data = _op_keys_data(key, padded_seeds, padded_indices)
    return np.asarray(data)[:count]


_KEYS_PER_CALL = 8


@jax.jit
def _fold_in_block(key: jax.Array, start: jax.Array) -> tuple[jax.Array, ...]:
    return tuple(jax.random.fold_in(key, start + i) for i in range(_KEYS_PER_CALL))


def fold_in_range(key: jax.Array, count: int) -> list[jax.Array]:
    """``[jax.random.fold_in(key, i) for i in range(count)]``, bit for bit, in few dispatches."""
    if isinstance(key, jax.core.Tracer):
        return [jax.random.fold_in(key, i) for i in range(count)]
    keys: list[jax.Array] = []
    for start in range(0, count, _KEYS_PER_CALL):
        keys.extend(_fold_in_block(key, np.uint32(start)))
    return keys[:count]


def generator(data: np.ndarray | jax.Array) -> np.random.Generator:
    """The numpy Generator that ``numpy_rng`` gives for a key with this ``key_data``."""
    return np.random.default_rng(np.asarray(data).astype(np.uint64).ravel().tolist())


@dataclasses.dataclass(frozen=True)
class LeafKey:
    """A leaf's key ``fold_in(key, seed)``, derived only when a draw needs it.

    Deriving keys is a JAX dispatch each, which would otherwise dominate the cost of
    growing a small model; op ``i`` of the leaf draws from ``fold_in(leaf key, i)``.
    """

    key: jax.Array
    seed: int

    def leaf_key(self) -> jax.Array:
        """The leaf's key ``fold_in(key, seed)``."""
        return jax.random.fold_in(self.key, self.seed)

    def rng(self) -> np.random.Generator:
        """``numpy_rng(self.leaf_key())``, in one dispatch."""
        if isinstance(self.key, jax.core.Tracer):
            return numpy_rng(self.leaf_key())
        return generator(_leaf_key_data(self.key, np.uint32(self.seed)))

    def op_key(self, index: int) -> jax.Array:
        """The key of op ``index`` of this leaf."""
        return jax.random.fold_in(self.leaf_key(), index)

    def op_rng(self, index: int) -> np.random.Generator:
        """``numpy_rng(self.op_key(index))``, in one dispatch."""
        if isinstance(self.key, jax.core.Tracer):
            return numpy_rng(self.op_key(index))
        return generator(_op_key_data(self.key, np.uint32(self.seed), np.uint32(index)))


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


def to_host(leaf: Any) -> tuple[Any, bool]:
    """A concrete JAX array as numpy (and whether it was one); anything else unchanged."""
    if isinstance(leaf, jax.Array) and not isinstance(leaf, jax.core.Tracer):
        return np.asarray(leaf), True
    return leaf, False


# JAX's CPU client adopts host buffers aligned to this many bytes without copying them
# (numpy aligns large arrays to 16 bytes only, and those are copied element by element).
_ALIGNMENT = 64


def _aligned(shape: tuple[int, ...], dtype: Any, allocate: Callable) -> np.ndarray:
    dtype = np.dtype(dtype)
    nbytes = math.prod(shape) * dtype.itemsize
    raw = allocate(nbytes + _ALIGNMENT, np.uint8)
    offset = -raw.ctypes.data % _ALIGNMENT
    return raw[offset : offset + nbytes].view(dtype).reshape(shape)


def aligned_empty(shape: tuple[int, ...], dtype: Any) -> np.ndarray:
    """An uninitialised numpy array whose data is 64-byte aligned (see ``_ALIGNMENT``)."""
    return _aligned(shape, dtype, np.empty)


def aligned_zeros(shape: tuple[int, ...], dtype: Any) -> np.ndarray:
    """A zero numpy array whose data is 64-byte aligned (see ``_ALIGNMENT``).

    Large ones come from ``calloc``: fresh pages that the kernel zeroes when they are
    first touched, so zero entries cost no write of their own.
    """
    return _aligned(shape, dtype, np.zeros)


class Stage(NamedTuple):
    """One width step as data: its plan and what its new free entries are drawn from.

    Attributes:
      plan: ``{path: ops}``.
      key: the step's PRNG key; op ``i`` of leaf ``path`` draws from
        ``fold_in(fold_in(key, crc32(path)), i)``.
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
    key_data: np.ndarray | None = None  # of the op's key, when derived in a batch


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
    """``apply_op`` for every op, in one aligned zero output buffer of the final shape.

    The leaf always lives in the leading corner of the buffer: a Pad writes its new
    entries next to it, a Scale multiplies it in place, a Tile writes copies 1.. and then
    scales copy 0 in place. Everything outside the corner is still zero, so zero entries
    (fixed ones, and every new entry of a moment) are not written at all. Each element is
    computed by the same float32 operations as ``apply_op`` with each op's own key
    (bit-identical results, also for the ops of several steps) but written once, and the
    aligned buffer is handed to JAX without a copy.
    """
    out = aligned_zeros(final, x.dtype)
    current = list(x.shape)
    out[_corner(current)] = x
    for op, leaf_key, i, fill, key_data in ops:
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
        if role == PARAM and isinstance(op.value, Free):
            target = out[_corner(current, axis, size, op.new_size)]
            key = functools.partial(leaf_key.op_key, i)
            if key_data is None:
                rng = functools.partial(leaf_key.op_rng, i)
            else:
                rng = functools.partial(generator, key_data)
            write_new(target, op.value, fill, key, rng)
        current[axis] = op.new_size
    return out


# Leaves with at least this many entries (after growth) go to the thread pool.
_PARALLEL_SIZE = 1 << 16
_executors: dict[int, ThreadPoolExecutor] = {}


def _executor() -> ThreadPoolExecutor | None:
    """A thread pool with a worker per available core (one per process: fork-safe)."""
    workers = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    if not workers or workers < 2:
        return None
    pid = os.getpid()
    if pid not in _executors:
        _executors.clear()
        _executors[pid] = ThreadPoolExecutor(min(workers, 32), thread_name_prefix="growth")
    return _executors[pid]


def run_tasks(tasks: Sequence[Callable[[], Any]], sizes: Sequence[int]) -> list[Any]:
    """Runs host tasks, large ones on a thread pool (largest first), small ones here.

    Numpy releases the GIL in copies, arithmetic and random draws, so the leaves of a
    large model are grown in parallel. Every task writes only its own output and draws
    from its own generator: results do not depend on the schedule.

    Args:
      tasks: thunks.
      sizes: the work of each (e.g. output entries).

    Returns:
      The results, in the order of ``tasks``.
    """
    pool = _executor()
    big = [i for i, size in enumerate(sizes) if size >= _PARALLEL_SIZE] if pool else []
    if len(big) < 2:  # one large task: no gain from a worker
        big = []
    futures = {}
    for i in sorted(big, key=lambda i: -sizes[i]):
        assert pool is not None
        futures[i] = pool.submit(tasks[i])
    results = [None if i in futures else task() for i, task in enumerate(tasks)]
    for i, future in futures.items():
        results[i] = future.result()
    return results


def to_device(arrays: Sequence[np.ndarray]) -> list[jax.Array]:
    """Host arrays as JAX arrays, in one transfer (aligned CPU buffers are not copied)."""
    return list(jax.device_put(list(arrays))) if arrays else []


def flatten(tree: Mapping) -> dict[Path, Any]:
    """Flattens a nested (possibly frozen) dict into ``{path: leaf}``.

    What ``flax.traverse_util.flatten_dict(flax.core.unfreeze(tree))`` gives (empty dicts
    vanish), without copying the tree first.
    """
    flat: dict[Path, Any] = {}

    def walk(node: Mapping, prefix: Path) -> None:
        for name, child in node.items():
            if isinstance(child, dict | flax.core.FrozenDict):
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
    """A host leaf to grow: where it goes back (a box, a JAX array) and its ops."""

    path: Path
    host: np.ndarray
    ops: list[_Staged]
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
      The transformed tree as plain nested dicts; grown JAX leaves are JAX arrays again,
      numpy leaves stay numpy.

    Raises:
      KeyError: if a plan names a path that is not in the tree.
    """
    if role not in ROLES:
        raise ValueError(f"Unknown role {role!r}; expected one of {ROLES}.")
    flat = flatten(tree)
    staged: dict[Path, list[_Staged]] = {}
    for plan, key, fill in stages:
        missing = [p for p in plan if p not in flat]
        if missing:
            raise KeyError(f"Growth plan names parameters that do not exist: {missing[:5]}")
        for path, ops in plan.items():
            leaf_key = LeafKey(key, path_seed(path))
            staged.setdefault(path, []).extend(
                _Staged(op, leaf_key, i, fill) for i, op in enumerate(ops)
            )
    out = dict(flat)
    jobs: list[_Job] = []
    for path, leaf_ops in staged.items():
        leaf = flat[path]
        box = leaf if isinstance(leaf, meta.AxisMetadata) else None
        value = leaf.unbox() if box is not None else leaf
        if not leaf_ops or not hasattr(value, "shape"):  # e.g. optax.MaskedNode
            continue
        host, was_jax = to_host(value)
        if isinstance(host, np.ndarray):
            final = tuple(_final_shape(host.shape, [s.op for s in leaf_ops]))
            jobs.append(_Job(path, host, leaf_ops, final, box, was_jax))
            continue
        for op, leaf_key, i, fill, _ in leaf_ops:  # traced (inside jit): one op at a time
            value = apply_op(value, op, role, leaf_key.op_key(i), fill)
        out[path] = value if box is None else box.replace_boxed(value)
    if role == PARAM:
        _derive_keys(jobs)
    # A callable fill runs here, in order (it may not be thread-safe).
    serial = role == PARAM and any(callable(stage.fill) for stage in stages)
    grown = run_tasks(
        [functools.partial(_apply_ops_host, job.host, job.ops, role, job.final) for job in jobs],
        [0 if serial else math.prod(job.final) for job in jobs],
    )
    to_place = [i for i, job in enumerate(jobs) if job.was_jax]
    placed = dict(zip(to_place, to_device([grown[i] for i in to_place]), strict=True))
    for i, job in enumerate(jobs):
        new = placed.get(i, grown[i])
        out[job.path] = new if job.box is None else job.box.replace_boxed(new)
    return unflatten(out)


def _derive_keys(jobs: list[_Job]) -> None:
    """Derives the keys of every default draw of the jobs, one dispatch per step's key."""
    wanted: dict[int, list[tuple[_Job, int]]] = {}  # id(step key) -> (job, op) pairs
    for job in jobs:
        for j, (op, leaf_key, _, fill, _) in enumerate(job.ops):
            concrete = not isinstance(leaf_key.key, jax.core.Tracer)
            if concrete and fill is None and isinstance(op, Pad) and isinstance(op.value, Free):
                if op.value.stddev != 0:
                    wanted.setdefault(id(leaf_key.key), []).append((job, j))
    for pairs in wanted.values():
        ops = [job.ops[j] for job, j in pairs]
        data = batch_key_data(ops[0].key.key, [s.key.seed for s in ops], [s.position for s in ops])
        for (job, j), row in zip(pairs, data, strict=True):
            job.ops[j] = job.ops[j]._replace(key_data=row)


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


def random_split(key: jax.Array, copies: int, size: int) -> np.ndarray:
    """Random positive proportions ``[copies, size]`` that sum to one over the copies.

    Equal shares would give the copies identical gradients forever (they would never
    separate); random shares break the symmetry (LEMON). The last share is one minus the
    others so that the sum is as close to one as float32 allows.

    Args:
      key: PRNG key.
      copies: number of copies (>= 1).
      size: number of slices along the replicated axis.

    Returns:
      A float32 numpy array of shape ``[copies, size]``.
    """
    return split_from(numpy_rng(key), copies, size)


def split_from(rng: np.random.Generator, copies: int, size: int) -> np.ndarray:
    """``random_split`` drawn from a given generator (e.g. one of ``batch_key_data``'s rows).

    Args:
      rng: the generator of the leaf's key (``generator(key_data)``).
      copies: number of copies (>= 1).
      size: number of slices along the replicated axis.

    Returns:
      A float32 numpy array of shape ``[copies, size]``.
    """
    raw = rng.uniform(0.5, 1.5, (copies, size)).astype(np.float32)
    split = (raw / raw.sum(axis=0, keepdims=True)).astype(np.float32)
    split[-1] = np.float32(1.0) - split[:-1].sum(axis=0, dtype=np.float32)
    return split


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
