"""Elementary per-leaf operations that every expansion is built from, and their arrays.

An expansion is described as data before it touches any array: for each parameter leaf
(addressed by its path in the flattened parameter dict) a short tuple of operations that
grow or rescale it. The same description is applied, inside one jitted function
(``growth.api``), to the parameters and, with a different *role*, to every optimizer-state
tree that mirrors the parameters, which keeps parameter growth and optimizer-state growth
consistent by construction.

Roles:
  * ``PARAM``: parameters. New free entries come from the initializer (or ``fill``), new
    fixed entries are zero, scalings multiply.
  * ``FIRST_MOMENT``: first-moment-like state (Adam ``mu``, momentum ``trace``). New
    entries are 0, an entry scaled by ``c`` is scaled by ``c``.
  * ``SECOND_MOMENT``: second-moment-like state (Adam ``nu``). New entries are 0, an
    entry scaled by ``c`` is scaled by ``c**2``.

Randomness: every random value is a draw from a key folded from the step's key, the
leaf's path (``path_seed``) and the op's position, so a leaf's draws do not depend on the
other leaves, on the order they are grown in, or on how they are sharded. Keys of
threefry2x32 (JAX's default) fold and draw with ``fold_in`` and ``normal`` below, which
give bit for bit what ``jax.random.fold_in`` and ``jax.random.normal`` give (partitionable
threefry), computed as elementwise functions of each entry's index; any other key goes
through ``jax.random`` itself (see ``growth.api`` for why).
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
from flax.core import meta

PARAM = "param"
FIRST_MOMENT = "first_moment"
SECOND_MOMENT = "second_moment"
ROLES = (PARAM, FIRST_MOMENT, SECOND_MOMENT)

Path = tuple[str, ...]
# The nodes of a parameter tree (``flatten`` descends into them; the rest are leaves).
TREE_NODES = (dict, flax.core.FrozenDict)
# A constant for every free entry, a traceable callable ``(key, shape, dtype) -> array``,
# or None for the default initializer of each leaf.
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


@dataclasses.dataclass(frozen=True)
class Tile:
    """Concatenate ``copies`` copies of the leaf along ``axis``.

    Attributes:
      axis: the axis that is replicated.
      copies: the number of copies (the integer widening factor).
      split: whether copy ``j`` of slice ``i`` is multiplied by ``p[j, i]``, random
        proportions summing to one over the copies (``random_split``); else plain copies.
    """

    axis: int
    copies: int
    split: bool = False


Op = Pad | Scale | Tile


def path_seed(path: Path) -> int:
    """A stable 31-bit integer for a leaf path (used to fold keys per leaf)."""
    return zlib.crc32("/".join(path).encode()) & 0x7FFFFFFF


def draw_free(key: jax.Array, shape: tuple[int, ...], dtype: Any, value: Free, fill: Fill):
    """Values for new free entries.

    Args:
      key: PRNG key for this block of entries.
      shape: shape of the block of new entries.
      dtype: dtype of the leaf.
      value: the leaf's default initializer.
      fill: overrides the default: a constant or a callable ``(key, shape, dtype)``.

    Returns:
      An array of ``shape`` and ``dtype``.
    """
    if callable(fill):
        return jnp.asarray(fill(key, shape, dtype), dtype).reshape(shape)
    if fill is not None:
        return jnp.full(shape, fill, dtype)
    if value.stddev == 0:  # no draw: mean + 0 * noise is exactly mean
        return jnp.full(shape, jnp.float32(value.mean)).astype(dtype)
    noise = normal(key, shape)
    return (jnp.float32(value.mean) + jnp.float32(value.stddev) * noise).astype(dtype)


# Threefry-2x32 with 20 rounds (Salmon et al., "Parallel random numbers: as easy as 1, 2,
# 3", 2011), the hash behind JAX's default keys, with JAX's rotations and key schedule.
_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))
_KEY_PARITY = np.uint32(0x1BD11BDA)


def _threefry2x32(k1: Any, k2: Any, x1: Any, x2: Any) -> tuple[Any, Any]:
    """The threefry2x32 hash of the words ``(x1, x2)`` under the key ``(k1, k2)``.

    The same function as JAX's ``threefry2x32`` primitive, written out round by round:
    JAX lowers that primitive on CPU to a loop whose state is two whole uint32 arrays, a
    loop XLA cannot fuse with the ops that consume its bits, so every draw held its bits
    in buffers of its own and read and wrote them at every step of the loop. Written out,
    the hash is plain elementwise arithmetic that XLA fuses into the loop that writes
    the grown leaf: no bits are stored, and the values are the same.
    """
    ks = (k1, k2, k1 ^ k2 ^ _KEY_PARITY)
    x1, x2 = x1 + ks[0], x2 + ks[1]
    for i in range(5):
        for r in _ROTATIONS[i % 2]:
            x1 = x1 + x2
            x2 = ((x2 << np.uint32(r)) | (x2 >> np.uint32(32 - r))) ^ x1
        x1 = x1 + ks[(i + 1) % 3]
        x2 = x2 + ks[(i + 2) % 3] + np.uint32(i + 1)
    return x1, x2


def _threefry_data(key: jax.Array) -> jax.Array | None:
    """The uint32[2] data of a threefry2x32 key (typed or raw), or None for other keys."""
    if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
        if str(jax.random.key_impl(key)) != "threefry2x32":
            return None
        return jax.random.key_data(key)
    default_impl = jax.config.jax_default_prng_impl  # type: ignore[attr-defined]
    if key.shape != (2,) or default_impl != "threefry2x32":  # raw keys use the default
        return None
    return key


def fold_in(key: jax.Array, data: int) -> jax.Array:
    """``jax.random.fold_in(key, data)``, as scalar arithmetic for threefry2x32 keys.

    Args:
      key: a PRNG key (typed or raw).
      data: an integer in ``[0, 2**32)``.

    Returns:
      A key of the same kind, equal to ``jax.random.fold_in(key, data)``.
    """
    raw = _threefry_data(key)
    if raw is None:
        return jax.random.fold_in(key, data)
    # jax folds data in as the hash of the seed words (0, data) under the key. The
    # barrier keeps XLA from fusing this scalar hash into every loop that uses the key,
    # where it would be recomputed for each entry.
    out = jnp.stack(_threefry2x32(raw[0], raw[1], jnp.uint32(0), jnp.uint32(data)))
    out = jax.lax.optimization_barrier(out)
    if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
        return jax.random.wrap_key_data(out, impl="threefry2x32")
    return out


def normal(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """``jax.random.normal(key, shape, float32)``, computed entry by entry from its index.

    For a threefry2x32 key, entry ``i`` (row-major) is the threefry hash of the words
    ``(0, i)``, the xor of the two output words mapped to a uniform in (-1, 1) and then
    to a normal by ``sqrt(2) * erfinv``: what partitionable threefry computes, so a device
    computes its shard's entries only and any sharding gives the same bits.

    Args:
      key: a PRNG key (typed or raw).
      shape: the shape of the draw.

    Returns:
      A float32 array of ``shape``, bitwise equal to ``jax.random.normal(key, shape)``.
    """
    raw = _threefry_data(key)
    if raw is None or math.prod(shape) >= 2**32:  # indices need a second counter word
        return jax.random.normal(key, shape, jnp.float32)
    index = jnp.zeros(shape, jnp.uint32)
    stride = 1
    for axis in reversed(range(len(shape))):
        index = index + jax.lax.broadcasted_iota(jnp.uint32, shape, axis) * np.uint32(stride)
        stride *= shape[axis]
    word1, word2 = _threefry2x32(raw[0], raw[1], jnp.zeros(shape, jnp.uint32), index)
    bits = word1 ^ word2
    # As jax.random.uniform: 23 random mantissa bits under exponent 0 give [1, 2).
    one = np.float32(1.0).view(np.uint32)
    unit = jax.lax.bitcast_convert_type((bits >> np.uint32(9)) | one, jnp.float32) - 1.0
    low = np.nextafter(np.float32(-1.0), np.float32(0.0))
    uniform = jnp.maximum(low, unit * (np.float32(1.0) - low) + low)
    return np.float32(np.sqrt(2)) * jax.lax.erf_inv(uniform)


def random_split(key: jax.Array, copies: int, size: int) -> jax.Array:
    """Random positive proportions ``[copies, size]`` that sum to one over the copies.

    Equal shares would give the copies identical gradients forever (they would never
    separate); random shares break the symmetry (LEMON). The last share is one minus the
    others so that the sum is as close to one as float32 allows.

    Args:
      key: PRNG key.
      copies: number of copies (>= 1).
      size: number of slices along the replicated axis.

    Returns:
      A float32 array of shape ``[copies, size]``.
    """
    raw = jax.random.uniform(key, (copies, size), jnp.float32, 0.5, 1.5)
    split = raw / raw.sum(axis=0, keepdims=True)
    return split.at[-1].set(1.0 - split[:-1].sum(axis=0))


def _factor(factor: Any, role: str) -> Any:
    return factor * factor if role == SECOND_MOMENT else factor


def apply_ops(
    values: Sequence[jax.Array], roles: Sequence[str], ops: Sequence[Op], key: jax.Array, fill: Fill
) -> list[jax.Array]:
    """Applies a leaf's ops to the leaf and to its optimizer moments, in order.

    Op ``i`` draws from ``fold_in(key, i)``; a split is drawn once and used for every
    role (the parameter by ``p``, a first moment by ``p``, a second moment by ``p**2``).

    Args:
      values: the parameter leaf and its moment leaves (traced arrays, same shape).
      roles: the role of each.
      ops: the leaf's ops.
      key: the leaf's key in this step.
      fill: see ``draw_free``.

    Returns:
      The grown arrays, in the order of ``values``.
    """
    out = list(values)
    pairs = lambda: zip(out, roles, strict=True)  # noqa: E731 (out changes per op)
    for i, op in enumerate(ops):
        op_key = fold_in(key, i)
        if isinstance(op, Scale):
            out = [x * jnp.asarray(_factor(op.factor, r), x.dtype) for x, r in pairs()]
            continue
        axis = op.axis % out[0].ndim
        if isinstance(op, Tile):
            split = random_split(op_key, op.copies, out[0].shape[axis]) if op.split else None
            out = [_tile(x, axis, op.copies, split, r) for x, r in pairs()]
            continue
        out = [_pad(x, axis, op, r, op_key, fill) for x, r in pairs()]
    return out


def _tile(x: jax.Array, axis: int, copies: int, split: jax.Array | None, role: str):
    if split is None:
        return jnp.concatenate([x] * copies, axis=axis)
    bshape = [1] * x.ndim
    bshape[axis] = x.shape[axis]
    factors = _factor(split, role).astype(x.dtype)
    return jnp.concatenate([x * factors[j].reshape(bshape) for j in range(copies)], axis=axis)


def _pad(x: jax.Array, axis: int, op: Pad, role: str, key: jax.Array, fill: Fill) -> jax.Array:
    extra = op.new_size - x.shape[axis]
    if extra < 0:
        raise ValueError(f"Pad to {op.new_size} would shrink axis {axis} of {x.shape}.")
    if extra == 0:
        return x
    if role == PARAM and isinstance(op.value, Free):
        shape = (*x.shape[:axis], extra, *x.shape[axis + 1 :])
        new = draw_free(key, shape, x.dtype, op.value, fill)
        return jnp.concatenate([x, new], axis=axis)
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return jnp.pad(x, widths)


def flatten(tree: Mapping) -> dict[Path, Any]:
    """Flattens a nested (possibly frozen) dict into ``{path: leaf}``.

    What ``flax.traverse_util.flatten_dict(flax.core.unfreeze(tree))`` gives (empty dicts
    vanish); boxed leaves (``nn.Partitioned``) stay boxed.
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


def unbox(leaf: Any) -> Any:
    """The value of a boxed leaf (``nn.Partitioned``), or the leaf itself."""
    return leaf.unbox() if isinstance(leaf, meta.AxisMetadata) else leaf


def rebox(like: Any, value: Any) -> Any:
    """``value`` in the box of ``like`` (with its axis names), if ``like`` is boxed."""
    return like.replace_boxed(value) if isinstance(like, meta.AxisMetadata) else value


def leaf_shape(leaf: Any) -> tuple[int, ...]:
    """Shape of a (possibly boxed) leaf."""
    return tuple(unbox(leaf).shape)


def is_array(leaf: Any) -> bool:
    """Whether a (possibly boxed) leaf is an array or its abstract value (has a shape)."""
    value = unbox(leaf)
    return hasattr(value, "shape") and hasattr(value, "dtype")


def abstract(tree: Any) -> Any:
    """The tree with every array leaf replaced by its ``jax.ShapeDtypeStruct`` (unboxed).

    Expansions are planned from names and shapes only: no value is read, nothing moves.
    """

    def leaf(x: Any) -> Any:
        value = unbox(x)
        if is_array(value):
            return jax.ShapeDtypeStruct(tuple(value.shape), value.dtype)
        return value

    return jax.tree.map(leaf, tree, is_leaf=lambda x: isinstance(x, meta.AxisMetadata))


@dataclasses.dataclass(frozen=True)
class WidthGrowth:
    """A width expansion as data: ``(path, ops)`` for every leaf it grows or rescales.

    Hashable (it is a static argument of the jitted expansion).
    """

    plan: tuple[tuple[Path, tuple[Op, ...]], ...]

    def apply(
        self, flats: Sequence[dict[Path, Any]], roles: Sequence[str], key: jax.Array, fill: Fill
    ) -> list[dict[Path, Any]]:
        """Grows flattened parameter-shaped trees (the parameters and their moments).

        Leaf ``path`` draws from ``fold_in(key, path_seed(path))`` (see ``apply_ops``).

        Args:
          flats: ``flatten`` of each tree (traced arrays, possibly boxed).
          roles: the role of each tree.
          key: the step's key.
          fill: see ``draw_free``.

        Returns:
          The grown flat trees; leaves not in the plan are unchanged.

        Raises:
          KeyError: if the plan names a path that is not in a tree.
        """
        outs = [dict(flat) for flat in flats]
        for flat in flats:
            missing = [path for path, _ in self.plan if path not in flat]
            if missing:
                raise KeyError(f"Growth plan names parameters that do not exist: {missing[:5]}")
        for path, ops in self.plan:
            leaves = [flat[path] for flat in flats]
            grown = [i for i, leaf in enumerate(leaves) if is_array(leaf)]  # not MaskedNode
            if not grown:
                continue
            values = apply_ops(
                [unbox(leaves[i]) for i in grown],
                [roles[i] for i in grown],
                ops,
                fold_in(key, path_seed(path)),
                fill,
            )
            for i, value in zip(grown, values, strict=True):
                outs[i][path] = rebox(leaves[i], value)
        return outs


@dataclasses.dataclass(frozen=True)
class Step:
    """One planned expansion: the config after it and its growth as data.

    Attributes:
      config: the model config after this step.
      growth: a ``WidthGrowth`` or ``growth.depth.DepthGrowth``: ``apply(flats, roles,
        key, fill)`` grows the parameters and every optimizer moment with the same map.
    """

    config: Any
    growth: Any
