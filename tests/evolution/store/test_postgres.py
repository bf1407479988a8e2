"""The PostgreSQL store: locations, foreign stores, concurrent publishers, kill -9 of a
publisher, and the same search results as the embedded SQLite store (the store contract
on both backends is evolution/store/test_store_contract.py).

The tests start a throw-away PostgreSQL server (Debian's `postgresql` package) on
127.0.0.1 at a free port in a temporary folder (as the `postgres` or `nobody` user when
run as root, which the server refuses), one fresh database per test; they skip when
the server binaries or psycopg are missing.
"""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

psycopg = pytest.importorskip("psycopg", reason="psycopg (3) is not installed")

import postgres_testlib  # noqa: E402
from multiprocess_testlib import free_port  # noqa: E402
from store_testlib import (  # noqa: E402
    Backend,
    bits,
    make_component,
    make_params,
    make_path,
    seed_root,
)

from evolution import store  # noqa: E402
from evolution.roots import seeding  # noqa: E402
from evolution.store import param_files  # noqa: E402
from evolution.store import postgres as postgres_store  # noqa: E402
from evolution.system import state as system  # noqa: E402

pytestmark = pytest.mark.postgres  # a throw-away PostgreSQL server

REPO_ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", ".."))
ROOT_SLOTS = (("embed", "root-embed"), ("block_0", "root-block"), ("head", "root-head"))


# -- the throw-away server ------------------------------------------------------------


@pytest.fixture(scope="module")
def server():
    """A PostgreSQL server on loopback for this module; yields its port."""
    if postgres_testlib.server_bin_dir() is None:
        pytest.skip("PostgreSQL server binaries (initdb, postgres) not found")
    with postgres_testlib.local_server() as port:
        yield port


_new_database = postgres_testlib.new_database
_dsn = postgres_testlib.dsn


@pytest.fixture
def pg(server, tmp_path):
    """A fresh PostgreSQL store location."""
    return Backend("postgres", tmp_path, _new_database(server))


@pytest.fixture
def db(backend):
    with backend.open() as opened:
        yield opened


# -- PostgreSQL only: locations and foreign or damaged stores -------------------------


def test_location_string(server, tmp_path):
    dsn, params_dir = postgres_store.split_location(
        "postgresql://u@h:5/db?connect_timeout=3&params_dir=/shared/evo&sslmode=disable"
    )
    assert (dsn, params_dir) == (
        "postgresql://u@h:5/db?connect_timeout=3&sslmode=disable",
        "/shared/evo",
    )
    for bad in ("/local/dir", "postgresql://h/db", "postgresql://h/db?params_dir="):
        with pytest.raises(ValueError):
            postgres_store.split_location(bad)
    name = _new_database(server).split("dbname=")[1].split()[0]
    location = f"postgresql://evogrow@127.0.0.1:{server}/{name}?params_dir={tmp_path / 'p'}"
    with postgres_store.PostgresStore.from_location(location) as db:
        seed_root(db)
        assert db.params_dir == str(tmp_path / "p")
        assert db.load_state().root_path_id == "root-path"


def test_foreign_or_damaged_locations_are_refused(pg, tmp_path, server):
    with pg.open() as db:
        seed_root(db)
    empty_database = _new_database(server)
    with pytest.raises(store.DamagedStoreError, match="no tables, but .* holds 4 entries"):
        postgres_store.PostgresStore(empty_database, pg.params_dir)
    with psycopg.connect(empty_database, autocommit=True) as connection:  # nothing created
        assert (
            connection.execute(
                "SELECT COUNT(*) FROM pg_tables WHERE schemaname = current_schema()"
            ).fetchone()[0]
            == 0
        )
    with pg.open() as db:  # the parameters of the store are untouched
        assert pg.folders() == set(db.load_state().components)
    other = _new_database(server)
    with postgres_store.PostgresStore(other, str(tmp_path / "other")):
        pass
    with pytest.raises(store.ForeignStoreError, match="another|of store"):
        postgres_store.PostgresStore(other, pg.params_dir)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "checkpoint").write_text("x")
    with pytest.raises(store.ForeignStoreError, match="not empty"):
        postgres_store.PostgresStore(pg.dsn, str(tmp_path / "busy"))
    with pytest.raises(store.ForeignStoreError, match="no .evogrow-store"):
        postgres_store.PostgresStore(pg.dsn, str(tmp_path / "empty"))
    with pytest.raises(store.ForeignStoreError, match="not a directory"):
        postgres_store.PostgresStore(pg.dsn, str(tmp_path / "busy" / "checkpoint"))
    with psycopg.connect(pg.dsn, autocommit=True) as connection:
        connection.execute("UPDATE schema_info SET value = '99' WHERE key = 'version'")
    with pytest.raises(store.SchemaVersionError, match="99"):
        pg.open()
    foreign = _new_database(server)
    with psycopg.connect(foreign, autocommit=True) as connection:
        connection.execute("CREATE TABLE users(name TEXT)")
    with pytest.raises(store.ForeignStoreError, match="not an evolution store"):
        postgres_store.PostgresStore(foreign, str(tmp_path / "p2"))
    with pytest.raises(store.StoreError, match="connect"):
        postgres_store.PostgresStore(_dsn(free_port(), "x"), str(tmp_path / "p3"))


# -- several processes: concurrent publishers and kill -9 -----------------------------

# Each iteration puts two head components and publishes two paths (a pair with equal
# scores) retiring the previous pair, then prints their ids. A crash point kills the
# process with SIGKILL right after that step of iteration `crash_at`.
_CHILD = r"""
import os
import signal
import sys

import numpy as np

from evolution.store import param_files, postgres as postgres_store
from evolution.system import state as system

dsn, params_dir, agent, seed, iterations, crash_point, crash_at = sys.argv[1:8]
iteration = 0


def die_at(point, original):
    def wrapper(*args, **kwargs):
        result = original(*args, **kwargs)
        if crash_point == point and iteration == int(crash_at):
            os.kill(os.getpid(), signal.SIGKILL)
        return result
    return wrapper


param_files._write_item = die_at("mid_temp_write", param_files._write_item)
param_files.publish_folder = die_at("after_rename", param_files.publish_folder)
postgres_store.PostgresStore._write_path = die_at(
    "mid_publish", postgres_store.PostgresStore._write_path
)
db = postgres_store.PostgresStore(dsn, params_dir)
db.discard_staged(agent)
rng = np.random.default_rng(int(seed))
previous = []
print("ready", flush=True)
sys.stdin.readline()  # the parent's go, once every child has opened the store
for iteration in range(int(iterations)):
    value = float(iteration)
    ids = [system.new_id(rng, "c") for _ in range(2)]
    for cid in ids:
        component = system.Component(
            id=cid, kind="head", num_params=3, agent=agent, task="t", config={"value": value}
        )
        db.put_component(component, {"scale": np.full(3, value, np.float32)})
    paths = [
        system.Path(
            id=system.new_id(rng, "p"),
            task="t",
            components=(("embed", "root-embed"), ("block_0", "root-block"), ("head", cid)),
            agent=agent,
            score=value,
            metrics={"pair": ids[0]},
        )
        for cid in ids
    ]
    db.publish(agent, paths, ids, retire=previous)
    previous = [p.id for p in paths]
    print(paths[0].id, paths[1].id, value, flush=True)
"""


def _start_child(pg, agent, seed, out_file, iterations=100_000, crash_point="none", crash_at=0):
    env = {**os.environ, "PYTHONPATH": REPO_ROOT, "JAX_PLATFORMS": "cpu"}
    args = [pg.dsn, pg.params_dir, agent, str(seed), str(iterations), crash_point, str(crash_at)]
    out = open(out_file, "wb")
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD, *args],
        stdin=subprocess.PIPE,
        stdout=out,
        stderr=subprocess.PIPE,
        env=env,
        cwd=REPO_ROOT,
    )
    out.close()
    return child


def _go(children, out_files):
    """Waits until every child opened the store, then lets them all start."""
    deadline = time.monotonic() + 120
    for child, out_file in zip(children, out_files, strict=True):
        while not out_file.read_bytes().startswith(b"ready\n"):
            assert child.poll() is None, child.stderr.read().decode()
            assert time.monotonic() < deadline, "a child never got ready"
            time.sleep(0.02)
    for child in children:
        child.stdin.write(b"go\n")
        child.stdin.close()


def _reported(out_file):
    lines = out_file.read_bytes().split(b"\n")
    assert lines[0] == b"ready"
    return [line.decode().split() for line in lines[1:-1]]  # the last one may be partial


def _finish(child, timeout=120):
    try:
        child.wait(timeout=timeout)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        stderr = child.stderr.read().decode()
        child.stderr.close()
    return child.returncode, stderr


def _check_state(db, state, check_params=False):
    """Invariants no publication may break: references resolve, pairs are whole."""
    state.validate()
    by_agent = {}
    for path in state.paths.values():
        if path.status == system.ACTIVE and path.agent != "root_agent":
            by_agent.setdefault(path.agent, []).append(path)
    for agent, active in by_agent.items():
        assert len(active) == 2, f"{agent}: a torn publication {active}"
        assert active[0].metrics == active[1].metrics and active[0].score == active[1].score
        if check_params:
            for path in active:
                scale = db.load_params(path.component_ids[-1])["scale"]
                assert np.all(scale == path.score)


def _seeded(pg):
    with pg.open() as db:
        seed_root(db)


def test_concurrent_publishers_lose_nothing_and_tear_nothing(pg, tmp_path):
    _seeded(pg)
    iterations = 12
    killed_out = tmp_path / "out_killed"
    children = {
        f"agent{i}": _start_child(pg, f"agent{i}", i, tmp_path / f"out{i}", iterations)
        for i in range(3)
    }
    killed = _start_child(pg, "killed", 99, tmp_path / "out_killed")
    _go([*children.values(), killed], [*(tmp_path / f"out{i}" for i in range(3)), killed_out])
    deadline = time.monotonic() + 120
    with pg.open() as reader:
        while killed.poll() is None or any(c.poll() is None for c in children.values()):
            _check_state(reader, reader.load_state(), check_params=True)
            if killed.poll() is None and killed_out.read_bytes().count(b"\n") >= 3:
                killed.send_signal(signal.SIGKILL)  # a fourth publisher dies mid-work
            assert time.monotonic() < deadline
        assert _finish(killed)[0] == -signal.SIGKILL
        for child in children.values():
            returncode, stderr = _finish(child)
            assert returncode == 0, stderr
        state = reader.load_state()
        _check_state(reader, state, check_params=True)
        for i, agent in enumerate(children):
            reported = _reported(tmp_path / f"out{i}")
            assert len(reported) == iterations
            assert all(p in state.paths for line in reported for p in line[:2])
            assert {p.id for p in state.active_paths("t") if p.agent == agent} == set(
                reported[-1][:2]
            )
        for line in _reported(killed_out):
            assert line[0] in state.paths and line[1] in state.paths
    with pg.open() as db:
        db.discard_staged("killed")
        assert pg.folders() == set(db.load_state().components)


@pytest.mark.parametrize("crash_at", [1])
def test_publishers_killed_mid_transaction_leave_nothing_half_visible(pg, tmp_path, crash_at):
    """Three publishers die by SIGKILL at the critical moments of iteration 1, at once."""
    _seeded(pg)
    points = ("mid_temp_write", "after_rename", "mid_publish")
    children = [
        _start_child(pg, point, i, tmp_path / point, 10, point, crash_at)
        for i, point in enumerate(points)
    ]
    _go(children, [tmp_path / point for point in points])
    for child in children:
        returncode, stderr = _finish(child)
        assert returncode == -signal.SIGKILL, stderr
    with pg.open() as db:
        removed = sorted(db.removed_on_open)
        state = db.load_state()
        _check_state(db, state, check_params=True)
        for point in points:
            reported = _reported(tmp_path / point)
            assert len(reported) == crash_at  # iteration 0 committed, 1 was interrupted
            assert {p.id for p in state.active_paths("t") if p.agent == point} == set(
                reported[-1][:2]
            )
        # mid_temp_write left a temp folder, after_rename a renamed folder without a row;
        # mid_publish left two staged components, discarded when its agent restarts.
        assert len(removed) == 2 and removed[0].startswith(param_files.TEMP_PREFIX)
        assert removed[1].startswith("c-")
        assert len(db.discard_staged("mid_publish")) == 2
        assert db.discard_staged("after_rename") == ()
        assert pg.folders() == set(state.components)
        db.put_component(make_component("after", agent="agent", task="t"), make_params(5.0))
        db.publish("agent", [make_path("p_after", "after")], ["after"])  # the lock is free


# -- same results as the embedded store -----------------------------------------------


def test_search_iteration_gives_identical_results_on_both_stores(server, tmp_path):
    from tiny_vit_testlib import TINY_VIT, random_params

    from evolution.search import loop as search
    from evolution.search.data import batches
    from evolution.search.paths import candidate as cand
    from evolution.search.space import mutations as mut

    config = search.SearchConfig(
        generations=1,
        candidates_per_generation=2,
        num_validations=1,
        steps_per_validation=3,
        batch_size=16,
        scale=0.99,
        seed=7,
        mutation_options=mut.MutationOptions(max_layers=2),
    )
    rng = np.random.default_rng(3)
    data = {}
    for split, rows in (("train", 64), ("validation", 32)):
        labels = rng.integers(0, 4, rows).astype(np.int32)
        images = rng.normal(labels[:, None, None, None], 1.0, (rows, 8, 8, 1))
        data[split] = (images.astype(np.float32), labels)
    cache = cand.StepCache()
    outcomes = []
    for backend in (
        Backend("sqlite", tmp_path / "a"),
        Backend("postgres", tmp_path, _new_database(server)),
    ):
        with backend.open() as db:
            seeding.seed_root(db, TINY_VIT, random_params(), agent="root")
            result = search.evolve_task(
                db,
                "tex",
                config,
                train_batches_fn=batches.array_train_batches(*data["train"]),
                validation_batches=batches.array_eval_batches(*data["validation"], 32),
                agent="munet",
                cache=cache,
            )
            best = {cid: db.load_params(cid) for cid in result.best_path.component_ids}
            outcomes.append((result, db.load_state(), best))
    (result_a, state_a, best_a), (result_b, state_b, best_b) = outcomes
    assert result_b.best_path == result_a.best_path
    assert (result_b.score, result_b.quality) == (result_a.score, result_a.quality)
    assert result_b.published_components == result_a.published_components
    assert [(c.path_id, c.score, c.accepted) for c in result_b.candidates] == [
        (c.path_id, c.score, c.accepted) for c in result_a.candidates
    ]
    assert state_b == state_a
    assert list(state_b.paths) == list(state_a.paths)  # the same order, too
    assert bits(best_b) == bits(best_a)
