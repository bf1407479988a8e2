"""Checking and backing up a store (`./run.sh store check|backup`).

`check_store` opens a store read-only and verifies what a search relies on: the schema,
SQLite's `integrity_check`, that every reference resolves, and that every published
component's parameter folder exists and loads. It lists the folders the database does
not know, and never deletes anything.

`backup_store` copies a live SQLite store (agents may be writing): the database with
SQLite's online backup API (one consistent snapshot), then the parameter folders of
the snapshot's published components, which are never changed or deleted once
published. Staged (unpublished) components are left out of the copy: they are private
to their agents, which discard them when they restart.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import sqlite3
import uuid

from evolution.store import base as store_lib
from evolution.store import opening
from evolution.store import sql as sql_store
from evolution.store import sqlite as sqlite_store
from evolution.system import state as system


@dataclasses.dataclass(frozen=True)
class StoreCheck:
    """What `check_store` found.

    Attributes:
      location: the store.
      components: published components whose parameters were loaded.
      paths: paths in the store.
      problems: what is wrong (empty when the store is healthy).
      unreferenced: parameter folders the database does not know (kept, not removed).
    """

    location: str
    components: int
    paths: int
    problems: tuple[str, ...]
    unreferenced: tuple[str, ...]

    @property
    def healthy(self) -> bool:
        """Whether no problem was found."""
        return not self.problems

    def summary(self) -> str:
        """One line: healthy, or the first problem (and how many more)."""
        if self.healthy:
            line = (
                f"{self.location}: healthy ({self.components} published components load, "
                f"{self.paths} paths)"
            )
            if self.unreferenced:
                line += (
                    f"; {len(self.unreferenced)} parameter folders the database does not know "
                    f"(kept): {', '.join(self.unreferenced[:5])}"
                )
            return line
        more = f" (and {len(self.problems) - 1} more problems)" if len(self.problems) > 1 else ""
        return f"{self.location}: {self.problems[0]}{more}"


def check_store(location: str) -> StoreCheck:
    """Verifies a store without changing it.

    Args:
      location: an `open_store` location.

    Returns:
      The findings.

    Raises:
      StoreError: the store cannot be opened (no store, damaged or foreign database).
    """
    problems: list[str] = []
    with opening.open_store(location, read_only=True) as store:
        if isinstance(store, sqlite_store.SqliteStore):
            problems += [f"integrity_check: {p}" for p in store.integrity_problems()[:5]]
        try:
            state = store.load_state()
            state.validate()
        except (store_lib.StoreError, ValueError) as error:
            problems.append(str(error))
            return StoreCheck(location, 0, 0, tuple(problems), ())
        loaded = 0
        for component_id in state.components:
            try:
                store.load_params(component_id)
                store.load_opt_state(component_id)
                loaded += 1
            except store_lib.StoreError as error:
                problems.append(f"published component {component_id!r}: {error}")
        unreferenced: list[str] = []
        if isinstance(store, sql_store.SqlStore):
            unreferenced = store.unreferenced_folders()
    return StoreCheck(location, loaded, len(state.paths), tuple(problems), tuple(unreferenced))


def backup_store(location: str, destination: str) -> StoreCheck:
    """Copies a (possibly live) SQLite store to a new directory and checks the copy.

    Args:
      location: the store directory.
      destination: a new directory (absent, or empty).

    Returns:
      `check_store` of the copy.

    Raises:
      StoreError: a server store (back it up with pg_dump and a copy of its params_dir),
        a destination that is not new, or a store that cannot be read.
    """
    if opening.is_server_location(location):
        raise store_lib.StoreError(
            "store backup copies SQLite stores; back up a PostgreSQL store with pg_dump "
            "plus a copy of its params_dir."
        )
    destination = os.path.abspath(destination)
    if os.path.exists(destination) and (not os.path.isdir(destination) or os.listdir(destination)):
        raise store_lib.StoreError(f"{destination} exists and is not empty; back up to a new one.")
    partial = f"{destination}.partial-{uuid.uuid4().hex[:8]}"
    os.makedirs(os.path.join(partial, sqlite_store.PARAMS_FOLDER))
    try:
        database = os.path.join(partial, sqlite_store.DATABASE_NAME)
        source = sqlite_store.SqliteStore(location, read_only=True)
        try:
            source.backup_database(database)
            source_params = os.path.join(source.directory, sqlite_store.PARAMS_FOLDER)
        finally:
            source.close()
        published = _keep_published_only(database)
        for component_id in published:
            shutil.copytree(
                os.path.join(source_params, component_id),
                os.path.join(partial, sqlite_store.PARAMS_FOLDER, component_id),
            )
        if os.path.isdir(destination):
            os.rmdir(destination)
        os.rename(partial, destination)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return check_store(destination)


def _keep_published_only(database: str) -> list[str]:
    """Drops staged components and orphan candidates from a backup copy; the published ids."""
    connection = sqlite3.connect(database, isolation_level=None)
    try:
        connection.execute("BEGIN IMMEDIATE")
        connection.execute("DELETE FROM components WHERE NOT published")
        tables = {r[0] for r in connection.execute("SELECT name FROM sqlite_master")}
        if "orphan_candidates" in tables:
            connection.execute("DELETE FROM orphan_candidates")
        ids = [r[0] for r in connection.execute("SELECT id FROM components ORDER BY id")]
        connection.execute("COMMIT")
        mode = connection.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise store_lib.StoreError(f"SQLite refused WAL mode for the copy (got {mode!r}).")
    except sqlite3.DatabaseError as error:
        raise store_lib.DamagedStoreError(
            sql_store.damaged_database_message(database, error)
        ) from error
    finally:
        connection.close()
    bad = [i for i in ids if not system.is_valid_id(i)]
    if bad:
        raise store_lib.DamagedStoreError(
            f"The store's database holds invalid component ids {bad[:3]}; nothing was copied."
        )
    return ids
