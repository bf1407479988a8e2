"""The muNet / mu2Net+ single-path search of one task on a stored system.

One call of `evolve_task` is one *task iteration* of the muNet family
(/work/shared/spec/evolution.md):

1. Load the published system; add the task if it is new (its paths will start from the
   seeds: the root and other tasks' best paths, with a fresh head). Re-score the task's
   own active paths with the current sharing (accounted parameters change as other
   tasks start sharing components).
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
import math
import time
import zlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from evolution import candidate, families, hparams, mutations, placement, scoring, selection, system
from evolution import flops as flops_lib
from evolution import store as store_lib
from evolution.architecture import model_config_of
from evolution.batches import Batch, TrainBatchesFn
from models import vit

logger = logging.getLogger("evogrow")

# Data hyperparameters that `array_train_batches` implements; the default search space
# pins the others (random crop, mixup) to their no-op value.
_FIXED_DATA_VALUES = {"crop_area_min": 1.0, "mixup": 0.0}
# Where a generation's candidates train (`SearchConfig.executor`).
EXECUTORS = ("threads", "ray")


def default_search_space(config: families.ModelConfig) -> hparams.HParamSpace:
    """The notebooks' space (`hparams.default_space`) restricted to what this search runs.

    The image size is dropped (a path's position table fixes its input shape) and random
    crop and mixup are pinned to their no-op values (`array_train_batches` implements
    flip and brightness only); learning rate, schedule, warmup, momentum, Nesterov,
    adapter size, mu, flip and brightness are searched as in the notebooks.

    Args:
      config: the root model's config.

    Returns:
      The space.
    """
    del config  # The space does not depend on the model beyond the dropped image size.
    base = hparams.default_space(patch_size=1, image_size=1, image_size_steps=0)
    kept = []
    for hparam in base.hparams:
        if hparam.name == "image_size":
            continue
        if hparam.name in _FIXED_DATA_VALUES:
            hparam = hparams.HParam(hparam.name, (_FIXED_DATA_VALUES[hparam.name],), 0, True)
        kept.append(hparam)
    return hparams.HParamSpace(tuple(kept))


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
      space: the hyperparameter space; None uses `default_search_space`.
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
class CandidateRecord:
    """What became of one trained candidate.

    Attributes:
      path_id: the candidate's path id.
      parent_id: its parent path.
      parent_task: the parent's task (another task's or the root's for a seed parent).
      parent_score: the parent's score when the candidate was judged (None: unscored).
      generation: its generation number.
      quality: its best validation accuracy.
      score: its scale-controlled score.
      accounted_params: the parameters it pays for.
      accepted: whether it joined the population.
      applied: the mutations applied.
      train_seconds: wall time of its training steps.
      eval_seconds: wall time of its validations.
      compile_seconds: wall time spent compiling steps for it.
    """

    path_id: str
    parent_id: str
    parent_task: str
    parent_score: float | None
    generation: int
    quality: float
    score: float
    accounted_params: float
    accepted: bool
    applied: tuple[str, ...]
    train_seconds: float
    eval_seconds: float
    compile_seconds: float


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


def _infer_num_classes(batches: Sequence[Batch]) -> int:
    top = -1
    for batch in batches:
        labels = np.asarray(batch["label"])
        mask = batch.get("_mask")
        if mask is not None:
            labels = labels[np.asarray(mask).astype(bool)]
        if labels.size:
            top = max(top, int(labels.max()))
    if top < 0:
        raise ValueError("Cannot infer num_classes: the validation batches hold no labels.")
    return top + 1


def _check_space(space: hparams.HParamSpace, config: families.ModelConfig) -> None:
    if "image_size" in space.names:
        if not isinstance(config, vit.ViTConfig):
            raise ValueError("The space's image_size is for image models only.")
        sizes = set(space["image_size"].values)
        if sizes != {config.image_shape[0]} or config.image_shape[0] != config.image_shape[1]:
            raise ValueError(
                f"The space's image sizes {sorted(sizes)} must be exactly the root's side "
                f"{config.image_shape[:2]}: a path's position table fixes its input shape."
            )
    for name in ("lr", "schedule", "warmup", "momentum", "nesterov"):
        if name not in space.names:
            raise ValueError(f"The space lacks the optimizer hyperparameter {name!r}.")


class _Population:
    """The task's paths during one iteration: published ones plus accepted candidates."""

    def __init__(self, published: Sequence[system.Path]):
        self.paths: dict[str, system.Path] = {p.id: p for p in published}
        self.offspring: dict[str, int] = {p.id: p.offspring for p in published}
        self.opt_states: dict[str, tuple[Any, tuple[str, ...]]] = {}

    def ranked(self) -> list[system.Path]:
        return system.rank_by_score(self.paths.values())

    def cap(self, size: int | None) -> None:
        """mu2Net+'s per-task population cap: keeps the `size` best-scored paths."""
        if size is None:
            return
        for path in self.ranked()[size:]:
            del self.paths[path.id]
            self.offspring.pop(path.id, None)
            self.opt_states.pop(path.id, None)


@dataclasses.dataclass(frozen=True)
class _Planned:
    """A planned and materialised child: its parent, its mutations and its training job."""

    parent: system.Path
    plan: mutations.MutationPlan
    job: placement.CandidateJob


def _rng_for(config: SearchConfig, task: str, base_generation: int) -> np.random.Generator:
    entropy = [int(config.seed), zlib.crc32(task.encode()), int(base_generation)]
    return np.random.default_rng(np.random.SeedSequence(entropy))


def _judge(
    item: _Planned,
    result: candidate.CandidateResult,
    *,
    work: system.SystemState,
    task: str,
    task_classes: int,
    agent: str,
    generation: int,
    score_of_values: Callable[[float, float, float | None], float],
) -> tuple[system.Path, list[system.Component], CandidateRecord]:
    """Scores a trained child in the system it would join and decides its acceptance.

    Args:
      item: the planned child.
      result: its training result.
      work: the system as this iteration sees it (published paths and accepted ones).
      task: the iterated task.
      task_classes: the task's number of classes.
      agent: the publishing agent.
      generation: the child's generation.
      score_of_values: (quality, accounted params, FLOPs or None) -> score.

    Returns:
      The scored child path, its new component records, and its `CandidateRecord`. A
      child whose training diverged (a non-finite loss) has quality 0.
    """
    parent, plan = item.parent, item.plan
    diverged = not all(math.isfinite(loss) for loss in result.train_losses)
    quality = 0.0 if diverged else float(result.quality)
    child_records = mutations.component_records(plan, result.params, agent=agent)
    architecture = {**plan.path.architecture, "num_classes": task_classes}
    child = dataclasses.replace(plan.path, architecture=architecture)
    would_be = system.SystemState(
        {**work.components, **{c.id: c for c in child_records}},
        {**work.paths, child.id: child},
        work.tasks,
        work.root_path_id,
    )
    accounted = would_be.accounted_params(child)
    flops = flops_lib.path_flops(item.job.config, child.components, item.job.pool.__getitem__)
    child_score = score_of_values(quality, accounted, flops)
    accepted = scoring.accept(child_score, parent.score, parent.task == task)
    metrics = {
        "accounted_params": accounted,
        "flops": flops,
        "best_step": result.best_step,
        "validations": [list(v) for v in result.validations],
        "train_losses": [x if math.isfinite(x) else None for x in result.train_losses],
        "applied": list(plan.applied),
        "parent_task": parent.task,
        "diverged": diverged,
    }
    child = dataclasses.replace(child, score=child_score, quality=quality, metrics=metrics)
    record = CandidateRecord(
        path_id=child.id,
        parent_id=parent.id,
        parent_task=parent.task,
        parent_score=parent.score,
        generation=generation,
        quality=quality,
        score=child_score,
        accounted_params=accounted,
        accepted=accepted,
        applied=plan.applied,
        train_seconds=result.train_seconds,
        eval_seconds=result.eval_seconds,
        compile_seconds=result.compile_seconds,
    )
    return child, child_records, record


def _publish_best(
    store: store_lib.Store,
    agent: str,
    task: str,
    population: _Population,
    *,
    state: system.SystemState,
    published_ids: set[str],
    new_records: Mapping[str, system.Component],
    new_params: Mapping[str, Any],
) -> tuple[system.Path, list[str], list[str]]:
    """Puts the best path's new components, publishes it and retires the agent's others.

    One store transaction (`Store.publish`): a crash leaves either the old or the new
    published state, never half of it.

    Args:
      store: the store.
      agent: the publishing agent.
      task: the iterated task.
      population: the iteration's population (published and accepted paths).
      state: the system as loaded at the start of the iteration.
      published_ids: the task's paths that were published at the start.
      new_records: records of the components trained in this iteration.
      new_params: their parameters.

    Returns:
      The published best path, the ids of its new components, and the retired path ids.

    Raises:
      RuntimeError: the population is empty.
    """
    ranked = population.ranked()
    if not ranked:
        raise RuntimeError(f"Task {task!r} has no path after its iteration.")
    best = dataclasses.replace(ranked[0], offspring=population.offspring.get(ranked[0].id, 0))
    fresh_ids = [cid for cid in best.component_ids if cid not in state.components]
    for component_id in fresh_ids:
        store.put_component(new_records[component_id], new_params[component_id])
    retire = sorted(
        pid for pid in published_ids if pid != best.id and state.paths[pid].agent == agent
    )
    foreign = sorted(pid for pid in published_ids if state.paths[pid].agent != agent)
    if foreign:
        logger.warning("evolve %s: cannot retire other agents' paths %s", task, foreign)
    store.publish(agent, paths=[best], components=fresh_ids, retire=retire)
    store.discard_staged(agent)
    return best, fresh_ids, retire


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
    options = search_config.mutation_options
    if not options.id_prefix:
        options = dataclasses.replace(options, id_prefix=agent)

    # Work staged by an earlier, interrupted iteration of this agent is never published.
    store.discard_staged(agent)
    state = store.load_state()
    if state.root_path_id is None:
        raise ValueError("The store has no root path; call seeding.seed_root first.")
    root_path = state.paths[state.root_path_id]
    root_config = model_config_of(root_path)
    space = search_config.space or default_search_space(root_config)
    if search_config.mu is not None:
        space = space.with_default(hparams.MU, search_config.mu)
    _check_space(space, root_config)
    if task_name not in state.tasks:
        classes = num_classes or _infer_num_classes(validation_batches)
        store.add_task(task_name, num_classes=classes, metadata=metadata)
        state = store.load_state()
    task_classes = state.tasks[task_name].num_classes
    if num_classes is not None and num_classes != task_classes:
        raise ValueError(f"Task {task_name!r} has {task_classes} classes, not {num_classes}.")
    root_params = state.root_params()

    root_flops = flops_lib.path_flops(root_config, root_path.components, store.load_params)

    def flops_of(config: families.ModelConfig, path: system.Path) -> float:
        return flops_lib.path_flops(config, path.components, params_of)

    def score_of_values(quality: float, accounted: float, flops: float | None) -> float:
        return scoring.score(
            quality,
            accounted,
            root_params,
            scale=search_config.scale,
            flops=flops if search_config.flops_scale < 1.0 else None,
            root_flops=root_flops,
            flops_scale=search_config.flops_scale,
        )

    def score_of(path: system.Path, quality: float, in_state: system.SystemState) -> float:
        flops = path.metrics.get("flops") if path.metrics else None
        if flops is None and search_config.flops_scale < 1.0:
            flops = flops_of(model_config_of(path), path)
        return score_of_values(quality, in_state.accounted_params(path), flops)

    # The task's own paths, re-scored with today's sharing.
    published = []
    for path in state.active_paths(task_name):
        if path.quality is not None:
            path = dataclasses.replace(path, score=score_of(path, path.quality, state))
        published.append(path)
    population = _Population(published)
    published_ids = {p.id for p in published}
    base_generation = 1 + max(
        (p.generation for p in state.paths.values() if p.task == task_name), default=0
    )
    rng = _rng_for(search_config, task_name, base_generation)
    seeds = [p.id for p in state.seed_paths(task_name)]

    loaded: dict[str, Any] = {}
    new_params: dict[str, Any] = {}
    new_records: dict[str, system.Component] = {}

    def params_of(component_id: str) -> Any:
        if component_id in new_params:
            return new_params[component_id]
        if component_id not in loaded:
            loaded[component_id] = store.load_params(component_id)
        return loaded[component_id]

    def working_state() -> system.SystemState:
        paths = {**state.paths, **population.paths}
        return system.SystemState(
            {**state.components, **new_records}, paths, state.tasks, state.root_path_id
        )

    devices = placement.search_devices(search_config.devices)
    records: list[CandidateRecord] = []
    train_s = eval_s = compile_s = 0.0
    for g in range(search_config.generations):
        generation = base_generation + g
        ranked = population.ranked()
        best_hparams = hparams.HParams.from_json(ranked[0].hparams) if ranked else space.defaults()
        data_indices, _ = hparams.generation_data_indices(best_hparams, rng, space=space)
        data_values = {name: space[name].values[i] for name, i in data_indices.items()}
        joining: list[tuple[system.Path, candidate.CandidateResult, list[system.Component]]] = []
        work = working_state()
        ranked = population.ranked()
        planned: list[_Planned] = []
        for _ in range(search_config.candidates_per_generation):
            parent_id = selection.select_parent(
                [p.id for p in ranked], population.offspring, seeds, rng
            )
            parent = population.paths.get(parent_id) or state.paths[parent_id]
            if parent_id in population.paths:
                population.offspring[parent_id] = population.offspring.get(parent_id, 0) + 1
            plan = mutations.plan_child(
                work,
                parent,
                task=task_name,
                agent=agent,
                rng=rng,
                space=space,
                options=options,
                data_indices=data_indices,
                generation=generation,
            )
            data_seed = int(rng.integers(0, 2**31 - 1))
            pool = {cid: params_of(cid) for cid in parent.component_ids}
            child_config, created = mutations.materialize(
                plan, pool, model_config_of(parent), num_classes=task_classes
            )
            pool.update(created)
            inherited: Any = None
            parent_trainable: tuple[str, ...] = ()
            if search_config.inherit_opt_state and parent_id in population.opt_states:
                inherited, parent_trainable = population.opt_states[parent_id]
            job = placement.CandidateJob(
                config=child_config,
                components=plan.path.components,
                pool=pool,
                trainable_ids=tuple(plan.trainable_ids),
                hparam_values=space.values(plan.hparams),
                data_values=data_values,
                data_seed=data_seed,
                parent_opt_state=inherited,
                parent_trainable_ids=parent_trainable,
                clone_sources=plan.clones,
            )
            planned.append(_Planned(parent, plan, job))

        results = placement.train_generation(
            [item.job for item in planned],
            train_batches_fn=train_batches_fn,
            validation_batches=validation_batches,
            settings=placement.StepSettings(
                search_config.batch_size,
                search_config.num_validations,
                search_config.steps_per_validation,
            ),
            executor=search_config.executor,
            ray_address=search_config.ray_address,
            cache=cache,
            devices=devices,
        )
        for item, result in zip(planned, results, strict=True):
            train_s += result.train_seconds
            eval_s += result.eval_seconds
            compile_s += result.compile_seconds
            child, child_records, record = _judge(
                item,
                result,
                work=work,
                task=task_name,
                task_classes=task_classes,
                agent=agent,
                generation=generation,
                score_of_values=score_of_values,
            )
            records.append(record)
            if record.accepted:
                joining.append((child, result, child_records))

        # The generation's candidates are siblings (trained in parallel in the notebooks):
        # the accepted ones join the population, as parents, from the next generation on.
        for child, result, child_records in joining:
            population.paths[child.id] = child
            population.offspring[child.id] = 0
            population.opt_states[child.id] = (result.opt_state, tuple(result.params))
            new_params.update(result.params)
            new_records.update({c.id: c for c in child_records})
        population.cap(search_config.population_cap)

        best = population.ranked()[0] if population.paths else None
        elapsed = time.perf_counter() - start
        logger.info(
            "evolve %s: generation %d/%d: best score %s (quality %s), %d/%d accepted, "
            "%.1f candidates/hour",
            task_name,
            g + 1,
            search_config.generations,
            f"{best.score:.4f}" if best and best.score is not None else "-",
            f"{best.quality:.4f}" if best and best.quality is not None else "-",
            len(joining),
            search_config.candidates_per_generation,
            3600.0 * len(records) / elapsed if elapsed else 0.0,
        )

    best, fresh_ids, retire = _publish_best(
        store,
        agent,
        task_name,
        population,
        state=state,
        published_ids=published_ids,
        new_records=new_records,
        new_params=new_params,
    )
    final_state = store.load_state()
    published_best = final_state.paths[best.id]
    wall = time.perf_counter() - start
    outcome = TaskResult(
        task=task_name,
        best_path=published_best,
        quality=float(published_best.quality or 0.0),
        score=float(published_best.score or 0.0),
        accounted_params=final_state.accounted_params(published_best),
        root_params=root_params,
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
        outcome.accounted_params / root_params,
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
