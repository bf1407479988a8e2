"""The pretrained root: files written, load round trip, bit-identical resume after a crash,
reuse by settings, seeding a store whose predictions equal the root's own forward, a root
started from a big_vision ViT checkpoint, and the gin entry point.

A tiny ViT (hidden 16, one block, 8x8 patches of 32x32x3) trains 8 steps of 16 on the
first 128 training images of digits_rgb32_v1.
"""

import json
import os
import pathlib
import shutil

import gin
import jax
import numpy as np
import pytest
from vit_checkpoint_testlib import big_vision_arrays

from evogrow import gin_utils
from evolution.export import inference
from evolution.roots import root
from evolution.search.data import batches, task_data
from evolution.store import sqlite as sqlite_store
from evolution.system import architecture as arch_lib
from models import vit
from models.pretrained import vit_checkpoints
from training import checkpoints as checkpoints_lib

pytestmark = pytest.mark.slow  # pretrains and resumes a root

REPO = pathlib.Path(__file__).resolve().parents[3]
GIN_FILE = "gin/runs/pretrain_root.gin"
TASK = "digits_rgb32_v1"
CONFIG = vit.ViTConfig(
    hidden=16,
    mlp_dim=32,
    num_heads=2,
    qk_dim=8,
    v_dim=8,
    num_layers=1,
    image_shape=(32, 32, 3),
    patch_size=8,
    num_classes=10,
)
SETTINGS = dict(
    task=TASK,
    config=CONFIG,
    steps=8,
    batch_size=16,
    learning_rate=3e-3,
    warmup_steps=2,
    weight_decay=0.01,
    seed=1,
    max_train_examples=128,
)


def _tree_equal(a, b):
    leaves_a, tree_a = jax.tree_util.tree_flatten(a)
    leaves_b, tree_b = jax.tree_util.tree_flatten(b)
    assert tree_a == tree_b
    for x, y in zip(leaves_a, leaves_b, strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """An uninterrupted 8-step run, checkpointing every 4 steps."""
    root_dir = str(tmp_path_factory.mktemp("root") / "uninterrupted")
    return root.pretrain_root(root_dir=root_dir, checkpoint_every=4, log_every=2, **SETTINGS)


def test_default_root_config_fits_fashion_mnist():
    config = root.default_root_config()
    assert config.image_shape == (32, 32, 3) and config.num_classes == 10
    assert config.norm_placement == "pre" and config.patch_size == 8
    shapes = jax.eval_shape(vit.ViT(config).init, jax.random.PRNGKey(0), np.zeros((1, 32, 32, 3)))
    num_params = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(shapes))
    assert num_params == 213_194


def test_pretrain_writes_root_files(trained, caplog):
    files = set(os.listdir(trained.root_dir))
    assert {"root.npz", "root.json", "checkpoints"} <= files
    assert os.listdir(os.path.join(trained.root_dir, "checkpoints")) == ["8"]  # the latest
    info = json.loads(pathlib.Path(trained.root_dir, "root.json").read_text())
    assert info["architecture"] == json.loads(json.dumps(arch_lib.architecture_of(CONFIG)))
    assert (info["task"], info["steps"], info["resumed_from_step"]) == (TASK, 8, 0)
    assert info["test_accuracy"] == trained.test_accuracy and 0.0 <= trained.test_accuracy <= 1
    assert info["wall_seconds"] > 0 and info["num_params"] == trained.num_params
    with np.load(os.path.join(trained.root_dir, "root.npz")) as data:
        assert {name.split("/")[0] for name in data.files} == set(vit.component_slots(CONFIG))
    assert list(trained.params) and not trained.reused


def test_load_root_round_trip(trained):
    config, params = root.load_root(trained.root_dir)
    assert config == CONFIG
    _tree_equal(params, trained.params)


def test_load_root_without_a_root(tmp_path):
    with pytest.raises(root.RootNotFoundError, match="run ./run.sh pretrain_root first"):
        root.load_root(str(tmp_path))
    with pytest.raises(root.RootNotFoundError, match="pretrain_root first"):
        root.seed_store(sqlite_store.SqliteStore(str(tmp_path / "store")), str(tmp_path))


class _Killed(Exception):
    pass


def test_resume_after_crash_is_bit_identical(trained, tmp_path, monkeypatch):
    root_dir = str(tmp_path / "crashed")
    real_save = checkpoints_lib.Checkpointer.save

    def save_then_die(self, step, *args):
        real_save(self, step, *args)
        if step == 4:
            raise _Killed()

    monkeypatch.setattr(checkpoints_lib.Checkpointer, "save", save_then_die)
    with pytest.raises(_Killed):
        root.pretrain_root(root_dir=root_dir, checkpoint_every=4, **SETTINGS)
    assert not os.path.exists(os.path.join(root_dir, "root.json"))
    assert os.listdir(os.path.join(root_dir, "checkpoints")) == ["4"]
    with pytest.raises(root.RootNotFoundError):
        root.load_root(root_dir)
    monkeypatch.setattr(checkpoints_lib.Checkpointer, "save", real_save)
    resumed = root.pretrain_root(root_dir=root_dir, checkpoint_every=4, **SETTINGS)
    assert resumed.start_step == 4
    _tree_equal(resumed.params, trained.params)
    assert resumed.test_accuracy == trained.test_accuracy


def test_checkpoint_of_other_settings_is_not_resumed(trained, tmp_path):
    root_dir = str(tmp_path / "other")
    shutil.copytree(
        os.path.join(trained.root_dir, "checkpoints"), os.path.join(root_dir, "checkpoints")
    )
    again = root.pretrain_root(root_dir=root_dir, **{**SETTINGS, "seed": 2})
    assert again.start_step == 0 and again.steps == 8


def test_ensure_root_reuses_matching_settings(trained, monkeypatch):
    calls = []
    monkeypatch.setattr(root, "pretrain_root", lambda **kwargs: calls.append(kwargs))
    reused = root.ensure_root(root_dir=trained.root_dir, **SETTINGS)
    assert reused.reused and not calls
    assert (reused.test_accuracy, reused.num_params) == (trained.test_accuracy, trained.num_params)
    _tree_equal(reused.params, trained.params)
    root.ensure_root(root_dir=trained.root_dir, **{**SETTINGS, "learning_rate": 1e-3})
    assert len(calls) == 1 and calls[0]["learning_rate"] == 1e-3


def test_invalid_settings():
    with pytest.raises(ValueError, match="warmup_steps=8"):
        root.pretrain_root(root_dir="/nonexistent", **{**SETTINGS, "warmup_steps": 8})
    with pytest.raises(ValueError, match="does not fit task"):
        root.pretrain_root(root_dir="/nonexistent", **{**SETTINGS, "task": "lfw_faces_rgb32_v1"})


def test_seed_store_predicts_like_the_root(trained, tmp_path):
    store = sqlite_store.SqliteStore(str(tmp_path / "store"))
    path = root.seed_store(store, trained.root_dir)
    assert path.task == arch_lib.ROOT_TASK
    assert [slot for slot, _ in path.components] == vit.component_slots(CONFIG)
    assert root.seed_store(store, trained.root_dir) == path  # Idempotent.
    # One full evaluation batch of test images: the root's own jitted forward is compiled.
    images = batches.array_eval_batches(*task_data.load_task_arrays(TASK, "test"), 250)[0]
    from_store = inference.predict(store, arch_lib.ROOT_TASK, images["image"])
    own = np.asarray(root._forward(CONFIG)(trained.params, images["image"]))
    np.testing.assert_allclose(from_store, own, rtol=1e-5, atol=1e-6)
    assert np.abs(own).max() > 0  # The trained head is no longer the zero-initialised one.
    assert store.load_state().root_params() == trained.num_params
    store.close()


# -- a root from a big_vision ViT checkpoint ------------------------------------------------

INIT_GRID = 4  # the file's patch grid; digits' 32x32 images in 4x4 patches make 8x8


@pytest.fixture(scope="module")
def vit_file(tmp_path_factory):
    """A tiny big_vision ViT (4x4 patches, 2 blocks) of 16x16 images, as an .npz file."""
    arrays = big_vision_arrays(seed=3)
    width = arrays["pos_embedding"].shape[-1]
    table = np.random.default_rng(4).standard_normal((1, INIT_GRID**2, width))
    arrays["pos_embedding"] = table.astype(np.float32)
    path = tmp_path_factory.mktemp("vit") / "vit_ti.npz"
    np.savez(path, **arrays)
    return str(path), arrays


def _from_file(root_dir, path, **overrides):
    settings = {**SETTINGS, "config": None, "init_checkpoint": path, **overrides}
    return root.pretrain_root(root_dir=root_dir, checkpoint_every=2, log_every=1, **settings)


def test_root_from_a_vit_checkpoint_as_is(vit_file, tmp_path):
    path, arrays = vit_file
    made = _from_file(str(tmp_path / "as_is"), path, steps=0)
    config, params = made.config, made.params
    assert (config.image_shape, config.num_classes, config.patch_size) == ((32, 32, 3), 10, 4)
    assert (config.hidden, config.num_layers, config.norm_eps) == (16, 2, 1e-6)
    assert made.steps == 0 and made.init_checkpoint == path
    # Every loaded component is the file's; the position embeddings resampled 4x4 -> 8x8.
    np.testing.assert_array_equal(params["embed"]["patch"]["kernel"], arrays["embedding/kernel"])
    np.testing.assert_array_equal(params["cls"]["token"], arrays["cls"])
    pos = np.asarray(params["pos"]["embedding"])
    want = np.asarray(vit_checkpoints.resample_posemb(arrays["pos_embedding"], 8))[0]
    assert pos.shape == (1 + 64, 16) and not np.any(pos[0])
    np.testing.assert_array_equal(pos[1:], want)
    block = "Transformer/encoderblock_1"
    np.testing.assert_array_equal(
        params["block_1"]["attn"]["query"]["kernel"],
        arrays[f"{block}/MultiHeadDotProductAttention_0/query/kernel"],
    )
    np.testing.assert_array_equal(
        params["block_1"]["mlp"]["wo"]["kernel"], arrays[f"{block}/MlpBlock_0/Dense_1/kernel"]
    )
    np.testing.assert_array_equal(
        params["final_norm"]["scale"], arrays["Transformer/encoder_norm/scale"]
    )
    head = params["head"]["dense"]
    assert head["kernel"].shape == (16, 10) and not np.any(head["kernel"])  # fresh, zero
    info = json.loads(pathlib.Path(made.root_dir, "root.json").read_text())
    assert info["init_checkpoint"] == path and len(info["init_checkpoint_sha256"]) == 64
    assert not os.path.exists(os.path.join(made.root_dir, "checkpoints"))  # nothing trained
    # The root seeds a store: its components are the loaded ones.
    store = sqlite_store.SqliteStore(str(tmp_path / "store"))
    seeded = root.seed_store(store, made.root_dir)
    assert [slot for slot, _ in seeded.components] == vit.component_slots(config)
    for slot, component in seeded.components:
        _tree_equal(store.load_params(component), params[slot])
    assert store.load_state().root_params() == made.num_params
    store.close()


def test_root_fine_tuned_from_a_vit_checkpoint(vit_file, tmp_path, monkeypatch):
    path = str(tmp_path / "vit.npz")  # a copy this test may change
    shutil.copy(vit_file[0], path)
    arrays = vit_file[1]
    root_dir = str(tmp_path / "tuned")
    made = _from_file(root_dir, path, steps=3, warmup_steps=1)
    as_is = _from_file(str(tmp_path / "as_is"), path, steps=0)
    assert made.config == as_is.config and made.steps == 3
    assert os.listdir(os.path.join(root_dir, "checkpoints")) == ["3"]
    for slot in vit.component_slots(made.config):  # every component trained
        leaves = jax.tree.leaves(made.params[slot]), jax.tree.leaves(as_is.params[slot])
        pairs = zip(*leaves, strict=True)
        assert any(np.any(np.asarray(x) != np.asarray(y)) for x, y in pairs), slot
    assert 0.0 <= made.test_accuracy <= 1.0
    # Reused with the same settings and file; the same path with other content is not.
    settings = {**SETTINGS, "config": None, "init_checkpoint": path, "steps": 3}
    reused = root.ensure_root(root_dir=root_dir, **{**settings, "warmup_steps": 1})
    assert reused.reused and reused.init_checkpoint == path
    _tree_equal(reused.params, made.params)
    np.savez(path, **{**arrays, "embedding/bias": arrays["embedding/bias"] + 1})
    calls = []
    monkeypatch.setattr(root, "pretrain_root", lambda **kwargs: calls.append(kwargs))
    root.ensure_root(root_dir=root_dir, **{**settings, "warmup_steps": 1})
    assert len(calls) == 1
    store = sqlite_store.SqliteStore(str(tmp_path / "store"))
    root.seed_store(store, root_dir)
    images = batches.array_eval_batches(*task_data.load_task_arrays(TASK, "test"), 250)[0]
    from_store = inference.predict(store, arch_lib.ROOT_TASK, images["image"])
    own = np.asarray(root._forward(made.config)(made.params, images["image"]))
    np.testing.assert_allclose(from_store, own, rtol=1e-5, atol=1e-6)
    assert np.abs(own).max() > 0  # The head trained away from zero.
    store.close()


def test_init_checkpoint_settings_are_checked(vit_file, tmp_path):
    path, _ = vit_file
    with pytest.raises(ValueError, match="either config or init_checkpoint"):
        root.pretrain_root(root_dir=str(tmp_path), **{**SETTINGS, "init_checkpoint": path})
    with pytest.raises(ValueError, match=r"steps \(0\) must be >= 1"):
        root.pretrain_root(root_dir=str(tmp_path), **{**SETTINGS, "steps": 0})
    with pytest.raises(vit_checkpoints.CheckpointError, match="cannot read ViT checkpoint"):
        _from_file(str(tmp_path), str(tmp_path / "absent.npz"))


@pytest.fixture
def fresh_gin():
    gin.clear_config()
    yield
    gin.clear_config()


def test_gin_file_requires_root_dir(fresh_gin):
    with pytest.raises(gin_utils.GinConfigError, match="ROOT_DIR"):
        gin_utils.parse_gin([str(REPO)], [GIN_FILE], [])


def test_gin_entry_point_pretrains(fresh_gin, tmp_path, vit_file):
    root_dir = str(tmp_path / "gin_root")
    gin_utils.parse_gin([str(REPO)], [GIN_FILE], [f"ROOT_DIR = '{root_dir}'"])
    defaults = {
        "ROOT_TASK": "fashion_mnist_rgb32_v1",
        "ROOT_STEPS": 2000,
        "ROOT_BATCH_SIZE": 128,
        "ROOT_WARMUP_STEPS": 200,
        "ROOT_SEED": 0,
        "ROOT_MAX_TRAIN_EXAMPLES": None,
        "ROOT_INIT_CHECKPOINT": None,
    }
    for macro, value in defaults.items():
        assert gin.query_parameter(f"%{macro}") == value
    # A few steps of the default architecture through the launcher's call.
    gin.clear_config()
    bindings = [
        f"ROOT_DIR = '{root_dir}'",
        f"ROOT_TASK = '{TASK}'",
        "ROOT_STEPS = 2",
        "ROOT_BATCH_SIZE = 8",
        "ROOT_WARMUP_STEPS = 1",
        "ROOT_MAX_TRAIN_EXAMPLES = 16",
    ]
    gin_utils.parse_gin([str(REPO)], [GIN_FILE], bindings)
    result = gin.get_configurable(root.pretrain_root)()
    assert result.config == root.default_root_config() and result.steps == 2
    assert root.load_root(root_dir)[0] == root.default_root_config()
    # The launcher's call from a ViT checkpoint, used as it is (the default warmup stays).
    gin.clear_config()
    from_file = str(tmp_path / "gin_from_file")
    bindings = [
        f"ROOT_DIR = '{from_file}'",
        f"ROOT_TASK = '{TASK}'",
        "ROOT_STEPS = 0",
        f"ROOT_INIT_CHECKPOINT = '{vit_file[0]}'",
    ]
    gin_utils.parse_gin([str(REPO)], [GIN_FILE], bindings)
    result = gin.get_configurable(root.pretrain_root)()
    assert result.init_checkpoint == vit_file[0] and result.config.patch_size == 4
    assert root.load_root(from_file)[0] == result.config
