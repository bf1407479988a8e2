"""Growth schedules: "at step N apply these growth requests", bound in gin.

    train_script.train.growth_schedule = @growth_schedule.GrowthSchedule()
    growth_schedule.GrowthSchedule.events = {
        500: ['mlp_dim=256', 'num_heads=8'],
        1000: ['hidden=128:replicate', 'add_layer@2'],
    }

The trainer runs the train step that reaches step N, then grows the whole training state
(parameters and optimizer state) with `growth.expand`, re-derives the shardings, compiles
the grown step once, and goes on; the checkpoint of step N already holds the grown state.
Requests use growth/requests.py's grammar and are validated when the schedule is built.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import jax

from growth import requests as requests_lib
from growth.rules import GrowthError

# Salt of the growth PRNG stream, so it never coincides with init or dropout keys.
_GROWTH_SALT = 0x67726F77  # "grow"


@dataclasses.dataclass(frozen=True)
class GrowthEvent:
    """One scheduled growth.

    Attributes:
      step: grow right after the train step that reaches this step.
      requests: growth requests in order, e.g. ("mlp_dim=256", "add_layer@2").
    """

    step: int
    requests: tuple[str, ...]

    def to_json(self) -> dict[str, Any]:
        """Returns {"step", "requests"} (checkpoint metadata, metrics.jsonl)."""
        return {"step": self.step, "requests": list(self.requests)}


class GrowthSchedule:
    """The growth events of a run, validated and ordered by step.

    Args:
      events: step -> requests (a list of request strings, or one comma-separated
        string), or a sequence of (step, requests) pairs.

    Raises:
      GrowthError: a step is not a positive integer, appears twice, or a request does
        not parse (the message names the step and the request).
    """

    def __init__(self, events: Mapping[int, Any] | Sequence[tuple[int, Any]] | None = None) -> None:
        items = list(events.items()) if isinstance(events, Mapping) else list(events or ())
        parsed: dict[int, GrowthEvent] = {}
        for step, requests in items:
            if isinstance(step, bool) or not isinstance(step, int) or step <= 0:
                raise GrowthError(
                    f"growth schedule step {step!r} must be a positive integer (the step "
                    "after which to grow)"
                )
            if step in parsed:
                raise GrowthError(f"growth schedule has step {step} twice; merge its requests")
            try:
                texts = tuple(str(r) for r in requests_lib.parse_requests(requests))
            except GrowthError as error:
                raise GrowthError(f"growth schedule step {step}: {error}") from error
            if not texts:
                raise GrowthError(f"growth schedule step {step} has no requests")
            parsed[step] = GrowthEvent(step, texts)
        self.events: tuple[GrowthEvent, ...] = tuple(parsed[s] for s in sorted(parsed))
        self._by_step = parsed  # `at` runs every train step

    def __repr__(self) -> str:
        return f"GrowthSchedule({[e.to_json() for e in self.events]})"

    def beyond(self, total_steps: int) -> tuple[GrowthEvent, ...]:
        """Returns the events a run ending at `total_steps` never reaches.

        An event at `total_steps` itself is applied (after the last train step, before
        the final checkpoint), which hands a grown state to the next stage of training.
        """
        return tuple(e for e in self.events if e.step > total_steps)

    def at(self, step: int) -> GrowthEvent | None:
        """Returns the event to apply right after `step`, or None."""
        return self._by_step.get(step)


def growth_rng(seed: int, step: int) -> jax.Array:
    """The PRNG key of the growth at `step` in a run seeded with `seed`.

    In-run growth and `./run.sh grow` on that run's checkpoint use the same key, so both
    produce the same grown state.
    """
    return jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), _GROWTH_SALT), step)
