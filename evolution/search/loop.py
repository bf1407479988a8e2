"""The muNet / mu2Net+ single-path search of one task on a stored system.

One call of `evolve_task` is one *task iteration* of the muNet family
(the muNet papers and reference notebooks):

1. Load the published system; add the task if it is new (its paths will start from the
   seeds: the root and other tasks' best paths, with a fresh head). Re-score the task's
   own active paths with the current sharing (accounted parameters change as other
   tasks start sharing components). What the iteration reads and changes lives in an
   `iteration.TaskIteration`: the steps below are its methods.
2. For each of G generations: mutate the data hyperparameters once from the task's best
   path (`hparams.generation_data`), then for each of D candidates select a
   parent (`selection.select_parent`: the task's population by descending score, with
   the seeds as fallback), plan and materialise a child (`mutations.plan_child`,
   `mutations.materialize`), train it V x B steps keeping its best validation
   (`candidate.train_candidate`, compiled steps shared through one `StepCache`), score
   it (`scoring.score`: quality = best validation accuracy, accounted parameters from
   `SystemState.accounted_params` of the state the candidate would be published into)
   and accept it iff `scoring.accept` says so. Accepted candidates join the population
   (in memory, private to this iteration) and may be parents in later generations.
   After each generation but the last the iteration saves its progress (staged
   components and a record in the store, `evolution.search.resume`): an interrupted
   iteration resumes from its last finished generation when the agent starts again.
3. Keep only the task's best path: put its new components, then publish it and retire
   the task's other active paths in ONE store transaction (`Store.publish`). From then
   on its components are locked by the task: every other task can only reference them
   frozen or clone them, so no later search changes this task's predictions.

A generation's candidates are planned first and then trained together
(`evolution.search.execution`): one per local device at a time (`SearchConfig.devices`), or
each as a Ray task (`SearchConfig.executor="ray"`), with the same results either way.
mu2Net+ optimizer-state inheritance: a parent trained in the same iteration hands its state
over from memory; a published component is stored with its slice of the state
(`evolution.search.paths.opt_states`), which a later clone of it reads back. FLOPs for the score's
compute term come from `evolution.search.paths.flops`. muNet's seed sweep
(`SearchConfig.seed_sweep`) makes an iteration's first candidates unmutated clones of every
seed; private tasks (`SearchConfig.private_tasks`) are never seeds of another task.

The root model is stored by `seeding.seed_root`; `evolve_round_robin` iterates tasks in turn
(`selection.next_task`), a task joining the rotation when it first appears (dynamic task
introduction). Inference from the store is in `evolution.export.inference`, data callbacks in
`evolution.search.data.batches`, the stored architecture in `evolution.system.architecture`.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Mapping, Sequence
from typing import Any

from evolution import store as store_lib
from evolution.search import iteration, selection
from evolution.search.config import SearchConfig
from evolution.search.data.batches import Batch, TaskData, TrainBatchesFn
from evolution.search.execution import executors, placement
from evolution.search.iteration import CandidateRecord
from evolution.search.paths import candidate
from evolution.system import state as system

logger = logging.getLogger("evogrow")

# -- results ------------------------------------------------------------------------------


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
    records: list[CandidateRecord] = list(it.resumed_candidates)
    train_s = it.resumed_seconds.get("train", 0.0)
    eval_s = it.resumed_seconds.get("eval", 0.0)
    compile_s = it.resumed_seconds.get("compile", 0.0)
    # A resumed iteration goes on after its last finished generation (`resume`).
    for g in range(it.generations_done, search_config.generations):
        generation = it.base_generation + g
        planned = it.plan_generation(generation)
        results = executors.train_generation(
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
        if g + 1 < search_config.generations:  # after the last, publication follows at once
            seconds = {"train": train_s, "eval": eval_s, "compile": compile_s}
            it.save_progress(g + 1, records, seconds)

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
        accounted_params=final_state.accounted_params(published_best, search_config.accounting),
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
