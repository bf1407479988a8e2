"""The store contract (`evolution.store.Store`) on every backend: SQLite and PostgreSQL.

One test body per property, run on the embedded SQLite store and on the PostgreSQL
store (a throw-away server on loopback, `postgres_testlib`; the PostgreSQL cases skip
when psycopg or the server binaries are missing): bit-identical round trips, reopening,
updates and ownership, all-or-nothing publication, staged components, orphans, errors.
Backend-specific behaviour (schemas, locations, kill -9 of processes) is tested in
evolution/store/test_sqlite.py and evolution/store/test_postgres.py.
"""

import os

import jax
import ml_dtypes
import numpy as np
import optax
import pytest
from store_testlib import (
    ROOT_SLOTS,
    Backend,
    bits,
    dead_pid,
    make_component,
    make_params,
    make_path,
    seed_root,
)

from evolution import store
from evolution.store import param_files
from evolution.system import state as system


@pytest.fixture(scope="module")
def server():
    """A PostgreSQL server on loopback for this module; yields its port."""
    pytest.importorskip("psycopg", reason="psycopg (3) is not installed")
    import postgres_testlib

    if postgres_testlib.server_bin_dir() is None:
        pytest.skip("PostgreSQL server binaries (initdb, postgres) not found")
    with postgres_testlib.local_server() as port:
        yield port


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def backend(request, tmp_path):
    """A store location of each backend."""
    if request.param == "sqlite":
        return Backend("sqlite", tmp_path)
    import postgres_testlib

    return Backend(
        "postgres", tmp_path, postgres_testlib.new_database(request.getfixturevalue("server"))
    )


@pytest.fixture
def db(backend):
    """An open client of a fresh store of each backend."""
    with backend.open() as opened:
        yield opened


# -- the store contract, on both backends ---------------------------------------------


def test_params_and_opt_state_round_trip_bit_identical(db):
    rng = np.random.default_rng(0)
    params = {
        "f32": rng.standard_normal((5, 7)).astype(np.float32),
        "bf16": rng.standard_normal((3, 2)).astype(ml_dtypes.bfloat16),
        "nested": {"i32": np.arange(6, dtype=np.int32).reshape(2, 3), "f64": np.float64(np.pi)},
        "special": np.array([np.nan, np.inf, -0.0], np.float32),
    }
    optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.sgd(0.1, momentum=0.9))
    opt_state = jax.tree.map(lambda x: np.asarray(x) + 0.5, optimizer.init(params["f32"]))
    db.put_component(make_component("c1"), params, opt_state)
    db.put_component(make_component("c2"), params)
    assert bits(db.load_params("c1")) == bits(params)
    restored = db.load_opt_state("c1", target=opt_state)
    assert type(restored) is type(opt_state) and bits(restored) == bits(opt_state)
    assert db.load_opt_state("c2") is None
    as_dicts = db.load_opt_state("c1")  # without a target: nested dicts
    assert as_dicts["1"]["0"]["trace"].shape == (5, 7)
    with pytest.raises(store.StoreError, match="target"):
        db.load_opt_state("c1", target={"only": np.zeros(1)})


def test_state_round_trip_and_reopen(backend):
    with backend.open() as db:
        root = seed_root(db)
        db.put_component(
            make_component("h1", agent="agent", task="t", kind="head"), make_params(3.0)
        )
        path = make_path(
            "p1",
            "h1",
            hparams={"lr": 2, "schedule": "cosine"},
            parent="root-path",
            score=0.1 + 0.2,  # a double that a 4-byte REAL column would not keep
            quality=0.8,
            metrics={"val": [0.5, 0.8]},
            generation=3,
            architecture={"hidden": 32},
        )
        db.publish("agent", [path], ["h1"])
        before = db.load_state()
    with backend.open() as db:
        after = db.load_state()
        assert after == before
        assert after.paths["p1"] == path and after.paths["root-path"] == root
        assert after.root_path_id == "root-path"
        assert [t.name for t in sorted(after.tasks.values(), key=lambda t: t.order)] == [
            "root",
            "t",
        ]
        assert after.tasks["root"].metadata == {"modality": "image"}
        assert after.components["h1"] == make_component("h1", agent="agent", task="t", kind="head")
        assert after.locks_of("root-embed") == frozenset({"root", "t"})
        assert bits(db.load_params("h1")) == bits(make_params(3.0))
        assert db.removed_on_open == []


def test_updates_retirement_and_ownership(db):
    seed_root(db)
    db.put_component(make_component("h1", agent="agent", task="t", kind="head"), make_params(1.0))
    first = make_path("p1", "h1", score=0.5)
    db.publish("agent", [first], ["h1"])
    updated = make_path("p1", "h1", score=0.6, offspring=2, metrics={"n": 1})
    db.publish("agent", [updated])
    assert db.load_state().paths["p1"] == updated
    with pytest.raises(store.IntegrityError, match="publish a new path"):
        db.publish("agent", [make_path("p1", "root-head")])
    with pytest.raises(store.IntegrityError, match="cannot change path"):
        db.retire_path("someone_else", "p1")
    with pytest.raises(store.IntegrityError, match="made by"):
        db.publish("someone_else", [first])
    db.retire_path("agent", "p1")
    state = db.load_state()
    assert state.paths["p1"].status == system.RETIRED
    assert state.locks_of("h1") == frozenset() and state.best_path("t") is None


def test_publish_is_all_or_nothing_even_when_interrupted(db, monkeypatch):
    seed_root(db)
    for head in ("h1", "h2", "h3"):
        db.put_component(
            make_component(head, agent="agent", task="t", kind="head"), make_params(1.0)
        )
    db.publish("agent", [make_path("old", "h1")], ["h1"])
    before = db.load_state()
    good, dangling = make_path("p_good", "h2"), make_path("p_bad", "missing")
    with pytest.raises(store.IntegrityError, match="missing.*not in the store"):
        db.publish("agent", [good, dangling], ["h2"], retire=["old"])
    assert db.load_state() == before
    with pytest.raises(store.IntegrityError, match="staged but not published"):
        db.publish("agent", [good])
    original, calls = type(db)._write_path, []

    def failing(self, *args):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # even a non-Exception interruption rolls back
        return original(self, *args)

    monkeypatch.setattr(type(db), "_write_path", failing)
    with pytest.raises(KeyboardInterrupt):
        db.publish("agent", [good, make_path("p3", "h3")], ["h2", "h3"], retire=["old"])
    monkeypatch.undo()
    assert db.load_state() == before
    db.publish("agent", [good], ["h2"], retire=["old"])
    state = db.load_state()
    assert state.paths["p_good"] == good and state.paths["old"].status == system.RETIRED


def test_failed_put_leaves_no_folder(db, backend, monkeypatch):
    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(param_files, "_write_item", broken)
    with pytest.raises(OSError, match="disk full"):
        db.put_component(make_component("c1"), make_params(1.0))
    monkeypatch.undo()
    assert backend.folders() == set()
    with pytest.raises(store.UnknownEntryError):
        db.load_params("c1")


def test_discard_staged_removes_only_the_agents_unpublished_components(db, backend):
    seed_root(db)
    for cid, agent in (("a2", "a"), ("a1", "a"), ("a3", "a"), ("b1", "b")):
        db.put_component(make_component(cid, agent=agent, task="t"), make_params(1.0))
    db.publish("a", [make_path("pa", "a1", agent="a")], ["a1"])
    assert db.discard_staged("a") == ("a2", "a3")
    assert backend.folders() == {"a1", "b1", *(cid for _, cid in ROOT_SLOTS)}
    with pytest.raises(store.UnknownEntryError):
        db.load_params("a2")
    assert db.load_params("b1")["scale"].shape == (3,)


def test_discard_staged_keeps_what_it_is_told_to(db, backend):
    seed_root(db)
    for cid in ("a1", "a2", "a3"):
        db.put_component(make_component(cid, agent="a", task="t"), make_params(1.0))
    assert db.discard_staged("a", keep=["a2", "unknown"]) == ("a1", "a3")
    assert backend.folders() == {"a2", *(cid for _, cid in ROOT_SLOTS)}
    assert bits(db.load_params("a2")) == bits(make_params(1.0))


def test_extra_roots_round_trip(db, backend):
    seed_root(db)
    db.put_component(make_component("h1", agent="r2", task="t"), make_params(1.0))
    db.publish("r2", [make_path("second-root", "h1", agent="r2")], ["h1"])
    assert db.load_state().extra_roots == ()
    with pytest.raises(store.UnknownEntryError):
        db.add_root("nope")
    db.add_root("second-root")
    db.add_root("second-root")  # idempotent
    state = db.load_state()
    assert state.root_path_id == "root-path" and state.extra_roots == ("second-root",)
    assert state.root_path_ids == ("root-path", "second-root")
    assert [p.id for p in state.seed_paths("other")][:2] == ["root-path", "second-root"]
    db.close()
    with backend.open() as reopened:
        assert reopened.load_state() == state


def test_orphans_removed_on_open_but_live_work_kept(backend):
    with backend.open() as db:
        seed_root(db)
        db.put_component(make_component("staged", agent="a", task="t"), make_params(1.0))
        with db._transaction() as connection:  # writers killed after their renames
            db._execute(
                connection,
                "INSERT INTO orphan_candidates(id, owner) VALUES (?, ?), (?, ?)",
                (
                    "dead-writer",
                    f".tmp-{param_files._HOST}-{dead_pid()}-x",
                    "live-writer",
                    f".tmp-{param_files._HOST}-{os.getpid()}-x",
                ),
            )
    host = param_files._HOST
    orphans = {"dead-writer", f".tmp-{host}-{dead_pid()}-abc"}
    # Unknown to the database (a lost row, a foreign folder): never removed, only listed.
    unknown = {"deadbeef"}
    kept = {f".tmp-{host}-{os.getpid()}-abc", ".tmp-otherhost-1-abc", "live-writer"}
    for name in orphans | kept | unknown:
        os.makedirs(os.path.join(backend.params_dir, name))
    with backend.open() as db:
        assert sorted(db.removed_on_open) == sorted(orphans)
        assert backend.folders() == {*kept, *unknown, "staged", *(cid for _, cid in ROOT_SLOTS)}
        assert db.unreferenced_folders() == ["deadbeef"]
        assert db.load_params("staged")["scale"].shape == (3,)
        with backend.open() as second:  # a second client sees publications, not staging
            assert "staged" not in second.load_state().components
            db.publish("a", [make_path("p1", "staged", agent="a")], ["staged"])
            assert second.load_state().paths["p1"].agent == "a"


def test_clear_errors_for_unknown_and_conflicting_entries(db, backend):
    seed_root(db)
    for call in (db.load_params, db.load_opt_state, db.set_root):
        with pytest.raises(store.UnknownEntryError, match="nope"):
            call("nope")
    with pytest.raises(store.UnknownEntryError, match="nope"):
        db.retire_path("agent", "nope")
    with pytest.raises(store.UnknownEntryError, match="never put"):
        db.publish("agent", components=["nope"])
    with pytest.raises(store.UnknownEntryError, match="unknown task"):
        db.publish("agent", [make_path("p", "root-head", task="unknown_task")])
    with pytest.raises(store.IntegrityError, match="exists already"):
        db.put_component(make_component("root-embed"), make_params(1.0))
    with pytest.raises(store.IntegrityError, match="cannot re-add"):
        db.add_task("t", num_classes=4)
    assert db.add_task("t", num_classes=3).order == 1
    db.put_component(make_component("b1", agent="b", task="t"), make_params(1.0))
    with pytest.raises(store.IntegrityError, match="cannot publish component"):
        db.publish("agent", components=["b1"])
    os.remove(os.path.join(backend.params_dir, "b1", "params.npz"))
    with pytest.raises(store.StoreError, match="b1"):
        db.load_params("b1")
    db.close()
    with pytest.raises(store.StoreError, match="closed"):
        db.load_state()
