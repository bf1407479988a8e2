"""What an agent loads from the shared store: checked, and narrowed for its search.

`check_state` refuses a published state that an agent must not build on (a path that
references missing components, has slots its model family does not know, or an
architecture of another family or shape than the root's), naming the path; nothing of
such a state is used. `AgentView` is the store as one agent sees it: every
`load_state` checked and, for a muNet agent's search, two kinds of active paths shown
retired:

- other agents' paths of the agent's own task: agents on one task compete by score for
  the task's best path, each evolving its own population (`search.evolve_task` may only
  publish and retire its own paths, and would otherwise try to republish another
  agent's best);
- paths `mutations.plan_child` cannot take as a parent (an "adapter_i" that does not
  come right before "block_i", as paths written before the adapters baseline put its
  adapters before the blocks had).

Locks are per agent (`SystemState.holders_of`), so a hidden path's locks still count:
the view keeps them as the state's `hidden_locks`. What another agent published stays
frozen for this one (even on its own task), and the search's accounted parameters are
those of the published system.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Mapping
from typing import Any

from evolution import store as store_lib
from evolution.search.paths import router_path
from evolution.search.space import mutations
from evolution.system import families
from evolution.system import state as system
from evolution.system.architecture import model_config_of

_ADAPTER_SLOT = re.compile(r"adapter_(\d+)")


class AgentStateError(store_lib.StoreError):
    """A published state an agent refuses to load (malformed or foreign paths)."""


def _path_problem(
    path: system.Path, state: system.SystemState, root_architecture: Mapping[str, Any]
) -> str | None:
    """Why a published path cannot be loaded next to the root, or None when it can."""
    if path.task not in state.tasks:
        return f"its task {path.task!r} is not in the store"
    missing = [cid for cid in path.component_ids if cid not in state.components]
    if missing:
        return f"it references components {missing} that the store does not hold (published)"
    if system.is_router_path(path):
        return _router_path_problem(path, state, root_architecture)
    architecture = dict(path.architecture)
    family = architecture.get("model", families.DEFAULT_FAMILY)
    root_family = root_architecture.get("model", families.DEFAULT_FAMILY)
    if family != root_family:
        return f"its architecture is of model family {family!r}; the root's is {root_family!r}"
    fields = architecture.get("config")
    root_fields = root_architecture["config"]
    if not isinstance(fields, Mapping):
        return "its architecture has no model config"
    # A path's resolution (its image size) is its own; every other field is the root's.
    fields = {k: v for k, v in fields.items() if k not in families.OPTIONAL_FIELDS}
    root_fields = {k: v for k, v in root_fields.items() if k not in families.OPTIONAL_FIELDS}
    if fields != root_fields:
        differ = sorted(k for k in {*fields, *root_fields} if fields.get(k) != root_fields.get(k))
        return f"its architecture's shape differs from the root's in {differ}"
    try:
        config = families.config_from_architecture(architecture)
    except (ValueError, TypeError, KeyError) as error:
        return f"its architecture cannot be read: {error}"
    classes = state.tasks[path.task].num_classes
    if config.num_classes != classes:
        return f"its head has {config.num_classes} classes; task {path.task!r} has {classes}"
    expected = families.family_of(config).component_slots(config)
    slots = [slot for slot, _ in path.components]
    unknown = [
        s
        for s in slots
        if s not in expected
        and not (_ADAPTER_SLOT.fullmatch(s) and int(s.split("_")[1]) < config.num_layers)
    ]
    if unknown:
        return f"it has slots {unknown} that a {config.num_layers}-block {family} has not"
    if [s for s in slots if s in expected] != expected:
        return f"its slots {slots} are not the {family} layout {expected} (plus adapters)"
    for slot, component_id in path.components:
        kind = state.components[component_id].kind
        if kind != mutations.slot_kind(slot):
            return f"component {component_id!r} of kind {kind!r} sits in slot {slot!r}"
    return None


def _router_path_problem(
    path: system.Path, state: system.SystemState, root_architecture: Mapping[str, Any]
) -> str | None:
    """Why a router path cannot be loaded: its layout, its members' shapes, slots or kinds."""
    try:
        layout = router_path.layout_of(path)
    except ValueError as error:
        return str(error)
    root_family = root_architecture.get("model", families.DEFAULT_FAMILY)
    for index, entry in enumerate(dict(path.architecture)["members"]):
        architecture = dict(entry["architecture"])
        fields = architecture.get("config")
        if architecture.get("model", families.DEFAULT_FAMILY) != root_family or (
            not isinstance(fields, Mapping) or dict(fields) != dict(root_architecture["config"])
        ):
            return f"its member {index}'s architecture is not of the root's family and shape"
        config = layout.members[index].config
        known = families.family_of(config).component_slots(config)
        unknown = [
            s
            for s in layout.members[index].slots
            if s not in known
            and not (_ADAPTER_SLOT.fullmatch(s) and int(s.split("_")[1]) < config.num_layers)
        ]
        if unknown:
            return f"its member {index} has slots {unknown} that its model has not"
    classes = state.tasks[path.task].num_classes
    if layout.num_classes != classes:
        return f"its member 0's head has {layout.num_classes} classes; {path.task!r} has {classes}"
    for slot, component_id in path.components:
        kind = state.components[component_id].kind
        if kind != router_path.slot_kind(slot):
            return f"component {component_id!r} of kind {kind!r} sits in slot {slot!r}"
    return None


def check_state(state: system.SystemState) -> None:
    """Refuses a published state that an agent must not build on.

    Every path (active or retired) must use only published components, a known task,
    the root's model family and shape (its architecture's config equals the root's;
    depth, classes and resolution may differ), the family's slots for its depth (plus
    adapters), a component of the right kind in each slot, and its task's number of
    classes. A router path (`system.is_router_path`) must have the router layout
    (`router_path.layout_of`), members of the root's family and shape with their model's
    slots, the right kind of component in every slot, and its task's classes at member
    0's head.

    Args:
      state: a snapshot of the store (`Store.load_state`).

    Raises:
      AgentStateError: no root, or the first offending path (by id), named with its
        agent and task and what is wrong.
    """
    if state.root_path_id is None:
        raise AgentStateError(
            "The store has no root path: seed it first (an agent's root_dir, or "
            "./run.sh evolve) before starting agents."
        )
    if state.root_path_id not in state.paths:
        raise AgentStateError(f"The store's root path {state.root_path_id!r} does not exist.")
    root = state.paths[state.root_path_id]
    try:
        model_config_of(root)
    except (ValueError, TypeError, KeyError) as error:
        raise AgentStateError(f"The store's root path cannot be read: {error}") from error
    for path_id in sorted(state.paths):
        path = state.paths[path_id]
        problem = _path_problem(path, state, root.architecture)
        if problem is not None:
            raise AgentStateError(
                f"Refusing the published state: path {path.id!r} (agent {path.agent!r}, "
                f"task {path.task!r}) is malformed or foreign: {problem}. Nothing was "
                "loaded; remove or repair that path before running agents on this store."
            )


def can_be_parent(path: system.Path) -> bool:
    """Whether `mutations.plan_child` can take the path as a parent (adapters precede blocks)."""
    slots = [slot for slot, _ in path.components]
    for index, slot in enumerate(slots):
        match = _ADAPTER_SLOT.fullmatch(slot)
        if match and slots[index + 1 : index + 2] != [f"block_{match.group(1)}"]:
            return False
    return True


class AgentView(store_lib.Store):
    """The store as one agent sees it: every load checked, optionally narrowed for the search.

    Writes go to the underlying store unchanged; `close` leaves it open (the agent
    owns it).

    Args:
      store: the shared store.
      agent: the agent's name.
      task: the agent's task.
      for_search: show other agents' active paths of `task`, and active paths that
        cannot be parents (`can_be_parent`), as retired (see the module docstring).
    """

    def __init__(self, store: store_lib.Store, *, agent: str, task: str, for_search: bool):
        self._store = store
        self._agent = agent
        self._task = task
        self._for_search = for_search

    def load_state(self) -> system.SystemState:
        """The published state, checked (`check_state`) and narrowed for the search."""
        state = self._store.load_state()
        check_state(state)
        if not self._for_search:
            return state
        paths = dict(state.paths)
        hidden: dict[str, frozenset[system.LockHolder]] = dict(state.hidden_locks)
        roots = set(state.root_path_ids)
        for path in state.active_paths():
            foreign = path.task == self._task and path.agent != self._agent
            if path.id not in roots and (foreign or not can_be_parent(path)):
                paths[path.id] = dataclasses.replace(path, status=system.RETIRED)
                for component_id in path.component_ids:
                    holders = hidden.get(component_id, frozenset())
                    hidden[component_id] = holders | {system.LockHolder.of(path)}
        return dataclasses.replace(state, paths=paths, hidden_locks=hidden)

    def add_task(
        self, name: str, *, num_classes: int, metadata: Mapping[str, Any] | None = None
    ) -> system.TaskRecord:
        """See `Store.add_task`."""
        return self._store.add_task(name, num_classes=num_classes, metadata=metadata)

    def put_component(
        self, component: system.Component, params: Any, opt_state: Any = None
    ) -> None:
        """See `Store.put_component`."""
        self._store.put_component(component, params, opt_state)

    def load_params(self, component_id: str) -> Any:
        """See `Store.load_params`."""
        return self._store.load_params(component_id)

    def load_opt_state(self, component_id: str, target: Any = None) -> Any:
        """See `Store.load_opt_state`."""
        return self._store.load_opt_state(component_id, target)

    def publish(
        self,
        agent: str,
        paths: Iterable[system.Path] = (),
        components: Iterable[str] = (),
        retire: Iterable[str] = (),
    ) -> None:
        """See `Store.publish`."""
        self._store.publish(agent, paths=paths, components=components, retire=retire)

    def set_root(self, path_id: str) -> None:
        """See `Store.set_root`."""
        self._store.set_root(path_id)

    def add_root(self, path_id: str) -> None:
        """See `Store.add_root`."""
        self._store.add_root(path_id)

    def discard_staged(self, agent: str, keep: Iterable[str] = ()) -> tuple[str, ...]:
        """See `Store.discard_staged`."""
        return self._store.discard_staged(agent, keep=keep)

    def read_setting(self, key: str) -> str | None:
        """See `Store.read_setting`."""
        return self._store.read_setting(key)

    def write_setting(self, key: str, value: str) -> None:
        """See `Store.write_setting`."""
        self._store.write_setting(key, value)

    def publication_count(self, agent: str, after: int = 0) -> tuple[int, int]:
        """See `Store.publication_count`."""
        return self._store.publication_count(agent, after)

    def close(self) -> None:
        """Leaves the underlying store open."""
