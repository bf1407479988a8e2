"""The single-path search on a store: immunity bit for bit, resume, determinism, acceptance
of a new task's first candidates and locking of the published best path.

A tiny root ViT (hidden 16, one block, 4x4 patches of 8x8x1 images) with random
parameters; three tiny synthetic 4-class texture tasks (128 train / 64 validation / 32
test images each); each task iteration is 2 generations x 2 candidates x 2 validations
x 5 steps. Tasks run round-robin A, B, C, then A again.
"""

import dataclasses
import logging

import jax
import numpy as np
import pytest
from search_testlib import AGENT, CONFIG, DATA, SEARCH, TASKS, _task_data_of
from tiny_vit_testlib import random_params

from evolution.export import inference
from evolution.roots import seeding
from evolution.search import loop as search
from evolution.search.data import batches
from evolution.search.paths import candidate as cand
from evolution.search.space import hparams as hp
from evolution.store import sqlite as sqlite_store
from evolution.system import architecture as arch_lib
from evolution.system import state as system

pytestmark = pytest.mark.slow  # evolves three tasks


def _evolve(store, task, cache, config=SEARCH):
    data = _task_data_of(task)
    return search.evolve_task(
        store,
        task,
        config,
        train_batches_fn=data.train_batches_fn,
        validation_batches=data.validation_batches,
        agent=AGENT,
        cache=cache,
    )


def _predict(store, task):
    return inference.predict(store, task, DATA[task]["test"][0])


def _path_params(store, path):
    return {cid: store.load_params(cid) for cid in path.component_ids}


def _assert_trees_equal(left, right):
    assert jax.tree_util.tree_structure(left) == jax.tree_util.tree_structure(right)
    for a, b in zip(jax.tree_util.tree_leaves(left), jax.tree_util.tree_leaves(right), strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.fixture(scope="module")
def cache():
    return cand.StepCache()


@pytest.fixture(scope="module")
def world(tmp_path_factory, cache):
    """Root, then A, B, C, A on one store, with predictions and parameters recorded."""
    directory = str(tmp_path_factory.mktemp("search") / "store")
    store = sqlite_store.SqliteStore(directory)
    seeding.seed_root(store, CONFIG, random_params(), agent="root")
    results, preds, params = {}, {}, {}
    task_data = {name: _task_data_of(name) for name in TASKS}
    previous = None
    for step, expected in enumerate((*TASKS, TASKS[0])):
        # Tasks join the rotation one at a time (dynamic task introduction).
        joined = {name: task_data[name] for name in TASKS[: step + 1]}
        (result,) = search.evolve_round_robin(
            store, joined, SEARCH, iterations=1, previous=previous, agent=AGENT, cache=cache
        )
        task = previous = result.task
        assert task == expected
        key = f"{task}@{step}"
        results[key] = result
        params[key] = _path_params(store, results[key].best_path)
        for name in TASKS[: min(step + 1, len(TASKS))]:
            preds[(name, step)] = _predict(store, name)
    state = store.load_state()
    store.close()
    return dict(directory=directory, results=results, preds=preds, params=params, state=state)


def test_architecture_round_trip():
    architecture = arch_lib.architecture_of(CONFIG)
    path = system.Path("p", "t", (("embed", "c"),), "a", architecture=architecture)
    assert arch_lib.config_of(path) == CONFIG


def test_new_task_first_candidates_accepted_and_best_path_locked(world):
    state = world["state"]
    for step, task in enumerate(TASKS):
        result = world["results"][f"{task}@{step}"]
        first = [
            c
            for c in result.candidates
            if c.generation == min(r.generation for r in result.candidates)
        ]
        assert len(first) == SEARCH.candidates_per_generation
        assert all(c.accepted and c.parent_task != task for c in first)
        assert len(result.candidates) == SEARCH.generations * SEARCH.candidates_per_generation
        assert result.published_components
        for component_id in result.published_components:
            assert component_id in state.components
            assert state.components[component_id].task == task
        assert 0.0 <= result.quality <= 1.0
        assert result.wall_seconds >= result.train_seconds + result.eval_seconds
        assert result.train_seconds > 0 and result.candidates_per_hour > 0
    for task in TASKS:
        active = state.active_paths(task)
        assert len(active) == 1, "only the task's best path stays active"
        best = active[0]
        for component_id in best.component_ids:
            assert task in state.locks_of(component_id)
            if state.components[component_id].task == task:
                others = [t for t in (*TASKS, "root") if t != task]
                assert all(not state.is_trainable(component_id, t) for t in others)
        # It shares frozen components it did not create (the root's or another task's).
        assert any(state.components[cid].task != task for cid in best.component_ids)
        # Its head is its own, never another task's.
        assert state.components[dict(best.components)["head"]].task == task
    # Components of a path read from the root share root components (frozen references)
    # or clone them; the root path itself is untouched and still the root.
    assert state.root_path_id == "root:path"


def test_immunity_bit_for_bit(world):
    preds, params = world["preds"], world["params"]
    # A is unchanged by B and C; B by C and by A's second iteration... until A2 replaces A.
    for step in (1, 2):
        np.testing.assert_array_equal(preds[("tex_a", 0)], preds[("tex_a", step)])
    for step in (2, 3):
        np.testing.assert_array_equal(preds[("tex_b", 1)], preds[("tex_b", step)])
    np.testing.assert_array_equal(preds[("tex_c", 2)], preds[("tex_c", 3)])
    # The check is not vacuous: some task's path uses a component another task published.
    state = world["state"]
    assert any(
        state.components[cid].task not in (task, "root")
        for task in TASKS
        for cid in state.best_path(task).component_ids
    )
    # Parameters on disk of every published best path never change, retired or not.
    with sqlite_store.SqliteStore(world["directory"]) as store:
        for recorded in params.values():
            _assert_trees_equal(recorded, {cid: store.load_params(cid) for cid in recorded})


def test_second_round_keeps_one_best_path(world):
    state = world["state"]
    first, second = world["results"]["tex_a@0"], world["results"]["tex_a@3"]
    assert second.best_path.id == state.best_path("tex_a").id
    assert all(c.generation > first.best_path.generation for c in second.candidates)
    if second.best_path.id != first.best_path.id:
        assert state.paths[first.best_path.id].status == "retired"
        assert second.retired == (first.best_path.id,)
    accepted = [c for c in second.candidates if c.accepted]
    assert all(second.best_path.score >= c.score for c in accepted)
    for record in second.candidates:
        if record.parent_task != "tex_a":
            assert record.accepted
        else:  # a child of the task's own path must match or beat its parent
            assert record.accepted == (record.score >= record.parent_score)


def test_resume_from_disk(world):
    with sqlite_store.SqliteStore(world["directory"]) as store:
        state = store.load_state()
        for task in TASKS:
            assert state.best_path(task) == world["state"].best_path(task)
        np.testing.assert_array_equal(_predict(store, "tex_b"), world["preds"][("tex_b", 3)])
        np.testing.assert_array_equal(_predict(store, "tex_a"), world["preds"][("tex_a", 3)])


def _comparable(result):
    return (
        result.best_path,
        result.quality,
        result.score,
        result.accounted_params,
        result.published_components,
        result.candidates,
    )


def test_determinism_fixed_seed(world, tmp_path, cache, caplog):
    store = sqlite_store.SqliteStore(str(tmp_path / "again"))
    seeding.seed_root(store, CONFIG, random_params(), agent="root")
    for step, task in enumerate(TASKS[:2]):
        with caplog.at_level(logging.INFO, logger="evogrow"):
            result = _evolve(store, task, cache)
        progress = [r.getMessage() for r in caplog.records if "generation 2/2" in r.getMessage()]
        assert progress and task in progress[-1] and "candidates/hour" in progress[-1]
        assert _comparable(result) == _comparable(world["results"][f"{task}@{step}"])
        _assert_trees_equal(
            _path_params(store, result.best_path), world["params"][f"{task}@{step}"]
        )
        np.testing.assert_array_equal(_predict(store, task), world["preds"][(task, step)])
    store.close()


def test_new_task_starts_from_the_configured_mu(tmp_path, cache):
    config = dataclasses.replace(SEARCH, generations=1, candidates_per_generation=1, mu=0.3)
    with sqlite_store.SqliteStore(str(tmp_path / "mu")) as store:
        seeding.seed_root(store, CONFIG, random_params(), agent="root")
        result = _evolve(store, "tex_a", cache, config)
    # The child of the root starts at 0.3 (the grid's top) and moves at most one step.
    mu_index = result.best_path.hparams["indices"]["mu"]
    assert mu_index in (len(hp.MU_GRID) - 2, len(hp.MU_GRID) - 1)


def test_seed_root_is_idempotent_and_required(tmp_path, cache):
    with sqlite_store.SqliteStore(str(tmp_path / "empty")) as store:
        with pytest.raises(ValueError, match="seed_root"):
            _evolve(store, "tex_a", cache)
        root = seeding.seed_root(store, CONFIG, random_params(), agent="root")
        assert seeding.seed_root(store, CONFIG, random_params(), agent="root") == root
        with pytest.raises(ValueError, match="another root"):
            seeding.seed_root(
                store, dataclasses.replace(CONFIG, hidden=8), random_params(), agent="root"
            )


def test_array_batches():
    images, labels = DATA["tex_a"]["validation"]
    eval_batches = batches.array_eval_batches(images, labels, 48)
    assert [len(b["label"]) for b in eval_batches] == [48, 48]
    assert int(sum(b["_mask"].sum() for b in eval_batches)) == 64
    np.testing.assert_array_equal(eval_batches[1]["image"][16:], 0.0)
    make = batches.array_train_batches(*DATA["tex_a"]["train"])
    values = {"flip": True, "brightness": 0.1}
    first = [next(make(values, batch_size=16, seed=3)) for _ in range(2)]
    np.testing.assert_array_equal(first[0]["image"], first[1]["image"])
    stream = make({"flip": False, "brightness": 0.0}, batch_size=48, seed=3)
    epoch = np.concatenate([next(stream)["label"] for _ in range(8)])
    assert epoch.shape == (384,) and first[0]["image"].shape == (16, 8, 8, 1)
