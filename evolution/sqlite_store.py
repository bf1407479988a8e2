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
during a write; writers queue on the lock with a busy timeout). The store's logic is
`sql_store.SqlStore`'s; this module is SQLite's connection, schema and transactions.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import time
from collections.abc import Iterator

from evolution import sql_store, store
from evolution.sql_store import SCHEMA_FORMAT, SCHEMA_VERSION

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


class SqliteStore(sql_store.SqlStore):
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
        self._location = self.directory
        self._params_root = os.path.join(self.directory, PARAMS_FOLDER)
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
        os.makedirs(self._params_root, exist_ok=True)
        with self._transaction() as db:
            self.removed_on_open = self._remove_orphans_locked(db)

    # -- connection and transactions --------------------------------------------------

    def _configure(self) -> None:
        db = self._db()
        mode = db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise store.StoreError(f"SQLite refused WAL mode (got {mode!r}).")
        db.execute("PRAGMA synchronous=FULL")
        db.execute("PRAGMA foreign_keys=ON")

    @contextlib.contextmanager
    def _transaction(self, mode: str = "IMMEDIATE") -> Iterator[sqlite3.Connection]:
        """`BEGIN IMMEDIATE` (the write lock) by default; DEFERRED reads a snapshot."""
        db = self._db()
        db.execute(f"BEGIN {mode}")
        try:
            yield db
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise

    def _snapshot(self) -> contextlib.AbstractContextManager[sqlite3.Connection]:
        return self._transaction("DEFERRED")

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
            info = None
            if "schema_info" in tables:
                info = dict(db.execute("SELECT key, value FROM schema_info").fetchall())
            sql_store.check_schema_info(f"{self.directory}/{DATABASE_NAME}", tables, info)

    def _insert_publication(self, db: sqlite3.Connection, agent: str) -> int:
        cursor = db.execute(
            "INSERT INTO publications(agent, time) VALUES (?, ?)", (agent, time.time())
        )
        return int(cursor.lastrowid or 0)
