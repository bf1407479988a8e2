"""A generation's planned candidates (`CandidateJob`), how they train, and on which devices.

`search.evolve_task` plans and materialises a generation's children first (a
`CandidateJob` each), then trains them together (`executors.train_generation`). A result
depends only on its own inputs, so the outcome does not depend on where a candidate
trained.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax

from evolution.search.data.batches import Batch, TrainBatchesFn
from evolution.search.paths import candidate
from evolution.system import families


class StepSettings(NamedTuple):
    """How every candidate of a generation trains.

    Attributes:
      batch_size: training batch size.
      num_validations: validations per candidate (V).
      steps_per_validation: training steps between validations (B).
    """

    batch_size: int
    num_validations: int
    steps_per_validation: int


@dataclasses.dataclass(frozen=True)
class CandidateJob:
    """One candidate's own inputs to `candidate.train_candidate` (a Ray task's payload).

    Attributes:
      config: the child's config.
      components: its (slot, component id) pairs.
      pool: component id -> parameters for every id it references.
      trainable_ids: the ids it trains.
      hparam_values: its hyperparameter values (`HParamSpace.values`).
      data_values: the generation's data hyperparameter values (for `train_batches_fn`).
      data_seed: the seed of its training stream.
      parent_opt_state: the inherited optimizer state (mu2Net+), or None.
      parent_trainable_ids: the parent's trainable ids.
      clone_sources: new id -> parent id of cloned components.
    """

    config: families.ModelConfig
    components: tuple[tuple[str, str], ...]
    pool: Mapping[str, Any]
    trainable_ids: tuple[str, ...]
    hparam_values: Mapping[str, Any]
    data_values: Mapping[str, Any]
    data_seed: int
    parent_opt_state: Any = None
    parent_trainable_ids: tuple[str, ...] = ()
    clone_sources: Mapping[str, str] | None = None

    def train(
        self,
        train_batches_fn: TrainBatchesFn,
        validation_batches: Sequence[Batch],
        settings: StepSettings,
        *,
        cache: candidate.StepCache,
        device: Any,
        shared_pool: Mapping[str, Any] | None = None,
    ) -> candidate.CandidateResult:
        """Trains the candidate (`candidate.train_candidate`).

        Args:
          train_batches_fn: makes its training stream from `data_values` and `data_seed`.
          validation_batches: the task's validation batches.
          settings: batch size, V and B.
          cache: compiled steps shared across candidates of the same shapes.
          device: where it trains (None: the default device).
          shared_pool: parameters of ids that are not in `pool` (a Ray task's pool
            entries shared by the generation).

        Returns:
          The result.
        """
        return candidate.train_candidate(
            config=self.config,
            components=self.components,
            pool={**shared_pool, **self.pool} if shared_pool else self.pool,
            trainable_ids=self.trainable_ids,
            hparam_values=self.hparam_values,
            train_batches=train_batches_fn(
                self.data_values, batch_size=settings.batch_size, seed=self.data_seed
            ),
            validation_batches=validation_batches,
            num_validations=settings.num_validations,
            steps_per_validation=settings.steps_per_validation,
            parent_opt_state=self.parent_opt_state,
            parent_trainable_ids=self.parent_trainable_ids,
            clone_sources=self.clone_sources,
            cache=cache,
            device=device,
        )


def search_devices(count: int | None) -> list[Any]:
    """The devices a generation's candidates train on (one candidate per device at once).

    Args:
      count: how many of the local devices to use; None: all of them.

    Returns:
      The devices.

    Raises:
      ValueError: `count` is below 1 or above the number of local devices.
    """
    local = jax.local_devices()
    if count is None:
        return list(local)
    if not 1 <= count <= len(local):
        raise ValueError(
            f"SearchConfig.devices={count}, but this process has {len(local)} local devices "
            "(set XLA_FLAGS=--xla_force_host_platform_device_count=N to simulate N on CPU)."
        )
    return list(local[:count])
