"""Where a generation's candidates train: one per local device at a time, or as Ray tasks.

On one device the candidates train one after another in the calling thread; on several
in threads, one candidate per device at a time (JAX releases the GIL while a device
computes); or as Ray tasks (`SearchConfig.executor="ray"`,
`evolution.search.execution.ray_executor`).
"""

from __future__ import annotations

import concurrent.futures
from collections.abc import Callable, Sequence
from typing import Any

from evolution.search.data.batches import Batch, TrainBatchesFn
from evolution.search.execution import placement, ray_executor
from evolution.search.paths import candidate


def train_generation(
    jobs: Sequence[placement.CandidateJob],
    *,
    train_batches_fn: TrainBatchesFn,
    validation_batches: Sequence[Batch],
    settings: placement.StepSettings,
    executor: str,
    ray_address: str | None,
    cache: candidate.StepCache,
    devices: Sequence[Any],
) -> list[candidate.CandidateResult]:
    """Trains a generation's candidates (`placement.CandidateJob.train`), results in order.

    Args:
      jobs: the candidates.
      train_batches_fn: makes each candidate's training stream.
      validation_batches: the fixed validation batches.
      settings: batch size, V and B.
      executor: "threads" (the local `devices`) or "ray".
      ray_address: the Ray cluster to join (None: $RAY_ADDRESS or a local one).
      cache: compiled steps shared across candidates of the same shapes.
      devices: the local devices (`search_devices`).

    Returns:
      One result per candidate, in order.
    """
    if executor == "ray":
        return ray_executor.train_candidates(
            jobs,
            train_batches_fn=train_batches_fn,
            validation_batches=validation_batches,
            settings=settings,
            ray_address=ray_address,
        )

    def train(job: placement.CandidateJob, device: Any) -> candidate.CandidateResult:
        return job.train(train_batches_fn, validation_batches, settings, cache=cache, device=device)

    return _train_on_devices(train, jobs, devices)


def _train_on_devices(
    train: Callable[[placement.CandidateJob, Any], candidate.CandidateResult],
    jobs: Sequence[placement.CandidateJob],
    devices: Sequence[Any],
) -> list[candidate.CandidateResult]:
    """Trains the candidates, up to one per device at a time, results in order.

    With one device the candidates train one after another in this thread (no pool);
    with more, in threads (JAX releases the GIL while a device computes).
    """
    if len(devices) <= 1 or len(jobs) <= 1:
        device = devices[0] if devices else None
        return [train(job, device) for job in jobs]
    with concurrent.futures.ThreadPoolExecutor(max_workers=len(devices)) as pool:
        futures = [pool.submit(train, job, devices[i % len(devices)]) for i, job in enumerate(jobs)]
        return [future.result() for future in futures]
