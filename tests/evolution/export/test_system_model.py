"""The evolved system as one routed model: routing equals per-task inference, shared
components stored once, unrouted examples masked, and export -> `./run.sh eval` of the
whole system on a seqio mixture with per-task accuracy equal to `inference.predict_classes`.

A tiny store: the tiny ViT root (8x8x1, one block) and, with test-local seqio tasks
carrying `task_id`, task A (id 0, 4 classes: a residual adapter before the root's block,
its own norm and head; plus a worse-scored second path that must not be used) and task B
(id 2, 3 classes: the root's block plus a second block of its own). Task C (id 1) has no
path.
"""

import dataclasses
import json
import os

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import seqio
from seqio_testlib import register_image_tasks
from tiny_vit_testlib import TINY_VIT, random_params

from evogrow import gin_utils, main
from evolution.export import inference, system_checkpoint, system_model
from evolution.roots import seeding
from evolution.search.space import mutations
from evolution.store import sqlite as sqlite_store
from evolution.system import architecture as arch_lib
from evolution.system import state as system
from models import adapters, vit
from training import checkpoints, reporting

pytestmark = pytest.mark.slow  # evolves, exports and evaluates a system

AGENT = "munet"
TASK_A, TASK_B, TASK_C = (
    "system_model_test_a_v1",
    "system_model_test_b_v1",
    "system_model_test_c_v1",
)
TASK_IDS = {TASK_A: 0, TASK_C: 1, TASK_B: 2}
NUM_CLASSES = {TASK_A: 4, TASK_B: 3, TASK_C: 4}
NUM_TEST = {TASK_A: 21, TASK_B: 13, TASK_C: 5}
MIXTURE_AB, MIXTURE_ABC = "system_model_test_ab_v1", "system_model_test_abc_v1"
CONFIG_B = dataclasses.replace(TINY_VIT, num_layers=2, num_classes=3)
ADAPTER_SIZE = 4
ROOT_SLOTS = vit.component_slots(TINY_VIT)


def _arrays(task):
    rng = np.random.default_rng(TASK_IDS[task])
    n = NUM_TEST[task]
    images = rng.uniform(size=(n, 8, 8, 1)).astype(np.float32)
    labels = rng.integers(0, NUM_CLASSES[task], n).astype(np.int32)
    return images, labels


def _register_tasks():
    register_image_tasks(_arrays, TASK_IDS)
    for name, members in ((MIXTURE_AB, [TASK_A, TASK_B]), (MIXTURE_ABC, [TASK_A, TASK_B, TASK_C])):
        if name not in seqio.MixtureRegistry.names():
            seqio.MixtureRegistry.add(name, [(t, 1.0) for t in members])


_register_tasks()


def _draw(shapes, rng):
    """Random parameters shaped like an (abstract, boxed) tree; norms near scale 1."""

    def leaf(path, value):
        noise = rng.normal(0.0, 0.3, value.shape).astype(value.dtype)
        return 1.0 + noise if "scale" in jax.tree_util.keystr(path) else noise

    return jax.tree_util.tree_map_with_path(leaf, nn.unbox(shapes))


def _new_params(module, x_shape, rng, *args):
    shapes = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros(x_shape), *args)
    return _draw(shapes["params"], rng)


def _publish(store, task, path_id, components, config, score, new, adapters_=None):
    """Puts the `new` {slot: params} components and publishes the path."""
    store.add_task(task, num_classes=config.num_classes)
    for slot, params in new.items():
        record = system.Component(
            id=dict(components)[slot],
            kind=mutations.slot_kind(slot),
            num_params=system.num_params_of(params),
            agent=AGENT,
            task=task,
        )
        store.put_component(record, params)
    architecture = arch_lib.architecture_of(config)
    if adapters_:
        architecture["adapters"] = adapters_
    path = system.Path(
        id=path_id,
        task=task,
        components=tuple(components),
        agent=AGENT,
        score=score,
        architecture=architecture,
    )
    store.publish(AGENT, paths=[path], components=[dict(components)[s] for s in new])
    return path


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The store (closed) and its paths."""
    directory = str(tmp_path_factory.mktemp("system") / "store")
    rng = np.random.default_rng(0)
    root_params = random_params(1)
    tokens = (1, TINY_VIT.num_tokens, TINY_VIT.hidden)
    with sqlite_store.SqliteStore(directory) as store:
        seeding.seed_root(store, TINY_VIT, root_params, agent="root")
        root = {slot: f"root:{slot}" for slot in ROOT_SLOTS}
        head_a = _new_params(vit.make_component(TINY_VIT, "head"), tokens, rng)
        worse_a = _publish(
            store,
            TASK_A,
            "a-worse",
            [(s, root[s]) for s in ROOT_SLOTS[:-1]] + [("head", "a-head0")],
            TINY_VIT,
            0.1,
            {"head": head_a},
        )
        slots_a = [s for s in ROOT_SLOTS if s.startswith(("embed", "cls", "pos"))]
        components_a = [(s, root[s]) for s in slots_a] + [
            ("adapter_0", "a-adapter"),
            ("block_0", root["block_0"]),
            ("final_norm", "a-norm"),
            ("head", "a-head"),
        ]
        new_a = {
            "adapter_0": _new_params(adapters.ResidualAdapter(TINY_VIT, ADAPTER_SIZE), tokens, rng),
            "final_norm": _new_params(vit.make_component(TINY_VIT, "final_norm"), tokens, rng),
            "head": _new_params(vit.make_component(TINY_VIT, "head"), tokens, rng),
        }
        best_a = _publish(
            store, TASK_A, "a-best", components_a, TINY_VIT, 0.9, new_a, {"adapter_0": ADAPTER_SIZE}
        )
        components_b = [(s, root[s]) for s in ROOT_SLOTS[:-2]] + [
            ("block_1", "b-block1"),
            ("final_norm", "b-norm"),
            ("head", "b-head"),
        ]
        block = vit.make_component(CONFIG_B, "block_1")
        new_b = {
            "block_1": _new_params(block, tokens, rng, None, True),
            "final_norm": _new_params(vit.make_component(CONFIG_B, "final_norm"), tokens, rng),
            "head": _new_params(vit.make_component(CONFIG_B, "head"), tokens, rng),
        }
        best_b = _publish(store, TASK_B, "b-best", components_b, CONFIG_B, 0.5, new_b)
    return {"directory": directory, "paths": {TASK_A: best_a, TASK_B: best_b}, "worse": worse_a}


@pytest.fixture(scope="module")
def system_and_params(world):
    with sqlite_store.SqliteStore(world["directory"]) as store:
        return system_model.SystemModel.from_store(store, {TASK_A: 0, TASK_B: 2})


@pytest.fixture(scope="module")
def expected(world):
    """Per-task logits and classes of `evolution.export.inference` on each task's test images."""
    with sqlite_store.SqliteStore(world["directory"]) as store:
        return {
            task: (
                inference.predict(store, task, _arrays(task)[0]),
                inference.predict_classes(store, task, _arrays(task)[0]),
            )
            for task in (TASK_A, TASK_B)
        }


def _mixed_batch():
    """A's and B's test examples interleaved; returns the batch and each task's rows."""
    (images_a, labels_a), (images_b, labels_b) = _arrays(TASK_A), _arrays(TASK_B)
    order = np.random.default_rng(3).permutation(len(labels_a) + len(labels_b))
    images = np.concatenate([images_a, images_b])[order]
    labels = np.concatenate([labels_a, labels_b])[order]
    task_id = np.concatenate([np.zeros(len(labels_a)), np.full(len(labels_b), 2)])[order]
    rows = {TASK_A: np.argsort(order)[: len(labels_a)], TASK_B: np.argsort(order)[len(labels_a) :]}
    batch = {"image": images, "label": labels, "task_id": task_id.astype(np.int32)}
    return batch, rows


def test_routes_are_best_paths_and_shared_components_stored_once(world, system_and_params):
    model, params = system_and_params
    routes = {r.task: r for r in model.config.routes}
    assert [r.task_id for r in model.config.routes] == [0, 2]
    for task, path in world["paths"].items():
        assert routes[task].path_id == path.id and routes[task].components == path.components
    assert "a-head0" not in params  # the worse path of A is not part of the system
    used = [cid for path in world["paths"].values() for cid in path.component_ids]
    assert len(used) > len(set(used)), "A and B share the root's components"
    assert list(params) == list(dict.fromkeys(used))
    with sqlite_store.SqliteStore(world["directory"]) as store:
        for cid, tree in params.items():
            jax.tree.map(np.testing.assert_array_equal, tree, store.load_params(cid))
    abstract = jax.eval_shape(
        lambda rng: model.get_initial_variables(rng, {"image": (2, 8, 8, 1)}), jax.random.key(0)
    )
    checkpoints.check_shapes(params, nn.unbox(abstract["params"]))
    assert nn.get_partition_spec(abstract["params"])["root:embed"]  # logical axis names kept


def test_config_json_round_trip_and_validation(system_and_params):
    config = system_and_params[0].config
    assert system_model.SystemConfig.from_json(json.loads(json.dumps(config.to_json()))) == config
    route = config.routes[0]
    with pytest.raises(ValueError, match="repeat task_id"):
        system_model.SystemConfig((route, dataclasses.replace(route, task="other")))


@pytest.fixture(scope="module")
def run_all(system_and_params):
    """One compiled step: (predictions, aux), scores and (loss, metrics) of a batch."""
    model, params = system_and_params

    @jax.jit
    def step(batch):
        return (
            model.predict_batch_with_aux(params, batch),
            model.score_batch(params, batch),
            model.loss_fn(params, batch, None),
        )

    return step


def test_routing_equals_per_task_inference(run_all, expected):
    batch, rows = _mixed_batch()
    (predictions, aux), scores, _ = run_all(batch)
    assert np.all(aux["routed"])
    for task, (logits, classes) in expected.items():
        k = NUM_CLASSES[task]
        mine = np.asarray(aux["logits"])[rows[task]]
        np.testing.assert_allclose(mine[:, :k], logits, rtol=1e-6, atol=1e-6)
        assert np.all(mine[:, k:] == system_model.ABSENT_CLASS_LOGIT)
        np.testing.assert_array_equal(np.asarray(predictions)[rows[task]], classes)
        labels = batch["label"][rows[task]]
        log_p = jax.nn.log_softmax(logits)[np.arange(len(labels)), labels]
        np.testing.assert_allclose(np.asarray(scores)[rows[task]], log_p, rtol=1e-5, atol=1e-6)


def test_unrouted_examples_are_masked(run_all):
    batch, _ = _mixed_batch()
    (_, routed_aux), _, _ = run_all(batch)
    unknown = np.where(np.arange(len(batch["label"])) % 3 == 0, 1, 7).astype(np.int32)
    (predictions, aux), scores, _ = run_all({**batch, "task_id": unknown})
    assert not np.any(aux["routed"])
    assert np.all(np.asarray(predictions) == system_model.UNROUTED_PREDICTION)
    assert np.all(np.isneginf(scores))
    # The loss and metrics of a batch count only its routed rows.
    half = len(batch["label"]) // 2
    partly = {**batch, "task_id": np.concatenate([batch["task_id"][:half], unknown[half:]])}
    _, _, (loss, metrics) = run_all(partly)
    logits, labels = np.asarray(routed_aux["logits"])[:half], batch["label"][:half]
    want = -np.mean(np.asarray(jax.nn.log_softmax(logits))[np.arange(half), labels])
    np.testing.assert_allclose(loss, want, rtol=1e-5)
    assert float(metrics["accuracy"].count) == half
    want_accuracy = np.mean(np.argmax(logits, -1) == labels)
    np.testing.assert_allclose(metrics["accuracy"].compute(), want_accuracy)


def test_task_ids_come_from_the_data():
    assert system_checkpoint.task_ids_of(MIXTURE_ABC, None) == {TASK_A: 0, TASK_B: 2, TASK_C: 1}


def test_tasks_without_path_are_clear_errors(world, tmp_path):
    with pytest.raises(ValueError, match=TASK_C):
        system_checkpoint.export_system(
            store_dir=world["directory"],
            model_dir=str(tmp_path / "abc"),
            mixture_or_task_name=MIXTURE_ABC,
            module=None,
        )
    assert not os.path.exists(tmp_path / "abc" / "checkpoints")


def _parse(gin_file, **macros):
    gin.clear_config()
    bindings = [f"{name} = {value!r}" for name, value in macros.items()]
    gin_utils.parse_gin([gin_utils.REPO_ROOT], [gin_file], bindings)


@pytest.mark.parametrize("gin_file", ["eval_system.gin", "infer_system.gin", "export_system.gin"])
def test_gin_files_parse(gin_file):
    gin.clear_config()
    try:
        gin.add_config_file_search_path(gin_utils.REPO_ROOT)
        gin.parse_config_file(os.path.join(gin_utils.REPO_ROOT, "gin", "evolution", gin_file))
        # By default the system's own tasks: export all, evaluate what the checkpoint routes.
        name = gin.query_parameter("%MIXTURE_OR_TASK_NAME")
        if gin_file == "export_system.gin":
            assert name is None
        else:
            assert "system_mixture" in repr(name)
    finally:
        gin.clear_config()


def test_export_then_eval_the_whole_system_in_one_run(world, expected, tmp_path):
    # Neither names a mixture: the export routes the system's tasks with a path (A and B;
    # C has none) and eval scores the tasks the checkpoint routes.
    model_dir, eval_dir = str(tmp_path / "system"), str(tmp_path / "eval")
    common = {"MIXTURE_OR_TASK_MODULE": None}
    try:
        _parse(
            "gin/evolution/export_system.gin",
            STORE_DIR=world["directory"],
            MODEL_DIR=model_dir,
            **common,
        )
        gin.get_configurable(system_checkpoint.export_system)()
        gin.clear_config()
        with pytest.raises(ValueError, match="not empty"):
            system_checkpoint.export_system(
                store_dir=world["directory"],
                model_dir=model_dir,
                mixture_or_task_name=MIXTURE_AB,
                module=None,
            )
        argv = [
            "eval",
            "--gin_file=gin/evolution/eval_system.gin",
            f"--gin.CHECKPOINT_PATH='{model_dir}'",
            f"--gin.EVAL_OUTPUT_DIR='{eval_dir}'",
            "--gin.MIXTURE_OR_TASK_MODULE=None",
            "--gin.BATCH_SIZE=8",
        ]
        assert main.run(argv) == 0
    finally:
        gin.clear_config()
    assert system_checkpoint.read_system_config(model_dir).tasks == (TASK_A, TASK_B)
    records = {r["task"]: r for r in reporting.read_history(eval_dir)}
    assert set(records) >= {TASK_A, TASK_B} and TASK_C not in records
    for task, (_, classes) in expected.items():
        labels = _arrays(task)[1]
        assert records[task]["num_examples"] == NUM_TEST[task]
        assert records[task]["accuracy"] == pytest.approx(np.mean(classes == labels), abs=1e-12)
    if MIXTURE_AB in records:  # an overall row, when evogrow.eval writes one for mixtures
        correct = sum(np.sum(c == _arrays(t)[1]) for t, (_, c) in expected.items())
        want = correct / sum(NUM_TEST[t] for t in expected)
        assert records[MIXTURE_AB]["accuracy"] == pytest.approx(want, abs=1e-12)
    # The checkpoint holds the store's parameters exactly, each component once.
    saved = checkpoints.Checkpointer(
        checkpoints.resolve_directory(model_dir), read_only=True
    ).restore_on_host(["params"])["params"]
    with sqlite_store.SqliteStore(world["directory"]) as store:
        assert sorted(saved) == sorted(
            dict.fromkeys(c for p in world["paths"].values() for c in p.component_ids)
        )
        for cid, tree in saved.items():
            jax.tree.map(np.testing.assert_array_equal, tree, store.load_params(cid))
    # A mixture with a task the system cannot route is refused when the model is built.
    with pytest.raises(ValueError, match=TASK_C):
        system_checkpoint.load_system_model(
            model_dir=model_dir, mixture_or_task_name=MIXTURE_ABC, module=None
        )
