"""Asynchronous agents: one method bound to one task, sharing only the published store.

An agent (spec: "Multiagent framework") runs cycles on the store until it has run
`cycles` of them or `max_seconds` have passed. Each cycle:

1. reloads what every agent last published; locks are rebuilt from the published paths,
   one per agent (`SystemState.holders_of`). A muNet cycle that was killed after a
   finished generation goes on from there (`search.resume`); other staged leftovers of
   the agent are dropped. What it loads is checked first (`agent_view.check_state`:
   a malformed or foreign path is refused with an `AgentStateError` naming it, and
   nothing is loaded);
2. runs one cycle of its method privately (candidates and their components stay
   invisible to the others: staged, never published);
3. publishes its live path and the components it created in ONE store transaction
   (`Store.publish`), retiring only its own paths.

Methods: "munet" (the muNet / mu2Net+ single-path search, one `search.evolve_task` per
cycle) and the baselines "finetune", "freeze", "adapters" (`baselines.run_baseline` from
the root each cycle, with a new seed; the agent keeps the better-scored of its live path
and the new one). Every agent's published path can be a seed of the other tasks' muNet
agents, so methods reuse each other's components. "multipath" (`multipath_agent`) trains
a router over its task's best path and other tasks' paths, all frozen, and keeps its best
result in files beside the store; it publishes a best that beats the task's best single
path as the task's router path (see there), and never evolves paths.

A parent retired by another agent during a cycle stays a valid, unchanged parent of the
child published at the cycle's end (published components are never written again: a
task trains only its own fresh clones); the next cycle no longer sees it, and selection
falls back to the seeds, which always include the root (`SystemState.seed_paths`).

A muNet agent's search sees the store through `agent_view.AgentView`, which hides
other agents' paths of its own task and paths that cannot be parents (see there).

An agent's run (its lock, the root, its cycles under a time budget) is
`agent_run.run_agent`.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import time
import zlib
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from evolution import store as store_lib
from evolution.agents import agent_view, baselines, multipath_agent
from evolution.search import iteration
from evolution.search import loop as search
from evolution.search.paths import candidate
from evolution.system import state as system

logger = logging.getLogger("evogrow")

MUNET = "munet"
MULTIPATH = multipath_agent.MULTIPATH
METHODS = (MUNET, *baselines.METHODS, MULTIPATH)
LOCK_FOLDER = "agents"
_NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}")


class AgentError(ValueError):
    """An agent that cannot start as configured; the message says what to change."""


@dataclasses.dataclass(frozen=True)
class BaselineSettings:
    """A baseline agent's method parameters (its other settings come from the search's).

    Attributes:
      steps: training steps per cycle; None: one muNet cycle's training steps
        (generations x candidates x validations x steps per validation).
      freeze_layers: k of "freeze" (None: half the root's blocks).
      adapter_size: width of "adapters" (None: the space's default).
      hparam_values: overrides of the space's default hyperparameter values.
    """

    steps: int | None = None
    freeze_layers: int | None = None
    adapter_size: int | None = None
    hparam_values: Mapping[str, Any] | None = None


@dataclasses.dataclass(frozen=True)
class AgentConfig:
    """One agent: a method with its config, bound to one task.

    Attributes:
      task: the task it works on.
      method: "munet", a baseline ("finetune", "freeze", "adapters") or "multipath".
      name: the agent's name (what it publishes as; unique among running agents);
        None: "<method>-<task>".
      search: the muNet cycle's settings; baselines use its steps_per_validation,
        batch_size, scale, flops_scale and seed.
      baseline: a baseline agent's method parameters.
      multipath: a multipath agent's method parameters.
    """

    task: str
    method: str = MUNET
    name: str | None = None
    search: search.SearchConfig = dataclasses.field(default_factory=search.SearchConfig)
    baseline: BaselineSettings = dataclasses.field(default_factory=BaselineSettings)
    multipath: multipath_agent.MultipathSettings = dataclasses.field(
        default_factory=multipath_agent.MultipathSettings
    )

    def __post_init__(self):
        if self.method not in METHODS:
            raise AgentError(f"Unknown agent method {self.method!r}; expected one of {METHODS}.")
        if not self.task:
            raise AgentError("An agent needs a task.")
        if self.name is None:
            safe_task = re.sub(r"[^A-Za-z0-9_.-]", "_", self.task)[:48]
            object.__setattr__(self, "name", f"{self.method}-{safe_task}")
        if not _NAME_PATTERN.fullmatch(str(self.name)):
            raise AgentError(
                f"Agent name {self.name!r} is not valid: use 1-64 characters from "
                "[A-Za-z0-9_.:-], starting with a letter or digit."
            )

    @property
    def agent(self) -> str:
        """The agent's name (never None after construction)."""
        return str(self.name)


@dataclasses.dataclass(frozen=True)
class CycleResult:
    """What one cycle of an agent published.

    Attributes:
      agent: the agent.
      task: its task.
      method: its method.
      cycle: the cycle's index in this run of the agent (0, 1, ...).
      path: the agent's live path after the publication.
      new_path: whether `path` was created in this cycle (else it was kept and
        re-published with its current score).
      published_components: ids of the components published with it.
      retired: ids of the agent's paths retired by the publication.
      quality: the live path's validation quality.
      score: its score in the published system.
      reused_components: ids of components on the live path that other agents (not
        the root agents) created.
      candidates: candidates trained in the cycle.
      wall_seconds: the cycle's wall time.
    """

    agent: str
    task: str
    method: str
    cycle: int
    path: system.Path
    new_path: bool
    published_components: tuple[str, ...]
    retired: tuple[str, ...]
    quality: float
    score: float
    reused_components: tuple[str, ...]
    candidates: int
    wall_seconds: float


# What a cycle returns: a multipath agent's cycle has its own record.
AgentResult = CycleResult | multipath_agent.MultipathCycle


# -- one cycle --------------------------------------------------------------------------


def _reused(state: system.SystemState, path: system.Path, agent: str) -> tuple[str, ...]:
    root_ids = {cid for root in state.root_path_ids for cid in state.paths[root].component_ids}
    return tuple(
        cid
        for cid in path.component_ids
        if cid not in root_ids and state.components[cid].agent != agent
    )


def _munet_cycle(
    store: store_lib.Store, config: AgentConfig, data: search.TaskData, cycle: int, cache: Any
) -> CycleResult:
    view = agent_view.AgentView(store, agent=config.agent, task=config.task, for_search=True)
    result = search.evolve_task(
        view,
        config.task,
        config.search,
        train_batches_fn=data.train_batches_fn,
        validation_batches=data.validation_batches,
        agent=config.agent,
        num_classes=data.num_classes,
        metadata=data.metadata,
        cache=cache,
    )
    state = store.load_state()
    path = state.paths[result.best_path.id]
    return CycleResult(
        agent=config.agent,
        task=config.task,
        method=config.method,
        cycle=cycle,
        path=path,
        new_path=bool(result.published_components),
        published_components=result.published_components,
        retired=result.retired,
        quality=result.quality,
        score=result.score,
        reused_components=_reused(state, path, config.agent),
        candidates=len(result.candidates),
        wall_seconds=result.wall_seconds,
    )


def _cycle_seed(*parts: int | str) -> int:
    entropy = [p if isinstance(p, int) else zlib.crc32(p.encode()) for p in parts]
    return int(np.random.default_rng(np.random.SeedSequence(entropy)).integers(0, 2**31 - 1))


def _num_classes(data: search.TaskData, state: system.SystemState, task: str) -> int:
    if data.num_classes is not None:
        return int(data.num_classes)
    if task in state.tasks:
        return state.tasks[task].num_classes
    return iteration.infer_num_classes(data.validation_batches)


def _as_agent_path(
    outcome: baselines.BaselineResult, *, agent: str, cycle: int, seed: int, steps: int
) -> tuple[system.Path, list[system.Component], dict[str, Any]]:
    """A baseline's path, components and parameters under fresh ids of the agent.

    `run_baseline` names them after its method and task, the same every run; an agent
    publishes a new set per cycle. The path's architecture loses the baseline's spec (a
    muNet child copies its parent's architecture), which goes to its metrics instead.
    """
    rng = np.random.default_rng(seed)
    renamed = {c.id: system.new_id(rng, agent) for c in outcome.components}
    records = [
        dataclasses.replace(c, id=renamed[c.id], agent=agent, generation=cycle)
        for c in outcome.components
    ]
    params = {renamed[old]: tree for old, tree in outcome.training.params.items()}
    metrics = {
        **outcome.path.metrics,
        "cycle": cycle,
        "baseline": dataclasses.asdict(outcome.spec),
        "test_accuracy": outcome.test_accuracy,
        "steps": steps,
    }
    path = dataclasses.replace(
        outcome.path,
        id=system.new_id(rng, agent),
        agent=agent,
        components=tuple((slot, renamed.get(cid, cid)) for slot, cid in outcome.path.components),
        generation=cycle,
        architecture={k: v for k, v in outcome.path.architecture.items() if k != "baseline"},
        metrics=metrics,
    )
    return path, records, params


def _scored(
    path: system.Path,
    state: system.SystemState,
    params_of: Callable[[str], Any],
    scorer: iteration.Scorer,
) -> system.Path:
    """The path with its score in `state`, as `search.evolve_task` scores its paths."""
    return dataclasses.replace(
        path, score=scorer.of_path(path, float(path.quality or 0.0), state, params_of)
    )


def _baseline_cycle(
    store: store_lib.Store,
    config: AgentConfig,
    data: search.TaskData,
    test_data: tuple[np.ndarray, np.ndarray],
    cycle: int,
    cache: Any,
) -> CycleResult:
    """One baseline run from the root, published if it beats the agent's live path."""
    start = time.perf_counter()
    agent, task, settings = config.agent, config.task, config.search
    store.discard_staged(agent)
    view = agent_view.AgentView(store, agent=agent, task=task, for_search=False)
    state = view.load_state()
    classes = _num_classes(data, state, task)
    if task not in state.tasks:
        store.add_task(task, num_classes=classes, metadata=data.metadata)
        state = view.load_state()
    # Numbered in the store (the live path records the last), so a restart goes on.
    mine = [p for p in state.paths.values() if p.agent == agent]
    number = 1 + max((int(p.metrics.get("cycle", p.generation)) for p in mine), default=0)
    seed = _cycle_seed(settings.seed, agent, number)
    steps = config.baseline.steps or (
        settings.generations
        * settings.candidates_per_generation
        * settings.num_validations
        * settings.steps_per_validation
    )
    outcome = baselines.run_baseline(
        store=view,
        method=config.method,
        task=task,
        train_batches=data.train_batches_fn,
        validation_batches=data.validation_batches,
        test_images=test_data[0],
        test_labels=test_data[1],
        num_classes=classes,
        steps=steps,
        steps_per_validation=settings.steps_per_validation,
        hparam_values=config.baseline.hparam_values,
        seed=seed,
        freeze_layers=config.baseline.freeze_layers,
        adapter_size=config.baseline.adapter_size,
        batch_size=settings.batch_size,
        cache=cache,
    )
    new, records, params = _as_agent_path(
        outcome, agent=agent, cycle=number, seed=seed, steps=steps
    )
    live = [p for p in state.active_paths(task) if p.agent == agent]
    # Scored in the system it would be published into: the agent's live path retired.
    retired = {p.id: dataclasses.replace(p, status=system.RETIRED) for p in live}
    components = {**state.components, **{c.id: c for c in records}}
    paths = {**state.paths, **retired, new.id: new}
    would_be = dataclasses.replace(state, components=components, paths=paths)
    # One scorer serves both systems: they share the root.
    scorer = iteration.Scorer.of_system(
        state,
        store.load_params,
        scale=settings.scale,
        flops_scale=settings.flops_scale,
        flops_term=settings.flops_term,
        accounting=settings.accounting,
    )
    new = _scored(
        new, would_be, lambda c: params[c] if c in params else store.load_params(c), scorer
    )
    ranked = system.rank_by_score(_scored(p, state, store.load_params, scorer) for p in live)
    if not ranked or (new.score or 0.0) > (ranked[0].score or 0.0):
        for record in records:
            store.put_component(record, params[record.id])
        kept, fresh, retire = new, tuple(r.id for r in records), tuple(p.id for p in live)
        store.publish(agent, paths=[new], components=fresh, retire=retire)
    else:
        kept = dataclasses.replace(ranked[0], metrics={**ranked[0].metrics, "cycle": number})
        fresh, retire = (), tuple(p.id for p in live if p.id != kept.id)
        store.publish(agent, paths=[kept], retire=retire)
    store.discard_staged(agent)
    final = store.load_state()
    path = final.paths[kept.id]
    return CycleResult(
        agent=agent,
        task=task,
        method=config.method,
        cycle=cycle,
        path=path,
        new_path=kept.id == new.id,
        published_components=fresh,
        retired=retire,
        quality=float(path.quality or 0.0),
        score=float(path.score or 0.0),
        reused_components=_reused(final, path, agent),
        candidates=1,
        wall_seconds=time.perf_counter() - start,
    )


def run_cycle(
    store: store_lib.Store,
    config: AgentConfig,
    data: search.TaskData,
    *,
    test_data: tuple[np.ndarray, np.ndarray] | None = None,
    cycle: int = 0,
    cache: candidate.StepCache | None = None,
    report_dir: str | None = None,
) -> AgentResult:
    """One cycle of an agent: reload (checked), work privately, publish atomically.

    Args:
      store: the shared store (with a root).
      config: the agent.
      data: its task's training stream and validation batches.
      test_data: (inputs, labels) a baseline reports its test accuracy on (required by
        baselines, optional for multipath, unused by muNet).
      cycle: the cycle's index in the agent's run (reported in the result).
      cache: compiled steps shared across cycles.
      report_dir: where a multipath agent keeps its best result (required by it).

    Returns:
      What the cycle published (a `multipath_agent.MultipathCycle` for multipath).

    Raises:
      agent_view.AgentStateError: the published state is malformed or foreign (nothing is loaded).
      AgentError: a baseline agent without `test_data`, or multipath without `report_dir`.
    """
    if config.method == MULTIPATH:
        if report_dir is None:
            raise AgentError("The 'multipath' agent needs report_dir (where it keeps its best).")
        return multipath_agent.run_multipath_cycle(
            store,
            agent=config.agent,
            task=config.task,
            settings=config.multipath,
            data=data,
            report_dir=report_dir,
            test_data=test_data,
            cycle=cycle,
        )
    cache = cache or candidate.default_cache()
    if config.method == MUNET:
        return _munet_cycle(store, config, data, cycle, cache)
    if test_data is None:
        raise AgentError(f"The {config.method!r} agent needs test_data (inputs, labels).")
    return _baseline_cycle(store, config, data, test_data, cycle, cache)
