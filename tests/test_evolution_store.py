"""The SQLite store: round trips, transactions, reopening, orphans, errors, kill -9."""

import os
import signal
import sqlite3
import subprocess
import sys
import time

import jax
import ml_dtypes
import numpy as np
import optax
import pytest

from evolution import param_files, sqlite_store, store, system

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROOT_SLOTS = (("embed", "root-embed"), ("block_0", "root-block"), ("head", "root-head"))


def _params(value, dtype=np.float32):
    return {
        "dense": {"kernel": np.full((4, 3), value, dtype), "bias": np.arange(3).astype(dtype)},
        "scale": np.full((3,), value, dtype),
    }


def _component(cid, agent="root_agent", task="root", kind="block", **kwargs):
    return system.Component(
        id=cid, kind=kind, num_params=21, agent=agent, task=task, config={"v": 1}, **kwargs
    )


def _seed_root(db):
    """Tasks root and t, and a published root path of three components."""
    db.add_task("root", num_classes=10, metadata={"modality": "image"})
    db.add_task("t", num_classes=3)
    for _, cid in ROOT_SLOTS:
        db.put_component(_component(cid), _params(1.0))
    root = system.Path(id="root-path", task="root", components=ROOT_SLOTS, agent="root_agent")
    db.publish("root_agent", [root], [cid for _, cid in ROOT_SLOTS])
    db.set_root("root-path")
    return root


def _path(pid, head, agent="agent", task="t", **kwargs):
    return system.Path(
        id=pid,
        task=task,
        components=(*ROOT_SLOTS[:2], ("head", head)),
        agent=agent,
        **kwargs,
    )


@pytest.fixture
def db(tmp_path):
    with sqlite_store.SqliteStore(str(tmp_path / "store")) as opened:
        yield opened


def _assert_trees_identical(a, b):
    assert type(a) is type(b) or (isinstance(a, dict) and isinstance(b, dict))
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            _assert_trees_identical(a[key], b[key])
    else:
        assert a.dtype == b.dtype and a.shape == b.shape
        assert a.tobytes() == b.tobytes()


# -- round trips ----------------------------------------------------------------------


def test_params_round_trip_bit_identical(db):
    rng = np.random.default_rng(0)
    params = {
        "f32": rng.standard_normal((5, 7)).astype(np.float32),
        "bf16": rng.standard_normal((3, 2)).astype(ml_dtypes.bfloat16),
        "nested": {"i32": np.arange(6, dtype=np.int32).reshape(2, 3), "f64": np.float64(np.pi)},
        "special": np.array([np.nan, np.inf, -0.0], np.float32),
    }
    db.put_component(_component("c1"), params)
    loaded = db.load_params("c1")
    for key in ("f32", "bf16", "special"):
        _assert_trees_identical(params[key], loaded[key])
    _assert_trees_identical(params["nested"]["i32"], loaded["nested"]["i32"])
    assert loaded["nested"]["f64"].tobytes() == np.asarray(params["nested"]["f64"]).tobytes()
    assert db.load_opt_state("c1") is None


def test_opt_state_round_trip_into_optax_structure(db):
    params = _params(2.0)
    optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.sgd(0.1, momentum=0.9))
    opt_state = jax.tree.map(lambda x: np.asarray(x) + 0.5, optimizer.init(params))
    db.put_component(_component("c1"), params, opt_state)
    restored = db.load_opt_state("c1", target=opt_state)
    assert type(restored) is type(opt_state)
    flat_a, tree_a = jax.tree_util.tree_flatten(opt_state)
    flat_b, tree_b = jax.tree_util.tree_flatten(restored)
    assert tree_a == tree_b
    for x, y in zip(flat_a, flat_b, strict=True):
        assert np.asarray(x).tobytes() == np.asarray(y).tobytes()
    as_dicts = db.load_opt_state("c1")
    assert as_dicts["1"]["0"]["trace"]["dense"]["kernel"].shape == (4, 3)
    with pytest.raises(store.StoreError, match="target"):
        db.load_opt_state("c1", target={"only": np.zeros(1)})


def test_state_round_trip_and_reopen(tmp_path):
    directory = str(tmp_path / "store")
    with sqlite_store.SqliteStore(directory) as db:
        root = _seed_root(db)
        db.put_component(_component("h1", agent="agent", task="t", kind="head"), _params(3.0))
        path = _path(
            "p1",
            "h1",
            hparams={"lr": 2, "schedule": "cosine"},
            parent="root-path",
            score=0.75,
            quality=0.8,
            metrics={"val": [0.5, 0.8]},
            generation=3,
            architecture={"hidden": 32},
        )
        db.publish("agent", [path], ["h1"])
        before = db.load_state()
    with sqlite_store.SqliteStore(directory) as db:
        after = db.load_state()
        assert after == before
        assert after.paths["p1"] == path and after.paths["root-path"] == root
        assert after.root_path_id == "root-path"
        assert after.tasks["root"].metadata == {"modality": "image"}
        assert [t.name for t in sorted(after.tasks.values(), key=lambda t: t.order)] == [
            "root",
            "t",
        ]
        assert after.components["h1"] == _component("h1", agent="agent", task="t", kind="head")
        assert after.locks_of("root-embed") == frozenset({"root", "t"})
        _assert_trees_identical(db.load_params("h1"), _params(3.0))
        assert db.removed_on_open == []


def test_updates_retirement_and_ownership(db):
    _seed_root(db)
    db.put_component(_component("h1", agent="agent", task="t", kind="head"), _params(1.0))
    first = _path("p1", "h1", score=0.5)
    db.publish("agent", [first], ["h1"])
    updated = _path("p1", "h1", score=0.6, offspring=2, metrics={"n": 1})
    db.publish("agent", [updated])
    assert db.load_state().paths["p1"] == updated
    with pytest.raises(store.IntegrityError, match="publish a new path"):
        db.publish("agent", [_path("p1", "root-head")])
    with pytest.raises(store.IntegrityError, match="cannot change path"):
        db.retire_path("someone_else", "p1")
    with pytest.raises(store.IntegrityError, match="made by"):
        db.publish("someone_else", [first])
    db.retire_path("agent", "p1")
    state = db.load_state()
    assert state.paths["p1"].status == system.RETIRED
    assert state.locks_of("h1") == frozenset()
    assert state.best_path("t") is None


# -- transactions ---------------------------------------------------------------------


def test_publish_is_all_or_nothing(db):
    _seed_root(db)
    db.put_component(_component("h1", agent="agent", task="t", kind="head"), _params(1.0))
    db.put_component(_component("h2", agent="agent", task="t", kind="head"), _params(2.0))
    db.publish("agent", [_path("old", "h1")], ["h1"])
    before = db.load_state()
    good = _path("p_good", "h2")
    dangling = _path("p_bad", "missing")
    with pytest.raises(store.IntegrityError, match="missing.*not in the store"):
        db.publish("agent", [good, dangling], ["h2"], retire=["old"])
    assert db.load_state() == before  # h2 still staged, old still active, p_good absent
    with pytest.raises(store.IntegrityError, match="staged but not published"):
        db.publish("agent", [good])
    db.publish("agent", [good], ["h2"], retire=["old"])
    state = db.load_state()
    assert state.paths["p_good"] == good and state.paths["old"].status == system.RETIRED


def test_an_exception_mid_transaction_rolls_back(db, monkeypatch):
    _seed_root(db)
    for head in ("h1", "h2"):
        db.put_component(_component(head, agent="agent", task="t", kind="head"), _params(1.0))
    before = db.load_state()
    original = sqlite_store.SqliteStore._write_path
    calls = []

    def failing(self, *args):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # even a non-Exception interruption rolls back
        return original(self, *args)

    monkeypatch.setattr(sqlite_store.SqliteStore, "_write_path", failing)
    with pytest.raises(KeyboardInterrupt):
        db.publish("agent", [_path("p1", "h1"), _path("p2", "h2")], ["h1", "h2"])
    monkeypatch.undo()
    assert db.load_state() == before
    db.publish("agent", [_path("p1", "h1")], ["h1"])  # the store is usable afterwards
    assert "p1" in db.load_state().paths


def test_failed_put_leaves_no_folder(db, monkeypatch):
    db.add_task("t", num_classes=2)

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(param_files, "_write_item", broken)
    with pytest.raises(OSError, match="disk full"):
        db.put_component(_component("c1"), _params(1.0))
    monkeypatch.undo()
    assert os.listdir(os.path.join(db.directory, "params")) == []
    with pytest.raises(store.UnknownEntryError):
        db.load_params("c1")


# -- staged components and orphans ---------------------------------------------------


def test_discard_staged_removes_only_the_agents_unpublished_components(db):
    _seed_root(db)
    db.put_component(_component("a1", agent="a", task="t"), _params(1.0))
    db.put_component(_component("a2", agent="a", task="t"), _params(1.0))
    db.put_component(_component("b1", agent="b", task="t"), _params(1.0))
    db.publish("a", [_path("pa", "a1", agent="a")], ["a1"])
    assert db.discard_staged("a") == ("a2",)
    assert sorted(os.listdir(os.path.join(db.directory, "params"))) == sorted(
        ["a1", "b1", *(cid for _, cid in ROOT_SLOTS)]
    )
    with pytest.raises(store.UnknownEntryError):
        db.load_params("a2")
    assert db.load_params("b1")["scale"].shape == (3,)


def _dead_pid():
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_orphans_removed_on_open_but_live_work_kept(tmp_path):
    directory = str(tmp_path / "store")
    with sqlite_store.SqliteStore(directory) as db:
        _seed_root(db)
        db.put_component(_component("staged", agent="a", task="t"), _params(1.0))
    params_dir = os.path.join(directory, "params")
    host = param_files._HOST
    orphans = {
        "deadbeef": "a folder renamed just before its row's commit",
        f".tmp-{host}-{_dead_pid()}-abc": "a half-written temp folder of a dead process",
    }
    kept = {
        f".tmp-{host}-{os.getpid()}-abc": "this process is still writing it",
        ".tmp-otherhost-1-abc": "another machine's writer may be alive",
    }
    for name in [*orphans, *kept]:
        os.makedirs(os.path.join(params_dir, name))
        with open(os.path.join(params_dir, name, "params.npz"), "wb") as handle:
            handle.write(b"partial")
    with sqlite_store.SqliteStore(directory) as db:
        assert sorted(db.removed_on_open) == sorted(orphans)
        remaining = set(os.listdir(params_dir))
        assert remaining == {*kept, "staged", *(cid for _, cid in ROOT_SLOTS)}
        assert db.load_params("staged")["scale"].shape == (3,)


def test_second_store_on_the_same_directory_sees_publications(tmp_path):
    directory = str(tmp_path / "store")
    with sqlite_store.SqliteStore(directory) as first:
        _seed_root(first)
        first.put_component(_component("h1", agent="a", task="t"), _params(1.0))
        with sqlite_store.SqliteStore(directory) as second:
            assert "h1" not in second.load_state().components  # staged stays private
            first.publish("a", [_path("p1", "h1", agent="a")], ["h1"])
            assert second.load_state().paths["p1"].agent == "a"
            assert second.removed_on_open == []


# -- errors ---------------------------------------------------------------------------


def test_clear_errors_for_unknown_and_conflicting_entries(db):
    _seed_root(db)
    with pytest.raises(store.UnknownEntryError, match="nope"):
        db.load_params("nope")
    with pytest.raises(store.UnknownEntryError, match="nope"):
        db.load_opt_state("nope")
    with pytest.raises(store.UnknownEntryError, match="nope"):
        db.retire_path("agent", "nope")
    with pytest.raises(store.UnknownEntryError, match="nope"):
        db.set_root("nope")
    with pytest.raises(store.UnknownEntryError, match="never put"):
        db.publish("agent", components=["nope"])
    with pytest.raises(store.UnknownEntryError, match="unknown task"):
        db.publish("agent", [_path("p", "root-head", task="unknown_task")])
    with pytest.raises(store.IntegrityError, match="exists already"):
        db.put_component(_component("root-embed"), _params(1.0))
    with pytest.raises(store.IntegrityError, match="cannot re-add"):
        db.add_task("t", num_classes=4)
    assert db.add_task("t", num_classes=3).order == 1  # repeating the same facts is fine
    db.put_component(_component("b1", agent="b", task="t"), _params(1.0))
    with pytest.raises(store.IntegrityError, match="cannot publish component"):
        db.publish("agent", components=["b1"])
    assert isinstance(store.UnknownEntryError("x"), LookupError)


def test_missing_parameter_files_are_reported(db):
    db.put_component(_component("c1"), _params(1.0))
    os.remove(os.path.join(db.directory, "params", "c1", "params.npz"))
    with pytest.raises(store.StoreError, match="c1"):
        db.load_params("c1")


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

from evolution import param_files, sqlite_store, system

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
        _seed_root(db)
    return directory


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
        db.put_component(_component("after", agent="agent", task="t"), _params(5.0))
        db.publish("agent", [_path("p_after", "after")], ["after"])
        assert db.load_state().paths["p_after"].agent == "agent"


@pytest.mark.parametrize(
    "crash_point, expect_removed, expect_discarded",
    [
        ("mid_temp_write", "temp", False),  # parameters in the temp folder, not renamed
        ("after_rename", "final", False),  # folder in place, its row not committed
        ("mid_publish", None, True),  # component staged, publication half-done
    ],
)
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
        db.put_component(_component("after", agent="agent", task="t"), _params(5.0))
        db.publish("agent", [_path("p_after", "after")], ["after"])
