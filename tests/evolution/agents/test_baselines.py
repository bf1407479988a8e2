"""The baselines (evolution/agents/baselines.py): muNet's protocol (D replicas from the same
root with the default hyperparameters, each trained for the steps given, the
best-validation replica kept), each method trains only what it should and never writes
the store, adapters come before every block and start as the identity, both
accounted-parameter accountings, test accuracy from the best-validation parameters,
determinism, clear errors, and the gin entry point end to end.

A tiny 2-block root ViT (hidden 16, 4x4 patches of 8x8x1 images) with random parameters;
two synthetic 4-class texture tasks; each baseline trains 2 replicas of 10 steps
validating every 5.
"""

import dataclasses
import json
import pathlib

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tiny_vit_testlib import TINY_VIT

from evogrow import gin_utils
from evolution import baseline_run
from evolution.agents import baselines
from evolution.roots import seeding
from evolution.search import iteration
from evolution.search import loop as search
from evolution.search.data import batches
from evolution.search.data import task_data as task_data_lib
from evolution.search.paths import candidate
from evolution.search.space import mutations
from evolution.store import sqlite as sqlite_store
from evolution.system.architecture import config_of
from models import vit

pytestmark = pytest.mark.slow  # trains every baseline method

REPO = pathlib.Path(__file__).resolve().parents[3]
CONFIG = dataclasses.replace(TINY_VIT, num_layers=2)
TASKS = ("tex_a", "tex_b")
OPTIONS = dict(
    steps_per_validation=5, batch_size=16, freeze_layers=1, adapter_size=8, seed=3, replicas=2
)
STEPS = 10


def _root_params(seed=0):
    """Random root parameters (numpy, as tiny_vit_testlib does) with a random head too."""
    shapes = jax.eval_shape(vit.ViT(CONFIG).init, jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 1)))
    rng = np.random.default_rng(seed)

    def draw(key_path, leaf):
        name = jax.tree_util.keystr(key_path)
        if "scale" in name:
            return np.ones(leaf.shape, leaf.dtype)
        if "bias" in name:
            return np.zeros(leaf.shape, leaf.dtype)
        return rng.normal(0.0, 0.2, leaf.shape).astype(leaf.dtype)

    return jax.tree_util.tree_map_with_path(draw, nn.unbox(shapes["params"]))


def _split(task_index, rows, rng):
    grid_r, grid_c = np.mgrid[0:4, 0:4]
    textures = np.stack([grid_r % 2, grid_c % 2, (grid_r + grid_c) % 2, grid_r == grid_c])
    textures = textures[[0, 1, 2, 3] if task_index == 0 else [2, 0, 3, 1]].astype(np.float32)
    labels = rng.integers(0, 4, rows).astype(np.int32)
    images = np.tile(textures[labels], (1, 2, 2)) + rng.normal(0.0, 0.3, (rows, 8, 8))
    return images.astype(np.float32)[..., None], labels


DATA = {
    name: {
        split: _split(i, rows, np.random.default_rng(10 * i + k))
        for k, (split, rows) in enumerate((("train", 96), ("validation", 48), ("test", 40)))
    }
    for i, name in enumerate(TASKS)
}


def _task(name):
    data = search.TaskData(
        train_batches_fn=batches.array_train_batches(*DATA[name]["train"]),
        validation_batches=batches.array_eval_batches(*DATA[name]["validation"], 32),
    )
    return baselines.BaselineTask(data, *DATA[name]["test"])


def _snapshot(store):
    state = store.load_state()
    return state, {cid: store.load_params(cid) for cid in state.components}


def _assert_trees_equal(left, right):
    assert jax.tree_util.tree_structure(left) == jax.tree_util.tree_structure(right)
    for a, b in zip(jax.tree_util.tree_leaves(left), jax.tree_util.tree_leaves(right), strict=True):
        np.testing.assert_array_equal(a, b)


def _trees_differ(left, right):
    pairs = zip(jax.tree_util.tree_leaves(left), jax.tree_util.tree_leaves(right), strict=True)
    return any(not np.array_equal(a, b) for a, b in pairs)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    directory = str(tmp_path_factory.mktemp("baselines") / "store")
    with sqlite_store.SqliteStore(directory) as opened:
        seeding.seed_root(opened, CONFIG, _root_params(), agent="root")
        yield opened


@pytest.fixture(scope="module")
def world(store):
    before = _snapshot(store)
    results = baselines.run_baselines(
        store=store,
        tasks={name: _task(name) for name in TASKS},
        methods=baselines.METHODS,
        steps_per_task={name: STEPS for name in TASKS},
        keep_params=True,
        **OPTIONS,
    )
    return before, {(r.method, r.task): r for r in results}


def _single(store, method, **overrides):
    task = _task(TASKS[0])
    kwargs = dict(
        store=store,
        method=method,
        task=TASKS[0],
        train_batches=task.data.train_batches_fn,
        validation_batches=task.data.validation_batches,
        test_images=task.test_images,
        test_labels=task.test_labels,
        num_classes=4,
        steps=STEPS,
        **OPTIONS,
    )
    return baselines.run_baseline(**{**kwargs, **overrides})


def test_plans_reference_clone_and_init_what_each_method_says(store):
    root = store.load_state().paths["root:path"]
    actions = {}
    for method in baselines.METHODS:
        spec = baselines.BaselineSpec(
            method,
            freeze_layers=1 if method == "freeze" else None,
            adapter_size=8 if method == "adapters" else None,
        )
        plan = baselines.plan_baseline(root, spec, task="t", num_classes=3, init_seed=0)
        actions[method] = [(s.slot, s.action) for s in plan.slots]
        for s in plan.slots:  # frozen slots reference the root's component itself
            assert (s.component_id == f"root:{s.slot}") == (s.action == mutations.REFERENCE)
    ref, clone, init = mutations.REFERENCE, mutations.CLONE, mutations.INIT
    slots = ["embed", "cls", "pos", "block_0", "block_1", "final_norm"]
    assert actions["finetune"] == [(s, clone) for s in slots] + [("head", init)]
    assert actions["freeze"] == [
        *[(s, ref) for s in slots[:4]],
        ("block_1", clone),
        ("final_norm", clone),
        ("head", init),
    ]
    assert (
        actions["adapters"]
        == [  # muNet's Encoder: residual_adapter_i, then block i
            *[(s, ref) for s in slots[:3]],
            ("adapter_0", init),
            ("block_0", ref),
            ("adapter_1", init),
            ("block_1", ref),
            ("final_norm", clone),
            ("head", init),
        ]
    )


@pytest.mark.parametrize("layers", [0, 1, 2])
def test_freeze_bottom_k_trains_the_top_blocks_final_norm_and_head(store, layers):
    root = store.load_state().paths["root:path"]
    spec = baselines.BaselineSpec("freeze", freeze_layers=layers)
    plan = baselines.plan_baseline(root, spec, task="t", num_classes=3, init_seed=0)
    trained = {s.slot for s in plan.slots if s.action != mutations.REFERENCE}
    top = {f"block_{i}" for i in range(layers, CONFIG.num_layers)}
    assert trained == top | {"final_norm", "head"}
    assert len(plan.trainable_ids) == len(trained)


def test_adapters_come_before_every_block_for_any_depth(store):
    root_path = store.load_state().paths["root:path"]
    for depth in (1, 3):
        architecture = {**root_path.architecture, "num_layers": depth}
        blocks = tuple((f"block_{i}", f"root:block_{i}") for i in range(depth))
        root = dataclasses.replace(
            root_path,
            architecture=architecture,
            components=(*root_path.components[:3], *blocks, *root_path.components[-2:]),
        )
        spec = baselines.BaselineSpec("adapters", adapter_size=16)
        plan = baselines.plan_baseline(root, spec, task="t", num_classes=3, init_seed=0)
        order = [s.slot for s in plan.slots]
        for i in range(depth):
            assert order[order.index(f"block_{i}") - 1] == f"adapter_{i}"
        assert sum(s.startswith("adapter") for s in order) == depth
        assert all(s.config == {"size": 16} for s in plan.slots if s.slot.startswith("adapter"))


def test_variants_are_named_as_the_notebook_names_them():
    assert baselines.BaselineSpec("finetune").name == "Finetune all"
    assert baselines.BaselineSpec("freeze", freeze_layers=2).name == "Freeze bottom layers:2"
    assert baselines.BaselineSpec("adapters", adapter_size=64).name == "Adapters:64"
    assert baselines.NOTEBOOK_ADAPTER_SIZE in baselines.NOTEBOOK_ADAPTER_SIZES


def test_adapters_start_as_the_identity(store):
    """At initialisation an adapter path computes the root's function (any head)."""
    state = store.load_state()
    root = state.paths[state.root_path_id]
    spec = baselines.BaselineSpec("adapters", adapter_size=8)
    plan = baselines.plan_baseline(root, spec, task="t", num_classes=4, init_seed=5)
    pool = {cid: store.load_params(cid) for cid in root.component_ids}
    config, created = mutations.materialize(plan, pool, config_of(root), num_classes=4)
    pool.update(created)
    adapters = [created[cid] for cid, slot in plan.fresh.items() if slot.startswith("adapter")]
    assert len(adapters) == 2 and all(np.any(a["down"]["kernel"]) for a in adapters)
    head = pool["root:head"]  # the root's (random) head in both, so logits are not zero
    by_slot = {slot: pool[cid] for slot, cid in plan.path.components} | {"head": head}
    root_by_slot = {slot: pool[cid] for slot, cid in root.components}
    images = jnp.asarray(DATA[TASKS[0]]["test"][0])
    ours = candidate.forward(config, [s for s, _ in plan.path.components], by_slot, images)
    theirs = candidate.forward(config, [s for s, _ in root.components], root_by_slot, images)
    np.testing.assert_array_equal(np.asarray(ours), np.asarray(theirs))
    assert float(jnp.abs(theirs).max()) > 0


def test_baselines_never_write_the_store(store, world):
    (state_before, params_before), _ = world
    state_after, params_after = _snapshot(store)
    assert state_after == state_before
    assert not any(cid.startswith("baseline") for cid in state_after.components)
    _assert_trees_equal(params_after, params_before)


def test_each_method_trains_only_its_own_components(store, world):
    (state, root_params), results = world
    root_ids = set(state.paths[state.root_path_id].component_ids)
    expected_trained = {
        "finetune": {"embed", "cls", "pos", "block_0", "block_1", "final_norm", "head"},
        "freeze": {"block_1", "final_norm", "head"},
        "adapters": {"adapter_0", "adapter_1", "final_norm", "head"},
    }
    for (method, _), result in results.items():
        path = result.path
        trained = {slot for slot, cid in path.components if cid in result.training.params}
        assert trained == expected_trained[method]
        assert set(result.training.params) == {c.id for c in result.components}
        frozen = {cid for cid in path.component_ids if cid not in result.training.params}
        assert frozen <= root_ids  # everything else is the root's, referenced as stored
        assert result.trainable_params == sum(c.num_params for c in result.components)
        head = result.training.params[dict(path.components)["head"]]
        assert head["dense"]["kernel"].shape == (CONFIG.hidden, 4)
        for slot, cid in path.components:
            if slot.startswith("adapter"):  # left the identity (its up projection starts at 0)
                assert np.any(result.training.params[cid]["up"]["kernel"])
            elif slot in trained and slot != "head":  # clones moved away from their source
                assert _trees_differ(result.training.params[cid], root_params[f"root:{slot}"])
        assert result.steps == STEPS and result.training.validations[-1][0] == STEPS


def test_accounted_params_split_root_components_among_the_runs_tasks(store, world):
    (state, _), results = world
    sizes = {cid: c.num_params for cid, c in state.components.items()}
    users = 1 + len(TASKS)  # mu2Net+: the root path stays active, a user of its components
    for (method, _), result in results.items():
        shared = sum(sizes[cid] for cid in result.path.component_ids if cid in sizes)
        assert result.accounted_params == pytest.approx(result.trainable_params + shared / users)
        # muNet: the root's lock is not a user, the run's tasks share the root alone.
        munet = result.trainable_params + shared / len(TASKS)
        assert result.accounted_params_munet == pytest.approx(munet)
        if method == "finetune":
            assert shared == 0 and result.trainable_params == state.root_params()
    assert (
        results[("adapters", TASKS[0])].accounted_params
        < results[("finetune", TASKS[0])].accounted_params
    )
    # Alone (run_baseline), a task shares the root only with the root task.
    alone = _single(store, "freeze")
    shared = sum(sizes[cid] for cid in alone.path.component_ids if cid in sizes)
    assert alone.accounted_params == pytest.approx(alone.trainable_params + shared / 2)
    assert alone.accounted_params_munet == pytest.approx(alone.trainable_params + shared)
    with pytest.raises(ValueError, match="one path per task"):
        baselines.accounted_params_per_task(state, [alone.path, alone.path], alone.components)


def test_test_accuracy_is_that_of_the_best_validation_params(store, world):
    _, results = world
    for (_, task), result in results.items():
        best_step, best = max(result.training.validations, key=lambda v: (v[1], -v[0]))
        assert result.validation_accuracy == best and result.training.best_step == best_step
        path = result.path
        config = config_of(path)
        params = {
            slot: result.training.params.get(cid) or store.load_params(cid)
            for slot, cid in path.components
        }
        slots = [slot for slot, _ in path.components]
        test = batches.array_eval_batches(*DATA[task]["test"], 32)
        validation = batches.array_eval_batches(*DATA[task]["validation"], 32)
        assert candidate.validate(config, slots, params, test) == result.test_accuracy
        assert candidate.validate(config, slots, params, validation) == best


def test_replicas_start_from_the_root_with_the_defaults_and_the_best_is_kept(store, monkeypatch):
    """muNet's protocol: D replicas of the same root and hyperparameters, each trained for
    the steps given (one chain's), with different fresh adapters; the best validation wins."""
    calls = []
    real = candidate.train_candidate

    def spy(**kwargs):
        result = real(**kwargs)
        calls.append((kwargs, result))
        return result

    monkeypatch.setattr(candidate, "train_candidate", spy)
    replicas = 3
    result = _single(store, "adapters", replicas=replicas)
    assert len(calls) == replicas
    state, root_params = _snapshot(store)
    root = state.paths[state.root_path_id]
    space = iteration.default_search_space(config_of(root))
    defaults = space.values(space.defaults())
    fresh = []
    for kwargs, trained in calls:
        assert kwargs["hparam_values"] == defaults
        assert kwargs["num_validations"] * kwargs["steps_per_validation"] == STEPS
        assert kwargs["steps_per_validation"] == OPTIONS["steps_per_validation"]
        assert kwargs["parent_opt_state"] is None
        for _, cid in kwargs["components"]:
            if cid in root_params:  # referenced frozen: the root's parameters as stored
                assert cid not in kwargs["trainable_ids"]
                _assert_trees_equal(kwargs["pool"][cid], root_params[cid])
        assert [s for s, _ in kwargs["components"]] == [s for s, _ in result.path.components]
        # Heads start at zero; the adapters' down projections are drawn per replica.
        fresh.append(kwargs["pool"][dict(kwargs["components"])["adapter_0"]])
        assert len(trained.validations) == STEPS // OPTIONS["steps_per_validation"]
    assert all(_trees_differ(a, b) for i, a in enumerate(fresh) for b in fresh[i + 1 :])
    qualities = [trained.quality for _, trained in calls]
    assert sorted(result.replica_validation_accuracies) == sorted(qualities)
    assert result.replicas == replicas and result.steps == STEPS
    assert result.validation_accuracy == max(qualities)
    assert result.replica_validation_accuracies[result.kept_replica] == max(qualities)
    assert any(result.training is trained for _, trained in calls)
    assert result.training.quality == max(qualities)


def test_an_image_size_override_trains_and_tests_at_that_size(store, world):
    """A baseline given the hyperparameter "image_size" sees its images at that side, as
    an evolved path with that value does (`vit.ViTConfig.resolution`)."""
    _, results = world
    default = results[("finetune", TASKS[0])]
    larger = _single(store, "finetune", hparam_values={"image_size": 12})
    config = config_of(larger.path)
    assert config.resolution == 12 and config_of(default.path).resolution is None
    assert larger.flops > default.flops
    params = {slot: larger.training.params.get(cid) for slot, cid in larger.path.components}
    test = batches.array_eval_batches(*DATA[TASKS[0]]["test"], 32)
    slots = [slot for slot, _ in larger.path.components]
    assert candidate.validate(config, slots, params, test) == larger.test_accuracy


def test_a_seed_fixes_the_outcome(store, world):
    _, results = world
    again = _single(store, "adapters")
    first = results[("adapters", TASKS[0])]
    _assert_trees_equal(again.training.params, first.training.params)
    assert again.test_accuracy == first.test_accuracy
    assert again.training.validations == first.training.validations
    other = _single(store, "adapters", seed=4)
    assert _trees_differ(other.training.params, first.training.params)


def test_bad_arguments_are_clear_errors(store):
    with pytest.raises(ValueError, match="Unknown baseline method 'lora'"):
        _single(store, "lora")
    with pytest.raises(ValueError, match=r"freeze_layers=3 is outside 0\.\.2"):
        _single(store, "freeze", freeze_layers=3)
    with pytest.raises(ValueError, match="freeze_layers=-1 < 0"):
        _single(store, "freeze", freeze_layers=-1)
    with pytest.raises(ValueError, match="multiple of steps_per_validation"):
        _single(store, "finetune", steps=7)
    with pytest.raises(ValueError, match="Unknown hyperparameters"):
        _single(store, "finetune", hparam_values={"learning_rate": 0.1})
    with pytest.raises(ValueError, match=r"required by\) .freeze. only"):
        baselines.BaselineSpec("freeze")
    with pytest.raises(ValueError, match="replicas=0 < 1"):
        _single(store, "finetune", replicas=0)
    stream = _task(TASKS[0]).data.train_batches_fn({}, batch_size=16, seed=0)
    with pytest.raises(ValueError, match="2 replicas need a TrainBatchesFn"):
        _single(store, "finetune", train_batches=stream)
    with pytest.raises(ValueError, match="Unknown baseline methods"):
        baselines.run_baselines(store=store, tasks={}, methods=["x"], steps_per_task={})


@pytest.fixture
def fake_task_data(monkeypatch):
    """Serves the synthetic tasks through evolution.search.data.task_data's functions."""

    def search_task_data(name, *, eval_batch_size, max_train_examples=None, **unused):
        del unused
        images, labels = DATA[name]["train"]
        return search.TaskData(
            train_batches_fn=batches.array_train_batches(
                images[:max_train_examples], labels[:max_train_examples]
            ),
            validation_batches=batches.array_eval_batches(
                *DATA[name]["validation"], eval_batch_size
            ),
        )

    def load_task_arrays(name, split, *, max_examples=None):
        images, labels = DATA[name][split]
        return images[:max_examples], labels[:max_examples]

    monkeypatch.setattr(task_data_lib, "search_task_data", search_task_data)
    monkeypatch.setattr(task_data_lib, "load_task_arrays", load_task_arrays)


def test_gin_entry_point_end_to_end(store, world, fake_task_data, tmp_path, capsys):
    (state_before, _), _ = world
    gin.clear_config()
    try:
        with pytest.raises(gin_utils.GinConfigError, match="STORE_DIR"):
            gin_utils.parse_gin([str(REPO)], ["gin/runs/baseline.gin"], [])
        gin.clear_config()
        bindings = [
            f"STORE_DIR = '{store.directory}'",
            f"OUTPUT_DIR = '{tmp_path}'",
            f"TASKS = {list(TASKS)}",
            "METHODS = ['freeze', 'adapters']",
            "STEPS = 7",  # not a multiple of 5: it would fail if STEPS_PER_TASK were ignored
            f"STEPS_PER_TASK = {{'{TASKS[0]}': 10, '{TASKS[1]}': 10}}",
            "STEPS_PER_VALIDATION = 5",
            "BATCH_SIZE = 16",
            "EVAL_BATCH_SIZE = 32",
            "FREEZE_LAYERS = 1",
            "ADAPTER_SIZE = 8",
            "HPARAM_VALUES = {'lr': 0.05}",
            "REPLICAS = 2",
        ]
        gin_utils.parse_gin([str(REPO)], ["gin/runs/baseline.gin"], bindings)
        results = gin.get_configurable(baseline_run.baseline)()
    finally:
        gin.clear_config()
    assert [(r.method, r.task, r.steps) for r in results] == [
        ("freeze", TASKS[0], 10),
        ("freeze", TASKS[1], 10),
        ("adapters", TASKS[0], 10),
        ("adapters", TASKS[1], 10),
    ]
    assert results[0].spec.freeze_layers == 1 and results[2].spec.adapter_size == 8
    assert all(r.replicas == 2 and len(r.replica_validation_accuracies) == 2 for r in results)
    report = json.loads((tmp_path / "baselines.json").read_text())
    assert [r["test_accuracy"] for r in report["results"]] == [r.test_accuracy for r in results]
    assert report["settings"]["hparam_values"] == {"lr": 0.05}
    assert report["root_params"] == state_before.root_params()
    assert set(report["summary"]) == {"freeze", "adapters"}
    printed = capsys.readouterr().out
    assert "| task | method | test acc |" in printed and f"| {TASKS[1]} | Adapters:8 |" in printed
    assert store.load_state() == state_before
