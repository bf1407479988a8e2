"""Host buffers of grown leaves and their hand-off to JAX.

Growth writes new leaves on the host, into 64-byte aligned numpy buffers that JAX's CPU
client adopts without a copy. Each ``jax.device_put`` call has a fixed cost on top of
its per-array cost, so ``expand`` defers the hand-off (``deferred_transfer``): inside it
``to_device`` only notes the host arrays, and ``DeferredTransfer.place`` hands every noted
array that is still in the result to JAX in one call.
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import numpy as np

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


def to_host(leaf: Any) -> tuple[Any, bool]:
    """A leaf as numpy, and whether it goes back to JAX once grown.

    Concrete JAX arrays become numpy (zero-copy on CPU), as do host arrays noted by a
    deferred transfer (they are JAX arrays in waiting); anything else is unchanged.
    """
    if isinstance(leaf, jax.Array) and not isinstance(leaf, jax.core.Tracer):
        return np.asarray(leaf), True
    noted = _state.noted
    return leaf, noted is not None and noted.get(id(leaf)) is leaf


class _State(threading.local):
    noted: dict[int, np.ndarray] | None = None


_state = _State()


def to_device(arrays: Sequence[np.ndarray]) -> list[Any]:
    """Host arrays as JAX arrays, in one transfer (aligned CPU buffers are not copied).

    Inside ``deferred_transfer`` the arrays are only noted and come back unchanged.
    """
    noted = _state.noted
    if noted is not None:
        noted.update((id(a), a) for a in arrays)
        return list(arrays)
    return _device_put(arrays)


def _device_put(arrays: Sequence[np.ndarray]) -> list[jax.Array]:
    return list(jax.device_put(list(arrays))) if arrays else []


class DeferredTransfer:
    """The host arrays that ``to_device`` noted inside one ``deferred_transfer``."""

    def __init__(self, noted: dict[int, np.ndarray]):
        self._noted = noted

    def place(self, tree: Any) -> Any:
        """``tree`` with every noted host array in it replaced by a JAX array, in one call.

        Args:
          tree: a pytree (parameters, optimizer state, ...).

        Returns:
          The same structure; other leaves are unchanged.
        """
        leaves, treedef = jax.tree_util.tree_flatten(tree)
        chosen = [i for i, leaf in enumerate(leaves) if self._noted.get(id(leaf)) is leaf]
        placed = _device_put([leaves[i] for i in chosen])
        for i, array in zip(chosen, placed, strict=True):
            leaves[i] = array
        return jax.tree_util.tree_unflatten(treedef, leaves)


@contextlib.contextmanager
def deferred_transfer() -> Iterator[DeferredTransfer]:
    """Defers ``to_device`` on this thread until ``DeferredTransfer.place`` (one call).

    Nested, the inner context shares the outer one's notes.
    """
    outer = _state.noted
    noted: dict[int, np.ndarray] = {} if outer is None else outer
    _state.noted = noted
    try:
        yield DeferredTransfer(noted)
    finally:
        _state.noted = outer
