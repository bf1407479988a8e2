"""Asynchronous agents on one SQLite store: concurrent publication, kill -9 and restart,
parents retired by other agents, and refusal of malformed or foreign published state.

Agents run as separate processes (`python -c _CHILD`, which imports agents_testlib for
its settings and data) on a tiny root ViT (hidden 16, one block, 8x8x1 images) and
synthetic 4-class texture tasks; a muNet cycle is one generation of two candidates of
2 x 3 steps, a baseline cycle 6 steps. The optimizer's static settings are pinned and
the processes share the session's compilation cache (warmed first), so they compile
little. Each child records, right after each of its publications, the published path
and its task's predictions; the test compares them bit for bit with what the store
predicts at the end.
"""

import functools
import hashlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from agents_testlib import BASELINE, DATA, SEARCH, _task_data, _test_split
from tiny_vit_testlib import TINY_VIT, random_params

from evolution import store as store_lib
from evolution.agents import agent_cycle, agent_run, agent_view
from evolution.export import inference
from evolution.roots import seeding
from evolution.search import loop as search
from evolution.search import selection
from evolution.search.paths import candidate
from evolution.store import sqlite as sqlite_store
from evolution.system.architecture import architecture_of, model_config_of

pytestmark = pytest.mark.multiprocess  # agents run as processes

REPO_ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", ".."))
TESTS_DIR = os.path.join(REPO_ROOT, "tests")


# The agent process: run_agent with the test's settings; after each publication it records
# the published path and its task's predictions (logits from the store, as any reader
# would see them). Hooks: "kill_after_put" dies (SIGKILL) right after staging its first
# component, before publishing; "pause_in_training" announces "training" once it trains
# after its first publication, and waits there to be killed.
_CHILD = r"""
import json, logging, os, signal, sys, time

import numpy as np

import agents_testlib as spec
from evolution.agents import agent_run, agent_cycle
from evolution.search.paths import candidate
from evolution.export import inference
from evolution.store import sqlite as sqlite_store

store_dir, task, method, name, cycles, out_dir = sys.argv[1:7]
logging.basicConfig(format="%(asctime)s %(message)s")
logging.getLogger("evogrow").setLevel(logging.INFO)
config = agent_cycle.AgentConfig(task, method, name, spec.SEARCH, spec.BASELINE)
test_x = spec.DATA[task]["test_x"]
hook = os.environ.get("AGENT_TEST_HOOK", "")
published = []
if hook == "kill_after_put":
    put = sqlite_store.SqliteStore.put_component
    def put_then_die(self, *args, **kwargs):
        put(self, *args, **kwargs)
        os.kill(os.getpid(), signal.SIGKILL)
    sqlite_store.SqliteStore.put_component = put_then_die
if hook == "pause_in_training":
    train = candidate.train_candidate
    def train_or_wait(*args, **kwargs):
        if published:
            print("training", flush=True)
            time.sleep(60)
        return train(*args, **kwargs)
    candidate.train_candidate = train_or_wait
reader = sqlite_store.SqliteStore(store_dir)

def on_publish(result):
    logits = inference.predict(reader, task, test_x)
    best = reader.load_state().best_path(task)
    # Numbered across restarts (the records file is appended by every process).
    records = os.path.join(out_dir, f"{name}.jsonl")
    index = sum(1 for _ in open(records)) if os.path.exists(records) else 0
    np.save(os.path.join(out_dir, f"{name}-{index}.npy"), logits)
    record = {"path": result.path.id, "best": best.id, "new": result.new_path,
              "components": [list(c) for c in result.path.components],
              "reused": list(result.reused_components), "wall": result.wall_seconds}
    published.append(record)
    with open(os.path.join(out_dir, f"{name}.jsonl"), "a") as f:
        f.write(json.dumps(record) + "\n")
    print("published", result.path.id, flush=True)

agent_run.run_agent(store_dir=store_dir, config=config, data=spec._task_data(task),
                 test_data=spec._test_split(task), cycles=int(cycles), on_publish=on_publish)
print("done", flush=True)
"""


def _seeded_store(tmp_path):
    directory = str(tmp_path / "store")
    with sqlite_store.SqliteStore(directory) as store:
        seeding.seed_root(store, TINY_VIT, random_params(), agent="root")
    return directory


def _child_env(hook=""):
    paths = [REPO_ROOT, TESTS_DIR, os.environ.get("PYTHONPATH", "")]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(paths),
        "JAX_PLATFORMS": "cpu",
        "AGENT_TEST_HOOK": hook,
    }
    if jax.config.jax_compilation_cache_dir:  # the session's cache (conftest.py), shared
        env["JAX_COMPILATION_CACHE_DIR"] = str(jax.config.jax_compilation_cache_dir)
        env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
        env["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
    return env


def _start(tmp_path, store_dir, task, method, name, cycles, hook=""):
    out_dir = tmp_path / "out"
    out_dir.mkdir(exist_ok=True)
    args = [store_dir, task, method, name, str(cycles), str(out_dir)]
    logs = tmp_path / "logs"
    logs.mkdir(exist_ok=True)
    with open(logs / f"{name}.out", "a") as out, open(logs / f"{name}.err", "a") as err:
        return subprocess.Popen(
            [sys.executable, "-c", _CHILD, *args],
            stdout=out,
            stderr=err,
            env=_child_env(hook),
            cwd=REPO_ROOT,
        )


def _log(tmp_path, name, stream):
    return (tmp_path / "logs" / f"{name}.{stream}").read_text()


def _records(tmp_path, name):
    path = tmp_path / "out" / f"{name}.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]


def _recorded_logits(tmp_path, name, index):
    return np.load(tmp_path / "out" / f"{name}-{index}.npy")


def _path_logits(store, path, images):
    config = model_config_of(path)
    slots = tuple(slot for slot, _ in path.components)
    params = {slot: store.load_params(cid) for slot, cid in path.components}
    forward = jax.jit(functools.partial(candidate.forward, config, slots))
    return np.asarray(forward(params, np.asarray(images, np.float32)), np.float32)


def _digest(tree):
    leaves = jax.tree_util.tree_leaves(tree)
    return hashlib.sha256(b"".join(np.ascontiguousarray(x).tobytes() for x in leaves)).hexdigest()


def _publications(store_dir):
    with sqlite3.connect(os.path.join(store_dir, sqlite_store.DATABASE_NAME)) as db:
        return dict(db.execute("SELECT agent, COUNT(*) FROM publications GROUP BY agent"))


def _staged(store_dir, agent):
    with sqlite3.connect(os.path.join(store_dir, sqlite_store.DATABASE_NAME)) as db:
        query = "SELECT id FROM components WHERE agent = ? AND published = 0"
        return [row[0] for row in db.execute(query, (agent,))]


def _check_snapshot(store, digests):
    """One reader's view while agents publish: complete publications, consistent locks,
    one live path per agent and task, and components that never change."""
    state = store.load_state()
    agent_view.check_state(state)  # every path's components exist; layouts known
    holders = {}
    for path in state.active_paths():
        for cid in path.component_ids:
            holders.setdefault(cid, set()).add(path.task)
    assert state.locks() == {cid: frozenset(tasks) for cid, tasks in holders.items()}
    live = [(p.agent, p.task) for p in state.active_paths()]
    assert len(live) == len(set(live)), f"an agent has two live paths on a task: {live}"
    for cid in state.components:
        digest = _digest(store.load_params(cid))
        assert digests.setdefault(cid, digest) == digest, f"component {cid} changed"
    return state


def _finish(tmp_path, name, process, timeout=120):
    try:
        process.wait(timeout=timeout)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    return process.returncode, _log(tmp_path, name, "out"), _log(tmp_path, name, "err")


@pytest.fixture(scope="module")
def warm_cache(tmp_path_factory):
    """Compiles what the agent processes run (muNet cycles from the root and from another
    task's path, a freeze cycle, inference) into the session's persistent compilation
    cache, which they share: otherwise each of them compiles the same steps at once."""
    store_dir = _seeded_store(tmp_path_factory.mktemp("warm"))
    with sqlite_store.SqliteStore(store_dir) as store:
        for task, method in (("tex_a", "munet"), ("tex_b", "munet"), ("tex_a", "munet")):
            config = agent_cycle.AgentConfig(task, method, None, SEARCH, BASELINE)
            agent_cycle.run_cycle(store, config, _task_data(task), test_data=_test_split(task))
        config = agent_cycle.AgentConfig("tex_d", "freeze", None, SEARCH, BASELINE)
        agent_cycle.run_cycle(store, config, _task_data("tex_d"), test_data=_test_split("tex_d"))
        inference.predict(store, "tex_a", DATA["tex_a"]["test_x"])


def test_four_agents_publish_concurrently_without_interference(tmp_path, warm_cache):
    start = time.perf_counter()
    store_dir = _seeded_store(tmp_path)
    cycles = 5
    members = [
        ("tex_a", "munet", "munet-a"),
        ("tex_b", "munet", "munet-b"),
        ("tex_c", "munet", "munet-c"),
        ("tex_d", "freeze", "freeze-d"),
    ]
    processes = [_start(tmp_path, store_dir, *m, cycles) for m in members]
    digests, snapshots = {}, 0
    with sqlite_store.SqliteStore(store_dir) as reader:
        try:
            while any(p.poll() is None for p in processes):
                _check_snapshot(reader, digests)
                snapshots += 1
                time.sleep(0.1)
        finally:
            outcomes = [_finish(tmp_path, m[2], p) for m, p in zip(members, processes, strict=True)]
        for (_, _, name), (code, out, err) in zip(members, outcomes, strict=True):
            assert code == 0, f"{name} failed:\n{err[-3000:]}"
            assert out.splitlines()[-1] == "done"
        final = _check_snapshot(reader, digests)

        # No lost publication: every cycle published once, and what each agent saw
        # itself publish is in the store as published.
        counts = _publications(store_dir)
        assert {name: counts[name] for _, _, name in members} == dict.fromkeys(
            (m[2] for m in members), cycles
        )
        reused = 0
        for task, _, name in members:
            records = _records(tmp_path, name)
            assert len(records) == cycles
            for index, record in enumerate(records):
                path = final.paths[record["path"]]
                assert [list(c) for c in path.components] == record["components"]
                assert record["best"] == record["path"]
                # That path's function is unchanged by everything published since.
                expected = _recorded_logits(tmp_path, name, index)
                np.testing.assert_array_equal(
                    _path_logits(reader, path, DATA[task]["test_x"]), expected
                )
                reused += len(record["reused"])
            # The task's published function is what its agent last published.
            np.testing.assert_array_equal(
                inference.predict(reader, task, DATA[task]["test_x"]),
                _recorded_logits(tmp_path, name, cycles - 1),
            )
            assert final.best_path(task).id == records[-1]["path"]
        # Nothing private was left behind: no staged rows, no stray folders.
        for _, _, name in members:
            assert _staged(store_dir, name) == []
        assert set(os.listdir(os.path.join(store_dir, "params"))) == set(final.components)
    cross = sum(
        1
        for path in final.paths.values()
        for cid in path.component_ids
        if final.components[cid].agent not in (path.agent, "root")
    )
    print(
        f"\n4 agents x {cycles} cycles: {sum(counts.values())} publications, "
        f"{len(final.paths)} paths, {len(final.components)} components, {snapshots} "
        f"concurrent snapshots checked, {cross} references to other agents' components "
        f"({reused} on live paths at publication), {time.perf_counter() - start:.1f}s"
    )


def test_killed_agent_restarts_and_its_private_state_stays_private(tmp_path, warm_cache):
    store_dir = _seeded_store(tmp_path)
    name, task = "munet-k", "tex_a"

    # 1. Killed after staging its best path's components, before publishing them.
    child = _start(tmp_path, store_dir, task, "munet", name, 2, "kill_after_put")
    code, _, err = _finish(tmp_path, name, child)
    assert code == -signal.SIGKILL, err[-3000:]
    staged = _staged(store_dir, name)
    assert staged, "the child died before staging anything"
    with sqlite_store.SqliteStore(store_dir) as reader:
        state = reader.load_state()
        agent_view.check_state(state)
        assert not set(staged) & set(state.components)
        assert [p for p in state.paths.values() if p.agent == name] == []
    assert _records(tmp_path, name) == []

    # 2. Restarted; killed from outside while training its second cycle.
    process = _start(tmp_path, store_dir, task, "munet", name, 3, "pause_in_training")
    try:
        deadline = time.monotonic() + 120
        while "training" not in _log(tmp_path, name, "out").split():
            assert process.poll() is None, _log(tmp_path, name, "err")[-3000:]
            assert time.monotonic() < deadline, "the agent never reached its second cycle"
            time.sleep(0.05)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == -signal.SIGKILL
    first = _records(tmp_path, name)
    assert len(first) == 1 and first[0]["new"]
    # The restarted agent redid the killed cycle from the same published state: the
    # same candidates, so the components it had staged are the ones it published now.
    assert set(staged) <= {cid for _, cid in first[0]["components"]}

    # 3. Restarted again: it continues from what it published and finishes its cycle.
    code, _, err = _finish(tmp_path, name, _start(tmp_path, store_dir, task, "munet", name, 1))
    assert code == 0, err[-3000:]
    records = _records(tmp_path, name)
    assert len(records) == 2
    assert _publications(store_dir)[name] == 2
    assert _staged(store_dir, name) == []
    with sqlite_store.SqliteStore(store_dir) as reader:
        state = reader.load_state()
        agent_view.check_state(state)
        first_path = state.paths[first[0]["path"]]
        latest = state.paths[records[1]["path"]]
        assert latest.generation > first_path.generation or latest.id == first_path.id
        np.testing.assert_array_equal(
            _path_logits(reader, first_path, DATA[task]["test_x"]),
            _recorded_logits(tmp_path, name, 0),
        )
        np.testing.assert_array_equal(
            _path_logits(reader, state.paths[records[1]["best"]], DATA[task]["test_x"]),
            _recorded_logits(tmp_path, name, 1),
        )
        assert set(os.listdir(os.path.join(store_dir, "params"))) == set(state.components)


def test_retired_parents_and_same_task_agents(tmp_path, monkeypatch):
    """A parent retired by its agent mid-cycle stays a valid parent of the child published
    at the cycle's end; afterwards selection falls back to the seeds, down to the root.
    A baseline and a muNet agent share a task without blocking each other."""
    store_dir = _seeded_store(tmp_path)
    cache = candidate.default_cache()  # the steps warm_cache compiled, if it ran
    with sqlite_store.SqliteStore(store_dir) as store, sqlite_store.SqliteStore(store_dir) as other:
        root_id = store.load_state().root_path_id

        def cycle(task, method, name):
            config = agent_cycle.AgentConfig(task, method, name, SEARCH, BASELINE)
            return agent_cycle.run_cycle(
                store, config, _task_data(task), test_data=_test_split(task), cache=cache
            )

        first_a = cycle("tex_a", "munet", "munet-a").path
        # An adapters baseline on the same task: its adapters precede the blocks, as an
        # evolved path's do, so its path could be a muNet parent.
        adapters_path = cycle("tex_a", "adapters", "adapters-a").path
        assert agent_view.can_be_parent(adapters_path)

        # munet-b builds on munet-a's path (its selection is forced to pick it), and
        # munet-a retires that path while munet-b trains.
        train = candidate.train_candidate

        def train_while_retiring(*args, **kwargs):
            if store.load_state().paths[first_a.id].status == "active":
                other.publish("munet-a", retire=[first_a.id])
            return train(*args, **kwargs)

        with monkeypatch.context() as patch:
            patch.setattr(selection, "select_parent", lambda *args: first_a.id)
            patch.setattr(candidate, "train_candidate", train_while_retiring)
            b = cycle("tex_b", "munet", "munet-b").path
        state = store.load_state()
        agent_view.check_state(state)
        assert state.paths[first_a.id].status == "retired" and b.parent == first_a.id
        _path_logits(store, state.paths[b.id], DATA["tex_b"]["test_x"])  # loads and runs

        # With munet-b's path retired as well, only the root is left to build on (the
        # adapters path of tex_a is another agent's path of the same task, hidden from
        # munet-a's search; munet-a's own path is retired).
        other.publish("munet-b", retire=[b.id])
        view = agent_view.AgentView(store, agent="munet-a", task="tex_a", for_search=True)
        assert [p.id for p in view.load_state().seed_paths("tex_a")] == [root_id]
        data = _task_data("tex_a")
        result = search.evolve_task(
            view,
            "tex_a",
            SEARCH,
            train_batches_fn=data.train_batches_fn,
            validation_batches=data.validation_batches,
            agent="munet-a",
            cache=cache,
        )
        assert {c.parent_id for c in result.candidates} == {root_id}
        state = store.load_state()
        # Both agents of tex_a are live; the task's function is the better-scored path.
        live = {p.agent for p in state.active_paths("tex_a")}
        assert live == {"munet-a", "adapters-a"}
        assert state.best_path("tex_a").score == max(p.score for p in state.active_paths("tex_a"))


def _insert_raw_path(store_dir, path_id, components, architecture):
    """Writes a path row directly (as a foreign or buggy writer could), bypassing checks."""
    with sqlite3.connect(os.path.join(store_dir, sqlite_store.DATABASE_NAME)) as db:
        db.execute(
            "INSERT INTO paths(id, task, agent, components, hparams, parent, score, quality,"
            " metrics, generation, offspring, status, architecture, publication)"
            " VALUES (?, 'root', 'intruder', ?, '{}', NULL, NULL, NULL, '{}', 0, 0, 'active',"
            " ?, 1)",
            (path_id, json.dumps(components), json.dumps(architecture)),
        )


@pytest.mark.parametrize(
    "kind, expected",
    [
        ("missing_component", r"references components \['ghost'\]"),
        ("foreign_family", "model family 'bert'; the root's is 'vit'"),
        ("other_shape", r"shape differs from the root's in \['hidden'\]"),
        ("unknown_slot", r"slots \['mystery'\]"),
    ],
)
@pytest.mark.parametrize("method", ["munet", "finetune"])
def test_malformed_or_foreign_state_is_refused(tmp_path, kind, expected, method):
    store_dir = _seeded_store(tmp_path)
    with sqlite_store.SqliteStore(store_dir) as store:
        root = store.load_state().paths["root:path"]
    components = [list(c) for c in root.components]
    architecture = architecture_of(TINY_VIT)
    if kind == "missing_component":
        components[-1] = ["head", "ghost"]
    elif kind == "foreign_family":
        architecture["model"] = "bert"
    elif kind == "other_shape":
        architecture["config"]["hidden"] = 32
    else:
        components.insert(3, ["mystery", "root:block_0"])
    _insert_raw_path(store_dir, "bad-path", components, architecture)
    before = _publications(store_dir)
    config = agent_cycle.AgentConfig("tex_a", method, search=SEARCH, baseline=BASELINE)
    with pytest.raises(agent_view.AgentStateError, match=f"path 'bad-path'.*{expected}"):
        agent_run.run_agent(
            store_dir=store_dir,
            config=config,
            data=_task_data("tex_a"),
            test_data=_test_split("tex_a"),
            cycles=1,
        )
    assert _publications(store_dir) == before
    assert _staged(store_dir, config.agent) == []


def test_agent_start_errors(tmp_path):
    config = agent_cycle.AgentConfig("tex_a", search=SEARCH)
    data = _task_data("tex_a")
    empty = str(tmp_path / "empty")
    with pytest.raises(agent_view.AgentStateError, match="no root path"):
        agent_run.run_agent(store_dir=empty, config=config, data=data, cycles=1)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("not a store")
    with pytest.raises(store_lib.ForeignStoreError):
        agent_run.run_agent(store_dir=str(foreign), config=config, data=data, cycles=1)
    with (
        agent_run.agent_lock(empty, config.agent),
        pytest.raises(agent_cycle.AgentError, match="already running"),
    ):
        agent_run.run_agent(store_dir=empty, config=config, data=data, cycles=1)
    with pytest.raises(agent_cycle.AgentError, match="needs test_data"):
        agent_run.run_agent(
            store_dir=empty, config=agent_cycle.AgentConfig("tex_a", "freeze"), data=data
        )
    with pytest.raises(agent_cycle.AgentError, match="Unknown agent method"):
        agent_cycle.AgentConfig("tex_a", "router")
    assert agent_cycle.AgentConfig("tex a/1").agent == "munet-tex_a_1"
