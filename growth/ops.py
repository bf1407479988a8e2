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
import math
import zlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
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


@jax.jit
def _op_key_data(key: jax.Array, seed: jax.Array, index: jax.Array) -> jax.Array:
    # One compiled dispatch instead of three eager ones (two fold_ins and key_data).
    return jax.random.key_data(jax.random.fold_in(jax.random.fold_in(key, seed), index))


@dataclasses.dataclass(frozen=True)
class _LeafKey:
    """A leaf's key ``fold_in(key, seed)``, derived only when a draw needs it.

    Deriving keys is a JAX dispatch each, which would otherwise dominate the cost of
    growing a small model; op ``i`` of the leaf draws from ``fold_in(leaf key, i)``.
    """

    key: jax.Array
    seed: int

    def op_key(self, index: int) -> jax.Array:
        """The key of op ``index`` of this leaf."""
        return jax.random.fold_in(jax.random.fold_in(self.key, self.seed), index)

    def op_rng(self, index: int) -> np.random.Generator:
        """``numpy_rng(self.op_key(index))``, in one dispatch."""
        if isinstance(self.key, jax.core.Tracer):
            return numpy_rng(self.op_key(index))
        data = _op_key_data(self.key, np.uint32(self.seed), np.uint32(index))
        return np.random.default_rng(np.asarray(data).astype(np.uint64).ravel().tolist())


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


def aligned_empty(shape: tuple[int, ...], dtype: Any) -> np.ndarray:
    """An uninitialised numpy array whose data is 64-byte aligned (see ``_ALIGNMENT``)."""
    dtype = np.dtype(dtype)
    nbytes = math.prod(shape) * dtype.itemsize
    raw = np.empty(nbytes + _ALIGNMENT, np.uint8)
    offset = -raw.ctypes.data % _ALIGNMENT
    return raw[offset : offset + nbytes].view(dtype).reshape(shape)


def _final_shape(shape: tuple[int, ...], ops: tuple[Op, ...]) -> list[int]:
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
    x: np.ndarray, ops: tuple[Op, ...], role: str, leaf_key: _LeafKey, fill: Fill
) -> np.ndarray:
    """``apply_op`` for every op, in one aligned output buffer of the final shape.

    The leaf always lives in the leading corner of the buffer: a Pad writes its new
    entries next to it, a Scale multiplies it in place, a Tile writes copies 1.. and then
    scales copy 0 in place. Each element is computed by the same float32 operations as
    ``apply_op`` (bit-identical results) but written once, not once per op, and the
    aligned buffer is handed to JAX without a copy.
    """
    out = aligned_empty(tuple(_final_shape(x.shape, ops)), x.dtype)
    current = list(x.shape)
    out[_corner(current)] = x
    for i, op in enumerate(ops):
        region = out[_corner(current)]
        if isinstance(op, Scale):
            np.multiply(region, np.asarray(_factor(op.factor, role), x.dtype), out=region)
            continue
        axis = op.axis % x.ndim
        size = current[axis]
        if isinstance(op, Tile):
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
        if role == PARAM and isinstance(op.value, Free):
            # The same draws as apply_op; a constant fill needs no key at all.
            if fill is None:
                rng = None if op.value.stddev == 0 else leaf_key.op_rng(i)
                new = _draw_normal(rng, target.shape, x.dtype, op.value)
            else:
                key = leaf_key.op_key(i) if callable(fill) else None
                new = draw_free(key, target.shape, x.dtype, op.value, fill)  # type: ignore[arg-type]
            target[...] = np.asarray(new, x.dtype).reshape(target.shape)
        else:
            target[...] = 0
        current[axis] = op.new_size
    return out


class _ForDevice:
    """A grown host array that goes back to JAX (``_place`` puts them all in one call)."""

    __slots__ = ("array",)

    def __init__(self, array: np.ndarray):
        self.array = array


def _apply_ops(
    leaf: Any, ops: tuple[Op, ...], role: str, leaf_key: _LeafKey, fill: Fill, boxed: bool = False
) -> Any:
    if isinstance(leaf, meta.AxisMetadata):
        inner = _apply_ops(leaf.unbox(), ops, role, leaf_key, fill, boxed=True)
        return leaf.replace_boxed(inner)
    if not hasattr(leaf, "shape"):  # e.g. optax.MaskedNode: nothing stored for this leaf
        return leaf
    leaf, was_jax = to_host(leaf)
    if isinstance(leaf, np.ndarray):
        out = _apply_ops_host(leaf, ops, role, leaf_key, fill)
        if not was_jax:
            return out
        return jax.device_put(out) if boxed else _ForDevice(out)
    for i, op in enumerate(ops):  # traced (inside jit): one jnp operation after the other
        leaf = apply_op(leaf, op, role, leaf_key.op_key(i), fill)
    return leaf


def _place(flat: dict[Path, Any]) -> None:
    """Replaces every ``_ForDevice`` leaf by a JAX array, all in one transfer.

    On CPU the aligned buffers are adopted without a copy, and one batched ``device_put``
    saves its per-call overhead on every leaf (boxed leaves are placed one by one).
    """
    pending = [path for path, leaf in flat.items() if isinstance(leaf, _ForDevice)]
    if pending:
        placed = jax.device_put([flat[path].array for path in pending])
        flat.update(zip(pending, placed, strict=True))


def flatten(tree: Mapping) -> dict[Path, Any]:
    """Flattens a nested (possibly frozen) dict into ``{path: leaf}``."""
    return traverse_util.flatten_dict(flax.core.unfreeze(tree))  # type: ignore[arg-type]


def unflatten(flat: Mapping[Path, Any]) -> dict:
    """Inverse of ``flatten`` (always returns plain dicts)."""
    return traverse_util.unflatten_dict(dict(flat))


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
    if role not in ROLES:
        raise ValueError(f"Unknown role {role!r}; expected one of {ROLES}.")
    flat = flatten(tree)
    missing = [p for p in plan if p not in flat]
    if missing:
        raise KeyError(f"Growth plan names parameters that do not exist: {missing[:5]}")
    out = {}
    for path, leaf in flat.items():
        ops = plan.get(path, ())
        if ops:
            leaf = _apply_ops(leaf, ops, role, _LeafKey(key, path_seed(path)), fill)
        out[path] = leaf
    _place(out)
    return unflatten(out)


def leaf_shape(leaf: Any) -> tuple[int, ...]:
    """Shape of a (possibly boxed) leaf."""
    if isinstance(leaf, meta.AxisMetadata):
        leaf = leaf.unbox()
    return tuple(leaf.shape)


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
    raw = numpy_rng(key).uniform(0.5, 1.5, (copies, size)).astype(np.float32)
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
    """

    config: Any
    grow: Callable[[Mapping, str], dict]


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
    return Step(config, lambda tree, role: apply_plan(tree, plan, role, key, fill))
