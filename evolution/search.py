"""The muNet / mu2Net+ single-path search of one task on a stored system.

One call of `evolve_task` is one *task iteration* of the muNet family
(/work/shared/spec/evolution.md):

1. Load the published system; add the task if it is new (its paths will start from the
   seeds: the root and other tasks' best paths, with a fresh head). Re-score the task's
   own active paths with the current sharing (accounted parameters change as other
   tasks start sharing components). What the iteration reads and changes lives in an
   `iteration.TaskIteration`: the steps below are its methods.
2. For each of G generations: mutate the data hyperparameters once from the task's best
   path (`hparams.generation_data_indices`), then for each of D candidates select a
   parent (`selection.select_parent`: the task's population by descending score, with
   the seeds as fallback), plan and materialise a child (`mutations.plan_child`,
   `mutations.materialize`), train it V x B steps keeping its best validation
   (`candidate.train_candidate`, compiled steps shared through one `StepCache`), score
   it (`scoring.score`: quality = best validation accuracy, accounted parameters from
   `SystemState.accounted_params` of the state the candidate would be published into)
   and accept it iff `scoring.accept` says so. Accepted candidates join the population
   (in memory, private to this iteration) and may be parents in later generations.
3. Keep only the task's best path: put its new components, then publish it and retire
   the task's other active paths in ONE store transaction (`Store.publish`). From then
   on its components are locked by the task: every other task can only reference them
   frozen or clone them, so no later search changes this task's predictions.

A generation's candidates are planned first and then trained together
(`evolution.placement`): one per local device at a time (`SearchConfig.devices`), or each
as a Ray task (`SearchConfig.executor="ray"`, `evolution.ray_engine`), with the same
results either way. mu2Net+ optimizer-state inheritance applies to parents trained in the
same iteration (their state is held in memory); a parent read from the store starts its
child's optimizer afresh. FLOPs for the score's compute term come from `evolution.flops`.

The root model is stored by `seeding.seed_root`; `evolve_round_robin` iterates tasks in turn
(`selection.next_task`), a task joining the rotation when it first appears (dynamic task
introduction). Inference from the store is in `evolution.inference`, data callbacks in
`evolution.batches`, the stored architecture in `evolution.architecture`.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Mapping, Sequence
from typing import Any

from evolution import candidate, hparams, iteration, mutations, placement, selection, system
from evolution import store as store_lib
from evolution.batches import Batch, TrainBatchesFn
from evolution.iteration import CandidateRecord

logger = logging.getLogger("evogrow")

# Where a generation's candidates train (`SearchConfig.executor`).
EXECUTORS = ("threads", "ray")


# -- configuration and results ----------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SearchConfig:
    """One task iteration's settings (the notebooks' G, D, V, B, s and mutations).

    Attributes:
      generations: G, generations per task iteration.
      candidates_per_generation: D, candidates per generation.
      num_validations: V, validations per candidate.
      steps_per_validation: B, training steps between validations.
      batch_size: training batch size.
      scale: s of the score (1.0: quality only).
      seed: seeds everything random (parents, mutations, ids, initialisation, data).
      mutation_options: which mutations run (`mutations.MutationOptions`); an empty
        `id_prefix` becomes the agent's name.
      space: the hyperparameter space; None uses `iteration.default_search_space`.
      mu: the mutation rate a path without one starts from (the root's children, as
        every new task's first candidates are), a value of `hparams.MU_GRID`; None keeps
        the space's default (0.1, the notebooks'). Children inherit their parent's mu,
        which mu2Net+ then tunes; with a few candidates per task it cannot climb far, so
        a short search may start higher.
      inherit_opt_state: mu2Net+: a child clone starts from its parent's optimizer
        state when the parent was trained in this iteration.
      flops_scale: mu2Net+'s compute factor of the score, paid per root-model's worth
        of FLOPs per example (XLA cost analysis, `flops.path_flops`); 1.0 leaves it out.
      population_cap: mu2Net+'s per-task population cap (None: unbounded).
      devices: how many local devices a generation's candidates train on at once
        (None: all; `placement.search_devices`).
      executor: where a generation's candidates train: "threads" (this process's
        devices) or "ray" (one Ray task per candidate, `ray_engine.train_candidates`).
      ray_address: the Ray cluster of executor "ray" (None: $RAY_ADDRESS, or a local
        cluster started on first use).
    """

    generations: int = 3
    candidates_per_generation: int = 4
    num_validations: int = 4
    steps_per_validation: int = 50
    batch_size: int = 32
    scale: float = 1.0
    seed: int = 0
    mutation_options: mutations.MutationOptions = dataclasses.field(
        default_factory=mutations.MutationOptions
    )
    space: hparams.HParamSpace | None = None
    mu: float | None = None
    inherit_opt_state: bool = True
    flops_scale: float = 1.0
    population_cap: int | None = None
    devices: int | None = None
    executor: str = "threads"
    ray_address: str | None = None

    def __post_init__(self):
        for name in (
            "generations",
            "candidates_per_generation",
            "num_validations",
            "steps_per_validation",
            "batch_size",
        ):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"SearchConfig.{name}={getattr(self, name)} must be >= 1.")
        for name in ("scale", "flops_scale"):
            if not 0.0 < getattr(self, name) <= 1.0:
                raise ValueError(f"SearchConfig.{name}={getattr(self, name)} must be in (0, 1].")
        if self.mu is not None and self.mu not in hparams.MU_GRID:
            raise ValueError(
                f"SearchConfig.mu={self.mu} is not on the grid of mutation rates "
                f"{list(hparams.MU_GRID)}."
            )
        if self.population_cap is not None and self.population_cap < 1:
            raise ValueError(f"SearchConfig.population_cap={self.population_cap} must be >= 1.")
        if self.executor not in EXECUTORS:
            raise ValueError(
                f"SearchConfig.executor={self.executor!r} is unknown; use one of {EXECUTORS}."
            )


@dataclasses.dataclass(frozen=True)
class TaskResult:
    """The outcome of one task iteration (`evolve_task`).

    Attributes:
      task: the task.
      best_path: the task's published best path (its components are locked by it).
      quality: the best path's validation quality.
      score: the best path's score.
      accounted_params: the parameters the best path pays for.
      root_params: P, the root model's parameter count.
      candidates: every trained candidate, in training order.
      published_components: ids of the components published with the best path.
      retired: ids of the task's paths retired by the publication.
      train_seconds: total wall time of training steps.
      eval_seconds: total wall time of validations.
      compile_seconds: total wall time compiling steps.
      overhead_seconds: the rest of the wall time (planning, materialising, scoring,
        loading and storing).
      wall_seconds: the iteration's wall time.
    """

    task: str
    best_path: system.Path
    quality: float
    score: float
    accounted_params: float
    root_params: int
    candidates: tuple[CandidateRecord, ...]
    published_components: tuple[str, ...]
    retired: tuple[str, ...]
    train_seconds: float
    eval_seconds: float
    compile_seconds: float
    overhead_seconds: float
    wall_seconds: float

    @property
    def candidates_per_hour(self) -> float:
        """Trained candidates per hour of the iteration's wall time."""
        return 3600.0 * len(self.candidates) / self.wall_seconds if self.wall_seconds else 0.0


# -- the search ---------------------------------------------------------------------------


def evolve_task(
    store: store_lib.Store,
    task_name: str,
    search_config: SearchConfig,
    *,
    train_batches_fn: TrainBatchesFn,
    validation_batches: Sequence[Batch],
    agent: str = "munet",
    num_classes: int | None = None,
    metadata: Mapping[str, Any] | None = None,
    cache: candidate.StepCache | None = None,
) -> TaskResult:
    """Runs one task iteration (G generations of D candidates) and publishes the best path.

    Args:
      store: the store holding the system (with a root, `seeding.seed_root`).
      task_name: the task; added to the store when new.
      search_config: the iteration's settings.
      train_batches_fn: makes each candidate's training stream.
      validation_batches: fixed batches ("image", "label", optional "_mask") scoring
        every candidate (`array_eval_batches`).
      agent: the publishing agent (owns the task's paths it publishes and retires).
      num_classes: classes of a new task's head; None: the stored task's, or the
        largest validation label + 1.
      metadata: JSON-safe facts stored with a new task.
      cache: compiled steps shared across candidates and calls (default: the
        process-wide `candidate.default_cache()`).

    Returns:
      The iteration's result; the best path is published and locks its components.

    Raises:
      ValueError: the store has no root, the space does not fit the root model, or
        `num_classes` contradicts the stored task.
    """
    start = time.perf_counter()
    cache = cache or candidate.default_cache()
    it = iteration.TaskIteration.open(
        store,
        task_name,
        search_config,
        agent=agent,
        validation_batches=validation_batches,
        num_classes=num_classes,
        metadata=metadata,
    )
    devices = placement.search_devices(search_config.devices)
    settings = placement.StepSettings(
        search_config.batch_size, search_config.num_validations, search_config.steps_per_validation
    )
    records: list[CandidateRecord] = []
    train_s = eval_s = compile_s = 0.0
    for g in range(search_config.generations):
        generation = it.base_generation + g
        planned = it.plan_generation(generation)
        results = placement.train_generation(
            [item.job for item in planned],
            train_batches_fn=train_batches_fn,
            validation_batches=validation_batches,
            settings=settings,
            executor=search_config.executor,
            ray_address=search_config.ray_address,
            cache=cache,
            devices=devices,
        )
        judged = []
        for item, result in zip(planned, results, strict=True):
            train_s += result.train_seconds
            eval_s += result.eval_seconds
            compile_s += result.compile_seconds
            judged.append(it.judge(item, result, generation=generation))
        records.extend(j.record for j in judged)
        accepted = [j for j in judged if j.record.accepted]
        it.join(accepted)

        ranked = it.population.ranked()
        best = ranked[0] if ranked else None
        elapsed = time.perf_counter() - start
        logger.info(
            "evolve %s: generation %d/%d: best score %s (quality %s), %d/%d accepted, "
            "%.1f candidates/hour",
            task_name,
            g + 1,
            search_config.generations,
            f"{best.score:.4f}" if best and best.score is not None else "-",
            f"{best.quality:.4f}" if best and best.quality is not None else "-",
            len(accepted),
            search_config.candidates_per_generation,
            3600.0 * len(records) / elapsed if elapsed else 0.0,
        )

    best, fresh_ids, retire = it.publish()
    final_state = store.load_state()
    published_best = final_state.paths[best.id]
    wall = time.perf_counter() - start
    outcome = TaskResult(
        task=task_name,
        best_path=published_best,
        quality=float(published_best.quality or 0.0),
        score=float(published_best.score or 0.0),
        accounted_params=final_state.accounted_params(published_best),
        root_params=it.scorer.root_params,
        candidates=tuple(records),
        published_components=tuple(fresh_ids),
        retired=tuple(retire),
        train_seconds=train_s,
        eval_seconds=eval_s,
        compile_seconds=compile_s,
        overhead_seconds=max(wall - train_s - eval_s - compile_s, 0.0),
        wall_seconds=wall,
    )
    logger.info(
        "evolve %s: published %s: quality %.4f, score %.4f, accounted params %.0f "
        "(%.2f x root); %d candidates in %.1fs (train %.1fs, eval %.1fs, compile %.1fs, "
        "overhead %.1fs), %.1f candidates/hour",
        task_name,
        published_best.id,
        outcome.quality,
        outcome.score,
        outcome.accounted_params,
        outcome.accounted_params / outcome.root_params,
        len(records),
        wall,
        train_s,
        eval_s,
        compile_s,
        outcome.overhead_seconds,
        outcome.candidates_per_hour,
    )
    return outcome


@dataclasses.dataclass(frozen=True)
class TaskData:
    """What `evolve_round_robin` needs to iterate one task.

    Attributes:
      train_batches_fn: makes each candidate's training stream.
      validation_batches: the fixed validation batches.
      num_classes: classes of the task's head when it is new (None: inferred).
      metadata: JSON-safe facts stored with a new task.
    """

    train_batches_fn: TrainBatchesFn
    validation_batches: Sequence[Batch]
    num_classes: int | None = None
    metadata: Mapping[str, Any] | None = None


def evolve_round_robin(
    store: store_lib.Store,
    tasks: Mapping[str, TaskData],
    search_config: SearchConfig,
    *,
    iterations: int,
    previous: str | None = None,
    agent: str = "munet",
    cache: candidate.StepCache | None = None,
) -> list[TaskResult]:
    """Iterates tasks round-robin (`selection.next_task`), one `evolve_task` per turn.

    The rotation is the store's task order (tasks added earlier first) restricted to
    `tasks`, followed by the tasks of `tasks` the store does not know yet, in mapping
    order: a task added to `tasks` between calls joins the rotation (dynamic task
    introduction) and starts from the seeds with a fresh head.

    Args:
      store: the store (with a root).
      tasks: task name -> its data; tasks of the store not named here are skipped.
      search_config: each iteration's settings.
      iterations: how many task iterations to run.
      previous: the task iterated last (None: start from the first).
      agent: the publishing agent.
      cache: compiled steps shared across iterations.

    Returns:
      One result per iteration, in order.
    """
    results = []
    for _ in range(iterations):
        known = store.load_state().task_order()
        order = [name for name in known if name in tasks]
        order += [name for name in tasks if name not in known]
        task = selection.next_task(order, previous)
        data = tasks[task]
        results.append(
            evolve_task(
                store,
                task,
                search_config,
                train_batches_fn=data.train_batches_fn,
                validation_batches=data.validation_batches,
                agent=agent,
                num_classes=data.num_classes,
                metadata=data.metadata,
                cache=cache,
            )
        )
        previous = task
    return results
