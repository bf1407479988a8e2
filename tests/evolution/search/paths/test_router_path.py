"""Router paths are part of the system: a multipath agent publishes its router path as
its task's path; after reloading the store, inference, the exported system model and
`./run.sh eval` / `infer` serve it with the multipath model's outputs; every other
task's outputs are bit-identical before and after, and the router path's are after a
companion task's muNet cycle (immunity both ways); the router path locks its members,
passes the agents' and the store's checks, is never a search's parent, seed or member,
and a malformed one is refused with what is wrong.

Tiny root ViT (8x8x1, one block) and three test-local seqio tasks (with `task_id`) on
agents_testlib's synthetic textures; each task's published path has its own random body
and a random head, so path_0 is near chance and the companion's features help.
"""

import dataclasses
import json
import shutil

import gin
import jax
import numpy as np
import pytest
from agents_testlib import DATA, SEARCH, _task_data
from seqio_testlib import register_image_tasks
from tiny_vit_testlib import TINY_VIT, publish_random_path, random_params

from evogrow import main
from evolution.agents import agent_cycle, agent_view, multipath, multipath_agent
from evolution.export import inference, system_checkpoint, system_model
from evolution.report import summaries, system_picture
from evolution.roots import seeding
from evolution.search.paths import router_path
from evolution.store import check as store_check
from evolution.store import sqlite as sqlite_store
from evolution.system import state as system
from models import t5x_adapter
from training import reporting

pytestmark = pytest.mark.slow  # trains a multipath model, exports and evaluates the system

TASKS = ("router_test_a_v1", "router_test_b_v1", "router_test_c_v1")
DATA_OF = dict(zip(TASKS, ("tex_a", "tex_b", "tex_c"), strict=True))
TASK_IDS = {task: index for index, task in enumerate(TASKS)}
ROUTED = TASKS[0]
AGENT = "multipath-a"
SETTINGS = multipath_agent.MultipathSettings(
    num_paths=2, steps=20, steps_per_validation=10, batch_size=16, wait_seconds=0.0
)


def _test_arrays(task):
    data = DATA[DATA_OF[task]]
    return data["test_x"], data["test_y"]


register_image_tasks(_test_arrays, TASK_IDS)


def _all_logits(store):
    """Each task's served logits on its test images (`inference.predict`)."""
    return {task: inference.predict(store, task, _test_arrays(task)[0]) for task in TASKS}


def _system_logits(store):
    """Each task's logits from the system model of the store (routed by task_id)."""
    model, params = system_model.SystemModel.from_store(store, TASK_IDS)
    out = {}
    for task in TASKS:
        images = _test_arrays(task)[0]
        ids = np.full(len(images), TASK_IDS[task], np.int32)
        logits, routed = jax.jit(model.routed_logits)(params, images, ids)
        assert np.all(np.asarray(routed))
        out[task] = np.asarray(logits)
    return model, out


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The store before and after the multipath agent's cycle, and what each served."""
    directory = str(tmp_path_factory.mktemp("router") / "store")
    report_dir = str(tmp_path_factory.mktemp("router_reports"))
    with sqlite_store.SqliteStore(directory) as store:
        seeding.seed_root(store, TINY_VIT, random_params(99), agent="root")
        for index, task in enumerate(TASKS):
            publish_random_path(store, task, seed=index + 1, score=0.5 - 0.1 * index)
        before = _all_logits(store)
        _, system_before = _system_logits(store)
        state_before = store.load_state()
        config = agent_cycle.AgentConfig(
            ROUTED, agent_cycle.MULTIPATH, multipath=SETTINGS, name=AGENT
        )
        cycle = agent_cycle.run_cycle(
            store, config, _task_data(DATA_OF[ROUTED]), report_dir=report_dir
        )
    return {
        "directory": directory,
        "report_dir": report_dir,
        "cycle": cycle,
        "before": before,
        "system_before": system_before,
        "state_before": state_before,
    }


def _kept_model(world, state):
    """The multipath agent's kept best: its member paths, router and connectors."""
    report, router, connectors = multipath_agent.load_best(world["report_dir"], AGENT)
    return [state.paths[i] for i in report["path_ids"]], router, connectors


def test_the_cycle_publishes_a_router_path_that_the_reloaded_store_serves(world, tmp_path):
    cycle = world["cycle"]
    assert cycle.status == multipath_agent.NEW_BEST and cycle.published is not None
    assert cycle.report["quality"] > cycle.report["single_path_quality"]
    with sqlite_store.SqliteStore(world["directory"]) as store:  # reloaded
        state = store.load_state()
        agent_view.check_state(state)  # every agent can still load the store
        assert not store_check.check_store(world["directory"]).problems
        served = state.best_path(ROUTED)
        assert served.id == cycle.published and system.is_router_path(served)
        assert served.quality == cycle.report["quality"]
        single = state.best_single_path(ROUTED)
        assert single.id == f"{ROUTED}.path"
        members, router, connectors = _kept_model(world, state)
        assert [m.id for m in members] == [single.id, f"{TASKS[1]}.path"]
        layout = router_path.layout_of(served)
        assert len(layout.members) == 2 and layout.num_classes == TINY_VIT.num_classes
        # Only the connector and the router are new components; the members' are shared.
        new = [c for c in served.component_ids if state.components[c].agent == AGENT]
        assert sorted(state.components[c].kind for c in new) == ["connector", "router"]
        body_b = [cid for slot, cid in members[1].components if slot != "head"]
        assert set(body_b) <= set(served.component_ids)
        assert f"{TASKS[1]}.head" not in served.component_ids
        # It locks the companion's body for its task: task B can no longer train it in place.
        for cid in body_b:
            assert ROUTED in state.locks_of(cid)
            assert not state.is_trainable(cid, TASKS[1])
        # Searches never build on it.
        assert all(not system.is_router_path(p) for p in state.seed_paths(TASKS[1]))
        companions = multipath.choose_companions(state, TASKS[2], 3)
        assert all(not system.is_router_path(p) for p in companions)
        # Inference serves the multipath model's outputs.
        images = _test_arrays(ROUTED)[0]
        want, alone = multipath_agent.predict(store, members, router, connectors, images)
        got = inference.predict(store, ROUTED, images)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(world["before"][ROUTED], alone, rtol=1e-5, atol=1e-5)
    # The reports take it as the task's path.
    (row,) = [r for r in summaries.task_rows(state) if r["task"] == ROUTED]
    assert row["path"] == served.id and row["quality"] == served.quality
    system_picture.render_system_files(state, str(tmp_path))
    assert not np.array_equal(got, world["before"][ROUTED])


def test_other_tasks_are_bit_identical_and_the_system_model_serves_it(world):
    with sqlite_store.SqliteStore(world["directory"]) as store:
        after = _all_logits(store)
        model, system_after = _system_logits(store)
        state = store.load_state()
        members, router, connectors = _kept_model(world, state)
        images = _test_arrays(ROUTED)[0]
        want, _ = multipath_agent.predict(store, members, router, connectors, images)
    for task in TASKS[1:]:  # immunity: what the other tasks serve is unchanged, bit for bit
        np.testing.assert_array_equal(after[task], world["before"][task])
        np.testing.assert_array_equal(system_after[task], world["system_before"][task])
    routes = {r.task: r for r in model.config.routes}
    assert routes[ROUTED].is_router and not routes[TASKS[1]].is_router
    np.testing.assert_allclose(system_after[ROUTED], want, rtol=1e-5, atol=1e-5)
    # The routes survive JSON (the checkpoint's metadata) and keep one kind per component.
    config = model.config
    assert system_model.SystemConfig.from_json(json.loads(json.dumps(config.to_json()))) == config
    # t5x's form of the variables: every parameter, the router's too, has axis names.
    abstract = jax.eval_shape(
        lambda rng: model.get_initial_variables(rng, {"image": (1, 8, 8, 1)}), jax.random.key(0)
    )
    converted = t5x_adapter.t5x_variables(abstract)
    assert set(converted["params"]) == set(config.component_ids())


def test_export_then_eval_and_infer_serve_the_router_path(world, tmp_path):
    model_dir, eval_dir = str(tmp_path / "system"), str(tmp_path / "eval")
    infer_dir = str(tmp_path / "infer")
    system_checkpoint.export_system(
        store_dir=world["directory"],
        model_dir=model_dir,
        mixture_or_task_name=list(TASKS),
        module=None,
    )
    assert system_checkpoint.read_system_config(model_dir).routes[0].is_router
    common = ["--gin.MIXTURE_OR_TASK_MODULE=None", "--gin.BATCH_SIZE=8"]
    try:
        argv = [
            "eval",
            "--gin_file=gin/evolution/eval_system.gin",
            f"--gin.CHECKPOINT_PATH='{model_dir}'",
            f"--gin.EVAL_OUTPUT_DIR='{eval_dir}'",
            *common,
        ]
        assert main.run(argv) == 0
        gin.clear_config()
        argv = [
            "infer",
            "--gin_file=gin/evolution/infer_system.gin",
            f"--gin.CHECKPOINT_PATH='{model_dir}'",
            f"--gin.INFER_OUTPUT_DIR='{infer_dir}'",
            *common,
        ]
        assert main.run(argv) == 0
    finally:
        gin.clear_config()
    with sqlite_store.SqliteStore(world["directory"]) as store:
        classes = {
            task: inference.predict_classes(store, task, _test_arrays(task)[0]) for task in TASKS
        }
    records = {r["task"]: r for r in reporting.read_history(eval_dir)}
    for task in TASKS:
        labels = _test_arrays(task)[1]
        assert records[task]["accuracy"] == pytest.approx(
            np.mean(classes[task] == labels), abs=1e-12
        )
    lines = open(f"{infer_dir}/{ROUTED}-000000.jsonl").read().splitlines()
    predictions = [json.loads(line)["prediction"] for line in lines]
    np.testing.assert_array_equal(predictions, classes[ROUTED])


def test_malformed_router_paths_are_refused_with_what_is_wrong(world):
    with sqlite_store.SqliteStore(world["directory"]) as store:
        state = store.load_state()
    served = state.paths[world["cycle"].published]
    no_router = dataclasses.replace(served, components=served.components[:-1])
    with pytest.raises(ValueError, match=f"{served.id}.*not the router layout"):
        router_path.layout_of(no_router)
    members = dict(served.architecture)["members"]
    one_member = dataclasses.replace(
        served, architecture={**served.architecture, "members": members[:1]}
    )
    with pytest.raises(ValueError, match="1 members"):
        router_path.layout_of(one_member)
    # The connector's component in the router's slot: the layout reads, the kinds do not.
    connector_id = served.components[-2][1]
    bad_kind = dataclasses.replace(
        served, components=(*served.components[:-1], ("router", connector_id))
    )
    router_path.layout_of(bad_kind)
    for bad, why in ((no_router, "router layout"), (one_member, "1 members"), (bad_kind, "kind")):
        broken = dataclasses.replace(state, paths={**state.paths, served.id: bad})
        with pytest.raises(agent_view.AgentStateError, match=f"{served.id}.*{why}"):
            agent_view.check_state(broken)


def test_a_companion_task_evolving_leaves_the_router_path_bit_identical(world, tmp_path):
    # A muNet agent cycle on task B (whose body the router path uses) on a copy of the store.
    directory = str(tmp_path / "store")
    shutil.copytree(world["directory"], directory)
    with sqlite_store.SqliteStore(directory) as store:
        before = _all_logits(store)
        config = agent_cycle.AgentConfig(TASKS[1], "munet", search=SEARCH)
        result = agent_cycle.run_cycle(store, config, _task_data(DATA_OF[TASKS[1]]))
        state = store.load_state()
        assert state.paths[result.path.id].task == TASKS[1]
        assert not system.is_router_path(state.paths[result.path.id])
        assert state.best_path(ROUTED).id == world["cycle"].published
        after = _all_logits(store)
    for task in (ROUTED, TASKS[2]):
        np.testing.assert_array_equal(after[task], before[task])
