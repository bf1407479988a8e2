"""An interrupted agent cycle resumes from its last finished generation.

A muNet agent's cycle (three generations of two candidates on the tiny root ViT of
agents_testlib) is interrupted right after generation k has been saved; the agent's next
cycle resumes there and publishes the same path, with bit-identical parameters, as a
cycle that was never interrupted, also when the agent's process is killed (SIGKILL)
instead. Progress that may not be resumed (other settings, an agent that published
since) is dropped with the staged work it names.
"""

import dataclasses
import os
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest
from agents_testlib import SEARCH, _task_data
from tiny_vit_testlib import TINY_VIT, random_params

from evolution.agents import agent_cycle
from evolution.roots import seeding
from evolution.search import iteration, resume
from evolution.search.paths import candidate
from evolution.store import sqlite as sqlite_store

SETTINGS = dataclasses.replace(SEARCH, generations=3)
TASK = "tex_a"
AGENT = "munet-a"
TESTS_DIR = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
REPO_ROOT = os.path.dirname(TESTS_DIR)

# The agent's process: one cycle that SIGKILLs itself right after saving generation 1.
_CHILD = r"""
import dataclasses, os, signal, sys

import agents_testlib as spec
from evolution.agents import agent_cycle
from evolution.search import iteration
from evolution.store import sqlite as sqlite_store

save = iteration.TaskIteration.save_progress

def save_then_die(self, done, *args, **kwargs):
    save(self, done, *args, **kwargs)
    os.kill(os.getpid(), signal.SIGKILL)

iteration.TaskIteration.save_progress = save_then_die
settings = dataclasses.replace(spec.SEARCH, generations=3)
config = agent_cycle.AgentConfig("tex_a", "munet", "munet-a", settings)
with sqlite_store.SqliteStore(sys.argv[1]) as store:
    agent_cycle.run_cycle(store, config, spec._task_data("tex_a"))
"""


class _Interrupted(Exception):
    """Stands for the agent's process dying."""


def _store(tmp_path, name):
    store = sqlite_store.SqliteStore(str(tmp_path / name))
    seeding.seed_root(store, TINY_VIT, random_params(), agent="root")
    return store


def _cycle(store, settings=SETTINGS):
    config = agent_cycle.AgentConfig(TASK, "munet", AGENT, settings)
    return agent_cycle.run_cycle(store, config, _task_data(TASK), cache=candidate.default_cache())


def _interrupt_after(monkeypatch, generations_done):
    save = iteration.TaskIteration.save_progress

    def save_then_die(self, done, *args, **kwargs):
        save(self, done, *args, **kwargs)
        if done == generations_done:
            raise _Interrupted

    monkeypatch.setattr(iteration.TaskIteration, "save_progress", save_then_die)


def _staged(store):
    return store._execute(store._db(), "SELECT id FROM components WHERE NOT published").fetchall()


def _published(store, result):
    state = store.load_state()
    path = state.paths[result.path.id]
    params = {cid: store.load_params(cid) for cid in result.published_components}
    opt = {cid: store.load_opt_state(cid) for cid in result.published_components}
    return state, path, params, opt


def _assert_trees_equal(a, b):
    assert type(a) is type(b) or (np.ndim(a) == np.ndim(b) == 0)
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            _assert_trees_equal(a[key], b[key])
    elif a is None:
        assert b is None
    else:
        assert np.asarray(a).dtype == np.asarray(b).dtype
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    store = _store(tmp_path_factory.mktemp("uninterrupted"), "store")
    result = _cycle(store)
    yield result, _published(store, result)
    store.close()


@pytest.mark.parametrize("generations_done", [1, 2])
def test_resumed_cycle_publishes_what_the_uninterrupted_one_does(
    tmp_path, monkeypatch, uninterrupted, generations_done
):
    expected, (expected_state, expected_path, expected_params, expected_opt) = uninterrupted
    store = _store(tmp_path, "store")
    with monkeypatch.context() as patch:
        _interrupt_after(patch, generations_done)
        with pytest.raises(_Interrupted):
            _cycle(store)
    # Nothing of the interrupted cycle is published; its progress is staged.
    state = store.load_state()
    assert [p.agent for p in state.active_paths(TASK)] == []
    saved = resume.load(store, agent=AGENT, task=TASK, settings=SETTINGS)
    assert saved is not None and saved.generations_done == generations_done
    assert {row[0] for row in _staged(store)} == set(saved.component_ids)

    trained = []
    train = candidate.train_candidate

    def counting(*args, **kwargs):
        trained.append(1)
        return train(*args, **kwargs)

    monkeypatch.setattr(candidate, "train_candidate", counting)
    result = _cycle(store)
    # Only the generations after the saved one are trained again.
    per_generation = SETTINGS.candidates_per_generation
    assert len(trained) == (SETTINGS.generations - generations_done) * per_generation
    assert result.candidates == expected.candidates
    state, path, params, opt = _published(store, result)
    assert path == expected_path
    assert result.published_components == expected.published_components
    assert result.retired == expected.retired
    for cid in expected.published_components:
        _assert_trees_equal(params[cid], expected_params[cid])
        _assert_trees_equal(opt[cid], expected_opt[cid])
        assert state.components[cid] == expected_state.components[cid]
    # The resumed cycle leaves nothing staged and no progress behind.
    assert _staged(store) == []
    assert resume.load(store, agent=AGENT, task=TASK, settings=SETTINGS) is None
    assert store.read_setting(resume.SETTING.format(agent=AGENT)) == ""


@pytest.mark.multiprocess
def test_cycle_of_a_killed_process_resumes(tmp_path, uninterrupted):
    expected, (_, expected_path, expected_params, _) = uninterrupted
    directory = str(tmp_path / "store")
    _store(tmp_path, "store").close()
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([REPO_ROOT, TESTS_DIR, os.environ.get("PYTHONPATH", "")]),
        "JAX_PLATFORMS": "cpu",
    }
    if jax.config.jax_compilation_cache_dir:  # the session's cache (conftest.py), shared
        env["JAX_COMPILATION_CACHE_DIR"] = str(jax.config.jax_compilation_cache_dir)
    child = subprocess.run(
        [sys.executable, "-c", _CHILD, directory],
        env=env,
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert child.returncode == -signal.SIGKILL, child.stderr[-3000:]
    with sqlite_store.SqliteStore(directory) as store:
        saved = resume.load(store, agent=AGENT, task=TASK, settings=SETTINGS)
        assert saved is not None and saved.generations_done == 1
        result = _cycle(store)
        path = store.load_state().paths[result.path.id]
        assert path == expected_path
        for cid in expected.published_components:
            _assert_trees_equal(store.load_params(cid), expected_params[cid])
        assert _staged(store) == []


def test_progress_of_other_settings_or_a_finished_cycle_is_dropped(tmp_path, monkeypatch):
    store = _store(tmp_path, "store")
    with monkeypatch.context() as patch:
        _interrupt_after(patch, 1)
        with pytest.raises(_Interrupted):
            _cycle(store)
    assert _staged(store)
    other = dataclasses.replace(SETTINGS, scale=0.9)
    assert resume.load(store, agent=AGENT, task=TASK, settings=other) is None
    assert resume.load(store, agent=AGENT, task="tex_b", settings=SETTINGS) is None
    # Placement settings do not change results: the progress still fits.
    assert resume.load(
        store, agent=AGENT, task=TASK, settings=dataclasses.replace(SETTINGS, devices=1)
    )

    # A cycle with other settings starts afresh: the staged work is discarded.
    two = dataclasses.replace(SETTINGS, generations=1)
    result = _cycle(store, two)
    assert result.candidates == two.candidates_per_generation
    assert _staged(store) == []
    assert resume.load(store, agent=AGENT, task=TASK, settings=SETTINGS) is None

    # Progress saved before the agent's last publication is stale.
    with monkeypatch.context() as patch:
        _interrupt_after(patch, 1)
        with pytest.raises(_Interrupted):
            _cycle(store)
    saved = resume.load(store, agent=AGENT, task=TASK, settings=SETTINGS)
    assert saved is not None
    store.publish(AGENT, paths=[store.load_state().paths[result.path.id]])
    assert resume.load(store, agent=AGENT, task=TASK, settings=SETTINGS) is None
    _cycle(store, two)
    assert _staged(store) == []
