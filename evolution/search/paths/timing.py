"""Where a candidate's wall time goes: one timer, phases (train, eval, compile) timed apart.

A `Timer` is entered around a piece of work (`with timer.phase("train"): ...`). Code
deeper down, which does not know the timer, marks its own phase with the module-level
`phase`: it is timed in the timer active in the calling thread, and a phase entered
inside another is not counted in the outer one. JAX's own compile events (tracing,
lowering and compiling a jitted function, which happen in the thread that first calls
it) are counted the same way as the "compile" phase of the thread's active timer, so the
compilation of a step in the middle of training counts as compilation only.
"""

from __future__ import annotations

import contextlib
import contextvars
import time
from collections.abc import Iterator

import jax

COMPILE = "compile"
# JAX's duration events of a top-level jit's tracing, lowering and (cached) compilation.
COMPILE_EVENTS = frozenset(
    {
        "/jax/core/compile/jaxpr_trace_duration",
        "/jax/core/compile/jaxpr_to_mlir_module_duration",
        "/jax/core/compile/backend_compile_duration",
    }
)

# Each thread starts with its own context, so candidates training in parallel threads
# each see their own timer.
_ACTIVE: contextvars.ContextVar[Timer | None] = contextvars.ContextVar("timer", default=None)


class Timer:
    """Wall seconds by phase, each phase without the phases nested inside it.

    Attributes:
      seconds: phase name -> wall seconds spent in it.
    """

    def __init__(self) -> None:
        """Starts with no time in any phase."""
        self.seconds: dict[str, float] = {}
        self._nested: list[float] = []  # per open phase: time spent in phases inside it

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Times the body as phase `name` (and makes this the thread's active timer).

        Args:
          name: the phase.

        Yields:
          nothing.
        """
        token = _ACTIVE.set(self)
        self._nested.append(0.0)
        start = time.perf_counter()
        try:
            yield
        finally:
            elapsed = time.perf_counter() - start
            nested = self._nested.pop()
            self.seconds[name] = self.seconds.get(name, 0.0) + elapsed - nested
            if self._nested:
                self._nested[-1] += elapsed
            _ACTIVE.reset(token)

    def add(self, name: str, seconds: float) -> None:
        """Counts `seconds` spent in phase `name` inside the open phase (not counted there).

        Args:
          name: the phase.
          seconds: wall seconds measured elsewhere (e.g. a JAX compile event).
        """
        self.seconds[name] = self.seconds.get(name, 0.0) + seconds
        if self._nested:
            self._nested[-1] += seconds


def phase(name: str) -> contextlib.AbstractContextManager[None]:
    """Times the body as phase `name` of the calling thread's active timer, if any.

    Args:
      name: the phase.

    Returns:
      a context manager (doing nothing when no timer is active).
    """
    timer = _ACTIVE.get()
    return timer.phase(name) if timer is not None else contextlib.nullcontext()


def _on_duration_event(event: str, duration_secs: float, **_: str | int) -> None:
    """Counts a JAX compile event in the calling thread's active timer, if any."""
    if event in COMPILE_EVENTS:
        timer = _ACTIVE.get()
        if timer is not None:
            timer.add(COMPILE, duration_secs)


jax.monitoring.register_event_duration_secs_listener(_on_duration_event)
