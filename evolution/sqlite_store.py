"""The default store: an embedded SQLite database plus a folder of parameter files.

Layout of a store directory:
    system.sqlite    metadata: tasks, components, paths, publications, schema version
    params/<id>/     one folder per component (`params.npz`, optional `opt_state.npz`)

Crash safety (kill -9 at any instruction):
- The database runs in WAL mode with `synchronous=FULL`; every write is one
  `BEGIN IMMEDIATE` transaction, so a killed writer leaves the last committed state.
- A component's parameters go to a hidden temporary folder (named after host and pid),
  are fsynced, and are renamed to `params/<id>` inside the transaction that inserts the
  component's row, while holding the database's write lock. A crash before the commit
  leaves at most a folder without a row; a row never exists without its folder.
- Opening the store removes, under the same write lock, folders no row references and
  temporary folders of dead processes of this host, so concurrent agents never see
  each other's work in progress removed.
- Deleting components (staged ones an agent discards) commits the row deletion first
  and removes folders after, for the same reason.

Several processes may share one store directory on one machine (WAL allows readers
during a write; writers queue on the lock with a busy timeout).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import sqlite3
import time
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from evolution import param_files, store, system

logger = logging.getLogger("evogrow")

SCHEMA_FORMAT = "evogrow.evolution.store"
SCHEMA_VERSION = 1
DATABASE_NAME = "system.sqlite"
PARAMS_FOLDER = "params"

_SCHEMA = """
CREATE TABLE schema_info(key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE settings(key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE tasks(
  name TEXT PRIMARY KEY,
  position INTEGER NOT NULL UNIQUE,
  num_classes INTEGER NOT NULL,
  metadata TEXT NOT NULL);
CREATE TABLE components(
  id TEXT PRIMARY KEY,
  kind TEXT NOT NULL,
  num_params INTEGER NOT NULL,
  agent TEXT NOT NULL,
  task TEXT NOT NULL,
  config TEXT NOT NULL,
  parent TEXT,
  generation INTEGER NOT NULL,
  has_opt_state INTEGER NOT NULL,
  published INTEGER NOT NULL);
CREATE TABLE publications(
  seq INTEGER PRIMARY KEY AUTOINCREMENT,
  agent TEXT NOT NULL,
  time REAL NOT NULL);
CREATE TABLE paths(
  id TEXT PRIMARY KEY,
  task TEXT NOT NULL REFERENCES tasks(name),
  agent TEXT NOT NULL,
  components TEXT NOT NULL,
  hparams TEXT NOT NULL,
  parent TEXT,
  score REAL,
  quality REAL,
  metrics TEXT NOT NULL,
  generation INTEGER NOT NULL,
  offspring INTEGER NOT NULL,
  status TEXT NOT NULL,
  architecture TEXT NOT NULL,
  publication INTEGER NOT NULL REFERENCES publications(seq));
CREATE TABLE path_components(
  path_id TEXT NOT NULL REFERENCES paths(id),
  position INTEGER NOT NULL,
  component_id TEXT NOT NULL REFERENCES components(id),
  PRIMARY KEY (path_id, position));
CREATE INDEX path_components_by_component ON path_components(component_id);
"""
_TABLES = {"schema_info", "settings", "tasks", "components", "publications", "paths"}
_TABLES |= {"path_components"}


def _dumps(value: Any) -> str:
    return json.dumps(value, sort_keys=True)


class SqliteStore(store.Store):
    """A store in a local directory: SQLite metadata plus atomic parameter folders.

    Args:
      directory: the store directory; created (with a fresh schema) when absent or
        empty.
      busy_timeout_s: how long a write waits for another process's transaction.

    Attributes:
      directory: the absolute store directory.
      removed_on_open: names of orphaned parameter folders removed when opening.

    Raises:
      ForeignStoreError: the directory holds something else (a non-empty directory
        without a database, a database that is not ours, or a damaged file).
      SchemaVersionError: the store was written by a newer schema version.
    """

    def __init__(self, directory: str, *, busy_timeout_s: float = 60.0):
        self.directory = os.path.abspath(directory)
        self._params_dir = os.path.join(self.directory, PARAMS_FOLDER)
        database = os.path.join(self.directory, DATABASE_NAME)
        if os.path.exists(self.directory) and not os.path.isdir(self.directory):
            raise store.ForeignStoreError(f"{self.directory} is not a directory.")
        os.makedirs(self.directory, exist_ok=True)
        if not os.path.exists(database):
            unexpected = [n for n in os.listdir(self.directory) if n != PARAMS_FOLDER]
            if unexpected:
                raise store.ForeignStoreError(
                    f"{self.directory} is not empty ({sorted(unexpected)[:5]}) and holds no "
                    f"{DATABASE_NAME}; refusing to create a store there."
                )
        self._connection: sqlite3.Connection | None = sqlite3.connect(
            database, timeout=busy_timeout_s, isolation_level=None
        )
        try:
            self._configure()
            self._check_or_create_schema()
        except sqlite3.DatabaseError as error:
            self.close()
            raise store.ForeignStoreError(
                f"{database} is not a usable SQLite database: {error}"
            ) from error
        except BaseException:
            self.close()
            raise
        os.makedirs(self._params_dir, exist_ok=True)
        self.removed_on_open = self._remove_orphans()

    # -- connection and transactions --------------------------------------------------

    def _db(self) -> sqlite3.Connection:
        if self._connection is None:
            raise store.StoreError(f"The store at {self.directory} is closed.")
        return self._connection

    def _configure(self) -> None:
        db = self._db()
        mode = db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise store.StoreError(f"SQLite refused WAL mode (got {mode!r}).")
        db.execute("PRAGMA synchronous=FULL")
        db.execute("PRAGMA foreign_keys=ON")

    @contextlib.contextmanager
    def _transaction(self, mode: str = "IMMEDIATE") -> Iterator[sqlite3.Connection]:
        db = self._db()
        db.execute(f"BEGIN {mode}")
        try:
            yield db
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise

    def _check_or_create_schema(self) -> None:
        with self._transaction() as db:
            tables = {
                row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type='table'")
            }
            tables.discard("sqlite_sequence")
            if not tables:
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        db.execute(statement)
                db.executemany(
                    "INSERT INTO schema_info(key, value) VALUES (?, ?)",
                    [("format", SCHEMA_FORMAT), ("version", str(SCHEMA_VERSION))],
                )
                return
            if "schema_info" not in tables:
                raise store.ForeignStoreError(
                    f"{self.directory}/{DATABASE_NAME} has tables {sorted(tables)} but no "
                    "schema_info: not an evolution store."
                )
            info = dict(db.execute("SELECT key, value FROM schema_info").fetchall())
            if info.get("format") != SCHEMA_FORMAT or not str(info.get("version")).isdigit():
                raise store.ForeignStoreError(
                    f"{self.directory}/{DATABASE_NAME} records format {info.get('format')!r} "
                    f"version {info.get('version')!r}; expected {SCHEMA_FORMAT!r}."
                )
            version = int(info["version"])
            if version > SCHEMA_VERSION:
                raise store.SchemaVersionError(
                    f"{self.directory} has schema version {version}; this code reads up to "
                    f"{SCHEMA_VERSION}. Use a newer evogrow."
                )
            if version < SCHEMA_VERSION or not _TABLES <= tables:
                raise store.ForeignStoreError(
                    f"{self.directory} (schema version {version}) lacks tables "
                    f"{sorted(_TABLES - tables)}: a damaged or unsupported store."
                )

    def _remove_orphans(self) -> list[str]:
        removed = []
        with self._transaction() as db:
            known = {row[0] for row in db.execute("SELECT id FROM components")}
            for name in sorted(os.listdir(self._params_dir)):
                if name.startswith(param_files.TEMP_PREFIX):
                    orphan = param_files.is_temp_of_dead_local_process(name)
                else:
                    orphan = name not in known
                if orphan:
                    shutil.rmtree(os.path.join(self._params_dir, name), ignore_errors=True)
                    removed.append(name)
        if removed:
            logger.info(
                "store %s: removed %d orphaned parameter folders", self.directory, len(removed)
            )
        return removed

    # -- tasks ------------------------------------------------------------------------

    def add_task(
        self, name: str, *, num_classes: int, metadata: Mapping[str, Any] | None = None
    ) -> system.TaskRecord:
        """See `Store.add_task`."""
        with self._transaction() as db:
            row = db.execute(
                "SELECT position, num_classes, metadata FROM tasks WHERE name = ?", (name,)
            ).fetchone()
            if row is not None:
                existing = system.TaskRecord(name, row[1], row[0], json.loads(row[2]))
                wanted = system.TaskRecord(name, num_classes, row[0], metadata or {})
                if existing != wanted:
                    raise store.IntegrityError(
                        f"Task {name!r} exists as {existing}; cannot re-add it as {wanted}."
                    )
                return existing
            order = db.execute("SELECT COUNT(*) FROM tasks").fetchone()[0]
            record = system.TaskRecord(name, num_classes, order, metadata or {})
            db.execute(
                "INSERT INTO tasks(name, position, num_classes, metadata) VALUES (?, ?, ?, ?)",
                (name, order, record.num_classes, _dumps(record.metadata)),
            )
            return record

    # -- components -------------------------------------------------------------------

    def put_component(
        self, component: system.Component, params: Any, opt_state: Any = None
    ) -> None:
        """See `Store.put_component`."""
        if self._component_row(component.id) is not None:
            raise store.IntegrityError(f"Component {component.id!r} exists already.")
        items = {"params": params}
        if opt_state is not None:
            items["opt_state"] = opt_state
        temp = param_files.write_temp_folder(self._params_dir, items)
        final = os.path.join(self._params_dir, component.id)
        renamed = False
        try:
            with self._transaction() as db:
                if self._component_row(component.id) is not None:
                    raise store.IntegrityError(f"Component {component.id!r} exists already.")
                if os.path.lexists(final):
                    # A crashed writer's folder without a row; we hold the write lock.
                    shutil.rmtree(final)
                param_files.publish_folder(temp, final)
                renamed = True
                db.execute(
                    "INSERT INTO components(id, kind, num_params, agent, task, config, parent,"
                    " generation, has_opt_state, published) VALUES (?,?,?,?,?,?,?,?,?,0)",
                    (
                        component.id,
                        component.kind,
                        component.num_params,
                        component.agent,
                        component.task,
                        _dumps(component.config),
                        component.parent,
                        component.generation,
                        int(opt_state is not None),
                    ),
                )
        except BaseException:
            shutil.rmtree(final if renamed else temp, ignore_errors=True)
            raise

    def _component_row(self, component_id: str) -> tuple | None:
        return (
            self._db()
            .execute(
                "SELECT agent, published, has_opt_state FROM components WHERE id = ?",
                (component_id,),
            )
            .fetchone()
        )

    def _folder_of(self, component_id: str) -> str:
        if self._component_row(component_id) is None:
            raise store.UnknownEntryError(f"Unknown component {component_id!r}.")
        return os.path.join(self._params_dir, component_id)

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

    def discard_staged(self, agent: str) -> tuple[str, ...]:
        """See `Store.discard_staged`."""
        with self._transaction() as db:
            ids = tuple(
                row[0]
                for row in db.execute(
                    "SELECT id FROM components WHERE agent = ? AND published = 0 ORDER BY id",
                    (agent,),
                )
            )
            db.executemany("DELETE FROM components WHERE id = ?", [(i,) for i in ids])
        # Rows go first: a crash here leaves folders without rows, removed on next open.
        for component_id in ids:
            shutil.rmtree(os.path.join(self._params_dir, component_id), ignore_errors=True)
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
            cursor = db.execute(
                "INSERT INTO publications(agent, time) VALUES (?, ?)", (agent, time.time())
            )
            seq = int(cursor.lastrowid or 0)
            for path in paths:
                self._write_path(db, agent, path, seq)
            for path_id in retire:
                self._check_owner(db, agent, path_id)
                db.execute("UPDATE paths SET status = ? WHERE id = ?", (system.RETIRED, path_id))

    def _publish_components(self, db: sqlite3.Connection, agent: str, ids: list[str]) -> None:
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
            if not os.path.isdir(os.path.join(self._params_dir, component_id)):
                raise store.StoreError(f"Parameters of component {component_id!r} are missing.")
            db.execute("UPDATE components SET published = 1 WHERE id = ?", (component_id,))

    def _check_owner(self, db: sqlite3.Connection, agent: str, path_id: str) -> None:
        row = db.execute("SELECT agent FROM paths WHERE id = ?", (path_id,)).fetchone()
        if row is None:
            raise store.UnknownEntryError(f"Unknown path {path_id!r}.")
        if row[0] != agent:
            raise store.IntegrityError(
                f"Agent {agent!r} cannot change path {path_id!r} of agent {row[0]!r}."
            )

    def _write_path(self, db: sqlite3.Connection, agent: str, path: system.Path, seq: int) -> None:
        if path.agent != agent:
            raise store.IntegrityError(
                f"Agent {agent!r} cannot publish path {path.id!r} made by {path.agent!r}."
            )
        if db.execute("SELECT 1 FROM tasks WHERE name = ?", (path.task,)).fetchone() is None:
            raise store.UnknownEntryError(f"Path {path.id!r} has unknown task {path.task!r}.")
        for component_id in path.component_ids:
            row = self._component_row(component_id)
            if row is None or not row[1]:
                state = "not in the store" if row is None else "staged but not published"
                raise store.IntegrityError(
                    f"Path {path.id!r} references component {component_id!r}, which is "
                    f"{state}; put it and list it in `components`."
                )
        mutable = (
            path.score,
            path.quality,
            _dumps(path.metrics),
            path.offspring,
            path.status,
        )
        old = db.execute(
            "SELECT agent, task, components, parent, hparams, generation, architecture"
            " FROM paths WHERE id = ?",
            (path.id,),
        ).fetchone()
        fixed = (
            agent,
            path.task,
            _dumps(path.components),
            path.parent,
            _dumps(path.hparams),
            path.generation,
            _dumps(path.architecture),
        )
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
            db.execute(
                "UPDATE paths SET score = ?, quality = ?, metrics = ?, offspring = ?,"
                " status = ?, publication = ? WHERE id = ?",
                (*mutable, seq, path.id),
            )
            return
        db.execute(
            "INSERT INTO paths(id, agent, task, components, parent, hparams, generation,"
            " architecture, score, quality, metrics, offspring, status, publication)"
            " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
            (path.id, *fixed, *mutable, seq),
        )
        db.executemany(
            "INSERT INTO path_components(path_id, position, component_id) VALUES (?, ?, ?)",
            [(path.id, i, cid) for i, cid in enumerate(path.component_ids)],
        )

    def set_root(self, path_id: str) -> None:
        """See `Store.set_root`."""
        with self._transaction() as db:
            if db.execute("SELECT 1 FROM paths WHERE id = ?", (path_id,)).fetchone() is None:
                raise store.UnknownEntryError(f"Unknown path {path_id!r}.")
            db.execute(
                "INSERT INTO settings(key, value) VALUES ('root_path', ?)"
                " ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                (path_id,),
            )

    # -- reading the system -----------------------------------------------------------

    def load_state(self) -> system.SystemState:
        """See `Store.load_state`."""
        with self._transaction("DEFERRED") as db:
            tasks = {
                name: system.TaskRecord(name, num_classes, position, json.loads(metadata))
                for name, position, num_classes, metadata in db.execute(
                    "SELECT name, position, num_classes, metadata FROM tasks"
                )
            }
            components = {
                row[0]: system.Component(
                    id=row[0],
                    kind=row[1],
                    num_params=row[2],
                    agent=row[3],
                    task=row[4],
                    config=json.loads(row[5]),
                    parent=row[6],
                    generation=row[7],
                )
                for row in db.execute(
                    "SELECT id, kind, num_params, agent, task, config, parent, generation"
                    " FROM components WHERE published = 1"
                )
            }
            paths = {
                row[0]: system.Path(
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
                for row in db.execute(
                    "SELECT id, agent, task, components, parent, hparams, generation,"
                    " architecture, score, quality, metrics, offspring, status FROM paths"
                )
            }
            root = db.execute("SELECT value FROM settings WHERE key = 'root_path'").fetchone()
        return system.SystemState(components, paths, tasks, root[0] if root else None)

    def close(self) -> None:
        """See `Store.close`."""
        if self._connection is not None:
            self._connection.close()
            self._connection = None
