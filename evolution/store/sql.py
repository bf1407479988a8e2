"""What the SQL stores share: rows in a relational database, parameters in folders.

`SqlStore` holds the logic of `sqlite_store.SqliteStore` and `postgres_store.PostgresStore`
(the `store.Store` contract, written once): components are put parameters-first (a
folder renamed into `<params root>/<id>` inside the transaction that inserts the row,
under the database's write lock), publications are one transaction, `load_state` is
one snapshot. A backend supplies its connection, its write transaction (serial: writers
of one store queue on one lock), its read snapshot, its schema check and a few dialect
details (`PLACEHOLDER`, `ROW_ORDER`, `_insert_publication`).

Statements are written with `?` placeholders; a backend whose driver uses another style
sets `PLACEHOLDER` and `_sql` rewrites them. Values keep the same types in every
backend (JSON as text written by `dumps`, booleans as the driver stores Python bools),
so both stores return equal `SystemState`s.
"""

from __future__ import annotations

import abc
import contextlib
import json
import logging
import os
import shutil
import time
from collections.abc import Iterable, Mapping
from typing import Any

from evolution.store import base as store
from evolution.store import param_files
from evolution.system import state as system

logger = logging.getLogger("evogrow")

SCHEMA_FORMAT = "evogrow.evolution.store"
# Version 2 added `orphan_candidates`; a version-1 store is upgraded when opened to write.
SCHEMA_VERSION = 2
TABLES_V1 = frozenset(
    {"schema_info", "settings", "tasks", "components", "publications", "paths", "path_components"}
)
TABLES = TABLES_V1 | {"orphan_candidates"}
# Ids whose parameter folder may exist without a component row: written (committed)
# before a folder is renamed into place, or when components are discarded. Only these
# folders are ever removed as orphans; `owner` is the writer's temporary folder name
# (host and pid), NULL for discarded components.
ORPHAN_CANDIDATES_TABLE = "CREATE TABLE orphan_candidates(id TEXT PRIMARY KEY, owner TEXT)"
# The settings key of the extra roots (`Store.add_root`), a JSON list of path ids.
EXTRA_ROOTS_SETTING = "extra_roots"
_COMPONENT_COLUMNS = "id, kind, num_params, agent, task, config, parent, generation"
_PATH_COLUMNS = (
    "id, agent, task, components, parent, hparams, generation, architecture, score,"
    " quality, metrics, offspring, status"
)


def dumps(value: Any) -> str:
    """JSON text of a value as every SQL store writes it (sorted keys).

    Args:
      value: a JSON-safe value.

    Returns:
      The text.
    """
    return json.dumps(value, sort_keys=True)


def check_schema_info(
    where: str,
    tables: set[str],
    info: Mapping[str, str] | None,
    *,
    required_keys: tuple[str, ...] = (),
) -> Mapping[str, str]:
    """Refuses a database that is not a usable store of this schema version.

    Args:
      where: the database, as messages name it.
      tables: the names of its tables (not empty).
      info: its schema_info rows as key -> value (None: no schema_info table).
      required_keys: schema_info keys the backend needs besides format and version.

    Returns:
      `info`, checked.

    Raises:
      ForeignStoreError: not a store of ours, or a damaged one.
      SchemaVersionError: written by a newer schema version.
    """
    if info is None:
        raise store.ForeignStoreError(
            f"{where} has tables {sorted(tables)[:5]} but no schema_info: not an evolution store."
        )
    if info.get("format") != SCHEMA_FORMAT or not str(info.get("version")).isdigit():
        raise store.ForeignStoreError(
            f"{where} records format {info.get('format')!r} version "
            f"{info.get('version')!r}; expected {SCHEMA_FORMAT!r}."
        )
    version = int(info["version"])
    if version > SCHEMA_VERSION:
        raise store.SchemaVersionError(
            f"{where} has schema version {version}; this code reads up to "
            f"{SCHEMA_VERSION}. Use a newer evogrow."
        )
    missing_keys = [key for key in required_keys if key not in info]
    wanted = TABLES_V1 if version == 1 else TABLES
    if version < 1 or not wanted <= tables or missing_keys:
        raise store.DamagedStoreError(
            f"{where} (schema version {version}) lacks tables {sorted(wanted - tables)} "
            f"or schema_info keys {missing_keys}: a damaged or unsupported store."
        )
    return info


def damaged_database_message(where: str, error: Exception) -> str:
    """The one-line message for a database error of a store (damaged pages, I/O).

    Args:
      where: the store, as messages name it.
      error: the driver's error.

    Returns:
      The message, which says how to check and recover.
    """
    return (
        f"The store's database at {where} is not usable: {error}. Nothing was changed; "
        f"run `./run.sh store check {where}` and restore the store from a backup."
    )


def _component_of(row: tuple) -> system.Component:
    return system.Component(
        id=row[0],
        kind=row[1],
        num_params=row[2],
        agent=row[3],
        task=row[4],
        config=json.loads(row[5]),
        parent=row[6],
        generation=row[7],
    )


def _path_of(row: tuple) -> system.Path:
    return system.Path(
        id=row[0],
        agent=row[1],
        task=row[2],
        components=tuple(tuple(pair) for pair in json.loads(row[3])),
        parent=row[4],
        hparams=json.loads(row[5]),
        generation=row[6],
        architecture=json.loads(row[7]),
        score=row[8],
        quality=row[9],
        metrics=json.loads(row[10]),
        offspring=row[11],
        status=row[12],
    )


class SqlStore(store.Store):
    """A `store.Store` on a SQL database and a folder of parameter folders.

    Subclasses set `_connection` (a DB-API connection whose `execute` returns a cursor),
    `_params_root` (the folder of `<id>/` parameter folders) and `_location` (for
    messages), and implement `_transaction` and `_snapshot`.
    """

    PLACEHOLDER = "?"
    # A column that orders rows by insertion (load_state keeps that order).
    ROW_ORDER = "rowid"

    _connection: Any
    _params_root: str
    _location: str
    read_only: bool = False
    # The schema version of the open database (after any upgrade).
    schema_version: int = SCHEMA_VERSION

    # -- what a backend supplies ------------------------------------------------------

    @abc.abstractmethod
    def _transaction(self) -> contextlib.AbstractContextManager[Any]:
        """A write transaction holding the store's write lock; yields the connection."""

    @abc.abstractmethod
    def _snapshot(self) -> contextlib.AbstractContextManager[Any]:
        """A read-only transaction on one consistent snapshot; yields the connection."""

    def _insert_publication(self, db: Any, agent: str) -> int:
        """Inserts a publication row; returns its sequence number."""
        row = db.execute(
            self._sql("INSERT INTO publications(agent, time) VALUES (?, ?) RETURNING seq"),
            (agent, time.time()),
        ).fetchone()
        return int(row[0])

    # -- helpers ----------------------------------------------------------------------

    def _sql(self, statement: str) -> str:
        return statement if self.PLACEHOLDER == "?" else statement.replace("?", self.PLACEHOLDER)

    def _db(self) -> Any:
        if self._connection is None:
            raise store.StoreError(f"The store at {self._location} is closed.")
        return self._connection

    def _execute(self, db: Any, statement: str, values: tuple = ()) -> Any:
        return db.execute(self._sql(statement), values)

    def _executemany(self, db: Any, statement: str, rows: list[tuple]) -> None:
        cursor = db.cursor()
        try:
            cursor.executemany(self._sql(statement), rows)
        finally:
            cursor.close()

    def _folder(self, component_id: Any) -> str:
        """The parameter folder of a component id, validated before it becomes a path."""
        if not system.is_valid_id(component_id):
            raise store.DamagedStoreError(
                f"The store at {self._location} holds the component id {component_id!r}, "
                "which is not a valid id (a damaged or tampered database); nothing was "
                "deleted. Restore the store from a backup."
            )
        return os.path.join(self._params_root, component_id)

    def _check_writable(self) -> None:
        if self.read_only:
            raise store.StoreError(
                f"The store at {self._location} is open read-only; open it to write."
            )

    def _remove_orphans_locked(self, db: Any) -> list[str]:
        """Removes the parameter folders the database proves orphaned, and dead temporaries.

        A folder is removed only when its id is an orphan candidate (`ORPHAN_CANDIDATES_TABLE`)
        without a component row, whose writer is gone (or which was discarded); folders
        the database does not know are kept (`unreferenced_folders` lists them).
        Call inside a write transaction, so no concurrent writer is renaming a folder.
        """
        removed = []
        candidates = self._execute(db, "SELECT id, owner FROM orphan_candidates").fetchall()
        for component_id, owner in sorted(candidates):
            folder = self._folder(component_id)
            has_row = self._component_row(component_id) is not None
            if not has_row and owner is not None:
                if not param_files.is_temp_of_dead_local_process(owner):
                    continue  # its writer may still be about to commit the row
            if not has_row and os.path.lexists(folder):
                shutil.rmtree(folder, ignore_errors=True)
                removed.append(component_id)
            self._execute(db, "DELETE FROM orphan_candidates WHERE id = ?", (component_id,))
        for name in sorted(os.listdir(self._params_root)):
            if param_files.is_temp_of_dead_local_process(name):
                shutil.rmtree(os.path.join(self._params_root, name), ignore_errors=True)
                removed.append(name)
        if removed:
            logger.info(
                "store %s: removed %d orphaned parameter folders", self._location, len(removed)
            )
        return removed

    def unreferenced_folders(self) -> list[str]:
        """Folders in the parameter root that the database does not know (never removed).

        Hidden entries (temporary folders, a marker file) and orphan candidates (which a
        writing open removes once their writer is gone) are not listed.

        Returns:
          The sorted names.
        """
        with self._snapshot() as db:
            known = {row[0] for row in self._execute(db, "SELECT id FROM components")}
            if self._has_orphan_candidates():
                known |= {row[0] for row in self._execute(db, "SELECT id FROM orphan_candidates")}
        return sorted(
            name
            for name in os.listdir(self._params_root)
            if name not in known and not name.startswith(".")
        )

    def _has_orphan_candidates(self) -> bool:
        """False only for a version-1 store opened read-only (never upgraded)."""
        return self.schema_version >= 2

    # -- tasks ------------------------------------------------------------------------

    def add_task(
        self, name: str, *, num_classes: int, metadata: Mapping[str, Any] | None = None
    ) -> system.TaskRecord:
        """See `Store.add_task`."""
        with self._transaction() as db:
            row = self._execute(
                db, "SELECT position, num_classes, metadata FROM tasks WHERE name = ?", (name,)
            ).fetchone()
            if row is not None:
                existing = system.TaskRecord(name, row[1], row[0], json.loads(row[2]))
                wanted = system.TaskRecord(name, num_classes, row[0], metadata or {})
                if existing != wanted:
                    raise store.IntegrityError(
                        f"Task {name!r} exists as {existing}; cannot re-add it as {wanted}."
                    )
                return existing
            order = int(self._execute(db, "SELECT COUNT(*) FROM tasks").fetchone()[0])
            record = system.TaskRecord(name, num_classes, order, metadata or {})
            self._execute(
                db,
                "INSERT INTO tasks(name, position, num_classes, metadata) VALUES (?, ?, ?, ?)",
                (name, order, record.num_classes, dumps(record.metadata)),
            )
            return record

    # -- components -------------------------------------------------------------------

    def put_component(
        self, component: system.Component, params: Any, opt_state: Any = None
    ) -> None:
        """See `Store.put_component`."""
        self._check_writable()
        final = self._folder(component.id)
        self._check_new_component(component.id, final)
        items = {"params": params}
        if opt_state is not None:
            items["opt_state"] = opt_state
        temp = param_files.write_temp_folder(self._params_root, items)
        renamed = False
        try:
            # Committed first: should we die between the rename and the row's commit, the
            # database proves the folder orphaned (`_remove_orphans_locked`).
            with self._transaction() as db:
                self._execute(db, "DELETE FROM orphan_candidates WHERE id = ?", (component.id,))
                self._execute(
                    db,
                    "INSERT INTO orphan_candidates(id, owner) VALUES (?, ?)",
                    (component.id, os.path.basename(temp)),
                )
            with self._transaction() as db:
                self._check_new_component(component.id, final)
                param_files.publish_folder(temp, final)
                renamed = True
                self._execute(
                    db,
                    "INSERT INTO components(id, kind, num_params, agent, task, config, parent,"
                    " generation, has_opt_state, published) VALUES (?,?,?,?,?,?,?,?,?,?)",
                    (
                        component.id,
                        component.kind,
                        component.num_params,
                        component.agent,
                        component.task,
                        dumps(component.config),
                        component.parent,
                        component.generation,
                        opt_state is not None,
                        False,
                    ),
                )
                self._execute(db, "DELETE FROM orphan_candidates WHERE id = ?", (component.id,))
        except BaseException:
            shutil.rmtree(final if renamed else temp, ignore_errors=True)
            if not renamed:  # the folder in place (if any) is not ours: never prove it orphaned
                with contextlib.suppress(Exception), self._transaction() as db:
                    self._execute(
                        db,
                        "DELETE FROM orphan_candidates WHERE id = ? AND owner = ?",
                        (component.id, os.path.basename(temp)),
                    )
            raise

    def _check_new_component(self, component_id: str, final: str) -> None:
        if self._component_row(component_id) is not None:
            raise store.IntegrityError(f"Component {component_id!r} exists already.")
        if os.path.lexists(final):
            raise store.IntegrityError(
                f"{final} exists but the store has no component {component_id!r}; refusing "
                "to overwrite a folder the store does not know (`./run.sh store check`)."
            )

    def _component_row(self, component_id: str) -> tuple | None:
        """(agent, published, has_opt_state) of a component, or None."""
        return self._execute(
            self._db(),
            "SELECT agent, published, has_opt_state FROM components WHERE id = ?",
            (component_id,),
        ).fetchone()

    def _folder_of(self, component_id: str) -> str:
        if self._component_row(component_id) is None:
            raise store.UnknownEntryError(f"Unknown component {component_id!r}.")
        return self._folder(component_id)

    def load_params(self, component_id: str) -> Any:
        """See `Store.load_params`."""
        folder = self._folder_of(component_id)
        try:
            return param_files.read_item(folder, "params")
        except param_files.ParamFileError as error:
            raise store.StoreError(f"Parameters of {component_id!r}: {error}") from error

    def load_opt_state(self, component_id: str, target: Any = None) -> Any:
        """See `Store.load_opt_state`."""
        folder = self._folder_of(component_id)
        if not param_files.has_item(folder, "opt_state"):
            row = self._component_row(component_id)
            if row is not None and row[2]:
                raise store.StoreError(f"Optimizer state of {component_id!r} is missing.")
            return None
        try:
            return param_files.read_item(folder, "opt_state", target)
        except param_files.ParamFileError as error:
            raise store.StoreError(f"Optimizer state of {component_id!r}: {error}") from error

    def discard_staged(self, agent: str, keep: Iterable[str] = ()) -> tuple[str, ...]:
        """See `Store.discard_staged`."""
        self._check_writable()
        kept = set(keep)
        with self._transaction() as db:
            ids = tuple(
                row[0]
                for row in self._execute(
                    db,
                    "SELECT id FROM components WHERE agent = ? AND NOT published ORDER BY id",
                    (agent,),
                ).fetchall()
                if row[0] not in kept
            )
            folders = [self._folder(i) for i in ids]
            self._executemany(db, "DELETE FROM components WHERE id = ?", [(i,) for i in ids])
            self._executemany(db, "DELETE FROM orphan_candidates WHERE id = ?", [(i,) for i in ids])
            self._executemany(
                db, "INSERT INTO orphan_candidates(id, owner) VALUES (?, NULL)", [(i,) for i in ids]
            )
        # Rows go first, recorded as orphan candidates: a crash here leaves folders the
        # next writing session removes.
        for folder in folders:
            shutil.rmtree(folder, ignore_errors=True)
        if ids:
            with self._transaction() as db:
                self._executemany(
                    db, "DELETE FROM orphan_candidates WHERE id = ?", [(i,) for i in ids]
                )
        return ids

    # -- paths ------------------------------------------------------------------------

    def publish(
        self,
        agent: str,
        paths: Iterable[system.Path] = (),
        components: Iterable[str] = (),
        retire: Iterable[str] = (),
    ) -> None:
        """See `Store.publish`."""
        paths, components, retire = list(paths), list(dict.fromkeys(components)), list(retire)
        path_ids = [p.id for p in paths]
        if len(set(path_ids)) != len(path_ids):
            raise store.IntegrityError(f"publish got the same path twice: {path_ids}.")
        if set(path_ids) & set(retire):
            raise store.IntegrityError(
                f"publish both updates and retires {sorted(set(path_ids) & set(retire))}."
            )
        with self._transaction() as db:
            self._publish_components(db, agent, components)
            seq = self._insert_publication(db, agent)
            for path in paths:
                self._write_path(db, agent, path, seq)
            for path_id in retire:
                self._check_owner(db, agent, path_id)
                self._execute(
                    db, "UPDATE paths SET status = ? WHERE id = ?", (system.RETIRED, path_id)
                )

    def _publish_components(self, db: Any, agent: str, ids: list[str]) -> None:
        for component_id in ids:
            row = self._component_row(component_id)
            if row is None:
                raise store.UnknownEntryError(
                    f"Cannot publish component {component_id!r}: it was never put."
                )
            if row[0] != agent:
                raise store.IntegrityError(
                    f"Agent {agent!r} cannot publish component {component_id!r} of {row[0]!r}."
                )
            if not os.path.isdir(self._folder(component_id)):
                raise store.StoreError(f"Parameters of component {component_id!r} are missing.")
            self._execute(
                db, "UPDATE components SET published = ? WHERE id = ?", (True, component_id)
            )

    def _check_owner(self, db: Any, agent: str, path_id: str) -> None:
        row = self._execute(db, "SELECT agent FROM paths WHERE id = ?", (path_id,)).fetchone()
        if row is None:
            raise store.UnknownEntryError(f"Unknown path {path_id!r}.")
        if row[0] != agent:
            raise store.IntegrityError(
                f"Agent {agent!r} cannot change path {path_id!r} of agent {row[0]!r}."
            )

    def _write_path(self, db: Any, agent: str, path: system.Path, seq: int) -> None:
        if path.agent != agent:
            raise store.IntegrityError(
                f"Agent {agent!r} cannot publish path {path.id!r} made by {path.agent!r}."
            )
        if self._execute(db, "SELECT 1 FROM tasks WHERE name = ?", (path.task,)).fetchone() is None:
            raise store.UnknownEntryError(f"Path {path.id!r} has unknown task {path.task!r}.")
        for component_id in path.component_ids:
            row = self._component_row(component_id)
            if row is None or not row[1]:
                state = "not in the store" if row is None else "staged but not published"
                raise store.IntegrityError(
                    f"Path {path.id!r} references component {component_id!r}, which is "
                    f"{state}; put it and list it in `components`."
                )
        mutable = (path.score, path.quality, dumps(path.metrics), path.offspring, path.status)
        fixed = (
            agent,
            path.task,
            dumps(path.components),
            path.parent,
            dumps(path.hparams),
            path.generation,
            dumps(path.architecture),
        )
        old = self._execute(
            db,
            "SELECT agent, task, components, parent, hparams, generation, architecture"
            " FROM paths WHERE id = ?",
            (path.id,),
        ).fetchone()
        if old is not None:
            if old[0] != agent:
                raise store.IntegrityError(
                    f"Agent {agent!r} cannot change path {path.id!r} of agent {old[0]!r}."
                )
            if tuple(old) != fixed:
                raise store.IntegrityError(
                    f"Path {path.id!r} exists with other task, components, parent, "
                    "hyperparameters, generation or architecture; publish a new path instead."
                )
            self._execute(
                db,
                "UPDATE paths SET score = ?, quality = ?, metrics = ?, offspring = ?,"
                " status = ?, publication = ? WHERE id = ?",
                (*mutable, seq, path.id),
            )
            return
        self._execute(
            db,
            "INSERT INTO paths(id, agent, task, components, parent, hparams, generation,"
            " architecture, score, quality, metrics, offspring, status, publication)"
            " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
            (path.id, *fixed, *mutable, seq),
        )
        self._executemany(
            db,
            "INSERT INTO path_components(path_id, position, component_id) VALUES (?, ?, ?)",
            [(path.id, i, cid) for i, cid in enumerate(path.component_ids)],
        )

    def set_root(self, path_id: str) -> None:
        """See `Store.set_root`."""
        with self._transaction() as db:
            if self._execute(db, "SELECT 1 FROM paths WHERE id = ?", (path_id,)).fetchone() is None:
                raise store.UnknownEntryError(f"Unknown path {path_id!r}.")
            self._execute(
                db,
                "INSERT INTO settings(key, value) VALUES ('root_path', ?)"
                " ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                (path_id,),
            )

    def add_root(self, path_id: str) -> None:
        """See `Store.add_root` (the ids are a JSON list in the settings: no schema change)."""
        with self._transaction() as db:
            if self._execute(db, "SELECT 1 FROM paths WHERE id = ?", (path_id,)).fetchone() is None:
                raise store.UnknownEntryError(f"Unknown path {path_id!r}.")
            row = self._execute(
                db, "SELECT value FROM settings WHERE key = ?", (EXTRA_ROOTS_SETTING,)
            ).fetchone()
            roots = json.loads(row[0]) if row else []
            if path_id in roots:
                return
            self._execute(
                db,
                "INSERT INTO settings(key, value) VALUES (?, ?)"
                " ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                (EXTRA_ROOTS_SETTING, dumps([*roots, path_id])),
            )

    # -- reading the system -----------------------------------------------------------

    def load_state(self) -> system.SystemState:
        """See `Store.load_state`."""
        try:
            return self._load_state()
        except (ValueError, TypeError) as error:  # rows that do not decode (JSON, ids)
            raise store.DamagedStoreError(
                f"The store at {self._location} holds rows that do not decode: {error}. "
                "Restore the store from a backup."
            ) from error

    def _load_state(self) -> system.SystemState:
        with self._snapshot() as db:
            tasks = {
                name: system.TaskRecord(name, num_classes, position, json.loads(metadata))
                for name, position, num_classes, metadata in self._execute(
                    db, "SELECT name, position, num_classes, metadata FROM tasks ORDER BY position"
                ).fetchall()
            }
            components = {
                row[0]: _component_of(row)
                for row in self._execute(
                    db,
                    f"SELECT {_COMPONENT_COLUMNS} FROM components WHERE published"
                    f" ORDER BY {self.ROW_ORDER}",
                ).fetchall()
            }
            paths = {
                row[0]: _path_of(row)
                for row in self._execute(
                    db, f"SELECT {_PATH_COLUMNS} FROM paths ORDER BY {self.ROW_ORDER}"
                ).fetchall()
            }
            root = self._execute(
                db, "SELECT value FROM settings WHERE key = 'root_path'"
            ).fetchone()
            extra = self._execute(
                db, "SELECT value FROM settings WHERE key = ?", (EXTRA_ROOTS_SETTING,)
            ).fetchone()
        return system.SystemState(
            components,
            paths,
            tasks,
            root[0] if root else None,
            extra_roots=tuple(json.loads(extra[0])) if extra else (),
        )

    def read_setting(self, key: str) -> str | None:
        """See `Store.read_setting`."""
        with self._snapshot() as db:
            row = self._execute(db, "SELECT value FROM settings WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def write_setting(self, key: str, value: str) -> None:
        """See `Store.write_setting`."""
        with self._transaction() as db:
            self._execute(
                db,
                "INSERT INTO settings(key, value) VALUES (?, ?)"
                " ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                (key, value),
            )

    def publication_count(self, agent: str, after: int = 0) -> tuple[int, int]:
        """See `Store.publication_count`."""
        with self._snapshot() as db:
            count = self._execute(
                db, "SELECT COUNT(*) FROM publications WHERE agent = ? AND seq > ?", (agent, after)
            ).fetchone()[0]
            latest = self._execute(db, "SELECT MAX(seq) FROM publications").fetchone()[0]
        return int(count), int(latest or 0)

    def close(self) -> None:
        """See `Store.close`."""
        if self._connection is not None:
            self._connection.close()
            self._connection = None
