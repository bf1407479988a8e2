"""The persistent store of an evolving system: its interface, backends and one opener.

`base` (the `Store` interface and its errors), `sql` (the SQL implementation both
backends share), `sqlite` (the embedded default), `postgres` (a server database for
multi-machine runs), `param_files` (atomic parameter files), `check` (read-only health
check and backup), `opening` (`open_store`: the backend chosen by location). The package
re-exports the interface and the opener, so `store.Store` and `store.open_store` read as
before.
"""

from evolution.store.base import (
    DamagedStoreError,
    ForeignStoreError,
    IntegrityError,
    NoStoreError,
    SchemaVersionError,
    Store,
    StoreError,
    UnknownEntryError,
)
from evolution.store.opening import (
    SERVER_SCHEMES,
    is_server_location,
    local_folder_of,
    open_store,
)

__all__ = [
    "StoreError",
    "UnknownEntryError",
    "IntegrityError",
    "SchemaVersionError",
    "ForeignStoreError",
    "DamagedStoreError",
    "NoStoreError",
    "Store",
    "SERVER_SCHEMES",
    "is_server_location",
    "local_folder_of",
    "open_store",
]
