"""The evolved system under t5x's OWN eval and infer binaries (gin/t5x/system_*.gin).

Skipped unless t5x is importable (docs/usage.md, "Using t5x"). A tiny store: the tiny ViT
root (8x8x1, one block) and test-local seqio tasks carrying `task_id`: A (id 0, 4 classes:
a residual adapter before the root's block, its own norm and head), B (id 1, 3 classes:
the root's block plus a second block of its own, whose id has a '.') and D (id 3, 4
classes), served by a published router path (`evolution.search.paths.router_path`) over D's
own path and B's body, with a random router and connector; C (id 2) has no path.
`export_system_t5x` writes it as a t5x checkpoint; `python -m t5x.eval` and
`python -m t5x.infer` run in subprocesses on the A+B+D mixture, as a user launches them,
and must agree with `evolution.export.inference.predict_classes` of each task's served
path.

The subprocesses register the test tasks by importing this very module
(MIXTURE_OR_TASK_MODULE='test_t5x_export', with this module's folder on PYTHONPATH).
"""

import dataclasses
import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

t5x = pytest.importorskip("t5x")

import flax.linen as nn  # noqa: E402 - after the skip: a skipped module loads no TensorFlow
import gin  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import orbax.checkpoint as ocp  # noqa: E402
import seqio  # noqa: E402
from seqio_testlib import register_image_tasks  # noqa: E402
from tiny_vit_testlib import TINY_VIT, publish_random_path, random_params  # noqa: E402

from evolution.agents import multipath  # noqa: E402
from evolution.export import inference, t5x_export  # noqa: E402
from evolution.roots import seeding  # noqa: E402
from evolution.search.paths import router_path  # noqa: E402
from evolution.search.space import mutations  # noqa: E402
from evolution.store import sqlite as sqlite_store  # noqa: E402
from evolution.system import architecture as arch_lib  # noqa: E402
from evolution.system import state as system  # noqa: E402
from models import adapters, vit  # noqa: E402

pytestmark = pytest.mark.slow  # evolves and exports a store first

ROOT = Path(__file__).resolve().parents[3]
THIS_MODULE = Path(__file__).stem
AGENT = "munet"
ROUTER_AGENT = "multipath-d"
TASK_A, TASK_B, TASK_C, TASK_D = (f"evolution_t5x_test_{x}_v1" for x in "abcd")
TASK_IDS = {TASK_A: 0, TASK_B: 1, TASK_C: 2, TASK_D: 3}
NUM_CLASSES = {TASK_A: 4, TASK_B: 3, TASK_C: 4, TASK_D: TINY_VIT.num_classes}
NUM_TEST = {TASK_A: 21, TASK_B: 13, TASK_C: 5, TASK_D: 11}
MIXTURE_ABD, MIXTURE_ALL = "evolution_t5x_test_abd_v1", "evolution_t5x_test_abcd_v1"
ROUTED = (TASK_A, TASK_B, TASK_D)
BATCH_SIZE = 8  # several batches per task, the last one padded
ADAPTER_SIZE = 4


def _arrays(task):
    rng = np.random.default_rng(10 + TASK_IDS[task])
    images = rng.uniform(size=(NUM_TEST[task], 8, 8, 1)).astype(np.float32)
    labels = rng.integers(0, NUM_CLASSES[task], NUM_TEST[task]).astype(np.int32)
    return images, labels


def _register_tasks():
    register_image_tasks(_arrays, TASK_IDS)
    for name, members in ((MIXTURE_ABD, ROUTED), (MIXTURE_ALL, tuple(TASK_IDS))):
        if name not in seqio.MixtureRegistry.names():
            seqio.MixtureRegistry.add(name, [(t, 1.0) for t in members])


_register_tasks()


def _new_params(module, rng, *args):
    """Random parameters of a component (numpy draws; norms near scale 1)."""
    tokens = jnp.zeros((1, TINY_VIT.num_tokens, TINY_VIT.hidden))
    shapes = jax.eval_shape(module.init, jax.random.key(0), tokens, *args)["params"]

    def leaf(path, value):
        noise = rng.normal(0.0, 0.3, value.shape).astype(value.dtype)
        return 1.0 + noise if "scale" in jax.tree_util.keystr(path) else noise

    return jax.tree_util.tree_map_with_path(leaf, nn.unbox(shapes))


def _publish(store, task, components, config, new, adapter_sizes=None):
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
    if adapter_sizes:
        architecture["adapters"] = adapter_sizes
    path = system.Path(
        id=f"{task}-best",
        task=task,
        components=tuple(components),
        agent=AGENT,
        score=0.5,
        architecture=architecture,
    )
    store.publish(AGENT, paths=[path], components=[dict(components)[s] for s in new])
    return path


def _publish_router_path(store, members, rng):
    """Publishes a router path of members[0]'s task as a multipath agent does
    (`multipath.publish_result`), with a random router and connectors, so that the router's
    weights differ per example and the companions change some classes."""
    num_classes, num_paths = NUM_CLASSES[members[0].task], len(members)
    router = router_path.init_router(num_classes, num_paths)
    router["dense"]["kernel"] = rng.normal(0.0, 1.0, (num_classes, num_paths)).astype(np.float32)
    connectors = tuple(
        {
            "kernel": rng.normal(0.0, 0.5, (TINY_VIT.hidden, num_classes)).astype(np.float32),
            "bias": rng.normal(0.0, 0.1, num_classes).astype(np.float32),
        }
        for _ in members[1:]
    )
    trainable = system.num_params_of({"router": router, "connectors": connectors})
    result = multipath.MultipathResult(
        task=members[0].task,
        path_ids=tuple(p.id for p in members),
        router_params=router,
        connector_params=connectors,
        quality=0.9,  # above its member 0's, so the router path is served
        single_path_quality=float(members[0].quality),
        best_step=0,
        validations=(),
        router_mean_weights=(1.0 / num_paths,) * num_paths,
        train_losses=(),
        trainable_params=trainable,
        activated_params=trainable,
        train_seconds=0.0,
    )
    published = multipath.publish_result(
        store, store.load_state(), agent=ROUTER_AGENT, result=result, rng=rng
    )
    assert published is not None
    return published


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory):
    """A store with the root, the best paths of A and B, and D's router path (C has none)."""
    directory = str(tmp_path_factory.mktemp("t5x_system") / "store")
    rng = np.random.default_rng(0)
    config_b = dataclasses.replace(TINY_VIT, num_layers=2, num_classes=3)
    with sqlite_store.SqliteStore(directory) as store:
        root = seeding.seed_root(store, TINY_VIT, random_params(1), agent="root")
        by_slot = dict(root.components)
        stem = [(s, by_slot[s]) for s in ("embed", "cls", "pos")]
        _publish(
            store,
            TASK_A,
            [*stem, ("adapter_0", "a-adapter"), ("block_0", by_slot["block_0"])]
            + [("final_norm", "a-norm"), ("head", "a-head")],
            TINY_VIT,
            {
                "adapter_0": _new_params(adapters.ResidualAdapter(TINY_VIT, ADAPTER_SIZE), rng),
                "final_norm": _new_params(vit.make_component(TINY_VIT, "final_norm"), rng),
                "head": _new_params(vit.make_component(TINY_VIT, "head"), rng),
            },
            {"adapter_0": ADAPTER_SIZE},
        )
        path_b = _publish(
            store,
            TASK_B,
            [*stem, ("block_0", by_slot["block_0"]), ("block_1", "b.block1")]
            + [("final_norm", "b-norm"), ("head", "b-head")],
            config_b,
            {
                "block_1": _new_params(vit.make_component(config_b, "block_1"), rng, None, True),
                "final_norm": _new_params(vit.make_component(config_b, "final_norm"), rng),
                "head": _new_params(vit.make_component(config_b, "head"), rng),
            },
        )
        path_d = publish_random_path(store, TASK_D, seed=3, score=0.3)
        _publish_router_path(store, [path_d, path_b], rng)
    return directory


@pytest.fixture(scope="module")
def expected(store_dir):
    """Each routed task's classes from `evolution.export.inference` on its test images."""
    with sqlite_store.SqliteStore(store_dir) as store:
        classes = {t: inference.predict_classes(store, t, _arrays(t)[0]) for t in ROUTED}
        # The test can tell the routes apart: another task's path predicts otherwise.
        for task, other in zip(ROUTED, ROUTED[1:] + ROUTED[:1], strict=True):
            crossed = inference.predict_classes(store, other, _arrays(task)[0])
            assert not np.array_equal(crossed, classes[task])
        # ... and D's router path apart from its member 0 (D's own path) alone.
        served = store.load_state().best_path(TASK_D)
        assert system.is_router_path(served)
        params = {slot: store.load_params(cid) for slot, cid in served.components}
        layout = router_path.layout_of(served)
        _, _, logits_0 = router_path.forward_with_weights(layout, params, _arrays(TASK_D)[0])
        assert not np.array_equal(np.argmax(logits_0, axis=-1), classes[TASK_D])
        return classes


@pytest.fixture(scope="module")
def exported(store_dir, tmp_path_factory):
    """export_system_t5x of A+B: (model_dir, checkpoint_dir, printed text)."""
    model_dir = tmp_path_factory.mktemp("export") / "system"
    capture = tmp_path_factory.mktemp("stdout") / "printed.txt"
    stdout = sys.stdout
    with open(capture, "w") as sys.stdout:
        try:
            checkpoint_dir = t5x_export.export_system_t5x(
                store_dir=store_dir,
                model_dir=str(model_dir),
                mixture_or_task_name=MIXTURE_ABD,
                module=THIS_MODULE,
            )
        finally:
            sys.stdout = stdout
    return model_dir, Path(checkpoint_dir), capture.read_text()


def _run(binary: str, *bindings: str) -> None:
    env = dict(os.environ)
    paths = [str(ROOT), str(ROOT / "tests"), str(Path(__file__).parent), env.get("PYTHONPATH")]
    env["PYTHONPATH"] = os.pathsep.join(filter(None, paths))
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    env["JAX_PLATFORMS"] = "cpu"
    cmd = [
        sys.executable,
        "-m",
        f"t5x.{binary}",
        "--gin_search_paths=gin",
        f"--gin_file=gin/t5x/system_{binary}.gin",
        *(f"--gin.{b}" for b in bindings),
    ]
    proc = subprocess.run(
        cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=False
    )
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stderr[-6000:]}"


def _bindings(checkpoint_dir):
    return [
        f"CHECKPOINT_PATH='{checkpoint_dir}'",
        f"MIXTURE_OR_TASK_NAME='{MIXTURE_ABD}'",
        f"MIXTURE_OR_TASK_MODULE='{THIS_MODULE}'",
        f"utils.DatasetConfig.batch_size={BATCH_SIZE}",
    ]


@pytest.mark.parametrize("binary", ["eval", "infer"])
def test_gin_file_parses(binary, monkeypatch):
    # t5x's run files bind `__main__.<fn>` of the binary, so parse as that binary would.
    monkeypatch.setitem(sys.modules, "__main__", importlib.import_module(f"t5x.{binary}"))
    monkeypatch.chdir(ROOT)
    gin.clear_config()
    try:
        gin.add_config_file_search_path(str(Path(t5x.__file__).parents[1]))
        gin.parse_config_file(f"gin/t5x/system_{binary}.gin")
        assert gin.query_parameter("%MIXTURE_OR_TASK_NAME") == "evolution_image_rgb32_v1"
        assert gin.query_parameter("%MIXTURE_OR_TASK_MODULE") == "tasks"
        assert gin.query_parameter("utils.RestoreCheckpointConfig.dtype") == "float32"
    finally:
        gin.clear_config()


def test_export_writes_a_t5x_checkpoint_of_the_pool(store_dir, exported):
    model_dir, checkpoint_dir, printed = exported
    assert checkpoint_dir == model_dir / "checkpoint_0" and checkpoint_dir.is_dir()
    assert f"--gin.CHECKPOINT_PATH=\"'{checkpoint_dir}'\"" in printed
    config = t5x_export.read_t5x_system_config(str(checkpoint_dir))
    assert config == t5x_export.read_t5x_system_config(str(model_dir))
    assert [(r.task, r.task_id, r.is_router) for r in config.routes] == [
        (TASK_A, 0, False),
        (TASK_B, 1, False),
        (TASK_D, 3, True),
    ]
    with ocp.PyTreeCheckpointer() as checkpointer:
        state = checkpointer.restore(str(checkpoint_dir / "state"))
    assert int(state["state"]["step"]) == 0 and "param_states" not in state["state"]
    saved = state["target"]
    # The store's parameters exactly, each shared component once.
    assert sorted(saved) == sorted(config.component_ids())
    with sqlite_store.SqliteStore(store_dir) as store:
        for cid, tree in saved.items():
            jax.tree.map(np.testing.assert_array_equal, tree, store.load_params(cid))


def test_export_refusals(store_dir, exported, tmp_path, monkeypatch):
    model_dir, checkpoint_dir, _ = exported
    common = {"store_dir": store_dir, "module": THIS_MODULE}
    with pytest.raises(ValueError, match="not empty"):
        t5x_export.export_system_t5x(
            model_dir=str(model_dir), mixture_or_task_name=MIXTURE_ABD, **common
        )
    with pytest.raises(ValueError, match=TASK_C):
        t5x_export.export_system_t5x(
            model_dir=str(tmp_path / "abc"), mixture_or_task_name=MIXTURE_ALL, **common
        )
    assert not (tmp_path / "abc").exists()
    with pytest.raises(ValueError, match=TASK_C):
        t5x_export.load_t5x_system_model(
            checkpoint_path=str(checkpoint_dir),
            mixture_or_task_name=MIXTURE_ALL,
            module=THIS_MODULE,
        )
    with pytest.raises(FileNotFoundError, match="system.json"):
        t5x_export.read_t5x_system_config(str(tmp_path))
    monkeypatch.setitem(sys.modules, "t5x", None)  # as if t5x were not installed
    with pytest.raises(t5x_export.T5XNotInstalledError, match="Using t5x"):
        t5x_export.export_system_t5x(
            model_dir=str(tmp_path / "no_t5x"), mixture_or_task_name=MIXTURE_ABD, **common
        )


@pytest.mark.multiprocess
def test_t5x_eval_reports_each_tasks_accuracy_of_its_path(exported, expected, tmp_path):
    _, checkpoint_dir, _ = exported
    _run("eval", *_bindings(checkpoint_dir), f"EVAL_OUTPUT_DIR='{tmp_path}'")
    for task, classes in expected.items():
        path = tmp_path / "inference_eval" / f"{task}-metrics.jsonl"
        metrics = json.loads(path.read_text().splitlines()[-1])
        assert metrics["step"] == 0
        assert metrics["num_examples"] == NUM_TEST[task]
        want = float(np.mean(classes == _arrays(task)[1]))
        assert metrics["accuracy"] == pytest.approx(want, abs=1e-12)
        assert metrics["log_likelihood"] < 0.0


@pytest.mark.multiprocess
def test_t5x_infer_writes_the_routed_prediction_of_every_example(exported, expected, tmp_path):
    _, checkpoint_dir, _ = exported
    _run("infer", *_bindings(checkpoint_dir), f"INFER_OUTPUT_DIR='{tmp_path}'")
    for task, classes in expected.items():
        (output,) = tmp_path.glob(f"{task}-predict.jsonl-*-of-*[0-9]")
        rows = [json.loads(line) for line in output.read_text().splitlines()]
        assert [row["prediction"] for row in rows] == classes.tolist()
