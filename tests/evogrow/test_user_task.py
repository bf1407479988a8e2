"""A user's own seqio tasks, registered with plain seqio, end to end through the launcher.

A task module outside the repo (written to a temporary folder, as a user's would be)
registers a synthetic image task (32x32x3, the class is the brightest channel) and two
synthetic text tasks (marker word pieces) with `seqio.TaskRegistry.add` alone, never
through `tasks.registry`. Gin files beside it `import` it, t5x style, and are found
through --gin_search_paths. Checked: each task trains by name with the generic
experiment file, the model taking its image shape and classes from the task; each joins
a small evolved system with `evolve --add_task`, which derives the task's metadata from
its data, caches it in the store and reports the earlier tasks' test predictions
bit-identical (also checked here directly); a pinned image shape that disagrees with the
task is refused in one line; and an unknown name is one line too.
"""

import json
import logging
import sys

import flax.linen as nn
import gin
import jax
import numpy as np
import pytest

import tasks
from evogrow import main
from evolution.export import inference
from evolution.roots import seeding
from evolution.search.data import task_data
from evolution.store import sqlite as sqlite_store
from models import encoder, vit
from training import checkpoints

pytestmark = pytest.mark.slow  # trains and evolves through the real entry points

REPO = str(main.__file__).rsplit("/evogrow/", 1)[0]
MODULE = "user_tasks_e2e"
IMAGE_TASK = "user_channels_v1"
TEXT_TASKS = ("user_marks_a_v1", "user_marks_b_v1")
TEXT_ROOT = encoder.tiny(num_classes=2, max_len=16)
IMAGE_ROOT = vit.vit_tiny(image_shape=(32, 32, 3), patch_size=8, num_classes=10)

MODULE_SOURCE = '''
"""A user's tasks: plain seqio registrations on synthetic in-memory data."""

import numpy as np
import seqio
import tensorflow as tf

import tasks

SPLITS = {"train": 96, "validation": 48, "test": 48}
LABEL = seqio.Feature(seqio.PassThroughVocabulary(1), add_eos=False, dtype=tf.int32, rank=0)


def _images(split):
    rng = np.random.default_rng(list(SPLITS).index(split))
    labels = rng.integers(0, 3, SPLITS[split]).astype(np.int32)
    images = rng.uniform(0.0, 0.5, (SPLITS[split], 32, 32, 3)).astype(np.float32)
    images[np.arange(len(labels)), :, :, labels] += 0.5  # the class is the bright channel
    return {"image": images, "label": labels}


def _marks(num_classes, seed, split):
    rng = np.random.default_rng(seed * 10 + list(SPLITS).index(split))
    rows = SPLITS[split]
    labels = rng.integers(0, num_classes, rows).astype(np.int32)
    ids = rng.integers(10, 128, (rows, 12)).astype(np.int32)
    ids[np.arange(rows), rng.integers(0, 12, rows)] = 1 + labels  # the class's marker
    return {"inputs": ids, "label": labels}


def _source(make):
    def dataset_fn(split, shuffle_files, seed=None):
        return tf.data.Dataset.from_tensor_slices(make(split))

    return seqio.FunctionDataSource(dataset_fn, splits=tuple(SPLITS))


seqio.TaskRegistry.add(
    "user_channels_v1",
    source=_source(_images),
    output_features={
        "image": seqio.Feature(seqio.PassThroughVocabulary(1), dtype=tf.float32, rank=3),
        "label": LABEL,
    },
)
for name, classes, seed in (("user_marks_a_v1", 2, 1), ("user_marks_b_v1", 3, 2)):
    seqio.TaskRegistry.add(
        name,
        source=_source(lambda split, c=classes, s=seed: _marks(c, s, split)),
        output_features={
            "inputs": seqio.Feature(tasks.MINILM_VOCABULARY, add_eos=False, dtype=tf.int32),
            "label": LABEL,
        },
    )
'''

TINY_SEARCH = [
    "--gin.GENERATIONS=1",
    "--gin.CANDIDATES=1",
    "--gin.VALIDATIONS=1",
    "--gin.STEPS_PER_VALIDATION=2",
    "--gin.BATCH_SIZE=16",
    "--gin.EVAL_BATCH_SIZE=48",
]
TINY_TRAIN = [
    "--gin.TRAIN_STEPS=4",
    "--gin.BATCH_SIZE=16",
    "--gin.EVAL_PERIOD=4",
    "--gin.CHECKPOINT_PERIOD=4",
    "--gin.WARMUP_STEPS=1",
    "--gin.train_script.train.eval_steps=1",
]


def _main(argv):
    """One launcher call on a clean gin configuration (as a fresh process would have)."""
    gin.clear_config()
    try:
        return main.main(argv)
    finally:
        gin.clear_config()


@pytest.fixture(scope="module")
def user_dir(tmp_path_factory):
    """The user's folder: the task module and gin files, outside the repo."""
    folder = tmp_path_factory.mktemp("user")
    (folder / f"{MODULE}.py").write_text(MODULE_SOURCE)
    for name, include, task in (
        ("my_image.gin", "gin/experiments/image_vit.gin", IMAGE_TASK),
        ("my_text.gin", "gin/experiments/text_encoder.gin", TEXT_TASKS[0]),
    ):
        (folder / name).write_text(
            f"import {MODULE}\ninclude '{include}'\nMIXTURE_OR_TASK_NAME = '{task}'\n"
        )
    (folder / "my_evolve.gin").write_text(f"import {MODULE}\ninclude 'gin/runs/evolve.gin'\n")
    sys.path.insert(0, str(folder))
    yield folder
    sys.path.remove(str(folder))


def _search_paths(user_dir):
    # The repo first: gin looks for the user's files there too, which is no error.
    return f"--gin_search_paths={REPO},{user_dir}"


def _architecture(model_dir):
    checkpointer = checkpoints.Checkpointer(str(model_dir / "checkpoints"), read_only=True)
    try:
        return checkpointer.read_metadata()["architecture"]["config"]
    finally:
        checkpointer.close()


def _logits(store_dir, task):
    with sqlite_store.SqliteStore(str(store_dir)) as store:
        inputs, _ = task_data.load_task_arrays(task, "test")
        return inference.predict(store, task, inputs)


def _seed_root(store_dir, config, sample):
    """A root of random parameters (what the search starts from; pretraining aside)."""
    module = (
        encoder.Encoder(config) if isinstance(config, encoder.EncoderConfig) else vit.ViT(config)
    )
    params = nn.unbox(module.init(jax.random.key(0), sample)["params"])
    with sqlite_store.SqliteStore(str(store_dir)) as store:
        seeding.seed_root(store, config, params, agent="root")


def _evolve(user_dir, store_dir, root_dir, *extra):
    argv = [
        "evolve",
        _search_paths(user_dir),
        "--gin_file=my_evolve.gin",
        f"--gin.STORE_DIR='{store_dir}'",
        f"--gin.ROOT_DIR='{root_dir}'",
        *TINY_SEARCH,
        *extra,
    ]
    return _main(argv)


def test_plain_seqio_task_metadata_is_derived(user_dir):
    __import__(MODULE)
    assert IMAGE_TASK not in tasks.registered_names()  # plain seqio, not tasks.registry
    image = tasks.info(IMAGE_TASK)
    assert (image.modality, image.image_shape, image.num_classes) == ("image", (32, 32, 3), 3)
    text = tasks.info(TEXT_TASKS[1])
    assert (text.modality, text.text_max_length, text.num_classes) == ("text", 12, 3)
    assert text.vocabulary_name == "minilm_wordpiece"
    with pytest.raises(tasks.UnknownTaskError, match=f"close matches: {IMAGE_TASK}") as error:
        tasks.lookup("user_chanels_v1")
    assert isinstance(error.value, KeyError) and isinstance(error.value, ValueError)


def test_image_task_trains_by_name_and_evolves_in(user_dir, tmp_path, caplog, capsys):
    model_dir = tmp_path / "model"
    argv = ["train", _search_paths(user_dir), "--gin_file=my_image.gin", *TINY_TRAIN]
    with caplog.at_level(logging.INFO):
        assert _main([*argv, f"--gin.MODEL_DIR='{model_dir}'"]) == 0
    assert not [r for r in caplog.records if "Path not found" in r.getMessage()]
    config = _architecture(model_dir)
    assert (tuple(config["image_shape"]), config["num_classes"]) == ((32, 32, 3), 3)

    store_dir = tmp_path / "store"
    _seed_root(store_dir, IMAGE_ROOT, np.zeros((1, 32, 32, 3), np.float32))
    root_dir = tmp_path / "unused_root"  # the store has its root already
    limits = ["--gin.MAX_TRAIN_EXAMPLES=64", "--gin.MAX_EVAL_EXAMPLES=48"]
    first = ["--gin.TASKS=['digits_rgb32_v1']", *limits]
    assert _evolve(user_dir, store_dir, root_dir, *first) == 0
    before = _logits(store_dir, "digits_rgb32_v1")
    capsys.readouterr()
    added = ["--gin.TASKS=[]", "--add_task", IMAGE_TASK, f"--gin.REPORT_DIR='{tmp_path / 'r'}'"]
    assert _evolve(user_dir, store_dir, root_dir, *added, *limits) == 0
    out = capsys.readouterr().out
    assert (
        "immunity: the 1 earlier tasks' test predictions are bit-identical after adding "
        f"{IMAGE_TASK}" in out
    )
    np.testing.assert_array_equal(_logits(store_dir, "digits_rgb32_v1"), before)
    cached = json.loads((store_dir / task_data.INFO_CACHE_FILE).read_text())
    assert cached[IMAGE_TASK]["image_shape"] == [32, 32, 3]
    assert cached[IMAGE_TASK]["num_classes"] == 3
    with sqlite_store.SqliteStore(str(store_dir)) as store:
        assert store.load_state().tasks[IMAGE_TASK].num_classes == 3
    assert _logits(store_dir, IMAGE_TASK).shape == (48, 3)


def test_text_tasks_train_by_name_and_evolve_in(user_dir, tmp_path, capsys):
    model_dir = tmp_path / "model"
    argv = ["train", _search_paths(user_dir), "--gin_file=my_text.gin", *TINY_TRAIN]
    assert _main([*argv, "--gin.TEXT_LENGTH=16", f"--gin.MODEL_DIR='{model_dir}'"]) == 0
    assert _architecture(model_dir)["num_classes"] == 2

    store_dir = tmp_path / "store"
    _seed_root(store_dir, TEXT_ROOT, np.ones((1, 8), np.int32))
    no_root = tmp_path / "unused_root"  # the store has its root already
    first = [f"--gin.TASKS=['{TEXT_TASKS[0]}']"]
    assert _evolve(user_dir, store_dir, no_root, *first) == 0
    before = _logits(store_dir, TEXT_TASKS[0])
    capsys.readouterr()
    added = ["--gin.TASKS=[]", "--add_task", TEXT_TASKS[1], f"--gin.REPORT_DIR='{tmp_path / 'r'}'"]
    assert _evolve(user_dir, store_dir, no_root, *added, "--no_immunity_check") == 0
    assert "immunity:" not in capsys.readouterr().out  # skipped on request
    np.testing.assert_array_equal(_logits(store_dir, TEXT_TASKS[0]), before)
    with sqlite_store.SqliteStore(str(store_dir)) as store:
        assert store.load_state().tasks[TEXT_TASKS[1]].num_classes == 3


def test_pinned_shape_that_disagrees_is_one_line(user_dir, tmp_path, capsys):
    argv = [
        "train",
        _search_paths(user_dir),
        "--gin_file=my_image.gin",
        f"--gin.MODEL_DIR='{tmp_path / 'model'}'",
        "--gin.vit.ViTConfig.image_shape=(8, 8, 1)",
        *TINY_TRAIN,
    ]
    assert _main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "image_shape (8, 8, 1)" in err and "(32, 32, 3)" in err and IMAGE_TASK in err
    argv[4] = "--gin.vit.ViTConfig.num_classes=2"
    assert _main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "num_classes=2" in err and "3 classes" in err


def test_unknown_task_is_one_line(user_dir, tmp_path, capsys):
    argv = [
        "train",
        _search_paths(user_dir),
        "--gin_file=my_image.gin",
        f"--gin.MODEL_DIR='{tmp_path / 'model'}'",
        "--gin.MIXTURE_OR_TASK_NAME='user_chanels_v1'",
        *TINY_TRAIN,
    ]
    assert _main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"close matches: {IMAGE_TASK}" in err


def test_derived_metadata_is_read_once_then_from_the_store(user_dir, tmp_path, monkeypatch):
    __import__(MODULE)
    task_data._FROM_CACHE.clear()
    derived = tasks.info(IMAGE_TASK)
    reads = []
    monkeypatch.setattr(tasks, "info", lambda name, **kw: reads.append(name) or derived)
    first = task_data.task_info(IMAGE_TASK, str(tmp_path))
    assert reads == [IMAGE_TASK] and (tmp_path / task_data.INFO_CACHE_FILE).exists()
    task_data._FROM_CACHE.clear()  # as a fresh process: only the store's file is left
    again = task_data.task_info(IMAGE_TASK, str(tmp_path))
    assert reads == [IMAGE_TASK]  # not read again
    assert (again.modality, again.image_shape, again.num_classes) == (
        first.modality,
        first.image_shape,
        first.num_classes,
    )
