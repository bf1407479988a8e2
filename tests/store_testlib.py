"""Shared fixtures' building blocks of the store tests: a tiny system and both backends.

`seed_root(db)` publishes tasks "root" and "t" and a root path of three components;
`make_path` builds a path of task t on the root's embedding and block with another head;
`Backend` opens one store location (again and again) of the SQLite or the PostgreSQL
store, so that one test body checks the store contract on both.
"""

import os
import subprocess
import sys

import jax
import numpy as np

from evolution.store import sqlite as sqlite_store
from evolution.system import state as system

ROOT_SLOTS = (("embed", "root-embed"), ("block_0", "root-block"), ("head", "root-head"))


def make_params(value, dtype=np.float32):
    """A small parameter tree filled with `value` (and a bias 0, 1, 2)."""
    return {
        "dense": {"kernel": np.full((4, 3), value, dtype), "bias": np.arange(3).astype(dtype)},
        "scale": np.full((3,), value, dtype),
    }


def make_component(cid, agent="root_agent", task="root", kind="block", **kwargs):
    """A component record of 21 parameters."""
    return system.Component(
        id=cid, kind=kind, num_params=21, agent=agent, task=task, config={"v": 1}, **kwargs
    )


def seed_root(db):
    """Tasks root and t, and a published root path of three components; returns the path."""
    db.add_task("root", num_classes=10, metadata={"modality": "image"})
    db.add_task("t", num_classes=3)
    for _, cid in ROOT_SLOTS:
        db.put_component(make_component(cid), make_params(1.0))
    root = system.Path(id="root-path", task="root", components=ROOT_SLOTS, agent="root_agent")
    db.publish("root_agent", [root], [cid for _, cid in ROOT_SLOTS])
    db.set_root("root-path")
    return root


def make_path(pid, head, agent="agent", task="t", **kwargs):
    """A path on the root's embedding and block with head `head`."""
    return system.Path(
        id=pid, task=task, components=(*ROOT_SLOTS[:2], ("head", head)), agent=agent, **kwargs
    )


def bits(tree):
    """(dtype, bytes) of every leaf: equal lists mean bit-identical trees."""
    return [(np.asarray(x).dtype, np.asarray(x).tobytes()) for x in jax.tree.leaves(tree)]


def dead_pid():
    """The pid of a process that has exited."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


class Backend:
    """Opens one store location (again and again) of either backend.

    Args:
      kind: "sqlite" or "postgres".
      tmp_path: a fresh folder for the store (SQLite) or its parameters (PostgreSQL).
      dsn: the PostgreSQL database (kind "postgres").
    """

    def __init__(self, kind, tmp_path, dsn=None):
        self.kind = kind
        if kind == "sqlite":
            self.directory = str(tmp_path / "store")
            self.params_dir = os.path.join(self.directory, sqlite_store.PARAMS_FOLDER)
        else:
            self.dsn = dsn
            self.params_dir = str(tmp_path / "params")

    def open(self):
        """A new client of the store."""
        if self.kind == "sqlite":
            return sqlite_store.SqliteStore(self.directory)
        from evolution.store import postgres as postgres_store

        return postgres_store.PostgresStore(self.dsn, self.params_dir)

    def folders(self):
        """The component folders in the parameter directory (not the PostgreSQL marker)."""
        names = set(os.listdir(self.params_dir))
        if self.kind == "postgres":
            from evolution.store import postgres as postgres_store

            names.discard(postgres_store.MARKER_NAME)
        return names
