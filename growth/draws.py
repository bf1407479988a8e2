"""Where the values of new free entries come from.

A free entry of a grown leaf may take any value without changing the function; by
default it is drawn from the leaf's initializer (``Free``), or set by a ``fill`` (a
constant, or a callable given a JAX key). Draws run on the host in numpy, from
generators seeded per leaf, op and step without JAX dispatches (``LeafKey``), so that the
same plan gives the same values however it is applied (fused, one step at a time, on any
number of threads). LEMON's random split proportions come from the same streams.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import struct
import zlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from numpy.random.bit_generator import ISeedSequence

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


def path_seed(path: tuple[str, ...]) -> int:
    """A stable 31-bit integer for a leaf path (used to fold keys per leaf)."""
    return zlib.crc32("/".join(path).encode()) & 0x7FFFFFFF


def numpy_rng(key: jax.Array) -> np.random.Generator:
    """A numpy Generator seeded by a (concrete) JAX PRNG key (``host_generator`` of its words).

    Surgery runs on the host in numpy: drawing with ``jax.random`` would compile once per
    new shape, which dominates the cost of growing a small model.
    """
    return host_generator(*key_words(key))


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
    out = np.zeros(shape, np.float32)
    _fill_free(out, value, lambda: rng)
    return out.astype(dtype, copy=False)


# Normal draws are made in blocks of about this many entries, which stay in the cache
# between the draw, the scaling and the store into the output.
_DRAW_BLOCK = 1 << 15


def _fill_free(target: np.ndarray, value: Free, rng: Callable[[], np.random.Generator]) -> None:
    """Writes the default initializer's values into a block.

    ``mean + stddev * noise`` in float32, the noise from the generator's ``NormalStream`` in
    C order, in blocks that stay in the cache: straight into a contiguous target, through
    a scratch block of whole rows into a strided one. The stream does not depend on how
    its draws are split, so ``_draw_normal`` gives the same values for an array of the
    block's shape. With no noise (stddev 0), entries equal to +0.0 are not written (the
    block must be zero already: see ``writes_every_entry``); ``rng`` is called only when
    noise is needed.

    Args:
      target: a block of the output (any strides; zero unless ``writes_every_entry``).
      value: the leaf's default initializer.
      rng: returns the generator of these entries.
    """
    if value.stddev == 0:
        if writes_every_entry(value, None):  # a mean other than +0.0
            target[...] = np.full((), np.float32(value.mean)).astype(target.dtype)
        return
    if target.dtype != np.float32 or target.ndim == 0:
        noise = np.zeros(target.shape or (1,), np.float32)
        _fill_free(noise, value, rng)
        target[...] = noise.reshape(target.shape).astype(target.dtype)
        return
    stddev, mean = np.float32(value.stddev), np.float32(value.mean)
    for block, noise in _noise_blocks(target, rng):
        np.multiply(noise, stddev, out=block)
        if mean != 0:
            block += mean


def _noise_blocks(
    target: np.ndarray, rng: Callable[[], np.random.Generator]
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(block of ``target``, its values of the generator's ``NormalStream``), in C order.

    A target whose stream is a single chunk (every draw of a small model) takes the
    chunk directly, without the stream's and ``_draw_blocks``' bookkeeping: the same
    values, 2-5 us less a fill (measured on 64x64 strided and 32x192 contiguous blocks).
    """
    if target.size % 2 == 0 and target.size <= 2 * _CHUNK_PAIRS:  # the stream is one chunk
        noise = target if target.flags.c_contiguous else np.empty(target.shape, np.float32)
        _box_muller(rng().bit_generator, noise.reshape(-1))
        yield target, noise
        return
    stream = NormalStream(rng(), target.size)
    for block, noise in _draw_blocks(target):
        stream.fill(noise.reshape(-1))
        yield block, noise


# The normal stream is computed in chunks of up to this many pairs (``NormalStream``).
_CHUNK_PAIRS = 1 << 14


class NormalStream:
    """``size`` standard normal float32 values from a generator, in C order (Box-Muller).

    The values are computed in chunks of up to ``_CHUNK_PAIRS`` pairs, the last one taking
    the pairs that are left (``ceil(size / 2)`` pairs in all; an odd ``size`` drops the last
    value). A chunk of ``c`` pairs takes ``c`` 64-bit words of the generator's bit
    generator; their ``2c`` 32-bit halves, in memory order (low half first), give the
    uniforms ``u = (half >> 8) * 2**-24``, the float32 uniforms of
    ``Generator.random(dtype=np.float32)``. The first ``c`` are the pairs' ``u1``, the last
    ``c`` their ``u2``, and the chunk's values are ``r cos(t)`` for its ``c`` pairs followed
    by ``r sin(t)`` for the same pairs, with ``r = sqrt(-2 ln(1 - u1))`` (``1 - u1`` is in
    ``[2**-24, 1]``, so ``r`` is at most 5.77) and ``t = 2 pi u2``. Each step runs on
    contiguous arrays, and the raw words cost less than the generator's float32
    uniforms: on this kind of CPU a value costs about 2.2 ns in a large chunk, against
    3.7 ns with interleaved pairs and 7.3 ns from numpy's float32 ziggurat (the draws of
    new free entries are a large part of growing a small model).

    The values depend only on the generator and ``size``, not on how ``fill`` splits them
    (a chunk that a fill ends inside is kept for the next fill). numpy's SIMD logarithm,
    sine and cosine give the same bits for an element wherever it sits in the array
    (checked by a test); they may round differently on another CPU family, where a value
    can then differ in its last bit: same seed, same machine, same bits.

    Args:
      generator: the numpy generator whose bit generator gives the words.
      size: the number of values the stream gives.
    """

    def __init__(self, generator: np.random.Generator, size: int):
        self._bits = generator.bit_generator
        self._pairs = -(-size // 2)  # not yet computed
        self._left = size  # not yet given out
        self._kept = _NO_VALUES  # the rest of a chunk that a fill ended inside
        self._start = 0  # of the next kept value

    def fill(self, out: np.ndarray) -> None:
        """Writes the stream's next ``out.size`` values into a contiguous 1-d float32 ``out``.

        Raises:
          ValueError: if the stream has fewer than ``out.size`` values left.
        """
        size = out.size
        if size > self._left:
            raise ValueError(f"the normal stream has {self._left} values left, not {size}")
        self._left -= size
        done = min(size, self._kept.size - self._start)
        if done:
            out[:done] = self._kept[self._start : self._start + done]
            self._start += done
        while done < size:
            pairs = min(_CHUNK_PAIRS, self._pairs)
            self._pairs -= pairs
            if size - done >= 2 * pairs:  # the whole chunk goes to `out`
                _box_muller(self._bits, out[done : done + 2 * pairs])
                done += 2 * pairs
                continue
            self._kept = np.empty(2 * pairs, np.float32)
            _box_muller(self._bits, self._kept)
            self._start = size - done
            out[done:] = self._kept[: self._start]
            done = size


_NO_VALUES = np.empty(0, np.float32)


def standard_normal(generator: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """``shape`` float32 values of a ``NormalStream`` of the generator, in C order."""
    size = math.prod(shape)
    out = np.empty(size, np.float32)
    NormalStream(generator, size).fill(out)
    return out.reshape(shape)


_TWO_24 = np.float32(1 << 24)
_MINUS_TWO = np.float32(-2)
_UNIT = np.float32(2.0**-24)
# 2 pi u2 with u2 = k 2**-24: the same float32 product as k (2 pi 2**-24), a power of two
# apart.
_ANGLE = np.float32(2 * np.pi) * _UNIT


def _box_muller(bits: np.random.BitGenerator, out: np.ndarray) -> None:
    """Computes one chunk of a ``NormalStream`` into a contiguous float32 ``out`` (even size)."""
    pairs = out.size // 2
    halves = bits.random_raw(pairs).view(np.uint32)
    np.right_shift(halves, 8, out=halves)
    np.copyto(out, halves.view(np.int32), casting="unsafe")  # exact: below 2**24
    radius, angle = out[:pairs], out[pairs:]
    np.subtract(_TWO_24, radius, out=radius)  # exact: (1 - u1) 2**24, in [1, 2**24]
    np.multiply(radius, _UNIT, out=radius)
    np.log(radius, out=radius)
    np.multiply(radius, _MINUS_TWO, out=radius)
    np.sqrt(radius, out=radius)
    np.multiply(angle, _ANGLE, out=angle)
    wave = np.cos(angle)
    np.sin(angle, out=angle)
    np.multiply(angle, radius, out=angle)
    np.multiply(radius, wave, out=radius)


def _draw_blocks(target: np.ndarray) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(block of ``target``, buffer its noise is drawn into), in C order, cache-sized.

    A contiguous target is cut into flat blocks that take their noise in place; a
    strided one (new columns of a wider leaf) into blocks of whole rows, drawn into one
    scratch buffer.
    """
    if target.flags.c_contiguous:
        flat = target.reshape(-1)
        for start in range(0, flat.size, _DRAW_BLOCK):
            block = flat[start : start + _DRAW_BLOCK]
            yield block, block
        return
    rows = target.shape[0]
    per_row = target.size // rows if rows else 1
    step = max(1, _DRAW_BLOCK // max(per_row, 1))
    scratch = np.empty((min(step, rows), *target.shape[1:]), np.float32)
    for start in range(0, rows, step):
        block = target[start : start + step]
        yield block, scratch[: block.shape[0]]


def writes_every_entry(value: Free, fill: Fill) -> bool:
    """Whether ``write_new`` writes every entry of its block (it leaves +0.0 entries alone).

    Only the default initializer of a leaf without noise whose value is +0.0 (a new bias)
    writes nothing: its block must be zero already.
    """
    if fill is not None or value.stddev != 0:
        return True
    return value.mean != 0 or math.copysign(1.0, value.mean) < 0


def write_new(
    target: np.ndarray,
    value: Free,
    fill: Fill,
    key: Callable[[], jax.Array],
    rng: Callable[[], np.random.Generator],
) -> None:
    """Writes new free entries into a block (zero on entry unless ``writes_every_entry``).

    What ``draw_free`` gives for a constant or a callable ``fill`` (given ``key()``), and
    for the default initializer ``_draw_normal(rng(), ...)``, bit for bit.

    Args:
      target: the block (zero on entry unless ``writes_every_entry(value, fill)``).
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


# Host draws come from numpy generators seeded with the words of the step's key (its
# ``key_data``), the leaf's path seed and integers naming the stream; deriving them costs
# no JAX dispatch. The last integer tells the streams of a leaf apart.
_LEAF_STREAM, _OP_STREAM, _SPLIT_STREAM = 1, 2, 3
# key id -> (key, words) of recent keys (``fold_in_range`` derives them with the keys).
_known_words: dict[int, tuple[jax.Array, tuple[int, ...]]] = {}
_KNOWN_LIMIT = 256


def _remember_words(key: jax.Array, words: tuple[int, ...]) -> None:
    if len(_known_words) >= _KNOWN_LIMIT:
        _known_words.pop(next(iter(_known_words)))
    _known_words[id(key)] = (key, words)


def key_words(key: jax.Array) -> tuple[int, ...]:
    """The words (``key_data``) of a concrete PRNG key, as Python ints.

    A dispatch, unless the key came from ``fold_in_range``, which derives the words of
    its keys in the same dispatch as the keys.
    """
    known = _known_words.get(id(key))
    if known is not None and known[0] is key:
        return known[1]
    words = tuple(int(w) for w in np.asarray(jax.random.key_data(key)).ravel())
    _remember_words(key, words)
    return words


class HashedSeed(ISeedSequence):
    """A numpy seed sequence whose state is the BLAKE2b hash of a tuple of integers.

    Distinct tuples give independent streams, as with ``np.random.SeedSequence``, which
    however costs several times the draws of a small leaf to create.

    Args:
      values: non-negative integers below 2**64.
    """

    def __init__(self, values: Sequence[int]):
        self._data = struct.pack(f"<{len(values)}Q", *values)

    def generate_state(self, n_words: int, dtype: Any = np.uint32) -> np.ndarray:
        """``n_words`` words of ``dtype`` (uint32 or uint64) of the hash (counter mode)."""
        dtype = np.dtype(dtype)
        nbytes = n_words * dtype.itemsize
        blocks = [
            hashlib.blake2b(
                self._data, digest_size=64, person=block.to_bytes(16, "little")
            ).digest()
            for block in range(-(-nbytes // 64))
        ]
        return np.frombuffer(b"".join(blocks)[:nbytes], dtype).copy()


def host_generator(*values: int) -> np.random.Generator:
    """An SFC64 generator seeded with ``HashedSeed(values)``: every host draw comes from one.

    SFC64 passes the same statistical test batteries as numpy's default PCG64 and gives
    its raw 64-bit words (what ``NormalStream`` consumes) about 15% faster on this kind
    of CPU (the draws of new free entries are a large part of growing a small model).
    """
    # Bit generators take any ISeedSequence (numpy.random.bit_generator); the stubs name
    # SeedSequence only.
    return np.random.Generator(np.random.SFC64(HashedSeed(values)))  # type: ignore[arg-type]


_KEYS_PER_CALL = 8


@jax.jit
def _fold_in_block(key: jax.Array, start: jax.Array) -> tuple[tuple[jax.Array, ...], jax.Array]:
    keys = tuple(jax.random.fold_in(key, start + i) for i in range(_KEYS_PER_CALL))
    return keys, jnp.stack([jax.random.key_data(k) for k in keys])


def fold_in_range(key: jax.Array, count: int) -> list[jax.Array]:
    """``[jax.random.fold_in(key, i) for i in range(count)]``, bit for bit, in few dispatches.

    The words of the keys (``key_words``) come with them.
    """
    if isinstance(key, jax.core.Tracer):
        return [jax.random.fold_in(key, i) for i in range(count)]
    keys: list[jax.Array] = []
    for start in range(0, count, _KEYS_PER_CALL):
        block, data = _fold_in_block(key, np.uint32(start))
        for k, words in zip(block, np.asarray(data).reshape(len(block), -1), strict=True):
            _remember_words(k, tuple(int(w) for w in words))
        keys.extend(block)
    return keys[:count]


@dataclasses.dataclass(frozen=True)
class LeafKey:
    """The randomness of one leaf in one step: JAX keys on demand, host generators cheaply.

    A callable ``fill`` and traced draws get JAX keys (``leaf_key``, ``op_key``: one
    dispatch each). The default initializer on the host draws from ``rng``:
    ``host_generator(*key_words(key), seed, *stream)``, derived without JAX.

    Attributes:
      key: the step's PRNG key.
      seed: the leaf's path seed (``path_seed``).
      words: ``key_words(key)`` when the key is concrete (derived once per step).
    """

    key: jax.Array
    seed: int
    words: tuple[int, ...] | None = None

    def leaf_key(self) -> jax.Array:
        """The leaf's JAX key ``fold_in(key, seed)``."""
        return jax.random.fold_in(self.key, self.seed)

    def op_key(self, index: int) -> jax.Array:
        """The JAX key of op ``index`` of this leaf."""
        return jax.random.fold_in(self.leaf_key(), index)

    def rng(self, *stream: int) -> np.random.Generator:
        """The host generator of one stream of this leaf (see the class docstring)."""
        words = key_words(self.key) if self.words is None else self.words
        return host_generator(*words, self.seed, *stream)

    def leaf_rng(self) -> np.random.Generator:
        """The generator of a whole new leaf's draws (depth growth)."""
        return self.rng(_LEAF_STREAM)

    def op_rng(self, index: int) -> np.random.Generator:
        """The generator of the new entries of op ``index`` of this leaf."""
        return self.rng(index, _OP_STREAM)

    def split_rng(self) -> np.random.Generator:
        """The generator of the leaf's LEMON split proportions."""
        return self.rng(_SPLIT_STREAM)


def leaf_keys(key: jax.Array, seeds: Sequence[int], words: bool = True) -> list[LeafKey]:
    """``LeafKey`` of many leaves of one step, the key's words derived once.

    Args:
      key: the step's PRNG key.
      seeds: the leaves' path seeds.
      words: whether host draws will need the key's words (not for optimizer moments).
    """
    concrete = words and not isinstance(key, jax.core.Tracer)
    known = key_words(key) if concrete else None
    return [LeafKey(key, seed, known) for seed in seeds]


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
    """``random_split`` drawn from a given generator.

    Args:
      rng: the generator of the leaf's split (``LeafKey.split_rng()``).
      copies: number of copies (>= 1).
      size: number of slices along the replicated axis.

    Returns:
      A float32 numpy array of shape ``[copies, size]``.
    """
    raw = rng.uniform(0.5, 1.5, (copies, size)).astype(np.float32)
    split = (raw / raw.sum(axis=0, keepdims=True)).astype(np.float32)
    split[-1] = np.float32(1.0) - split[:-1].sum(axis=0, dtype=np.float32)
    return split
