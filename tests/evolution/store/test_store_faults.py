"""Fault injection on the SQLite store: lost, empty, truncated, garbage and damaged
databases, a copy without its write-ahead log, and kill -9 at random points of publish
and of orphan removal.

The invariant everywhere: no parameter folder of a published component is ever deleted.
After each fault, either the store (and `./run.sh store check`) refuses with one clear
line, or `store check` passes with every published component loadable.
"""

import os
import re
import shutil
import signal
import sqlite3
import warnings

import numpy as np
import pytest
from store_testlib import bits, make_component, make_params, make_path, seed_root

from evogrow import main
from evolution import store
from evolution.store import check as store_check
from evolution.store import param_files
from evolution.store import sql as sql_store
from evolution.store import sqlite as sqlite_store
from evolution.system import state as system

DATABASE = sqlite_store.DATABASE_NAME


def _populated_store(directory, heads=30):
    """A store with the root and `heads` published head components (several pages)."""
    with sqlite_store.SqliteStore(directory) as db:
        seed_root(db)
        for i in range(heads):
            cid = f"head-{i:03d}"
            db.put_component(
                make_component(cid, agent="agent", task="t"),
                make_params(float(i)),
            )
            db.publish("agent", [make_path(f"path-{i:03d}", cid, score=float(i))], [cid])
    return directory


def _snapshot(directory):
    """Every file under params/ with its bytes, to prove nothing was deleted or changed."""
    root = os.path.join(directory, sqlite_store.PARAMS_FOLDER)
    out = {}
    for folder, _, files in os.walk(root):
        for name in files:
            path = os.path.join(folder, name)
            with open(path, "rb") as handle:
                out[os.path.relpath(path, root)] = handle.read()
    return out


def _store_cli(*argv):
    return main.main(["store", *argv])


@pytest.fixture
def populated(tmp_path):
    return _populated_store(str(tmp_path / "store"))


def _damage(directory, fault):
    database = os.path.join(directory, DATABASE)
    if fault == "missing":
        for suffix in ("", "-wal", "-shm"):
            if os.path.exists(database + suffix):
                os.remove(database + suffix)
    elif fault == "empty":
        open(database, "wb").close()
    elif fault == "truncated":
        size = os.path.getsize(database)
        with open(database, "r+b") as handle:
            handle.truncate(size // 3)
    elif fault == "random_bytes":
        size = os.path.getsize(database)
        with open(database, "wb") as handle:
            handle.write(np.random.default_rng(0).bytes(size))
    elif fault == "page_damaged":
        page = 4096
        with open(database, "r+b") as handle:
            size = handle.seek(0, os.SEEK_END)
            assert size >= 4 * page, "the fixture's database is too small to damage a page"
            rng = np.random.default_rng(1)
            for index in range(1, size // page):
                handle.seek(index * page + 8)
                handle.write(rng.bytes(page // 2))
    else:
        raise AssertionError(fault)


@pytest.mark.parametrize(
    "fault, message",
    [
        ("missing", "no system.sqlite"),
        ("empty", "empty \\(0 bytes\\)"),
        ("truncated", "not usable|malformed|no tables"),
        ("random_bytes", "not a usable SQLite database|not a database"),
        ("page_damaged", "malformed|not usable|integrity_check|do not decode|not a valid id"),
    ],
)
def test_damaged_database_is_refused_and_nothing_deleted(populated, fault, message, capsys):
    with sqlite_store.SqliteStore(populated, read_only=True) as db:
        published = set(db.load_state().components)
    before = _snapshot(populated)
    _damage(populated, fault)
    database_files = sorted(n for n in os.listdir(populated) if n.startswith(DATABASE))
    assert _store_cli("check", populated) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err
    for read_only in (True, False):  # a reader and a writer (evolve, agents) alike
        try:
            with sqlite_store.SqliteStore(populated, read_only=read_only) as db:
                state = db.load_state()
                for component_id in state.components:
                    db.load_params(component_id)
        except store.StoreError as error:
            assert len(str(error).splitlines()) == 1
            assert re.search(message, str(error)), str(error)
        else:
            raise AssertionError(f"a {fault} database was opened without complaint")
    assert _snapshot(populated) == before, "parameter files were deleted or changed"
    assert published <= set(os.listdir(os.path.join(populated, "params")))
    if fault in ("missing", "empty"):  # nothing was created in place of the database
        assert sorted(n for n in os.listdir(populated) if n.startswith(DATABASE)) == (
            database_files
        )


def test_copy_without_the_write_ahead_log_is_refused(tmp_path, capsys):
    """A store copied while an agent had it open: the schema is still in the -wal file."""
    live = str(tmp_path / "live")
    writer = sqlite_store.SqliteStore(live)  # open: nothing is checkpointed yet
    try:
        seed_root(writer)
        writer.put_component(make_component("h1", agent="agent", task="t"), make_params(1.0))
        writer.publish("agent", [make_path("p1", "h1")], ["h1"])
        assert os.path.getsize(os.path.join(live, f"{DATABASE}-wal")) > 0
        copy = str(tmp_path / "copy")
        os.makedirs(copy)
        shutil.copy(os.path.join(live, DATABASE), copy)  # without system.sqlite-wal
        shutil.copytree(os.path.join(live, "params"), os.path.join(copy, "params"))
        # The supported way: the backup API copies the live store consistently.
        backup = str(tmp_path / "backup")
        assert _store_cli("backup", live, backup) == 0
        assert "healthy (4 published components load, 2 paths)" in capsys.readouterr().out
    finally:
        writer.close()
    before = _snapshot(copy)
    for read_only in (True, False):
        with pytest.raises(store.DamagedStoreError, match="no tables|empty"):
            sqlite_store.SqliteStore(copy, read_only=read_only)
    assert _store_cli("check", copy) == 1
    assert "restore the store" in capsys.readouterr().err
    assert _snapshot(copy) == before
    with sqlite_store.SqliteStore(backup) as db:
        assert bits(db.load_params("h1")) == bits(make_params(1.0))
        assert db.load_state().paths["p1"].component_ids[-1] == "h1"


def test_clean_close_checkpoints_the_log(tmp_path):
    directory = str(tmp_path / "store")
    with sqlite_store.SqliteStore(directory) as db:
        seed_root(db)
    assert not os.path.exists(os.path.join(directory, f"{DATABASE}-wal")) or (
        os.path.getsize(os.path.join(directory, f"{DATABASE}-wal")) == 0
    )
    copy = str(tmp_path / "copy")
    os.makedirs(copy)
    shutil.copy(os.path.join(directory, DATABASE), copy)  # the main file alone suffices
    shutil.copytree(os.path.join(directory, "params"), os.path.join(copy, "params"))
    assert store_check.check_store(copy).healthy


def test_export_system_of_a_store_without_database_deletes_nothing(populated, tmp_path, capsys):
    """The issue's reproduction: a read-only command on a store whose database was lost."""
    _damage(populated, "missing")
    before = _snapshot(populated)
    argv = [
        "export_system",
        "--gin_file=gin/evolution/export_system.gin",
        f"--gin.STORE_DIR='{populated}'",
        f"--gin.MODEL_DIR='{tmp_path / 'export'}'",
    ]
    import gin

    gin.clear_config()
    try:
        assert main.main(argv) == 2
    finally:
        gin.clear_config()
    err = capsys.readouterr().err
    assert "no system.sqlite" in err and err.count("\n") == 1, err
    assert _snapshot(populated) == before
    assert not any(n.startswith(DATABASE) for n in os.listdir(populated))


def test_unknown_folders_are_kept_and_reported(populated, capsys):
    os.makedirs(os.path.join(populated, "params", "stray-folder"))
    with sqlite_store.SqliteStore(populated) as db:  # a writing open
        assert db.removed_on_open == []
    assert os.path.isdir(os.path.join(populated, "params", "stray-folder"))
    assert _store_cli("check", populated) == 0
    out = capsys.readouterr().out
    assert "healthy (33 published components load, 31 paths)" in out
    assert "stray-folder" in out


def test_invalid_component_id_in_database_is_refused_before_any_deletion(populated):
    outside = os.path.join(os.path.dirname(populated), "victim")
    os.makedirs(outside)
    connection = sqlite3.connect(os.path.join(populated, DATABASE))
    with connection:
        connection.execute("INSERT INTO orphan_candidates(id, owner) VALUES ('../victim', NULL)")
        connection.execute(
            "INSERT INTO components VALUES ('../victim', 'head', 1, 'x', 't', '{}', NULL, 0, 0, 0)"
        )
    connection.close()
    before = _snapshot(populated)
    with pytest.raises(store.DamagedStoreError, match="not a valid id"):
        sqlite_store.SqliteStore(populated)
    with (
        sqlite_store.SqliteStore(populated, read_only=True) as db,
        pytest.raises(store.DamagedStoreError, match="not a valid id"),
    ):
        db.load_params("../victim")
    assert os.path.isdir(outside)
    assert _snapshot(populated) == before


def test_version_1_store_is_upgraded_by_a_writer_only(populated):
    connection = sqlite3.connect(os.path.join(populated, DATABASE))
    with connection:
        connection.execute("DROP TABLE orphan_candidates")
        connection.execute("UPDATE schema_info SET value = '1' WHERE key = 'version'")
    connection.close()
    assert store_check.check_store(populated).healthy  # read-only: left at version 1
    with sqlite_store.SqliteStore(populated) as db:
        assert db.schema_version == sql_store.SCHEMA_VERSION
        db.put_component(make_component("new", agent="agent", task="t"), make_params(2.0))


# -- kill -9 at random points (forked writers) ------------------------------------------


def _fork_and_die(directory, work, die_at_call):
    """Runs `work(db)` in a forked child that SIGKILLs itself at its `die_at_call`-th
    hooked call (a store statement, a folder rename or removal, a parameter write).

    Returns the ids the child reported as committed (it writes them after `publish`).
    """
    read_end, write_end = os.pipe()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        try:
            os.close(read_end)
            calls = [0]

            def hooked(original):
                def wrapper(*args, **kwargs):
                    calls[0] += 1
                    if calls[0] == die_at_call:
                        os.kill(os.getpid(), signal.SIGKILL)
                    result = original(*args, **kwargs)
                    calls[0] += 1
                    if calls[0] == die_at_call:
                        os.kill(os.getpid(), signal.SIGKILL)
                    return result

                return wrapper

            sqlite_store.SqliteStore._execute = hooked(sqlite_store.SqliteStore._execute)
            param_files.publish_folder = hooked(param_files.publish_folder)
            param_files._write_item = hooked(param_files._write_item)
            shutil.rmtree = hooked(shutil.rmtree)
            db = sqlite_store.SqliteStore(directory)
            work(db, lambda text: os.write(write_end, f"{text}\n".encode()))
            db.close()
            os._exit(0)
        except BaseException:
            os._exit(3)
    os.close(write_end)
    chunks = []
    while chunk := os.read(read_end, 65536):
        chunks.append(chunk)
    os.close(read_end)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) or os.WEXITSTATUS(status) == 0, f"child failed: {status}"
    _KILLS.append(os.WIFSIGNALED(status))
    return [line.split() for line in b"".join(chunks).decode().splitlines()]


_KILLS: list[bool] = []  # whether each forked child died by SIGKILL (or finished)


def _publish_work(round_index):
    def work(db, report):
        db.discard_staged("crasher")  # what a restarted agent does first
        rng = np.random.default_rng(round_index)
        for step in range(3):
            ids = [system.new_id(rng, "c") for _ in range(2)]
            for cid in ids:
                db.put_component(
                    make_component(cid, agent="crasher", task="t"),
                    make_params(1.0),
                )
            path = make_path(system.new_id(rng, "p"), ids[0], agent="crasher")
            # The second component stays staged: discarded on the next restart.
            db.publish("crasher", [path], [ids[0]])
            report(f"{path.id} {ids[0]} {step}")

    return work


def _assert_healthy_and_kept(directory, committed, published_before):
    check = store_check.check_store(directory)
    assert check.healthy, check.summary()
    with sqlite_store.SqliteStore(directory, read_only=True) as db:
        state = db.load_state()
    for path_id, component_id, _ in committed:
        assert state.paths[path_id].component_ids[-1] == component_id, "a committed path was lost"
    on_disk = set(os.listdir(os.path.join(directory, "params")))
    assert published_before <= set(state.components) <= on_disk, "a published folder was deleted"
    return set(state.components)


def test_kill_9_at_random_points_of_publish(tmp_path):
    directory = _populated_store(str(tmp_path / "store"), heads=2)
    rng = np.random.default_rng(7)
    committed = []
    published = _assert_healthy_and_kept(directory, committed, set())
    _KILLS.clear()
    for round_index in range(24):
        die_at = int(rng.integers(1, 120))
        committed += _fork_and_die(directory, _publish_work(round_index), die_at)
        published = _assert_healthy_and_kept(directory, committed, published)
    assert len(committed) > 5 and sum(_KILLS) >= 18, (len(committed), _KILLS)
    with sqlite_store.SqliteStore(directory) as db:
        db.discard_staged("crasher")
        on_disk = set(os.listdir(os.path.join(directory, "params")))
        assert on_disk == set(db.load_state().components), "orphans were left behind"


def test_kill_9_at_random_points_of_orphan_removal(tmp_path):
    directory = _populated_store(str(tmp_path / "store"), heads=2)
    host = param_files._HOST
    rng = np.random.default_rng(11)
    for round_index in range(16):
        # Orphans the database proves (dead writers, discarded components), a stray
        # folder it does not know, and a dead writer's temporary folder.
        with sqlite_store.SqliteStore(directory) as db:
            published = set(db.load_state().components)
            for i in range(4):
                cid = f"staged-{round_index}-{i}"
                db.put_component(make_component(cid, agent="gone", task="t"), make_params(1.0))
            with db._transaction() as connection:
                for i in range(3):
                    cid = f"dead-{round_index}-{i}"
                    os.makedirs(os.path.join(directory, "params", cid))
                    connection.execute(
                        "INSERT INTO orphan_candidates(id, owner) VALUES (?, ?)",
                        (cid, f".tmp-{host}-999999999-x"),
                    )
        os.makedirs(os.path.join(directory, "params", f"stray-{round_index}"))
        os.makedirs(os.path.join(directory, "params", f".tmp-{host}-999999999-{round_index}"))

        def work(db, report):
            db.discard_staged("gone")

        die_at = int(rng.integers(1, 40))
        _fork_and_die(directory, work, die_at)
        _assert_healthy_and_kept(directory, [], published)
    assert sum(_KILLS[-16:]) >= 12, _KILLS[-16:]
    with sqlite_store.SqliteStore(directory) as db:
        db.discard_staged("gone")
        on_disk = set(os.listdir(os.path.join(directory, "params")))
        strays = {f"stray-{i}" for i in range(16)}
        assert on_disk == set(db.load_state().components) | strays
