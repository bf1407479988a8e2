"""Candidates and agents on Ray (a local two-CPU cluster) give the in-process results.

- A task iteration with `executor="ray"` (each candidate one Ray task) publishes the
  same candidates, qualities, scores and parameters, bit for bit, as with "threads".
- Agents run as Ray tasks on a shared store (the embedded SQLite store, or PostgreSQL
  on loopback with a parameter directory) leave the same published state as the same
  agents run in this process one after another on an SQLite store. The muNet agents
  run one after another through Ray (the second one's seeds include the first one's
  published path, so their outcome depends on their order); the two baseline agents run
  at the same time: both train from the root, and neither one's score depends on the
  other's publication (finetune clones every component; adapters shares only root
  components, which finetune does not use).

Ray's workers get the session's JAX settings and compilation cache through the
cluster's runtime_env; the tiny settings are those of the search and agents tests.
"""

import dataclasses
import os
import sys

import jax
import numpy as np
import pytest

ray = pytest.importorskip("ray")

import agents_testlib as agents_spec  # noqa: E402
from search_testlib import SEARCH, _task_data_of  # noqa: E402
from tiny_vit_testlib import TINY_VIT, random_params  # noqa: E402

from evolution import store as store_lib  # noqa: E402
from evolution.agents import agent_cycle, agent_run, ray_agents  # noqa: E402
from evolution.roots import seeding  # noqa: E402
from evolution.search import loop as search  # noqa: E402
from evolution.search.execution import ray_executor  # noqa: E402
from evolution.search.paths import candidate  # noqa: E402
from evolution.store import sqlite as sqlite_store  # noqa: E402

pytestmark = pytest.mark.ray  # a local Ray cluster

TESTS_DIR = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", ".."))
REPO_ROOT = os.path.dirname(TESTS_DIR)


def _worker_env():
    """What the workers need to compute as this process does (and to import the tests)."""
    # Ray workers import this module by name (its functions are pickled by reference).
    here = os.path.dirname(os.path.abspath(__file__))
    paths = [REPO_ROOT, TESTS_DIR, here, os.environ.get("PYTHONPATH", "")]
    env = {"PYTHONPATH": os.pathsep.join(paths)}
    for key in (
        "XLA_FLAGS",
        "PJRT_NPROC",
        "JAX_PLATFORMS",
        "JAX_ENABLE_X64",
        "TF_CPP_MIN_LOG_LEVEL",
    ):
        if key in os.environ:
            env[key] = os.environ[key]
    env.setdefault("JAX_PLATFORMS", "cpu")
    if jax.config.jax_compilation_cache_dir:  # the session's cache (conftest.py), shared
        env["JAX_COMPILATION_CACHE_DIR"] = str(jax.config.jax_compilation_cache_dir)
        env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
        env["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
    return env


@pytest.fixture(scope="module", autouse=True)
def ray_cluster():
    """A local Ray cluster of two CPUs for this module."""
    if ray.is_initialized():
        ray.shutdown()
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        object_store_memory=100 * 1024 * 1024,
        runtime_env={"env_vars": _worker_env()},
        log_to_driver=False,
    )
    yield
    ray.shutdown()


def _assert_trees_equal(left, right):
    assert jax.tree_util.tree_structure(left) == jax.tree_util.tree_structure(right)
    for a, b in zip(jax.tree_util.tree_leaves(left), jax.tree_util.tree_leaves(right), strict=True):
        np.testing.assert_array_equal(a, b)


# -- candidates -------------------------------------------------------------------------


def _search_run(directory, executor):
    """Task A then task B (whose seeds include A's best path) with the given executor."""
    config = dataclasses.replace(SEARCH, executor=executor)
    store = sqlite_store.SqliteStore(directory)
    seeding.seed_root(store, TINY_VIT, random_params(), agent="root")
    results, cache = [], candidate.StepCache()
    for task in ("tex_a", "tex_b"):
        data = _task_data_of(task)
        results.append(
            search.evolve_task(
                store,
                task,
                config,
                train_batches_fn=data.train_batches_fn,
                validation_batches=data.validation_batches,
                cache=cache,
            )
        )
    return store, results, cache


def test_candidates_on_ray_match_threads(tmp_path):
    threads_store, threads, threads_cache = _search_run(str(tmp_path / "threads"), "threads")
    ray_store, on_ray, ray_cache = _search_run(str(tmp_path / "ray"), "ray")
    assert threads_cache._train and not ray_cache._train  # Ray's workers trained them
    for left, right in zip(threads, on_ray, strict=True):
        assert right.candidates == left.candidates
        # The workers' timers come back with their results.
        assert right.train_seconds > 0 and right.compile_seconds > 0
        assert right.best_path == left.best_path
        assert (right.quality, right.score) == (left.quality, left.score)
        assert right.published_components == left.published_components
    assert len({c.quality for r in threads for c in r.candidates}) > 2  # they did train
    state = threads_store.load_state()
    assert ray_store.load_state().paths == state.paths
    for cid in state.components:
        _assert_trees_equal(ray_store.load_params(cid), threads_store.load_params(cid))
    threads_store.close()
    ray_store.close()


def test_unknown_executor_is_refused():
    with pytest.raises(ValueError, match="executor='dask' is unknown.*threads.*ray"):
        search.SearchConfig(executor="dask")


# -- agents -----------------------------------------------------------------------------

# tex_b's agent trains its candidates as Ray tasks of their own (nested in its task).
MUNET_AGENTS = [
    agent_cycle.AgentConfig(task, agent_cycle.MUNET, None, search_config, agents_spec.BASELINE)
    for task, search_config in (
        ("tex_a", agents_spec.SEARCH),
        ("tex_b", dataclasses.replace(agents_spec.SEARCH, executor="ray")),
    )
]
BASELINE_AGENTS = [
    agent_cycle.AgentConfig(task, method, None, agents_spec.SEARCH, agents_spec.BASELINE)
    for task, method in (("tex_c", "finetune"), ("tex_d", "adapters"))
]


def agent_data(config):
    """An agent's data in the worker (imported there from this module, by reference)."""
    return agents_spec._task_data(config.task), agents_spec._test_split(config.task)


def _seed(location):
    with store_lib.open_store(location) as store:
        seeding.seed_root(store, TINY_VIT, random_params(), agent="root")


@pytest.fixture(scope="module")
def in_process(tmp_path_factory):
    """The agents run in this process, one after another, on an SQLite store."""
    directory = str(tmp_path_factory.mktemp("in_process") / "store")
    _seed(directory)
    results = []
    for config in MUNET_AGENTS + BASELINE_AGENTS:
        data, test = agent_data(config)
        results.append(
            agent_run.run_agent(
                store_dir=directory, config=config, data=data, test_data=test, cycles=1
            )
        )
    return directory, results


def _published(location):
    """The published state (tasks without their order of addition) and all parameters."""
    with store_lib.open_store(location) as store:
        state = store.load_state()
        params = {cid: store.load_params(cid) for cid in state.components}
    tasks = {name: dataclasses.replace(t, order=0) for name, t in state.tasks.items()}
    return state, tasks, params


@pytest.fixture(params=["sqlite", "postgres"])
def location(request, tmp_path):
    if request.param == "sqlite":
        yield str(tmp_path / "store")
        return
    pytest.importorskip("psycopg")
    import postgres_testlib

    if postgres_testlib.server_bin_dir() is None:
        pytest.skip("PostgreSQL server binaries (initdb, postgres) are not installed")
    with postgres_testlib.local_server() as port:
        name = postgres_testlib.new_database(port).split("dbname=")[1].split()[0]
        yield f"postgresql://evogrow@127.0.0.1:{port}/{name}?params_dir={tmp_path / 'params'}"


def test_agents_on_ray_publish_what_they_publish_in_process(location, in_process):
    reference_dir, reference_results = in_process
    _seed(location)
    munet = ray_agents.run_agents(
        store=location, configs=MUNET_AGENTS, data_fn=agent_data, cycles=1, concurrent=False
    )
    baselines = ray_agents.run_agents(
        store=location, configs=BASELINE_AGENTS, data_fn=agent_data, cycles=1, concurrent=True
    )
    got = munet + baselines
    for results, expected in zip(got, reference_results, strict=True):
        (cycle,) = results
        (wanted,) = expected
        assert (cycle.agent, cycle.path, cycle.quality, cycle.score) == (
            wanted.agent,
            wanted.path,
            wanted.quality,
            wanted.score,
        )
        assert cycle.published_components == wanted.published_components
        assert cycle.reused_components == wanted.reused_components
    assert len({r[0].path.id for r in got}) == 4
    state, tasks, params = _published(location)
    ref_state, ref_tasks, ref_params = _published(reference_dir)
    assert state.paths == ref_state.paths
    assert state.components == ref_state.components
    assert tasks == ref_tasks
    assert state.root_path_id == ref_state.root_path_id
    assert params.keys() == ref_params.keys()
    for cid, tree in params.items():
        _assert_trees_equal(tree, ref_params[cid])


def test_run_agents_refuses_duplicate_names_and_endless_runs(tmp_path):
    with pytest.raises(agent_cycle.AgentError, match="unique"):
        ray_agents.run_agents(store=str(tmp_path), configs=MUNET_AGENTS[:1] * 2, cycles=1)
    with pytest.raises(agent_cycle.AgentError, match="cycles or max_seconds"):
        ray_agents.run_agents(store=str(tmp_path), configs=MUNET_AGENTS, cycles=None)


def test_agents_ray_command_reports_bad_settings_in_one_line(tmp_path, capsys):
    import gin

    from evogrow import main

    base = ["agents_ray", "--gin_file=gin/runs/agents_ray.gin"]
    store = f"--gin.STORE='{tmp_path / 'store'}'"
    cases = [
        ([], "STORE"),
        ([store, "--gin.TASKS=['digits_rgb32_v1']", "--gin.CYCLES=None"], "cycles or max_seconds"),
        ([store, "--gin.TASKS=['digits_rgb32_v1']", "--gin.METHODS=['munet', 'x']"], "'x'"),
    ]
    for flags, message in cases:
        gin.clear_config()
        try:
            assert main.main([*base, *flags]) == 2
        finally:
            gin.clear_config()
        assert message in capsys.readouterr().err


def test_missing_ray_is_a_clear_import_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # what `import ray` sees without Ray
    with pytest.raises(ImportError, match="pip install 'ray"):
        ray_executor.import_ray()
