"""A server store: PostgreSQL metadata plus a shared folder of parameter files.

For runs whose agents live on several machines: the metadata (tasks, components, paths,
publications) is in a PostgreSQL database, the parameters are `param_files` folders in
a directory every agent can reach (a shared file system). The semantics are those of
`sqlite_store.SqliteStore`, with the same crash safety:

- Every write is one transaction that first takes `LOCK TABLE schema_info IN EXCLUSIVE
  MODE`, the counterpart of SQLite's `BEGIN IMMEDIATE`: writers of one store queue on
  it, readers (which take no lock) are never blocked. Under that lock each statement
  of a READ COMMITTED transaction sees every earlier commit, so writes are serial.
- `load_state` reads in one REPEATABLE READ, READ ONLY transaction: one snapshot.
- A component's parameters are written to a hidden temporary folder and renamed to
  `<params_dir>/<id>` inside the transaction that inserts its row, under the lock; a
  killed client's connection is closed by its kernel and the server rolls back, so at
  most a folder without a row remains, removed (under the lock) when a store is next
  opened. Temporary folders of other hosts are never removed (`param_files`).
- `<params_dir>/.evogrow-store` names the database's store id, so a parameter folder
  is never cleaned against the wrong database (`ForeignStoreError`).

Columns keep SQLite's exact values: JSON as text written by `sqlite_store._dumps`,
scores as DOUBLE PRECISION, so both stores return equal `SystemState`s.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import time
import urllib.parse
import uuid
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import psycopg

from evolution import param_files, store, system
from evolution.sqlite_store import _TABLES, SCHEMA_FORMAT, SCHEMA_VERSION, _dumps

logger = logging.getLogger("evogrow")

MARKER_NAME = ".evogrow-store"
LOCATION_SCHEMES = ("postgresql", "postgres")

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
  num_params BIGINT NOT NULL,
  agent TEXT NOT NULL,
  task TEXT NOT NULL,
  config TEXT NOT NULL,
  parent TEXT,
  generation INTEGER NOT NULL,
  has_opt_state BOOLEAN NOT NULL,
  published BOOLEAN NOT NULL,
  ordinal BIGINT GENERATED ALWAYS AS IDENTITY UNIQUE);
CREATE TABLE publications(
  seq BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
  agent TEXT NOT NULL,
  time DOUBLE PRECISION NOT NULL);
CREATE TABLE paths(
  id TEXT PRIMARY KEY,
  task TEXT NOT NULL REFERENCES tasks(name),
  agent TEXT NOT NULL,
  components TEXT NOT NULL,
  hparams TEXT NOT NULL,
  parent TEXT,
  score DOUBLE PRECISION,
  quality DOUBLE PRECISION,
  metrics TEXT NOT NULL,
  generation INTEGER NOT NULL,
  offspring INTEGER NOT NULL,
  status TEXT NOT NULL,
  architecture TEXT NOT NULL,
  publication BIGINT NOT NULL REFERENCES publications(seq),
  ordinal BIGINT GENERATED ALWAYS AS IDENTITY UNIQUE);
CREATE TABLE path_components(
  path_id TEXT NOT NULL REFERENCES paths(id),
  position INTEGER NOT NULL,
  component_id TEXT NOT NULL REFERENCES components(id),
  PRIMARY KEY (path_id, position));
CREATE INDEX path_components_by_component ON path_components(component_id)
"""
_COMPONENT_COLUMNS = "id, kind, num_params, agent, task, config, parent, generation"
_PATH_COLUMNS = (
    "id, agent, task, components, parent, hparams, generation, architecture, score,"
    " quality, metrics, offspring, status"
)


def split_location(location: str) -> tuple[str, str]:
    """Splits an `open_store` location into a libpq DSN and the parameter directory.

    Args:
      location: `postgresql://user@host:port/dbname?params_dir=/shared/dir&...`; the
        other query parameters (e.g. `connect_timeout`, `options`) stay in the DSN.

    Returns:
      (dsn, params_dir).

    Raises:
      ValueError: not a postgresql:// URI, or no (or several) `params_dir`.
    """
    parts = urllib.parse.urlsplit(location)
    if parts.scheme not in LOCATION_SCHEMES:
        raise ValueError(f"{location!r} is not a postgresql:// location.")
    query = urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
    params_dirs = [value for key, value in query if key == "params_dir"]
    if len(params_dirs) != 1 or not params_dirs[0]:
        raise ValueError(f"{location!r} needs exactly one params_dir=<shared directory>.")
    rest = urllib.parse.urlencode([(k, v) for k, v in query if k != "params_dir"])
    return urllib.parse.urlunsplit(parts._replace(query=rest)), params_dirs[0]


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


class PostgresStore(store.Store):
    """A store whose metadata is in PostgreSQL and whose parameters are in a shared folder.

    Args:
      dsn: a libpq connection string or URI (the database, or a schema chosen with
        `options=-csearch_path=...`, holds one store; created when it has no tables).
      params_dir: the parameter directory, shared by every agent of the store; created
        when absent.
      lock_timeout_s: how long a write waits for another agent's transaction.

    Attributes:
      params_dir: the absolute parameter directory.
      store_id: the store's id (recorded in the database and in `params_dir`).
      removed_on_open: names of orphaned parameter folders removed when opening.

    Raises:
      StoreError: the server cannot be reached.
      ForeignStoreError: the database or the directory holds something else, or the
        directory belongs to another store's database.
      SchemaVersionError: the store was written by a newer schema version.
    """

    def __init__(self, dsn: str, params_dir: str, *, lock_timeout_s: float = 60.0):
        self.params_dir = os.path.abspath(params_dir)
        if os.path.exists(self.params_dir) and not os.path.isdir(self.params_dir):
            raise store.ForeignStoreError(f"{self.params_dir} is not a directory.")
        try:
            self._connection: psycopg.Connection | None = psycopg.connect(dsn, autocommit=True)
        except psycopg.Error as error:
            raise store.StoreError(f"Cannot connect to the store's database: {error}") from error
        try:
            self._db().execute(f"SET lock_timeout = {int(lock_timeout_s * 1000)}")
            self.store_id = self._check_or_create_schema()
            os.makedirs(self.params_dir, exist_ok=True)
            self.removed_on_open = self._check_marker_and_remove_orphans()
        except BaseException:
            self.close()
            raise

    @classmethod
    def from_location(cls, location: str, **kwargs: Any) -> PostgresStore:
        """Opens the store at a `postgresql://...?params_dir=...` location (`split_location`).

        Args:
          location: the location.
          **kwargs: passed to the constructor.

        Returns:
          The store.
        """
        dsn, params_dir = split_location(location)
        return cls(dsn, params_dir, **kwargs)

    # -- connection and transactions --------------------------------------------------

    def _db(self) -> psycopg.Connection:
        if self._connection is None:
            raise store.StoreError(f"The store with parameters in {self.params_dir} is closed.")
        return self._connection

    @contextlib.contextmanager
    def _transaction(self, *, write: bool = True) -> Iterator[psycopg.Connection]:
        db = self._db()
        with db.transaction():
            if write:
                db.execute("LOCK TABLE schema_info IN EXCLUSIVE MODE")
            else:
                db.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            yield db

    def _check_or_create_schema(self) -> str:
        db = self._db()
        with db.transaction():
            # Serializes the creation of the tables by concurrent first opens.
            db.execute("SELECT pg_advisory_xact_lock(hashtext(current_schema()))")
            tables = {
                row[0]
                for row in db.execute(
                    "SELECT table_name FROM information_schema.tables"
                    " WHERE table_schema = current_schema()"
                )
            }
            if not tables:
                for statement in _SCHEMA.split(";"):
                    db.execute(statement)
                store_id = uuid.uuid4().hex
                with db.cursor() as cursor:
                    cursor.executemany(
                        "INSERT INTO schema_info(key, value) VALUES (%s, %s)",
                        [
                            ("format", SCHEMA_FORMAT),
                            ("version", str(SCHEMA_VERSION)),
                            ("store_id", store_id),
                        ],
                    )
                return store_id
            where = f"database {db.info.dbname!r} (schema {self._schema_name()!r})"
            if "schema_info" not in tables:
                raise store.ForeignStoreError(
                    f"{where} has tables {sorted(tables)[:5]} but no schema_info: not an "
                    "evolution store."
                )
            info: dict[str, str] = dict(db.execute("SELECT key, value FROM schema_info").fetchall())
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
        if version < SCHEMA_VERSION or not _TABLES <= tables or "store_id" not in info:
            raise store.ForeignStoreError(
                f"{where} (schema version {version}) lacks tables "
                f"{sorted(_TABLES - tables)} or its store id: a damaged or unsupported store."
            )
        return info["store_id"]

    def _schema_name(self) -> str:
        row = self._db().execute("SELECT current_schema()").fetchone()
        return str(row[0]) if row else "?"

    def _check_marker_and_remove_orphans(self) -> list[str]:
        marker = os.path.join(self.params_dir, MARKER_NAME)
        removed = []
        with self._transaction() as db:
            if os.path.exists(marker):
                with open(marker) as handle:
                    owner = handle.read().strip()
                if owner != self.store_id:
                    raise store.ForeignStoreError(
                        f"{self.params_dir} holds the parameters of store {owner!r}, not of "
                        f"this database's store {self.store_id!r}."
                    )
            else:
                unexpected = os.listdir(self.params_dir)
                if unexpected:
                    raise store.ForeignStoreError(
                        f"{self.params_dir} is not empty ({sorted(unexpected)[:5]}) and holds "
                        f"no {MARKER_NAME}; refusing to use it as a parameter directory."
                    )
                if db.execute("SELECT 1 FROM components LIMIT 1").fetchone() is not None:
                    raise store.ForeignStoreError(
                        f"{self.params_dir} holds no {MARKER_NAME}, but the database has "
                        "components: is it the store's parameter directory?"
                    )
                temp = f"{marker}.{os.getpid()}.{uuid.uuid4().hex}"
                with open(temp, "w") as handle:
                    handle.write(self.store_id + "\n")
                    handle.flush()
                    os.fsync(handle.fileno())
                os.rename(temp, marker)
            known = {row[0] for row in db.execute("SELECT id FROM components")}
            for name in sorted(os.listdir(self.params_dir)):
                if name == MARKER_NAME:
                    continue
                if name.startswith(param_files.TEMP_PREFIX):
                    orphan = param_files.is_temp_of_dead_local_process(name)
                else:
                    orphan = name not in known
                if orphan:
                    shutil.rmtree(os.path.join(self.params_dir, name), ignore_errors=True)
                    removed.append(name)
        if removed:
            logger.info(
                "store %s: removed %d orphaned parameter folders", self.params_dir, len(removed)
            )
        return removed

    # -- tasks ------------------------------------------------------------------------

    def add_task(
        self, name: str, *, num_classes: int, metadata: Mapping[str, Any] | None = None
    ) -> system.TaskRecord:
        """See `Store.add_task`."""
        with self._transaction() as db:
            row = db.execute(
                "SELECT position, num_classes, metadata FROM tasks WHERE name = %s", (name,)
            ).fetchone()
            if row is not None:
                existing = system.TaskRecord(name, row[1], row[0], json.loads(row[2]))
                wanted = system.TaskRecord(name, num_classes, row[0], metadata or {})
                if existing != wanted:
                    raise store.IntegrityError(
                        f"Task {name!r} exists as {existing}; cannot re-add it as {wanted}."
                    )
                return existing
            count = db.execute("SELECT COUNT(*) FROM tasks").fetchone()
            record = system.TaskRecord(
                name, num_classes, int(count[0]) if count else 0, metadata or {}
            )
            db.execute(
                "INSERT INTO tasks(name, position, num_classes, metadata) VALUES (%s,%s,%s,%s)",
                (name, record.order, record.num_classes, _dumps(record.metadata)),
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
        temp = param_files.write_temp_folder(self.params_dir, items)
        final = os.path.join(self.params_dir, component.id)
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
                    " generation, has_opt_state, published)"
                    " VALUES (%s,%s,%s,%s,%s,%s,%s,%s,%s,FALSE)",
                    (
                        component.id,
                        component.kind,
                        component.num_params,
                        component.agent,
                        component.task,
                        _dumps(component.config),
                        component.parent,
                        component.generation,
                        opt_state is not None,
                    ),
                )
        except BaseException:
            shutil.rmtree(final if renamed else temp, ignore_errors=True)
            raise

    def _component_row(self, component_id: str) -> tuple | None:
        return (
            self._db()
            .execute(
                "SELECT agent, published, has_opt_state FROM components WHERE id = %s",
                (component_id,),
            )
            .fetchone()
        )

    def _folder_of(self, component_id: str) -> str:
        if self._component_row(component_id) is None:
            raise store.UnknownEntryError(f"Unknown component {component_id!r}.")
        return os.path.join(self.params_dir, component_id)

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
                    "DELETE FROM components WHERE agent = %s AND NOT published RETURNING id",
                    (agent,),
                )
            )
        # Rows go first: a crash here leaves folders without rows, removed on next open.
        for component_id in sorted(ids):
            shutil.rmtree(os.path.join(self.params_dir, component_id), ignore_errors=True)
        return tuple(sorted(ids))

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
            row = db.execute(
                "INSERT INTO publications(agent, time) VALUES (%s, %s) RETURNING seq",
                (agent, time.time()),
            ).fetchone()
            seq = int(row[0]) if row else 0
            for path in paths:
                self._write_path(db, agent, path, seq)
            for path_id in retire:
                self._check_owner(db, agent, path_id)
                db.execute("UPDATE paths SET status = %s WHERE id = %s", (system.RETIRED, path_id))

    def _publish_components(self, db: psycopg.Connection, agent: str, ids: list[str]) -> None:
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
            if not os.path.isdir(os.path.join(self.params_dir, component_id)):
                raise store.StoreError(f"Parameters of component {component_id!r} are missing.")
            db.execute("UPDATE components SET published = TRUE WHERE id = %s", (component_id,))

    def _check_owner(self, db: psycopg.Connection, agent: str, path_id: str) -> None:
        row = db.execute("SELECT agent FROM paths WHERE id = %s", (path_id,)).fetchone()
        if row is None:
            raise store.UnknownEntryError(f"Unknown path {path_id!r}.")
        if row[0] != agent:
            raise store.IntegrityError(
                f"Agent {agent!r} cannot change path {path_id!r} of agent {row[0]!r}."
            )

    def _write_path(self, db: psycopg.Connection, agent: str, path: system.Path, seq: int) -> None:
        if path.agent != agent:
            raise store.IntegrityError(
                f"Agent {agent!r} cannot publish path {path.id!r} made by {path.agent!r}."
            )
        if db.execute("SELECT 1 FROM tasks WHERE name = %s", (path.task,)).fetchone() is None:
            raise store.UnknownEntryError(f"Path {path.id!r} has unknown task {path.task!r}.")
        for component_id in path.component_ids:
            row = self._component_row(component_id)
            if row is None or not row[1]:
                state = "not in the store" if row is None else "staged but not published"
                raise store.IntegrityError(
                    f"Path {path.id!r} references component {component_id!r}, which is "
                    f"{state}; put it and list it in `components`."
                )
        mutable = (path.score, path.quality, _dumps(path.metrics), path.offspring, path.status)
        fixed = (
            agent,
            path.task,
            _dumps(path.components),
            path.parent,
            _dumps(path.hparams),
            path.generation,
            _dumps(path.architecture),
        )
        old = db.execute(
            "SELECT agent, task, components, parent, hparams, generation, architecture"
            " FROM paths WHERE id = %s",
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
            db.execute(
                "UPDATE paths SET score = %s, quality = %s, metrics = %s, offspring = %s,"
                " status = %s, publication = %s WHERE id = %s",
                (*mutable, seq, path.id),
            )
            return
        db.execute(
            "INSERT INTO paths(id, agent, task, components, parent, hparams, generation,"
            " architecture, score, quality, metrics, offspring, status, publication)"
            " VALUES (%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s)",
            (path.id, *fixed, *mutable, seq),
        )
        with db.cursor() as cursor:
            cursor.executemany(
                "INSERT INTO path_components(path_id, position, component_id) VALUES (%s, %s, %s)",
                [(path.id, i, cid) for i, cid in enumerate(path.component_ids)],
            )

    def set_root(self, path_id: str) -> None:
        """See `Store.set_root`."""
        with self._transaction() as db:
            if db.execute("SELECT 1 FROM paths WHERE id = %s", (path_id,)).fetchone() is None:
                raise store.UnknownEntryError(f"Unknown path {path_id!r}.")
            db.execute(
                "INSERT INTO settings(key, value) VALUES ('root_path', %s)"
                " ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                (path_id,),
            )

    # -- reading the system -----------------------------------------------------------

    def load_state(self) -> system.SystemState:
        """See `Store.load_state`."""
        with self._transaction(write=False) as db:
            tasks = {
                name: system.TaskRecord(name, num_classes, position, json.loads(metadata))
                for name, position, num_classes, metadata in db.execute(
                    "SELECT name, position, num_classes, metadata FROM tasks ORDER BY position"
                )
            }
            components = {
                row[0]: _component_of(row)
                for row in db.execute(
                    f"SELECT {_COMPONENT_COLUMNS} FROM components WHERE published ORDER BY ordinal"
                )
            }
            paths = {
                row[0]: _path_of(row)
                for row in db.execute(f"SELECT {_PATH_COLUMNS} FROM paths ORDER BY ordinal")
            }
            root = db.execute("SELECT value FROM settings WHERE key = 'root_path'").fetchone()
        return system.SystemState(components, paths, tasks, root[0] if root else None)

    def close(self) -> None:
        """See `Store.close`."""
        if self._connection is not None:
            self._connection.close()
            self._connection = None
