"""The SQLite store: its schema check, foreign locations, the factory, kill -9 of a writer.

(The store contract on both backends is evolution/store/test_store_contract.py.)"""

import os
import signal
import sqlite3
import subprocess
import sys
import time

import numpy as np
import pytest
from store_testlib import make_component, make_params, make_path, seed_root

from evolution import store
from evolution.store import param_files
from evolution.store import sqlite as sqlite_store

REPO_ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", ".."))
ROOT_SLOTS = (("embed", "root-embed"), ("block_0", "root-block"), ("head", "root-head"))


def test_newer_schema_is_refused(tmp_path):
    directory = str(tmp_path / "store")
    sqlite_store.SqliteStore(directory).close()
    connection = sqlite3.connect(os.path.join(directory, "system.sqlite"))
    with connection:
        connection.execute("UPDATE schema_info SET value = '99' WHERE key = 'version'")
    connection.close()
    with pytest.raises(store.SchemaVersionError, match="99"):
        sqlite_store.SqliteStore(directory)


def test_foreign_or_damaged_locations_are_refused(tmp_path):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    connection = sqlite3.connect(str(foreign / "system.sqlite"))
    with connection:
        connection.execute("CREATE TABLE users(name TEXT)")
    connection.close()
    with pytest.raises(store.ForeignStoreError, match="not an evolution store"):
        sqlite_store.SqliteStore(str(foreign))

    garbage = tmp_path / "garbage"
    garbage.mkdir()
    (garbage / "system.sqlite").write_bytes(b"this is not a database" * 100)
    with pytest.raises(store.ForeignStoreError, match="not a usable SQLite"):
        sqlite_store.SqliteStore(str(garbage))

    busy = tmp_path / "model_dir"
    busy.mkdir()
    (busy / "checkpoint").write_text("x")
    with pytest.raises(store.ForeignStoreError, match="not empty"):
        sqlite_store.SqliteStore(str(busy))

    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(store.ForeignStoreError, match="not a directory"):
        sqlite_store.SqliteStore(str(a_file))


def test_closed_store_and_open_store_factory(tmp_path):
    opened = store.open_store(str(tmp_path / "store"))
    assert isinstance(opened, sqlite_store.SqliteStore)
    opened.close()
    with pytest.raises(store.StoreError, match="closed"):
        opened.load_state()


# -- kill -9 --------------------------------------------------------------------------

# The child commits one path (with a fresh head component) per iteration and prints its
# ids only after `publish` returned. With a crash point it kills itself with SIGKILL at
# that moment of iteration `crash_at` instead of waiting for the parent's random kill.
_CHILD = r"""
import os
import signal
import sys

import numpy as np

from evolution.store import param_files, sqlite as sqlite_store
from evolution.system import state as system

directory, round_index, crash_point, crash_at = sys.argv[1:5]
round_index, crash_at = int(round_index), int(crash_at)
iteration = 0


def die_at(point, original):
    # Dies right after `original` returns, at the chosen point and iteration.
    def wrapper(*args, **kwargs):
        result = original(*args, **kwargs)
        if crash_point == point and iteration == crash_at:
            os.kill(os.getpid(), signal.SIGKILL)
        return result
    return wrapper


param_files._write_item = die_at("mid_temp_write", param_files._write_item)
param_files.publish_folder = die_at("after_rename", param_files.publish_folder)
sqlite_store.SqliteStore._write_path = die_at("mid_publish", sqlite_store.SqliteStore._write_path)

db = sqlite_store.SqliteStore(directory)
db.discard_staged("crasher")
rng = np.random.default_rng(round_index)
previous = None
print("ready", flush=True)
for iteration in range(100_000):
    value = float(round_index * 100_000 + iteration)
    cid = system.new_id(rng, "c")
    params = {
        "kernel": np.full((64, 256), value, np.float32),
        "bias": np.full(256, value, np.float32),
    }
    component = system.Component(
        id=cid, kind="head", num_params=64 * 257, agent="crasher", task="t", config={"value": value}
    )
    db.put_component(component, params)
    path = system.Path(
        id=system.new_id(rng, "p"),
        task="t",
        components=(("embed", "root-embed"), ("block_0", "root-block"), ("head", cid)),
        agent="crasher",
        score=value,
    )
    db.publish("crasher", [path], [cid], retire=[previous] if previous and iteration % 2 else [])
    previous = path.id
    print(path.id, cid, value, flush=True)
"""


def _run_child(directory, round_index, out_file, *, delay=None, crash_point="none", crash_at=0):
    """Runs the child until it is killed (after `delay` s of work, or at its crash point)."""
    paths = [REPO_ROOT, os.environ.get("PYTHONPATH", "")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths), "JAX_PLATFORMS": "cpu"}
    args = [directory, str(round_index), crash_point, str(crash_at)]
    with open(out_file, "wb") as out:
        child = subprocess.Popen(
            [sys.executable, "-c", _CHILD, *args],
            stdout=out,
            stderr=subprocess.PIPE,
            env=env,
            cwd=REPO_ROOT,
        )
        try:
            if delay is None:
                child.wait(timeout=120)
            else:
                deadline = time.monotonic() + 120
                while not out_file.read_bytes().startswith(b"ready\n"):
                    assert child.poll() is None, f"child died: {child.stderr.read().decode()}"
                    assert time.monotonic() < deadline, "the child never got ready"
                    time.sleep(0.02)
                time.sleep(delay)
                child.send_signal(signal.SIGKILL)
                child.wait()
        finally:
            if child.poll() is None:
                child.kill()
                child.wait()
            stderr = child.stderr.read().decode()
            child.stderr.close()
    assert child.returncode == -signal.SIGKILL, stderr
    lines = out_file.read_bytes().split(b"\n")
    assert lines[0] == b"ready", stderr
    # The last element is a partial line (killed mid-print) or empty: only whole lines count.
    return [line.decode().split() for line in lines[1:-1]]


def _assert_all_parameters_readable(db, state):
    for path in state.paths.values():
        for component_id in path.component_ids:
            params = db.load_params(component_id)
            expected = state.components[component_id].config.get("value", 1.0)
            assert np.all(params["scale" if "scale" in params else "bias"] == expected)


def _check_after_crash(directory, reported):
    """Reopens the store and checks it against what the child reported as committed."""
    with sqlite_store.SqliteStore(directory) as db:
        removed = db.removed_on_open
        state = db.load_state()
        state.validate()
        for path_id, component_id, value in reported:
            assert path_id in state.paths, f"lost the committed path {path_id}"
            assert state.paths[path_id].component_ids[-1] == component_id
            assert state.paths[path_id].score == float(value)
        _assert_all_parameters_readable(db, state)
        discarded = db.discard_staged("crasher")  # what the restarted agent does first
        on_disk = set(os.listdir(os.path.join(directory, "params")))
        assert on_disk == set(state.components), "orphans or temp folders were left"
        return state, removed, discarded


def _seeded_store(tmp_path):
    directory = str(tmp_path / "store")
    with sqlite_store.SqliteStore(directory) as db:
        seed_root(db)
    return directory


@pytest.mark.multiprocess
def test_store_survives_kill_9_at_random_moments(tmp_path):
    directory = _seeded_store(tmp_path)
    rng = np.random.default_rng(2024)
    reported = []
    for round_index in range(4):
        delay = float(rng.uniform(0.05, 0.5))
        out_file = tmp_path / f"out{round_index}"
        reported += _run_child(directory, round_index, out_file, delay=delay)
        _check_after_crash(directory, reported)
    assert len(reported) > 0, "the child never committed: the kill delays are too short"
    with sqlite_store.SqliteStore(directory) as db:
        db.put_component(make_component("after", agent="agent", task="t"), make_params(5.0))
        db.publish("agent", [make_path("p_after", "after")], ["after"])
        assert db.load_state().paths["p_after"].agent == "agent"


@pytest.mark.parametrize(
    "crash_point, expect_removed, expect_discarded",
    [
        ("mid_temp_write", "temp", False),  # parameters in the temp folder, not renamed
        ("after_rename", "final", False),  # folder in place, its row not committed
        ("mid_publish", None, True),  # component staged, publication half-done
    ],
)
@pytest.mark.multiprocess
def test_store_survives_kill_9_at_each_critical_moment(
    tmp_path, crash_point, expect_removed, expect_discarded
):
    directory = _seeded_store(tmp_path)
    reported = _run_child(directory, 0, tmp_path / "out", crash_point=crash_point, crash_at=2)
    assert len(reported) == 2  # iterations 0 and 1 committed, 2 was interrupted
    state, removed, discarded = _check_after_crash(directory, reported)
    assert [p.id for p in state.active_paths("t")] == [reported[1][0]]  # 1 retired 0
    if expect_removed == "temp":
        assert len(removed) == 1 and removed[0].startswith(param_files.TEMP_PREFIX)
    elif expect_removed == "final":
        assert len(removed) == 1 and removed[0].startswith("c-")
    else:
        assert removed == []
    assert bool(discarded) == expect_discarded
    with sqlite_store.SqliteStore(directory) as db:  # the store still accepts commits
        db.put_component(make_component("after", agent="agent", task="t"), make_params(5.0))
        db.publish("agent", [make_path("p_after", "after")], ["after"])
