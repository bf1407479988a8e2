"""Opening a store by location: the one factory over the embedded and server backends.

`open_store` picks the backend from the location (a folder: SQLite; a postgresql:// URL:
PostgreSQL), so `base` (the interface) never imports the backends that implement it.
"""

from __future__ import annotations

from evolution.store import base, sqlite

SERVER_SCHEMES = ("postgresql://", "postgres://")


def is_server_location(location: str) -> bool:
    """Whether `location` names a server store (PostgreSQL) rather than a local folder."""
    return location.startswith(SERVER_SCHEMES)


def local_folder_of(location: str) -> str:
    """The folder of a store's files: the store directory, or a server store's params_dir.

    Agents keep their lock files there (`agent_run.agent_lock`), so it must be a folder
    every process that runs agents of this store can reach.

    Args:
      location: an `open_store` location.

    Returns:
      The folder.
    """
    if is_server_location(location):
        from evolution.store import postgres  # noqa: PLC0415 - psycopg is optional

        return postgres.split_location(location)[1]
    return location


def open_store(location: str, *, read_only: bool = False) -> base.Store:
    """Opens the store at `location`, creating it only where there is nothing yet.

    A store is created only in an absent or empty location (no database, no parameter
    folders). A database that is missing, empty or damaged beside parameter folders is
    refused (`DamagedStoreError`), never re-created.

    Args:
      location: a local directory, which holds an embedded SQLite store (the default),
        or `postgresql://user@host:port/dbname?params_dir=/shared/dir`: metadata in a
        PostgreSQL database, parameters in a directory every agent can reach (multi-
        machine runs; needs `pip install "psycopg[binary]"`).
      read_only: open an existing store for reading only (exports, reports, checks):
        nothing is created, changed or deleted, and writes raise `StoreError`.

    Returns:
      The store.

    Raises:
      ImportError: a PostgreSQL location without psycopg installed.
      NoStoreError: `read_only` and there is no store at `location`.
      DamagedStoreError: the database is missing, empty or damaged beside parameters.
    """
    if is_server_location(location):
        try:
            # psycopg is optional: imported only for a server store.
            from evolution.store import postgres  # noqa: PLC0415
        except ImportError as error:
            raise ImportError(
                # The location is not repeated: it may hold a password.
                "A PostgreSQL server store (postgresql://...) needs psycopg: "
                'pip install "psycopg[binary]" (evogrow\'s [test] extra has it).'
            ) from error
        return postgres.PostgresStore.from_location(location, read_only=read_only)
    return sqlite.SqliteStore(location, read_only=read_only)
