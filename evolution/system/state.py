"""The evolving multitask system: components, paths, tasks and the locks between them.

A component is one named piece of a model (patch embedding, a block, an adapter, a
head) with its own stored parameters. A path is one task's model: hyperparameters plus
an ordered list of (slot, component id) references. Many paths share components.

Locks are the multiagent framework's train locks: a component is locked by every agent
with an active path that uses it (a `LockHolder`: the agent and the task it publishes
for), the root agents included. It is trainable for an agent only while no other holder
has a lock, so publishing a new path can never change another agent's model, even one of
the same task. A system may hold more than one root (`SystemState.extra_roots`, e.g. a
randomly initialised root next to the pretrained one): each is a seed of every task.

Everything here is an immutable value; the store (evolution/store/base.py) persists it.
Free-form fields (configs, hyperparameters, metrics, metadata) are kept in canonical
JSON form (tuples become lists, keys strings), so a value read back from the store
compares equal to the one written.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import re
from collections.abc import Collection, Iterable, Mapping
from typing import Any

import numpy as np

ACTIVE = "active"
RETIRED = "retired"
PATH_STATUSES = (ACTIVE, RETIRED)

# How shared parameters are paid for (`SystemState.accounted_params`). muNet's: the
# root's lock is no user (a root component used by one task is paid in full by it);
# mu2Net+'s: the root agent counts as one more user.
MUNET = "munet"
MU2NET_PLUS = "mu2net_plus"
ACCOUNTINGS = (MUNET, MU2NET_PLUS)

# The architecture "model" of a router path: a multipath model over frozen member paths
# (evolution/search/paths/router_path.py), stored and served like any path.
ROUTER_MODEL = "router"

# Ids name parameter folders on disk: a leading letter or digit keeps them apart from
# the store's hidden temporary folders, and no '/' keeps them one path segment.
_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}")


def is_valid_id(value: Any) -> bool:
    """Whether `value` is a valid component or path id (safe as one folder name).

    Args:
      value: anything, e.g. an id read back from a database.

    Returns:
      True for 1-128 characters from [A-Za-z0-9_.:-] starting with a letter or digit.
    """
    return isinstance(value, str) and _ID_PATTERN.fullmatch(value) is not None


def _check_id(value: str, what: str) -> None:
    if not is_valid_id(value):
        raise ValueError(
            f"{what} {value!r} is not a valid id: use 1-128 characters from "
            "[A-Za-z0-9_.:-], starting with a letter or digit."
        )


def _canonical_json(value: Any, what: str) -> Any:
    """Returns `value` as it reads back from JSON (a deep copy), or raises if it can't be."""
    try:
        return json.loads(json.dumps(value))
    except (TypeError, ValueError) as error:
        raise ValueError(f"{what} must be JSON-serialisable: {error}") from error


def _check_optional_number(value: float | None, what: str) -> float | None:
    if value is None:
        return None
    number = float(value)
    if math.isnan(number):
        raise ValueError(f"{what} is NaN; record a diverged candidate with quality 0 instead.")
    return number


def new_id(rng: np.random.Generator, prefix: str = "") -> str:
    """A fresh 128-bit hexadecimal id drawn from `rng` (deterministic for a seeded rng).

    Agents sharing a store must use differently seeded generators, or distinct
    prefixes, so that their ids never collide (the store rejects a duplicate id).

    Args:
      rng: the generator to draw from.
      prefix: prepended as `<prefix>-<hex>` when not empty (e.g. the agent's name).

    Returns:
      The id.
    """
    token = rng.bytes(16).hex()
    identifier = f"{prefix}-{token}" if prefix else token
    _check_id(identifier, "id")
    return identifier


def num_params_of(tree: Any) -> int:
    """Counts the scalars in a pytree of arrays (a component's parameter count).

    Args:
      tree: nested mappings / sequences whose leaves have a `.size` (or are scalars).

    Returns:
      The total number of elements.
    """
    if isinstance(tree, Mapping):
        return sum(num_params_of(value) for value in tree.values())
    if isinstance(tree, list | tuple):
        return sum(num_params_of(value) for value in tree)
    if tree is None:
        return 0
    return int(np.size(tree))


@dataclasses.dataclass(frozen=True)
class Component:
    """A stored piece of a model, immutable once published.

    Attributes:
      id: unique id; also the name of its parameter folder.
      kind: what it is: "embed", "cls", "pos", "block", "adapter", "final_norm", "head".
      num_params: its parameter count (what the score's scale control pays for).
      agent: the agent that created it (the root agent for root components).
      task: the task it was trained for (the root task for root components).
      config: its architecture, JSON-safe (e.g. hidden size, adapter width).
      parent: the component it was cloned from, or None.
      generation: the generation that created it.
    """

    id: str
    kind: str
    num_params: int
    agent: str
    task: str
    config: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    parent: str | None = None
    generation: int = 0

    def __post_init__(self):
        _check_id(self.id, "Component id")
        if self.parent is not None:
            _check_id(self.parent, "Component parent id")
        if not self.kind:
            raise ValueError(f"Component {self.id!r} has an empty kind.")
        if int(self.num_params) < 0:
            raise ValueError(f"Component {self.id!r} has num_params {self.num_params} < 0.")
        object.__setattr__(self, "num_params", int(self.num_params))
        object.__setattr__(self, "generation", int(self.generation))
        object.__setattr__(
            self, "config", _canonical_json(dict(self.config), f"Component {self.id!r} config")
        )


@dataclasses.dataclass(frozen=True)
class Path:
    """One task's model: hyperparameters plus ordered references to components.

    Attributes:
      id: unique id.
      task: the task it solves.
      components: ordered (slot, component_id) pairs (slots such as "embed",
        "block_3", "head").
      agent: the agent that published it.
      hparams: its hyperparameters, JSON-safe (e.g. indices into allowed values).
      parent: the path it was mutated from, or None (the root).
      score: the scale-controlled score (evolution/search/scoring.py), None before scoring.
      quality: the best validation quality seen while training it.
      metrics: further JSON-safe measurements.
      generation: the generation that produced it.
      offspring: how many times it has been selected as a parent.
      status: "active" (it holds locks) or "retired".
      architecture: the path's model config, JSON-safe (to rebuild the model).
    """

    id: str
    task: str
    components: tuple[tuple[str, str], ...]
    agent: str
    hparams: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    parent: str | None = None
    score: float | None = None
    quality: float | None = None
    metrics: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    generation: int = 0
    offspring: int = 0
    status: str = ACTIVE
    architecture: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        _check_id(self.id, "Path id")
        if self.parent is not None:
            _check_id(self.parent, "Path parent id")
        pairs = tuple((str(slot), str(cid)) for slot, cid in self.components)
        if not pairs:
            raise ValueError(f"Path {self.id!r} references no components.")
        for _, component_id in pairs:
            _check_id(component_id, f"Path {self.id!r} component id")
        slots = [slot for slot, _ in pairs]
        if len(set(slots)) != len(slots):
            raise ValueError(f"Path {self.id!r} repeats a slot: {slots}.")
        if self.status not in PATH_STATUSES:
            raise ValueError(f"Path {self.id!r} status {self.status!r} not in {PATH_STATUSES}.")
        if int(self.offspring) < 0:
            raise ValueError(f"Path {self.id!r} has offspring {self.offspring} < 0.")
        object.__setattr__(self, "components", pairs)
        object.__setattr__(self, "score", _check_optional_number(self.score, "Path score"))
        object.__setattr__(self, "quality", _check_optional_number(self.quality, "Path quality"))
        object.__setattr__(self, "generation", int(self.generation))
        object.__setattr__(self, "offspring", int(self.offspring))
        for name in ("hparams", "metrics", "architecture"):
            value = _canonical_json(dict(getattr(self, name)), f"Path {self.id!r} {name}")
            object.__setattr__(self, name, value)

    @property
    def component_ids(self) -> tuple[str, ...]:
        """The referenced component ids, in order."""
        return tuple(component_id for _, component_id in self.components)


@dataclasses.dataclass(frozen=True)
class TaskRecord:
    """A task known to the system.

    Attributes:
      name: the task's name (a seqio task name).
      num_classes: classes of its head.
      order: the order in which tasks were added (0, 1, ...): the round-robin order.
      metadata: further JSON-safe facts (modality, image shape, ...).
    """

    name: str
    num_classes: int
    order: int
    metadata: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        if not self.name:
            raise ValueError("A task needs a name.")
        object.__setattr__(self, "num_classes", int(self.num_classes))
        object.__setattr__(self, "order", int(self.order))
        object.__setattr__(
            self, "metadata", _canonical_json(dict(self.metadata), f"Task {self.name!r} metadata")
        )


def is_router_path(path: Path) -> bool:
    """Whether a path is a router path (a multipath model over frozen member paths).

    A router path is served as its task's model, locks the components it uses like any
    path, and is never a parent, a seed or a member of another router path.
    """
    return dict(path.architecture).get("model") == ROUTER_MODEL


@dataclasses.dataclass(frozen=True, order=True)
class LockHolder:
    """Who holds a lock on a component: an agent, with the task it publishes for.

    The pair, not the agent alone, is the holder: one agent that iterates several tasks
    (`search.evolve_round_robin`) locks a component once per task, as muNet's per-task
    locks do.

    Attributes:
      agent: the agent that published the path using the component.
      task: that path's task.
    """

    agent: str
    task: str

    @classmethod
    def of(cls, path: Path) -> LockHolder:
        """The holder of the locks of `path`'s components."""
        return cls(path.agent, path.task)


def _rank_key(path: Path) -> tuple[float, int, str]:
    score = -math.inf if path.score is None else path.score
    # Higher score first; among equal scores the older path, then the smaller id.
    return (-score, path.generation, path.id)


def rank_by_score(paths: Iterable[Path]) -> list[Path]:
    """Sorts paths by descending score (unscored last); ties: older generation, then id.

    Args:
      paths: the paths.

    Returns:
      A new, deterministically ordered list.
    """
    return sorted(paths, key=_rank_key)


@dataclasses.dataclass(frozen=True)
class SystemState:
    """A snapshot of the whole system as published in the store.

    Attributes:
      components: id -> published component.
      paths: id -> path (active and retired).
      tasks: name -> task.
      root_path_id: the root model's path (the seed of every new task, and the unit
        of the score's scale control), or None.
      extra_roots: further root paths (e.g. a randomly initialised root): seeds of
        every task like the root, published by their own root agents.
      hidden_locks: component id -> holders of locks that paths hidden from this
        snapshot hold (an agent's view shows some active paths retired,
        `agents.agent_view`); counted like the locks of active paths.
    """

    components: Mapping[str, Component]
    paths: Mapping[str, Path]
    tasks: Mapping[str, TaskRecord]
    root_path_id: str | None = None
    extra_roots: tuple[str, ...] = ()
    hidden_locks: Mapping[str, frozenset[LockHolder]] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        object.__setattr__(self, "extra_roots", tuple(dict.fromkeys(self.extra_roots)))

    @property
    def root_path_ids(self) -> tuple[str, ...]:
        """Every root path: the root first, then the extra roots."""
        main = () if self.root_path_id is None else (self.root_path_id,)
        return main + tuple(r for r in self.extra_roots if r != self.root_path_id)

    def validate(self) -> None:
        """Checks that every reference resolves.

        Raises:
          ValueError: naming a path's unknown task or component, or an unknown root.
        """
        for path in self.paths.values():
            if path.task not in self.tasks:
                raise ValueError(f"Path {path.id!r} has unknown task {path.task!r}.")
            missing = [cid for cid in path.component_ids if cid not in self.components]
            if missing:
                raise ValueError(f"Path {path.id!r} references unknown components {missing}.")
        for root in self.root_path_ids:
            if root not in self.paths:
                raise ValueError(f"Unknown root path {root!r}.")

    def active_paths(self, task: str | None = None) -> list[Path]:
        """Active paths (of one task, or all), best first (see `rank_by_score`).

        Args:
          task: restrict to this task; None gives every task's.

        Returns:
          The paths.
        """
        return rank_by_score(
            p
            for p in self.paths.values()
            if p.status == ACTIVE and (task is None or p.task == task)
        )

    @functools.cached_property
    def _holders(self) -> dict[str, frozenset[LockHolder]]:
        holders: dict[str, set[LockHolder]] = {
            cid: set(hidden) for cid, hidden in self.hidden_locks.items()
        }
        for path in self.paths.values():
            if path.status == ACTIVE:
                for component_id in path.component_ids:
                    holders.setdefault(component_id, set()).add(LockHolder.of(path))
        return {cid: frozenset(found) for cid, found in holders.items() if found}

    def holders_of(self, component_id: str) -> frozenset[LockHolder]:
        """The agents (with their tasks) holding a lock on one component (empty when none)."""
        return self._holders.get(component_id, frozenset())

    def locks(self) -> dict[str, frozenset[str]]:
        """Rebuilds the locks from the active paths, by task.

        Returns:
          component id -> the tasks whose active paths use it (components without an
          active user are absent); `holders_of` says which agents.
        """
        return {cid: frozenset(h.task for h in found) for cid, found in self._holders.items()}

    def locks_of(self, component_id: str) -> frozenset[str]:
        """The tasks holding a lock on one component (empty when none)."""
        return frozenset(h.task for h in self.holders_of(component_id))

    def is_trainable(self, component_id: str, task: str, agent: str | None = None) -> bool:
        """Whether a task's agent may train the component in place: nobody else holds a lock.

        Args:
          component_id: the component.
          task: the task that would train it.
          agent: the agent that would train it; None: any agent of `task` (only other
            tasks' locks count).

        Returns:
          True when the component's locks are empty or only the agent's own (for
          `agent=None`, only `task`'s). A component another agent locked, the root
          agents included, is frozen.

        Raises:
          KeyError: unknown component.
        """
        if component_id not in self.components:
            raise KeyError(f"Unknown component {component_id!r}.")
        if agent is None:
            return not (self.locks_of(component_id) - {task})
        return not (self.holders_of(component_id) - {LockHolder(agent, task)})

    def accounted_params(self, path: Path, accounting: str = MU2NET_PLUS) -> float:
        """The parameters a path pays for: shared components are split among their users.

        Sum over the path's components c of num_params(c) / |users(c)|, the users being
        the lock holders of c (`holders_of`: agents with their tasks, as the
        framework's `train_locks`) plus the path's own agent (a path that is not yet
        published counts as one more user of what it shares). With muNet's accounting
        the root agents' locks are not users, so a root component used by one agent is
        paid in full by it (a root path's own components are split among the agents
        using them, and paid in full by the root when none does); with mu2Net+'s a root
        agent counts as a user like any agent.

        Args:
          path: the path (published or a candidate).
          accounting: `MUNET` or `MU2NET_PLUS`.

        Returns:
          The accounted parameter count.

        Raises:
          KeyError: the path references an unknown component.
          ValueError: an unknown accounting.
        """
        if accounting not in ACCOUNTINGS:
            raise ValueError(f"accounting={accounting!r} is unknown; use one of {ACCOUNTINGS}.")
        own = LockHolder.of(path)
        not_users: frozenset[LockHolder] = frozenset()
        if accounting == MUNET:
            not_users = frozenset(LockHolder.of(self.paths[r]) for r in self.root_path_ids)
        total = 0.0
        for component_id in dict.fromkeys(path.component_ids):
            component = self.components.get(component_id)
            if component is None:
                raise KeyError(f"Path {path.id!r} references unknown component {component_id!r}.")
            users = (self.holders_of(component_id) | {own}) - not_users or {own}
            total += component.num_params / len(users)
        return total

    def best_single_path(self, task: str) -> Path | None:
        """The task's best active path that is not a router path (`rank_by_score`), or None.

        What searches build on: a parent, a seed, a multipath model's member.
        """
        ranked = [p for p in self.active_paths(task) if not is_router_path(p)]
        return ranked[0] if ranked else None

    def best_path(self, task: str) -> Path | None:
        """The task's served path: its best router path where that beats its best single path.

        Router paths are compared with the best single path by validation quality (their
        scores are not scale-controlled like a single path's): the router path of highest
        quality is served while its quality is above the single path's; otherwise the
        best single path (highest score; see `rank_by_score`) is.

        Args:
          task: the task.

        Returns:
          The path inference and the exported system run for the task, or None.
        """
        single = self.best_single_path(task)
        routers = [p for p in self.active_paths(task) if is_router_path(p)]
        best_router = max(routers, key=lambda p: p.quality or 0.0, default=None)
        if best_router is not None and (
            single is None or (best_router.quality or 0.0) > (single.quality or 0.0)
        ):
            return best_router
        return single

    def root_params(self) -> int:
        """The root model's parameter count P (the score's scale unit).

        Raises:
          ValueError: no root path is set.
        """
        if self.root_path_id is None:
            raise ValueError("The system has no root path.")
        root = self.paths[self.root_path_id]
        return sum(self.components[cid].num_params for cid in dict.fromkeys(root.component_ids))

    def seed_paths(self, task: str, private: Collection[str] = ()) -> list[Path]:
        """The seeds of a task: the root paths, then other tasks' best paths in task order.

        Args:
          task: the task that looks for seeds (its own paths are excluded).
          private: private tasks (muNet's option): their paths are never seeds of
            another task.

        Returns:
          Distinct active paths; the root paths (`root_path_ids`) are included even if
          retired.
        """
        seeds: dict[str, Path] = {}
        for root in self.root_path_ids:
            seeds[root] = self.paths[root]
        for record in sorted(self.tasks.values(), key=lambda t: t.order):
            if record.name == task or record.name in private:
                continue
            best = self.best_single_path(record.name)
            if best is not None:
                seeds.setdefault(best.id, best)
        return list(seeds.values())

    def task_order(self) -> list[str]:
        """Task names in the order they were added."""
        return [t.name for t in sorted(self.tasks.values(), key=lambda t: t.order)]
