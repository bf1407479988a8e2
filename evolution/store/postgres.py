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
  most a folder without a row remains; its id was committed as an orphan candidate
  before the rename, so the next writing open removes it (under the lock). Folders the
  database does not know, and temporary folders of other hosts, are never removed.
- A store is created only where there is nothing: a database without tables beside a
  non-empty params_dir is refused (`store.DamagedStoreError`); `read_only=True`
  creates, changes and deletes nothing.
- `<params_dir>/.evogrow-store` names the database's store id, so a parameter folder
  is never cleaned against the wrong database (`ForeignStoreError`).

Columns keep SQLite's exact values: JSON as text written by `sql_store.dumps`, scores
as DOUBLE PRECISION, so both stores return equal `SystemState`s. The store's logic is
`sql_store.SqlStore`'s; this module is PostgreSQL's connection, schema and transactions.
"""

from __future__ import annotations

import contextlib
import os
import urllib.parse
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg

from evolution.store import base as store
from evolution.store import sql as sql_store
from evolution.store.sql import SCHEMA_FORMAT, SCHEMA_VERSION

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


def redacted(location: str) -> str:
    """`location` with any password in it (`user:PASSWORD@`, `password=`) replaced by ***.

    Messages and logs name a store by its location; a password written into the URL
    (instead of ~/.pgpass or PGPASSWORD) must not be repeated there.

    Args:
      location: a store location or libpq URI.

    Returns:
      the location without its password.
    """
    parts = urllib.parse.urlsplit(location)
    netloc = parts.netloc
    if "@" in netloc:
        user, _, host = netloc.rpartition("@")
        if ":" in user:
            netloc = f"{user.partition(':')[0]}:***@{host}"
    query = [
        (key, "***" if key == "password" else value)
        for key, value in urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
    ]
    query_text = urllib.parse.urlencode(query, safe="*/") if query else parts.query
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc, query=query_text))


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
        raise ValueError(f"{redacted(location)!r} is not a postgresql:// location.")
    query = urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
    params_dirs = [value for key, value in query if key == "params_dir"]
    if len(params_dirs) != 1 or not params_dirs[0]:
        raise ValueError(f"{redacted(location)!r} needs exactly one params_dir=<shared directory>.")
    rest = urllib.parse.urlencode([(k, v) for k, v in query if k != "params_dir"])
    return urllib.parse.urlunsplit(parts._replace(query=rest)), params_dirs[0]


class PostgresStore(sql_store.SqlStore):
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

    PLACEHOLDER = "%s"
    ROW_ORDER = "ordinal"

    def __init__(
        self,
        dsn: str,
        params_dir: str,
        *,
        read_only: bool = False,
        lock_timeout_s: float = 60.0,
    ):
        self.params_dir = os.path.abspath(params_dir)
        self.read_only = read_only
        self.removed_on_open: list[str] = []
        self._params_root = self._location = self.params_dir
        if os.path.exists(self.params_dir) and not os.path.isdir(self.params_dir):
            raise store.ForeignStoreError(f"{self.params_dir} is not a directory.")
        try:
            self._connection: psycopg.Connection | None = psycopg.connect(dsn, autocommit=True)
        except psycopg.Error as error:
            raise store.StoreError(f"Cannot connect to the store's database: {error}") from error
        try:
            self._db().execute(f"SET lock_timeout = {int(lock_timeout_s * 1000)}")
            self.store_id = self._check_or_create_schema()
            if read_only:
                self._check_marker()
            else:
                os.makedirs(self.params_dir, exist_ok=True)
                self.removed_on_open = self._check_marker_and_remove_orphans()
        except psycopg.Error as error:
            self.close()
            raise store.StoreError(f"The store's database failed: {error}") from error
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

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[psycopg.Connection]:
        """A READ COMMITTED transaction holding the store's write lock."""
        self._check_writable()
        db = self._db()
        with db.transaction():
            db.execute("LOCK TABLE schema_info IN EXCLUSIVE MODE")
            yield db

    @contextlib.contextmanager
    def _snapshot(self) -> Iterator[psycopg.Connection]:
        db = self._db()
        with db.transaction():
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
                self._refuse_creation_beside_parameters()
                for statement in [*_SCHEMA.split(";"), sql_store.ORPHAN_CANDIDATES_TABLE]:
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
            info = None
            if "schema_info" in tables:
                info = dict(db.execute("SELECT key, value FROM schema_info").fetchall())
            checked = sql_store.check_schema_info(where, tables, info, required_keys=("store_id",))
            self.schema_version = int(checked["version"])
            if self.schema_version < SCHEMA_VERSION and not self.read_only:
                self.schema_version = SCHEMA_VERSION
                db.execute(sql_store.ORPHAN_CANDIDATES_TABLE)
                db.execute(
                    "UPDATE schema_info SET value = %s WHERE key = 'version'",
                    (str(SCHEMA_VERSION),),
                )
        return checked["store_id"]

    def _refuse_creation_beside_parameters(self) -> None:
        """A store is created only where there is nothing: not beside parameter folders."""
        names = os.listdir(self.params_dir) if os.path.isdir(self.params_dir) else []
        if self.read_only:
            raise store.NoStoreError(
                f"No store in database {self._db().info.dbname!r}: it has no tables."
            )
        if names:
            raise store.DamagedStoreError(
                f"The database {self._db().info.dbname!r} has no tables, but {self.params_dir} "
                f"holds {len(names)} entries ({sorted(names)[:3]}): the store's database was "
                "lost or is the wrong one. Nothing was changed; restore the database from a "
                "backup (pg_dump) or give a new, empty params_dir."
            )

    def _check_marker(self) -> None:
        """Refuses a parameter directory that belongs to another store (read-only opens)."""
        marker = os.path.join(self.params_dir, MARKER_NAME)
        if not os.path.exists(marker):
            return
        with open(marker) as handle:
            owner = handle.read().strip()
        if owner != self.store_id:
            raise store.ForeignStoreError(
                f"{self.params_dir} holds the parameters of store {owner!r}, not of "
                f"this database's store {self.store_id!r}."
            )

    def _schema_name(self) -> str:
        row = self._db().execute("SELECT current_schema()").fetchone()
        return str(row[0]) if row else "?"

    def _check_marker_and_remove_orphans(self) -> list[str]:
        marker = os.path.join(self.params_dir, MARKER_NAME)
        with self._transaction() as db:
            if os.path.exists(marker):
                self._check_marker()
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
            return self._remove_orphans_locked(db)
