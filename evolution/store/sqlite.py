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
- Before the rename, the component's id is committed as an orphan candidate (with the
  writer's host and pid); the row's transaction clears it. Opening the store to write
  removes, under the same write lock, only the folders the database proves orphaned:
  candidates without a row whose writer is gone, and temporary folders of dead
  processes of this host. A folder the database does not know is never removed
  (`./run.sh store check` lists it), so a lost or re-created database cannot empty
  `params/`.
- Deleting components (staged ones an agent discards) commits the row deletion (and
  the ids as orphan candidates) first and removes folders after.
- A store is created only where there is nothing: a missing, empty or schema-less
  database beside parameter folders is refused (`store.DamagedStoreError`). A
  read-only open (`read_only=True`) creates, changes and deletes nothing.
- A clean close checkpoints the write-ahead log into the database file; a live store
  is copied with `backup_database` (SQLite's online backup API).

Several processes may share one store directory on one machine (WAL allows readers
during a write; writers queue on the lock with a busy timeout). The store's logic is
`sql_store.SqlStore`'s; this module is SQLite's connection, schema and transactions.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import time
import urllib.parse
from collections.abc import Iterator
from typing import Any

from evolution.store import base as store
from evolution.store import param_files
from evolution.store import sql as sql_store
from evolution.store.sql import SCHEMA_FORMAT, SCHEMA_VERSION

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
      directory: the store directory; a store is created only where there is nothing
        (an absent or empty directory, or one with an empty `params/`).
      read_only: open an existing store for reading only: nothing is created, changed
        or deleted (exports, reports, `./run.sh store check`).
      busy_timeout_s: how long a write waits for another process's transaction.

    Attributes:
      directory: the absolute store directory.
      read_only: whether the store was opened read-only.
      removed_on_open: names of parameter folders the database proved orphaned and
        that opening removed (none when read-only).

    Raises:
      ForeignStoreError: the directory holds something else (a non-empty directory
        without a database, a database that is not ours).
      DamagedStoreError: the database is missing, empty, truncated or damaged beside
        parameter folders (restore the store from a backup).
      NoStoreError: `read_only` and there is no store.
      SchemaVersionError: the store was written by a newer schema version.
    """

    def __init__(self, directory: str, *, read_only: bool = False, busy_timeout_s: float = 60.0):
        self.directory = os.path.abspath(directory)
        self.read_only = read_only
        self.removed_on_open: list[str] = []
        self._location = self.directory
        self._params_root = os.path.join(self.directory, PARAMS_FOLDER)
        self._connection: sqlite3.Connection | None = None
        database = os.path.join(self.directory, DATABASE_NAME)
        fresh = self._check_location(database)
        if fresh and not read_only:
            os.makedirs(self.directory, exist_ok=True)
        try:
            if read_only:
                uri = f"file:{urllib.parse.quote(database)}?mode=ro"
                self._connection = sqlite3.connect(
                    uri, uri=True, timeout=busy_timeout_s, isolation_level=None
                )
            else:
                self._connection = sqlite3.connect(
                    database, timeout=busy_timeout_s, isolation_level=None
                )
            if not fresh or read_only:  # before anything writes to the file
                self._refuse_missing_schema()
            if not read_only:
                self._configure()
            self._check_or_create_schema()
            if not read_only:
                os.makedirs(self._params_root, exist_ok=True)
                with self._transaction() as db:
                    self.removed_on_open = self._remove_orphans_locked(db)
        except sqlite3.DatabaseError as error:
            self.close()
            raise store.DamagedStoreError(
                f"{database} is not a usable SQLite database: {error}. Nothing was changed; "
                "restore the store from a backup."
            ) from error
        except BaseException:
            self.close()
            raise

    def _parameter_folders(self) -> list[str]:
        if not os.path.isdir(self._params_root):
            return []
        return sorted(
            n for n in os.listdir(self._params_root) if not n.startswith(param_files.TEMP_PREFIX)
        )

    def _check_location(self, database: str) -> bool:
        """Refuses a location that is not a store; True when a new store may be created."""
        if os.path.exists(self.directory) and not os.path.isdir(self.directory):
            raise store.ForeignStoreError(f"{self.directory} is not a directory.")
        folders = self._parameter_folders()
        found = f"{len(folders)} parameter folders in {self._params_root}"
        recover = (
            "Nothing was changed; restore the store (database and params/ together) from a "
            "backup (`./run.sh store backup`), or move params/ away to start a new store."
        )
        if not os.path.exists(database):
            if os.path.exists(f"{database}-wal"):
                raise store.DamagedStoreError(
                    f"{self.directory} holds {DATABASE_NAME}-wal but no {DATABASE_NAME}: the "
                    f"database was deleted. {recover}"
                )
            if folders:
                raise store.DamagedStoreError(
                    f"{self.directory} has {found} but no {DATABASE_NAME}: the database was "
                    f"lost or not copied. {recover}"
                )
            if self.read_only:
                raise store.NoStoreError(f"No store at {self.directory} (no {DATABASE_NAME}).")
            if os.path.isdir(self.directory):
                unexpected = [n for n in os.listdir(self.directory) if n != PARAMS_FOLDER]
                if unexpected:
                    raise store.ForeignStoreError(
                        f"{self.directory} is not empty ({sorted(unexpected)[:5]}) and holds "
                        f"no {DATABASE_NAME}; refusing to create a store there."
                    )
            return True
        wal = f"{database}-wal"
        if os.path.getsize(database) == 0 and (not os.path.exists(wal) or not os.path.getsize(wal)):
            if folders:
                raise store.DamagedStoreError(
                    f"{database} is empty (0 bytes) beside {found}: a truncated or "
                    f"half-copied database. {recover}"
                )
            if self.read_only:
                raise store.NoStoreError(f"No store at {self.directory} ({database} is empty).")
            return True
        return not folders

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
        if mode == "IMMEDIATE":
            self._check_writable()
        db = self._db()
        try:
            db.execute(f"BEGIN {mode}")
            try:
                yield db
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise
        except sqlite3.DatabaseError as error:
            raise self._damaged(error) from error

    def _damaged(self, error: sqlite3.DatabaseError) -> store.StoreError:
        if isinstance(error, sqlite3.OperationalError) and "locked" in str(error):
            return store.StoreError(f"The store at {self.directory} stayed locked: {error}.")
        return store.DamagedStoreError(sql_store.damaged_database_message(self.directory, error))

    def _execute(self, db: sqlite3.Connection, statement: str, values: tuple = ()) -> Any:
        try:
            return db.execute(statement, values)
        except sqlite3.DatabaseError as error:
            raise self._damaged(error) from error

    def _snapshot(self) -> contextlib.AbstractContextManager[sqlite3.Connection]:
        return self._transaction("DEFERRED")

    def _tables(self, db: sqlite3.Connection) -> set[str]:
        rows = db.execute("SELECT name FROM sqlite_master WHERE type='table'").fetchall()
        return {row[0] for row in rows} - {"sqlite_sequence"}

    def _refuse_missing_schema(self) -> None:
        """Refuses a database without tables where a store exists (or must exist)."""
        with self._transaction("DEFERRED") as db:
            if self._tables(db):
                return
        folders = self._parameter_folders()
        raise store.DamagedStoreError(
            f"{self.directory}/{DATABASE_NAME} has no tables (a copy made without its -wal "
            f"file, or a truncated file?) beside {len(folders)} parameter folders. Nothing "
            "was changed; restore the store from a backup (`./run.sh store backup` copies "
            "a live store safely)."
        )

    def _check_or_create_schema(self) -> None:
        with self._transaction("DEFERRED" if self.read_only else "IMMEDIATE") as db:
            tables = self._tables(db)
            if not tables:
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        db.execute(statement)
                db.execute(sql_store.ORPHAN_CANDIDATES_TABLE)
                db.executemany(
                    "INSERT INTO schema_info(key, value) VALUES (?, ?)",
                    [("format", SCHEMA_FORMAT), ("version", str(SCHEMA_VERSION))],
                )
                return
            info = None
            if "schema_info" in tables:
                info = dict(db.execute("SELECT key, value FROM schema_info").fetchall())
            checked = sql_store.check_schema_info(f"{self.directory}/{DATABASE_NAME}", tables, info)
            self.schema_version = int(checked["version"])
            if self.schema_version < SCHEMA_VERSION and not self.read_only:
                self.schema_version = SCHEMA_VERSION
                db.execute(sql_store.ORPHAN_CANDIDATES_TABLE)
                db.execute(
                    "UPDATE schema_info SET value = ? WHERE key = 'version'", (str(SCHEMA_VERSION),)
                )

    def integrity_problems(self) -> list[str]:
        """SQLite's `PRAGMA integrity_check` of the database: an empty list when sound.

        Returns:
          The problems it reports.
        """
        with self._snapshot() as db:
            rows = [str(row[0]) for row in db.execute("PRAGMA integrity_check").fetchall()]
        return [] if rows == ["ok"] else rows

    def backup_database(self, destination: str) -> None:
        """Copies the database to a new file with SQLite's online backup API.

        Safe while other processes write: the copy is one consistent snapshot.

        Args:
          destination: the new database file (must not exist).
        """
        if os.path.exists(destination):
            raise store.StoreError(f"{destination} exists; back up into a new location.")
        target = sqlite3.connect(destination)
        try:
            self._db().backup(target)
        except sqlite3.DatabaseError as error:
            raise self._damaged(error) from error
        finally:
            target.close()

    def close(self) -> None:
        """Checkpoints the write-ahead log into the database file (writers), then closes.

        After a clean close the database file holds every commit, so copying it alone
        (without `system.sqlite-wal`) loses nothing; other live connections may keep a
        log, which is why a live store is backed up with `backup_database`.
        """
        if self._connection is not None and not self.read_only:
            with contextlib.suppress(sqlite3.Error):
                # Brief: a busy reader only delays truncation to the last close.
                self._connection.execute("PRAGMA busy_timeout = 200")
                self._connection.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        super().close()

    def _insert_publication(self, db: sqlite3.Connection, agent: str) -> int:
        cursor = db.execute(
            "INSERT INTO publications(agent, time) VALUES (?, ?)", (agent, time.time())
        )
        return int(cursor.lastrowid or 0)
