"""The multipath agent: after muNet agents published paths on two tiny tasks, a multipath
agent's cycle writes its report and parameters, never scores below path_0's validation
quality, leaves every published component bit-identical and the store's published
state unchanged, waits (without crashing) on a task without a path, and a restarted
agent continues from the best it kept.

Tiny root ViT (hidden 16, one block, 8x8x1 images) and the synthetic texture tasks of
agents_testlib; a muNet cycle is one generation of two candidates of 2 x 3 steps,
a multipath cycle 2 x 4 steps.
"""

import dataclasses
import hashlib
import json
import logging
import os
import sqlite3

import jax
import numpy as np
import pytest
from agents_testlib import SEARCH, _task_data, _test_split
from tiny_vit_testlib import TINY_VIT, random_params

from evolution.agents import agent_cycle, agent_run, agent_view, multipath_agent
from evolution.roots import seeding
from evolution.search.space import mutations as mut
from evolution.store import sqlite as sqlite_store

pytestmark = pytest.mark.slow  # muNet agents publish first

# Not published: these tests check that a cycle leaves the published state unchanged
# (tests/evolution/export/test_router_path.py covers publishing).
SETTINGS = multipath_agent.MultipathSettings(
    num_paths=2, steps=8, steps_per_validation=4, batch_size=16, wait_seconds=0.0, publish=False
)
# Each muNet child clones block_0 (the final norm is always cloned): every task's body is
# its own, so the other task's path is a companion with new features.
MUNET_SEARCH = dataclasses.replace(
    SEARCH,
    mutation_options=mut.MutationOptions(
        add_blocks=False,
        remove_layers=False,
        fixed_probabilities={"clone:*": 0.0, "clone:block_0": 1.0},
    ),
)


def _digest(tree):
    leaves = jax.tree_util.tree_leaves(tree)
    return hashlib.sha256(b"".join(np.ascontiguousarray(x).tobytes() for x in leaves)).hexdigest()


def _snapshot(store_dir):
    """Every component's parameters (digests), the published state and the publication log."""
    with sqlite_store.SqliteStore(store_dir) as store:
        state = store.load_state()
        digests = {cid: _digest(store.load_params(cid)) for cid in state.components}
    with sqlite3.connect(os.path.join(store_dir, sqlite_store.DATABASE_NAME)) as db:
        log = db.execute("SELECT * FROM publications ORDER BY rowid").fetchall()
    return digests, state, log


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory):
    """A store with the tiny root and one muNet agent cycle on each of tex_a, tex_b."""
    directory = str(tmp_path_factory.mktemp("multipath_agent") / "store")
    with sqlite_store.SqliteStore(directory) as store:
        seeding.seed_root(store, TINY_VIT, random_params(), agent="root")
        for task in ("tex_a", "tex_b"):
            config = agent_cycle.AgentConfig(task, "munet", search=MUNET_SEARCH)
            agent_cycle.run_cycle(store, config, _task_data(task))
    return directory


def _config(task="tex_a", settings=SETTINGS):
    return agent_cycle.AgentConfig(task, agent_cycle.MULTIPATH, multipath=settings)


def test_cycle_writes_report_and_changes_nothing_published(store_dir, tmp_path):
    before = _snapshot(store_dir)
    report_dir = str(tmp_path / "multipath")
    with sqlite_store.SqliteStore(store_dir) as store:
        path_0 = store.load_state().best_path("tex_a")
        result = agent_cycle.run_cycle(
            store,
            _config(),
            _task_data("tex_a"),
            test_data=_test_split("tex_a"),
            report_dir=report_dir,
        )
    assert isinstance(result, multipath_agent.MultipathCycle)
    assert result.status == multipath_agent.NEW_BEST and result.previous_quality is None
    npz_path, json_path = multipath_agent.report_files(report_dir, "multipath-tex_a")
    report = json.loads(open(json_path).read())
    assert report == result.report
    assert report["path_ids"][0] == path_0.id and len(report["path_ids"]) == 2
    assert report["companion_tasks"] == ["tex_b"]  # scored, so ranked above the root
    # Best-validation rule: never below path_0 alone (validated on the same batches).
    assert report["quality"] >= report["single_path_quality"]
    assert report["single_path_quality"] == pytest.approx(path_0.quality, abs=1e-6)
    assert report["score"] == report["quality"] == result.quality
    assert 0.0 <= report["test_accuracy"] <= 1.0 and report["test_examples"] == 32
    # The kept parameters reproduce the reported test accuracy.
    kept, router, connectors = multipath_agent.load_best(report_dir, "multipath-tex_a")
    assert kept == report
    with sqlite_store.SqliteStore(store_dir) as store:
        state = store.load_state()
        paths = [state.paths[i] for i in report["path_ids"]]
        accuracy, single = multipath_agent.measure_test_accuracy(
            store, paths, router, connectors, _test_split("tex_a")
        )
    assert accuracy == pytest.approx(report["test_accuracy"])
    assert single == pytest.approx(report["single_path_test_accuracy"])
    # Frozen paths bit-identical, published state and publication log unchanged.
    after = _snapshot(store_dir)
    assert after[0] == before[0]
    assert after[1] == before[1]
    assert after[2] == before[2]
    assert not [name for name in os.listdir(report_dir) if name.startswith(".tmp")]


def test_restart_reads_previous_best(store_dir, tmp_path):
    report_dir = os.path.join(store_dir, multipath_agent.FOLDER)
    first = agent_run.run_agent(
        store_dir=store_dir, config=_config(), data=_task_data("tex_a"), cycles=1
    )[0]
    assert first.status == multipath_agent.NEW_BEST
    _, router_1, connectors_1 = multipath_agent.load_best(report_dir, "multipath-tex_a")
    # A new run of the agent (as after a restart): it reads the kept best back.
    second = agent_run.run_agent(
        store_dir=store_dir, config=_config(), data=_task_data("tex_a"), cycles=1
    )[0]
    assert second.previous_quality == first.quality
    assert second.trained["cycle_number"] == 2 and second.report["cycles_run"] == 2
    assert second.trained["seed"] != first.trained["seed"]  # a new data order
    assert second.quality == max(first.quality, second.trained["quality"])
    report, router, connectors = multipath_agent.load_best(report_dir, "multipath-tex_a")
    if second.status == multipath_agent.KEPT:
        assert report["best_cycle_number"] == 1
        assert _digest((router, connectors)) == _digest((router_1, connectors_1))
    else:
        assert second.trained["quality"] > first.quality and report["best_cycle_number"] == 2


def test_task_without_published_path_waits(store_dir, tmp_path):
    before = _snapshot(store_dir)
    results = agent_run.run_agent(
        store_dir=store_dir, config=_config("tex_c"), data=_task_data("tex_c"), cycles=2
    )
    assert [r.status for r in results] == [multipath_agent.WAITING] * 2
    assert "task 'tex_c' has no published path yet" in results[0].message
    assert results[0].quality is None and results[0].candidates == 0
    npz_path, json_path = multipath_agent.report_files(
        os.path.join(store_dir, multipath_agent.FOLDER), "multipath-tex_c"
    )
    assert not os.path.exists(npz_path) and not os.path.exists(json_path)
    assert _snapshot(store_dir)[1:] == before[1:]


def test_three_paths_and_bad_settings(store_dir, tmp_path):
    with sqlite_store.SqliteStore(store_dir) as store:
        view = agent_view.AgentView(store, agent="x", task="tex_b", for_search=False)
        result = agent_cycle.run_cycle(
            view,
            _config("tex_b", dataclasses.replace(SETTINGS, num_paths=3)),
            _task_data("tex_b"),
            report_dir=str(tmp_path),
        )
    # tex_b's own path, then tex_a's (scored) and the root's (unscored: ranked last).
    assert result.report["companion_tasks"] == ["tex_a", "root"]
    assert len(result.report["router_mean_weights"]) == 3
    assert result.report["quality"] >= result.report["single_path_quality"]
    with pytest.raises(ValueError, match="num_paths=4"):
        multipath_agent.MultipathSettings(num_paths=4)
    with pytest.raises(ValueError, match="multiple"):
        multipath_agent.MultipathSettings(steps=10, steps_per_validation=4)
    with pytest.raises(agent_cycle.AgentError, match="report_dir"):
        with sqlite_store.SqliteStore(store_dir) as store:
            agent_cycle.run_cycle(store, _config(), _task_data("tex_a"))


def test_agents_bench_parses_the_cycle_log(store_dir, caplog):
    """`./run.sh bench agents` counts candidates from the agents' cycle log lines."""
    from benchmarks import agents as agents_bench

    config = agent_cycle.AgentConfig("tex_b", "munet", search=MUNET_SEARCH)
    with caplog.at_level(logging.INFO, logger="evogrow"):
        (result,) = agent_run.run_agent(
            store_dir=store_dir, config=config, data=_task_data("tex_b"), cycles=1
        )
    matches = [agents_bench._CYCLE_LINE.search(r.getMessage()) for r in caplog.records]
    (match,) = [m for m in matches if m]
    assert match["agent"] == "munet-tex_b" and match["path"] == result.path.id
    assert int(match["candidates"]) == result.candidates == 2
