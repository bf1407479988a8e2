"""The working state of one task iteration: its population, scoring, children, publication.

`search.evolve_task` runs a task iteration as a loop over generations; everything the loop
reads and changes lives in a `TaskIteration`:

- `TaskIteration.open` loads the published system, adds the task if it is new and
  re-scores the task's own active paths with today's sharing (`Scorer`).
- `plan_generation` mutates the data hyperparameters once from the best path, selects a
  parent per candidate (`selection.select_parent`) and plans and materialises its child
  (`mutations.plan_child`, `mutations.materialize`) into a `placement.CandidateJob`.
- `judge` scores a trained child in the system it would join and applies the acceptance
  rule; `join` adds a generation's accepted children to the population (private to the
  iteration until published).
- `publish` stores the best path's new components, publishes it and retires the agent's
  other paths of the task in one store transaction.
- `save_progress` stages what a finished generation produced, so that an interrupted
  iteration resumes from its last finished generation (`evolution.search.resume`).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import zlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from evolution import store as store_lib
from evolution.search import resume, scoring, selection
from evolution.search.config import SearchConfig
from evolution.search.data.batches import Batch
from evolution.search.execution import placement
from evolution.search.paths import candidate, opt_states
from evolution.search.paths import flops as flops_lib
from evolution.search.space import hparams, mutations
from evolution.system import families
from evolution.system import state as system
from evolution.system.architecture import model_config_of
from models import vit

logger = logging.getLogger("evogrow")

# Data hyperparameters of the notebooks' space that the search does not run: mixup (not
# in mu3Net either) is pinned to its no-op value.
_FIXED_DATA_VALUES = {"mixup": 0.0}
_REMOVE_PREFIX = mutations.REMOVE_LAYERS.split(":", 1)[0] + ":"
# Image-size steps (patch sides below and above the root's) of the default space.
DEFAULT_IMAGE_SIZE_STEPS = SearchConfig.image_size_steps


def default_search_space(
    config: families.ModelConfig, image_size_steps: int = DEFAULT_IMAGE_SIZE_STEPS
) -> hparams.HParamSpace:
    """The notebooks' space (`hparams.default_space`) for the root model `config`.

    Learning rate, schedule, warmup, momentum, Nesterov, adapter size, mu, and the data
    hyperparameters image size, crop area, aspect ratio, flip, brightness, contrast,
    saturation and hue are searched (mu3Net's lists; `batches.array_train_batches`
    augments, `vit.ViTConfig.resolution` resizes); mixup is pinned off. The image
    sizes are the root's side and up to `image_size_steps` patch sides below and above
    it (mu3Net: 16 to 112 around 32 with 16-pixel patches); a model that does not take
    square images (or no images) keeps its own size only (no image-size entry).

    Args:
      config: the root model's config.
      image_size_steps: patch-size steps the image size may move (0: fixed).

    Returns:
      The space.
    """
    if image_size_steps < 0:
        raise ValueError(f"image_size_steps={image_size_steps} must be >= 0.")
    base = hparams.default_space(patch_size=1, image_size=1, image_size_steps=0)
    resizable = False
    if isinstance(config, vit.ViTConfig) and config.image_shape is not None:
        height, width, _ = config.image_shape
        resizable = height == width
        if resizable:
            base = hparams.default_space(
                patch_size=config.patch_size, image_size=height, image_size_steps=image_size_steps
            )
    kept = []
    for hparam in base.hparams:
        if hparam.name == "image_size" and not resizable:
            continue
        if hparam.name in _FIXED_DATA_VALUES:
            hparam = hparams.HParam(hparam.name, (_FIXED_DATA_VALUES[hparam.name],), 0, True)
        kept.append(hparam)
    return hparams.HParamSpace(tuple(kept))


@dataclasses.dataclass(frozen=True)
class Scorer:
    """The scale-controlled score of the paths of one system (`scoring.score`).

    Attributes:
      root_params: P, the root model's parameter count.
      root_flops: F, the root path's FLOPs per example (None when `flops_scale` is 1).
      scale: s of the score.
      flops_scale: the compute factor (1.0 leaves FLOPs out).
      accounting: how shared parameters are paid for (`system.ACCOUNTINGS`).
    """

    root_params: int
    root_flops: float | None
    scale: float
    flops_scale: float
    accounting: str = system.MU2NET_PLUS

    @classmethod
    def of_system(
        cls,
        state: system.SystemState,
        params_of: Callable[[str], Any],
        *,
        scale: float,
        flops_scale: float,
        flops_term: bool = False,
        accounting: str = system.MU2NET_PLUS,
    ) -> Scorer:
        """The scorer of a system with a root path.

        Args:
          state: the system.
          params_of: component id -> parameters (for the root's FLOPs).
          scale: s of the score.
          flops_scale: the compute factor.
          flops_term: mu2Net+'s compute term: FLOPs pay the same factor `scale` as
            parameters (`flops_scale` must then be 1).
          accounting: how shared parameters are paid for.

        Returns:
          The scorer.
        """
        if flops_term:
            flops_scale = scale
        root_flops = None
        if flops_scale < 1.0:
            root = state.paths[str(state.root_path_id)]
            root_flops = flops_lib.path_flops(model_config_of(root), root.components, params_of)
        return cls(state.root_params(), root_flops, scale, flops_scale, accounting)

    def of_values(self, quality: float, accounted: float, flops: float | None) -> float:
        """The score of a quality at `accounted` parameters and `flops` FLOPs per example."""
        return scoring.score(
            quality,
            accounted,
            self.root_params,
            scale=self.scale,
            flops=flops if self.flops_scale < 1.0 else None,
            root_flops=self.root_flops,
            flops_scale=self.flops_scale,
        )

    def of_path(
        self,
        path: system.Path,
        quality: float,
        state: system.SystemState,
        params_of: Callable[[str], Any],
    ) -> float:
        """The score of `path` at `quality` with the sharing of `state`.

        Its FLOPs come from its metrics when recorded, else from XLA's cost analysis.
        """
        flops = path.metrics.get("flops") if path.metrics else None
        if flops is None and self.flops_scale < 1.0:
            flops = flops_lib.path_flops(model_config_of(path), path.components, params_of)
        return self.of_values(quality, state.accounted_params(path, self.accounting), flops)


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


class Population:
    """The task's paths during one iteration: published ones plus accepted candidates.

    Args:
      published: the task's active paths at the start of the iteration (scored).
    """

    def __init__(self, published: Sequence[system.Path]):
        self.paths: dict[str, system.Path] = {p.id: p for p in published}
        self.offspring: dict[str, int] = {p.id: p.offspring for p in published}
        # path id -> (optimizer state of its training, ids of its trained components)
        self.opt_states: dict[str, tuple[Any, tuple[str, ...]]] = {}

    def trained_slice(self, component_id: str) -> Any:
        """A component's slice of the optimizer state of the path that trained it here.

        Returns:
          `opt_states.component_slice` of that path's state, or None when no path of
          this iteration trained the component or its state is not kept.
        """
        for state, trained in self.opt_states.values():
            if state is not None and component_id in trained:
                return opt_states.component_slice(state, trained, component_id)
        return None

    def ranked(self) -> list[system.Path]:
        """The paths by descending score."""
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
class Planned:
    """A planned and materialised child: its parent, its mutations and its training job."""

    parent: system.Path
    plan: mutations.MutationPlan
    job: placement.CandidateJob


@dataclasses.dataclass(frozen=True)
class Judged:
    """A trained child as judged: its scored path, new component records and record."""

    child: system.Path
    records: list[system.Component]
    record: CandidateRecord
    result: candidate.CandidateResult


def infer_num_classes(batches: Sequence[Batch]) -> int:
    """The largest label of the (unmasked) examples of `batches`, plus one.

    Raises:
      ValueError: the batches hold no labels.
    """
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


def check_space(space: hparams.HParamSpace, config: families.ModelConfig) -> None:
    """Refuses a space that does not fit the root model or lacks an optimizer setting.

    Raises:
      ValueError: with what to change.
    """
    if "image_size" in space.names:
        if not isinstance(config, vit.ViTConfig) or config.image_shape is None:
            raise ValueError("The space's image_size is for image models only.")
        sizes = sorted(set(space["image_size"].values))
        side = config.image_shape[0]
        if sizes != [side] and config.image_shape[0] != config.image_shape[1]:
            raise ValueError(
                f"The space's image sizes {sizes} need square root images, not "
                f"{config.image_shape[:2]}; keep only the side {side}."
            )
        bad = [size for size in sizes if size < 1 or size % config.patch_size]
        if bad:
            raise ValueError(
                f"The space's image sizes {bad} are not multiples of the root's patch "
                f"size {config.patch_size}."
            )
    for name in ("lr", "schedule", "warmup", "momentum", "nesterov"):
        if name not in space.names:
            raise ValueError(f"The space lacks the optimizer hyperparameter {name!r}.")


def unmutated_options(options: mutations.MutationOptions) -> mutations.MutationOptions:
    """The options of an unmutated clone (muNet's seed sweep): no mutation can fire.

    Every hyperparameter, depth, adapter and clone decision gets probability 0, so the
    child keeps its parent's hyperparameters and architecture and references the
    parent's components (what is trainable for the task, and the final norm, is still
    cloned; a head of another task is still re-initialised).

    Args:
      options: the method's options.

    Returns:
      The options with every decision's probability fixed to 0.
    """
    fixed = dict.fromkeys(options.fixed_probabilities, 0.0)
    for prefix in (
        hparams.HPARAM_PREFIX,
        mutations.ADD_PREFIX,
        mutations.CLONE_PREFIX,
        _REMOVE_PREFIX,
    ):
        fixed[prefix + "*"] = 0.0
    return dataclasses.replace(options, fixed_probabilities=fixed)


class TaskIteration:
    """One task iteration's view of the system and what it has trained so far.

    Made by `open`. Attributes are read by the search loop; the methods change them.

    Attributes:
      store: the store.
      task: the iterated task.
      agent: the publishing agent.
      settings: the iteration's `search.SearchConfig`.
      space: the hyperparameter space (with the settings' mu as default).
      state: the system as loaded at the start (with the task).
      task_classes: the task's number of classes.
      scorer: the system's `Scorer`.
      population: the task's published and accepted paths.
      base_generation: the generation number of the iteration's first generation.
      generations_done: generations finished before this process took over (a resumed
        iteration's; 0 for a new one).
      resumed_candidates: the candidates those generations trained.
      resumed_seconds: their "train", "eval" and "compile" wall times.
    """

    def __init__(
        self,
        store: store_lib.Store,
        task: str,
        agent: str,
        settings: SearchConfig,
        space: hparams.HParamSpace,
        state: system.SystemState,
    ):
        self.store = store
        self.task = task
        self.agent = agent
        self.settings = settings
        self.space = space
        self.state = state
        self.task_classes = state.tasks[task].num_classes
        self._options = settings.mutation_options
        if not self._options.id_prefix:
            self._options = dataclasses.replace(self._options, id_prefix=agent)
        self._loaded: dict[str, Any] = {}
        self._new_params: dict[str, Any] = {}
        self._new_records: dict[str, system.Component] = {}
        self.scorer = Scorer.of_system(
            state,
            store.load_params,
            scale=settings.scale,
            flops_scale=settings.flops_scale,
            flops_term=settings.flops_term,
            accounting=settings.accounting,
        )
        # The task's own single paths, re-scored with today's sharing (a router path is
        # served, never evolved: it stays out of the population and is never retired here).
        published = []
        for path in state.active_paths(task):
            if system.is_router_path(path):
                continue
            if path.quality is not None:
                score = self.scorer.of_path(path, path.quality, state, self.params_of)
                path = dataclasses.replace(path, score=score)
            published.append(path)
        self.population = Population(published)
        self._published_ids = {p.id for p in published}
        self.base_generation = 1 + max(
            (p.generation for p in state.paths.values() if p.task == task), default=0
        )
        entropy = [int(settings.seed), zlib.crc32(task.encode()), int(self.base_generation)]
        self._rng = np.random.default_rng(np.random.SeedSequence(entropy))
        self._seeds = [p.id for p in state.seed_paths(task, settings.private_tasks)]
        # muNet's seed sweep: the iteration's first candidates are unmutated clones of
        # every seed, in order; PPDecay selection takes over when it is done.
        self._sweep = list(self._seeds) if settings.seed_sweep else []
        self._stored_slices: dict[str, Any] = {}
        # The system the current generation was planned in (its children are judged in it).
        self._generation_state = self.working_state()
        self._publications = resume.publications(store, agent)
        self._staged: set[str] = set()
        self.generations_done = 0
        self.resumed_candidates: tuple[CandidateRecord, ...] = ()
        self.resumed_seconds: dict[str, float] = {}

    @classmethod
    def open(
        cls,
        store: store_lib.Store,
        task: str,
        settings: SearchConfig,
        *,
        agent: str,
        validation_batches: Sequence[Batch],
        num_classes: int | None,
        metadata: Mapping[str, Any] | None,
    ) -> TaskIteration:
        """Loads the system for an iteration of `task`, adding the task when it is new.

        An earlier iteration of the agent that was interrupted after a finished
        generation is resumed from there (`resume.load`: same task and settings, nothing
        published since); any other staged work of the agent is discarded (it is never
        published).

        Args:
          store: the store (with a root path, `seeding.seed_root`).
          task: the task.
          settings: the iteration's `search.SearchConfig` (its space, or
            `default_search_space`, with its mu as the default mutation rate).
          agent: the publishing agent.
          validation_batches: the task's validation batches (a new task's classes).
          num_classes: classes of a new task's head; None: the stored task's, or the
            largest validation label + 1.
          metadata: JSON-safe facts stored with a new task.

        Returns:
          The iteration.

        Raises:
          ValueError: the store has no root, the space does not fit the root model, or
            `num_classes` contradicts the stored task.
        """
        progress = resume.load(store, agent=agent, task=task, settings=settings)
        store.discard_staged(agent, keep=progress.component_ids if progress else ())
        if progress is None:
            resume.clear(store, agent)  # its staged components are gone
        state = store.load_state()
        if state.root_path_id is None:
            raise ValueError("The store has no root path; call seeding.seed_root first.")
        root_config = model_config_of(state.paths[state.root_path_id])
        space = settings.space or default_search_space(root_config, settings.image_size_steps)
        for name, value in settings.starting_values:
            if name not in space.names:
                raise ValueError(
                    f"SearchConfig.starting_values names {name!r}, which is not a "
                    f"hyperparameter of the search space; known: {list(space.names)}."
                )
            space = space.with_default(name, value)
        if settings.mu is not None:
            space = space.with_default(hparams.MU, settings.mu)
        check_space(space, root_config)
        if task not in state.tasks:
            classes = num_classes or infer_num_classes(validation_batches)
            store.add_task(task, num_classes=classes, metadata=metadata)
            state = store.load_state()
        stored = state.tasks[task].num_classes
        if num_classes is not None and num_classes != stored:
            raise ValueError(f"Task {task!r} has {stored} classes, not {num_classes}.")
        iteration = cls(store, task, agent, settings, space, state)
        if progress is not None:
            try:
                iteration._restore(progress)
            except (store_lib.StoreError, KeyError) as error:  # e.g. a component removed by hand
                logger.warning("evolve %s: cannot resume (%s); starting afresh", task, error)
                store.discard_staged(agent)
                resume.clear(store, agent)
                iteration = cls(store, task, agent, settings, space, state)
        return iteration

    def _restore(self, progress: resume.Progress) -> None:
        """Takes over a saved iteration after its last finished generation."""
        self.base_generation = progress.base_generation
        self.generations_done = progress.generations_done
        self._publications = progress.publications
        self._rng.bit_generator.state = dict(progress.rng_state)
        self._sweep = list(progress.sweep)
        self._published_ids = set(progress.published_ids)
        self._new_records = {c.id: c for c in progress.components}
        self._new_params = {cid: self.store.load_params(cid) for cid in self._new_records}
        self._staged = set(self._new_records)
        population = self.population
        population.paths = {p.id: p for p in progress.paths}
        population.offspring = dict(progress.offspring)
        population.opt_states = {}
        settings = self.settings
        for path_id, trained in progress.trained.items():
            if not settings.inherit_opt_state:
                population.opt_states[path_id] = (None, trained)
                continue
            slices = {}
            for component_id in trained:
                stored = self.store.load_opt_state(component_id)
                if stored is not None:
                    slices[component_id] = stored
            values = self.space.values(hparams.HParams.from_json(population.paths[path_id].hparams))
            state, _ = opt_states.parent_state(
                slices,
                self.params_of,
                values,
                total_steps=settings.num_validations * settings.steps_per_validation,
                cycle_steps=settings.steps_per_validation,
            )
            population.opt_states[path_id] = (state, trained)
        self.resumed_candidates = tuple(
            CandidateRecord(**{**c, "applied": tuple(c["applied"])}) for c in progress.candidates
        )
        self.resumed_seconds = dict(progress.seconds)
        self._generation_state = self.working_state()
        logger.info(
            "evolve %s: agent %s resumes its iteration after generation %d of %d",
            self.task,
            self.agent,
            progress.generations_done,
            settings.generations,
        )

    def save_progress(
        self,
        generations_done: int,
        candidates: Sequence[CandidateRecord],
        seconds: Mapping[str, float],
    ) -> None:
        """Stages a finished generation's work so that an interrupted iteration resumes after it.

        The population's new components are put as staged components (with their slice
        of the optimizer state), then the `resume.Progress` record naming them is
        written: a crash in between leaves staged components that the restart discards.

        Args:
          generations_done: how many of the iteration's generations have finished.
          candidates: every candidate trained so far, in order.
          seconds: accumulated "train", "eval" and "compile" wall times.
        """
        if not resume.keeps_progress(self.store):
            return
        population = self.population
        live = {cid for p in population.paths.values() for cid in p.component_ids}
        kept = [cid for cid in self._new_records if cid in live]
        trained = {pid: tuple(ids) for pid, (_, ids) in population.opt_states.items()}
        for component_id in kept:
            if component_id not in self._staged:
                self._stage(component_id)
        progress = resume.Progress(
            agent=self.agent,
            task=self.task,
            fingerprint=resume.fingerprint(self.settings),
            publications=self._publications,
            base_generation=self.base_generation,
            generations_done=generations_done,
            rng_state=self._rng.bit_generator.state,
            sweep=tuple(self._sweep),
            paths=tuple(population.paths.values()),
            offspring=dict(population.offspring),
            published_ids=tuple(sorted(self._published_ids)),
            trained=trained,
            components=tuple(self._new_records[cid] for cid in kept),
            candidates=tuple(dataclasses.asdict(c) for c in candidates),
            seconds=dict(seconds),
        )
        resume.save(self.store, progress)

    def _stage(self, component_id: str) -> None:
        """Puts one new component (staged) with its slice of its training's optimizer state."""
        opt_slice = None
        if self.settings.inherit_opt_state:
            opt_slice = self.population.trained_slice(component_id)
        self.store.put_component(
            self._new_records[component_id], self._new_params[component_id], opt_slice
        )
        self._staged.add(component_id)

    def params_of(self, component_id: str) -> Any:
        """A component's parameters: trained in this iteration, or loaded once from the store."""
        if component_id in self._new_params:
            return self._new_params[component_id]
        if component_id not in self._loaded:
            self._loaded[component_id] = self.store.load_params(component_id)
        return self._loaded[component_id]

    def working_state(self) -> system.SystemState:
        """The system as this iteration sees it: published paths plus accepted ones."""
        return dataclasses.replace(
            self.state,
            components={**self.state.components, **self._new_records},
            paths={**self.state.paths, **self.population.paths},
        )

    def plan_generation(self, generation: int) -> list[Planned]:
        """Plans and materialises a generation's children (`candidates_per_generation`).

        The data hyperparameters are mutated once from the best path's; each child's
        parent is selected from the population (0.5 ** offspring), the seeds as fallback.
        With `seed_sweep`, the iteration's first children are unmutated clones of the
        seeds (one each, in order), and a generation holding any of them keeps the best
        path's data hyperparameters unmutated (as muNet's sampling does while it sweeps).

        Args:
          generation: the children's generation number.

        Returns:
          The planned children, in order.
        """
        space, population, rng = self.space, self.population, self._rng
        ranked = population.ranked()
        best_hparams = hparams.HParams.from_json(ranked[0].hparams) if ranked else space.defaults()
        data_mu = 0.0 if self._sweep else None
        data, _ = hparams.generation_data(
            best_hparams, rng, space=space, mu=data_mu, self_tuning=self._options.self_tuning
        )
        data_values = {name: space[name].values[i] for name, i in data.indices.items()}
        work = self._generation_state = self.working_state()
        planned: list[Planned] = []
        for _ in range(self.settings.candidates_per_generation):
            options = self._options
            if self._sweep:
                parent_id = self._sweep.pop(0)
                options = unmutated_options(options)
            else:
                parent_id = selection.select_parent(
                    [p.id for p in ranked], population.offspring, self._seeds, rng
                )
            parent = population.paths.get(parent_id) or self.state.paths[parent_id]
            if parent_id in population.paths:
                population.offspring[parent_id] = population.offspring.get(parent_id, 0) + 1
            plan = mutations.plan_child(
                work,
                parent,
                task=self.task,
                agent=self.agent,
                rng=rng,
                space=space,
                options=options,
                data=data,
                generation=generation,
            )
            data_seed = int(rng.integers(0, 2**31 - 1))
            pool = {cid: self.params_of(cid) for cid in parent.component_ids}
            child_config, created = mutations.materialize(
                plan, pool, model_config_of(parent), num_classes=self.task_classes
            )
            pool.update(created)
            hparam_values = space.values(plan.hparams)
            if self.settings.warmup_start is not None:
                hparam_values["warmup_start"] = self.settings.warmup_start
            inherited, parent_trainable = self._inherited_opt_state(plan.clones, hparam_values)
            job = placement.CandidateJob(
                config=child_config,
                components=plan.path.components,
                pool=pool,
                trainable_ids=tuple(plan.trainable_ids),
                hparam_values=hparam_values,
                data_values=data_values,
                data_seed=data_seed,
                parent_opt_state=inherited,
                parent_trainable_ids=parent_trainable,
                clone_sources=plan.clones,
            )
            planned.append(Planned(parent, plan, job))
        return planned

    def _inherited_opt_state(
        self, clones: Mapping[str, str], hparam_values: Mapping[str, Any]
    ) -> tuple[Any, tuple[str, ...]]:
        """The optimizer state a child inherits (mu2Net+), and the ids it is keyed by.

        As mu3Net's components carry their own optimizer state, each cloned component
        starts from its own slice, whichever path it is cloned through: a component
        trained in this iteration hands over its slice from memory (its path's state),
        a published one its slice from the store (other iterations and other agents
        published them), also when the parent only referenced it.
        """
        if not self.settings.inherit_opt_state or not clones:
            return None, ()
        slices = {}
        for source in dict.fromkeys(clones.values()):
            slices[source] = self.population.trained_slice(source)
            if slices[source] is None and source in self.state.components:
                if source not in self._stored_slices:
                    self._stored_slices[source] = self.store.load_opt_state(source)
                slices[source] = self._stored_slices[source]
        settings = self.settings
        return opt_states.parent_state(
            {cid: s for cid, s in slices.items() if s is not None},
            self.params_of,
            hparam_values,
            total_steps=settings.num_validations * settings.steps_per_validation,
            cycle_steps=settings.steps_per_validation,
        )

    def judge(
        self,
        item: Planned,
        result: candidate.CandidateResult,
        *,
        generation: int,
    ) -> Judged:
        """Scores a trained child in the system it would join and decides its acceptance.

        A child whose training diverged (a non-finite loss) has quality 0.

        Args:
          item: the planned child.
          result: its training result.
          generation: the child's generation.

        Returns:
          The judged child.
        """
        parent, plan = item.parent, item.plan
        diverged = not all(math.isfinite(loss) for loss in result.train_losses)
        quality = 0.0 if diverged else float(result.quality)
        child_records = mutations.component_records(plan, result.params, agent=self.agent)
        architecture = {**plan.path.architecture, "num_classes": self.task_classes}
        child = dataclasses.replace(plan.path, architecture=architecture)
        work = self._generation_state  # the system the child's generation was planned in
        would_be = dataclasses.replace(
            work,
            components={**work.components, **{c.id: c for c in child_records}},
            paths={**work.paths, child.id: child},
        )
        accounted = would_be.accounted_params(child, self.settings.accounting)
        flops = flops_lib.path_flops(item.job.config, child.components, item.job.pool.__getitem__)
        child_score = self.scorer.of_values(quality, accounted, flops)
        accepted = scoring.accept(child_score, parent.score, parent.task == self.task)
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
        )
        return Judged(child, child_records, record, result)

    def join(self, accepted: Sequence[Judged]) -> None:
        """Adds a generation's accepted children to the population, then applies the cap.

        The generation's candidates are siblings (trained in parallel in the notebooks):
        they become parents from the next generation on.
        """
        population = self.population
        for judged in accepted:
            child, result = judged.child, judged.result
            population.paths[child.id] = child
            population.offspring[child.id] = 0
            population.opt_states[child.id] = (result.opt_state, tuple(result.params))
            self._new_params.update(result.params)
            self._new_records.update({c.id: c for c in judged.records})
        population.cap(self.settings.population_cap)

    def publish(self) -> tuple[system.Path, list[str], list[str]]:
        """Puts the best path's new components, publishes it and retires the agent's others.

        One store transaction (`Store.publish`): a crash leaves either the old or the new
        published state, never half of it.

        Returns:
          The published best path, the ids of its new components, and the retired path ids.

        Raises:
          RuntimeError: the population is empty.
        """
        store, agent, task, state = self.store, self.agent, self.task, self.state
        ranked = self.population.ranked()
        if not ranked:
            raise RuntimeError(f"Task {task!r} has no path after its iteration.")
        offspring = self.population.offspring.get(ranked[0].id, 0)
        best = dataclasses.replace(ranked[0], offspring=offspring)
        fresh_ids = [cid for cid in best.component_ids if cid not in state.components]
        for component_id in fresh_ids:
            if component_id not in self._staged:  # staged by `save_progress` already
                self._stage(component_id)
        published_ids = self._published_ids
        retire = sorted(
            pid for pid in published_ids if pid != best.id and state.paths[pid].agent == agent
        )
        foreign = sorted(pid for pid in published_ids if state.paths[pid].agent != agent)
        if foreign:
            logger.warning("evolve %s: cannot retire other agents' paths %s", task, foreign)
        store.publish(agent, paths=[best], components=fresh_ids, retire=retire)
        store.discard_staged(agent)
        resume.clear(store, agent)
        return best, fresh_ids, retire
