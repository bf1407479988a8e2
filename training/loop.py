"""The training loop: dispatch train steps, then run the actions due after each step.

Every run that trains goes through `run`: the launcher's training (report, grow, save,
evaluate), root pretraining, candidates, baselines and the multipath router (validate
every B steps and keep the best). What differs between them is their `Trainer` (the
model, a mask of frozen parameters, the partitioner) and their actions, never the loop.

An action is an object with `due(step) -> bool` and `__call__(progress)`; it reads and
may replace what `Progress` holds (a growth event replaces the trainer and the state, a
report starts a new metrics accumulator). Actions run in list order after the step that
makes them due. Blocks of several steps in one dispatch (`dispatch_sizes`) end only at
steps where an action is due, so actions see every step they asked for.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, Protocol

import jax
import jax.numpy as jnp

from training import trainer as trainer_lib


@dataclasses.dataclass
class Progress:
    """What the loop carries from step to step (actions may replace any field).

    Attributes:
      trainer: the `Trainer` whose steps run (a growth event swaps it).
      state: the train state (donated by each step: never keep a reference across steps;
        copy what must outlive it, as `KeepBest` does).
      metrics: the on-device metrics accumulator since the last report.
      step: optimizer steps done.
    """

    trainer: trainer_lib.Trainer
    state: trainer_lib.TrainState
    metrics: trainer_lib.MetricsAccumulator
    step: int

    @classmethod
    def start(cls, trainer: trainer_lib.Trainer, state: trainer_lib.TrainState) -> Progress:
        """Progress at the state's step with an empty accumulator (blocks on the step)."""
        return cls(trainer, state, trainer.empty_metrics(), int(jax.device_get(state.step)))


class Action(Protocol):
    """Something the loop does after a step."""

    def due(self, step: int) -> bool:
        """Whether the action runs after step number `step`."""
        ...

    def __call__(self, progress: Progress) -> None:
        """Runs the action (may replace the progress' trainer, state or metrics)."""
        ...


def dispatch_sizes(
    start: int, total: int, steps_per_execution: int, stops_at: Callable[[int], bool]
) -> Iterator[int]:
    """Yields how many steps each dispatch of the loop runs, from `start` to `total`.

    A block of `steps_per_execution` steps starts at a multiple of it and holds no step
    an action is due at (`stops_at`) but its last; every other step is dispatched alone.
    So every run that reaches a step dispatches the same blocks from the next multiple
    on, resumed or not.

    Args:
      start: the first step's number (steps done so far).
      total: the step to stop at.
      steps_per_execution: the block size (1: every step alone).
      stops_at: whether an action is due after a step.

    Yields:
      1 or `steps_per_execution`, summing to `total - start`.
    """
    k = steps_per_execution
    step = start
    while step < total:
        if (
            k > 1
            and step % k == 0
            and step + k <= total
            and not any(stops_at(s) for s in range(step + 1, step + k))
        ):
            yield k
            step += k
        else:
            yield 1
            step += 1


def single_steps(batches: Iterable[Mapping[str, Any]]) -> Iterator[tuple[int, Mapping[str, Any]]]:
    """Pairs each batch with the step count 1 (the loop's input for one step per dispatch)."""
    for batch in batches:
        yield 1, batch


def run(
    progress: Progress,
    batches: Iterator[tuple[int, Mapping[str, Any]]],
    total_steps: int,
    actions: Sequence[Action] = (),
) -> Progress:
    """Trains from `progress.step` to `total_steps`, running each action when it is due.

    Args:
      progress: the trainer, state, accumulator and step to start from (updated in place).
      batches: yields (steps, batch): a global batch for one step, or for `steps` > 1 the
        steps' batches stacked on a leading axis (`Trainer.train_steps`).
      total_steps: the step to stop at.
      actions: run in order after each step they are `due` at.

    Returns:
      `progress`, at `total_steps`.

    Raises:
      ValueError: the batches ran out before `total_steps`.
    """
    while progress.step < total_steps:
        try:
            steps, batch = next(batches)
        except StopIteration as error:
            raise ValueError(
                f"the training batches ran out at step {progress.step} of {total_steps}"
            ) from error
        if steps == 1:
            progress.state, progress.metrics = progress.trainer.train_step(
                progress.state, progress.metrics, batch
            )
        else:
            progress.state, progress.metrics = progress.trainer.train_steps(
                progress.state, progress.metrics, batch
            )
        progress.step += steps
        for action in actions:
            if action.due(progress.step):
                action(progress)
    return progress


class KeepBest:
    """Validates every `every` steps and keeps a copy of the best trainable parameters.

    The copy is taken on device (`Trainer.trainable_params`, frozen parameters are not
    copied); a later validation replaces it only when strictly better, so ties keep the
    earlier parameters.

    Args:
      every: the validation interval B (steps).
      validate: params -> quality (higher is better), e.g. an accuracy.

    Attributes:
      validations: (step, quality) of every validation, in order.
      train_losses: the mean training loss of each interval (when the model reports a
        "loss" metric).
      best_quality: the best quality so far (-inf before the first validation).
      best_step: the step it was reached at.
      best_params: a copy of the trainable parameters at that step (None before).
    """

    def __init__(self, every: int, validate: Callable[[Any], float]):
        if every < 1:
            raise ValueError(f"validation interval {every} < 1")
        self.every = int(every)
        self._validate = validate
        self.validations: list[tuple[int, float]] = []
        self.train_losses: list[float] = []
        self.best_quality = float("-inf")
        self.best_step = 0
        self.best_params: Any = None

    def due(self, step: int) -> bool:
        """Every `every` steps."""
        return step % self.every == 0

    def consider(self, step: int, trainer: trainer_lib.Trainer, params: Any) -> None:
        """Validates `params` at `step` and keeps a copy when they are the best so far."""
        quality = float(self._validate(params))
        self.validations.append((step, quality))
        if quality > self.best_quality:
            self.best_quality, self.best_step = quality, step
            self.best_params = jax.tree.map(jnp.copy, trainer.trainable_params(params))

    def __call__(self, progress: Progress) -> None:
        """Records the interval's mean loss, validates, and starts a new accumulator."""
        values = trainer_lib.compute_metrics(progress.metrics)
        if "loss" in values:
            self.train_losses.append(values["loss"])
        progress.metrics = progress.trainer.empty_metrics()
        self.consider(progress.step, progress.trainer, progress.state.params)


class When:
    """An action from a predicate and a function (`When(due, fn)`).

    Args:
      due: step -> whether to run after it.
      fn: progress -> None.
    """

    def __init__(self, due: Callable[[int], bool], fn: Callable[[Progress], None]):
        self._due = due
        self._fn = fn

    def due(self, step: int) -> bool:
        """Whether the action runs after step number `step`."""
        return self._due(step)

    def __call__(self, progress: Progress) -> None:
        """Runs the function."""
        self._fn(progress)
