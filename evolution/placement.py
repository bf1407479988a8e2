"""Where a generation's candidates train: one per local device at a time, or as Ray tasks.

`search.evolve_task` plans and materialises a generation's children first
(`PlannedCandidate`), then trains them together here (`train_generation`): on one device
one after another in the calling thread; on several in threads, one candidate per device
at a time (JAX releases the GIL while a device computes); or as Ray tasks
(`SearchConfig.executor="ray"`, `evolution.ray_engine`). A result depends only on its own
inputs, so the outcome does not depend on where a candidate trained.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax

from evolution import candidate, families, hparams, mutations, system
from evolution.batches import Batch, TrainBatchesFn


@dataclasses.dataclass(frozen=True)
class PlannedCandidate:
    """A planned and materialised child, ready to train.

    Attributes:
      parent: the parent path.
      plan: the child's mutations (`mutations.plan_child`).
      config: the child's model config.
      pool: component id -> parameters of every component the child uses.
      data_values: the generation's data hyperparameters.
      data_seed: the seed of the child's training stream.
      inherited: the parent's optimizer state (mu2Net+), or None.
      parent_trainable: the component ids that state covers.
    """

    parent: system.Path
    plan: mutations.MutationPlan
    config: families.ModelConfig
    pool: dict[str, Any]
    data_values: Mapping[str, Any]
    data_seed: int
    inherited: Any
    parent_trainable: tuple[str, ...]


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


def train_generation(
    planned: Sequence[PlannedCandidate],
    *,
    space: hparams.HParamSpace,
    train_batches_fn: TrainBatchesFn,
    validation_batches: Sequence[Batch],
    batch_size: int,
    num_validations: int,
    steps_per_validation: int,
    executor: str,
    ray_address: str | None,
    cache: candidate.StepCache,
    devices: Sequence[Any],
) -> list[candidate.CandidateResult]:
    """Trains a generation's candidates (`candidate.train_candidate`), results in order.

    Args:
      planned: the candidates.
      space: the hyperparameter space their plans index into.
      train_batches_fn: makes each candidate's training stream.
      validation_batches: the fixed validation batches.
      batch_size: training batch size.
      num_validations: validations per candidate (V).
      steps_per_validation: training steps between validations (B).
      executor: "threads" (the local `devices`) or "ray".
      ray_address: the Ray cluster to join (None: a local one).
      cache: compiled steps shared across candidates of the same shapes.
      devices: the local devices (`search_devices`).

    Returns:
      One result per candidate, in order.
    """
    if executor == "ray":
        from evolution import ray_engine  # noqa: PLC0415 - Ray is optional

        return ray_engine.train_candidates(
            [
                ray_engine.CandidateJob(
                    config=item.config,
                    components=item.plan.path.components,
                    pool=item.pool,
                    trainable_ids=tuple(item.plan.trainable_ids),
                    hparam_values=space.values(item.plan.hparams),
                    data_values=item.data_values,
                    data_seed=item.data_seed,
                    parent_opt_state=item.inherited,
                    parent_trainable_ids=item.parent_trainable,
                    clone_sources=item.plan.clones,
                )
                for item in planned
            ],
            train_batches_fn=train_batches_fn,
            validation_batches=validation_batches,
            batch_size=batch_size,
            num_validations=num_validations,
            steps_per_validation=steps_per_validation,
            ray_address=ray_address,
        )

    def train(item: PlannedCandidate, device: Any) -> candidate.CandidateResult:
        return candidate.train_candidate(
            config=item.config,
            components=item.plan.path.components,
            pool=item.pool,
            trainable_ids=item.plan.trainable_ids,
            hparam_values=space.values(item.plan.hparams),
            train_batches=train_batches_fn(
                item.data_values, batch_size=batch_size, seed=item.data_seed
            ),
            validation_batches=validation_batches,
            num_validations=num_validations,
            steps_per_validation=steps_per_validation,
            parent_opt_state=item.inherited,
            parent_trainable_ids=item.parent_trainable,
            clone_sources=item.plan.clones,
            cache=cache,
            device=device,
        )

    return _train_on_devices(train, planned, devices)


def _train_on_devices(
    train: Callable[[PlannedCandidate, Any], candidate.CandidateResult],
    planned: Sequence[PlannedCandidate],
    devices: Sequence[Any],
) -> list[candidate.CandidateResult]:
    """Trains the planned candidates, up to one per device at a time, results in order.

    With one device the candidates train one after another in this thread (no pool);
    with more, in threads (JAX releases the GIL while a device computes).
    """
    if len(devices) <= 1 or len(planned) <= 1:
        device = devices[0] if devices else None
        return [train(item, device) for item in planned]
    with concurrent.futures.ThreadPoolExecutor(max_workers=len(devices)) as pool:
        futures = [
            pool.submit(train, item, devices[i % len(devices)]) for i, item in enumerate(planned)
        ]
        return [future.result() for future in futures]
