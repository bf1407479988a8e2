"""The persistent store of an evolving system: the interface every backend implements.

What the store guarantees (the contract a search and its agents rely on):

- Parameters first, rows second. `put_component` writes a component's parameters
  completely (and atomically) before its row exists, so a row never points at missing
  or half-written parameters. A put component is *staged*: private to its agent until
  published.
- One transaction per publication. `publish` makes an agent's new paths, its updated
  paths (scores, offspring counts), its retirements and the components it created
  visible together or not at all. A search killed at any moment (kill -9) reopens to
  the last completed publication: nothing it reported as published is lost, nothing
  half-written appears.
- `load_state` is a consistent snapshot of everything published, from which locks are
  rebuilt (`SystemState.locks`).

Multiagent use (agents as separate processes sharing one store): an agent publishes at
the end of each cycle its live paths and the components it created, and reloads the
state at the start of the next; ownership is checked (an agent updates or retires only
its own paths). The default backend is `evolution.store.sqlite.SqliteStore` (an
embedded SQLite file in WAL mode plus a parameter folder); a server database (e.g.
PostgreSQL for multi-machine runs) implements the same methods.
"""

from __future__ import annotations

import abc
from collections.abc import Iterable, Mapping
from typing import Any

from evolution.system import state as system


class StoreError(Exception):
    """Base class of the store's errors."""


class UnknownEntryError(StoreError, LookupError):
    """A component, path or task that the store does not hold."""


class IntegrityError(StoreError):
    """A write that would break the store's invariants (dangling or conflicting entries)."""


class SchemaVersionError(StoreError):
    """The store was written by a newer version of this code."""


class ForeignStoreError(StoreError):
    """The location holds something that is not a store of ours, or a damaged one."""


class DamagedStoreError(ForeignStoreError):
    """The store's database is missing, empty, truncated or damaged beside its parameters.

    Nothing is created, repaired or deleted: the message says what was found; restore
    the store from a backup (`./run.sh store backup`).
    """


class NoStoreError(StoreError, LookupError):
    """A read-only open of a location that holds no store."""


class Store(abc.ABC):
    """A transactional store of components (with parameters), paths and tasks."""

    @abc.abstractmethod
    def add_task(
        self, name: str, *, num_classes: int, metadata: Mapping[str, Any] | None = None
    ) -> system.TaskRecord:
        """Registers a task (idempotent when repeated with the same facts).

        Args:
          name: the task name.
          num_classes: classes of its head.
          metadata: JSON-safe facts.

        Returns:
          The stored record (with its order of addition).

        Raises:
          IntegrityError: the task exists with different facts.
        """

    @abc.abstractmethod
    def put_component(
        self, component: system.Component, params: Any, opt_state: Any = None
    ) -> None:
        """Stores a new component's parameters, then its row, as staged by its agent.

        Args:
          component: the component (its id must be new).
          params: its parameter pytree.
          opt_state: its optimizer-state pytree, or None.

        Raises:
          IntegrityError: the id exists already.
        """

    @abc.abstractmethod
    def load_params(self, component_id: str) -> Any:
        """Reads a component's parameters (nested dicts of numpy arrays).

        Raises:
          UnknownEntryError: no such component.
          StoreError: its parameters are unreadable.
        """

    @abc.abstractmethod
    def load_opt_state(self, component_id: str, target: Any = None) -> Any:
        """Reads a component's optimizer state, or None when none was stored.

        Args:
          component_id: the component.
          target: a pytree giving the structure (e.g. optax named tuples) and shapes;
            None returns nested dicts.

        Raises:
          UnknownEntryError: no such component.
          StoreError: its state is unreadable or does not fit `target`.
        """

    @abc.abstractmethod
    def publish(
        self,
        agent: str,
        paths: Iterable[system.Path] = (),
        components: Iterable[str] = (),
        retire: Iterable[str] = (),
    ) -> None:
        """Publishes an agent's work in ONE transaction.

        Args:
          agent: the publishing agent.
          paths: new paths, or new versions of the agent's own paths (task, components
            and parent must be unchanged; score, metrics, offspring, status may change).
          components: ids of components the agent staged with `put_component` that
            become public now.
          retire: ids of the agent's own paths to retire.

        Raises:
          UnknownEntryError: an unknown task, path to retire, or staged component.
          IntegrityError: a path references a component that is neither published nor
            published here, belongs to another agent, or changes an immutable field.
        """

    @abc.abstractmethod
    def set_root(self, path_id: str) -> None:
        """Marks a published path as the root model's path.

        Raises:
          UnknownEntryError: no such path.
        """

    def add_root(self, path_id: str) -> None:
        """Marks a published path as one more root (e.g. a randomly initialised root).

        The path becomes a seed of every task next to the root (`SystemState.extra_roots`);
        the root path (`set_root`) stays the unit of the score's scale control.

        Raises:
          UnknownEntryError: no such path.
        """
        raise StoreError(f"{type(self).__name__} keeps no extra roots.")

    @abc.abstractmethod
    def discard_staged(self, agent: str, keep: Iterable[str] = ()) -> tuple[str, ...]:
        """Deletes an agent's staged (never published) components and their parameters.

        An agent calls this when it (re)starts, or at the end of a cycle, to drop the
        components of rejected candidates; a restarted agent keeps the components its
        saved progress refers to (`search.resume`).

        Args:
          agent: the agent.
          keep: ids of its staged components to keep.

        Returns:
          The ids removed.
        """

    @abc.abstractmethod
    def load_state(self) -> system.SystemState:
        """A consistent snapshot of everything published (staged components excluded)."""

    @abc.abstractmethod
    def close(self) -> None:
        """Releases the store's resources."""

    def read_setting(self, key: str) -> str | None:
        """A value of the store's settings (e.g. a run's recorded plan), or None.

        Args:
          key: the setting's name.

        Returns:
          The stored text, or None when unset.
        """
        raise StoreError(f"{type(self).__name__} keeps no settings.")

    def write_setting(self, key: str, value: str) -> None:
        """Sets a value of the store's settings in one transaction.

        Args:
          key: the setting's name.
          value: the text to store.
        """
        raise StoreError(f"{type(self).__name__} keeps no settings.")

    def publication_count(self, agent: str, after: int = 0) -> tuple[int, int]:
        """How many publications `agent` committed after sequence number `after`.

        Progress that must survive a crash (e.g. evolve's finished iterations) is counted
        this way: a publication is one transaction, so it and its count commit together.

        Args:
          agent: the publishing agent.
          after: a sequence number (0: from the start).

        Returns:
          (the count, the store's latest publication sequence number).
        """
        raise StoreError(f"{type(self).__name__} does not count publications.")

    def retire_path(self, agent: str, path_id: str) -> None:
        """Retires one of the agent's paths (a one-entry `publish`).

        Args:
          agent: the path's agent.
          path_id: the path.
        """
        self.publish(agent, retire=(path_id,))

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
