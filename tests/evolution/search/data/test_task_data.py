"""seqio tasks as arrays for the search: shapes, order, caching, errors, and TaskData."""

import numpy as np
import pytest

import tasks
from evolution.search.data import task_data
from tasks import image_sources
from training import data as data_lib

TASK = "digits_rgb32_v1"


def test_load_task_arrays_shapes_dtypes_and_order():
    images, labels = task_data.load_task_arrays(TASK, "validation")
    assert images.shape == (180, 32, 32, 3) and images.dtype == np.float32
    assert labels.shape == (180,) and labels.dtype == np.int32
    assert 0.0 <= images.min() and images.max() <= 1.0 and set(labels) <= set(range(10))
    # The order is the source's (no shuffling): grey digits repeated over three channels.
    source = image_sources.load_digits()["validation"]
    np.testing.assert_array_equal(labels, source["label"])
    np.testing.assert_array_equal(images[..., 0], images[..., 2])


def test_load_task_arrays_cached_read_only_and_deterministic():
    images, labels = task_data.load_task_arrays(TASK, "validation")
    again = task_data.load_task_arrays(TASK, "validation")
    assert again[0] is images and again[1] is labels
    assert not images.flags.writeable and not labels.flags.writeable
    task_data._read_split.cache_clear()
    fresh_images, fresh_labels = task_data.load_task_arrays(TASK, "validation")
    assert fresh_images is not images
    np.testing.assert_array_equal(fresh_images, images)
    np.testing.assert_array_equal(fresh_labels, labels)
    first, first_labels = task_data.load_task_arrays(TASK, "validation", max_examples=10)
    np.testing.assert_array_equal(first, images[:10])
    np.testing.assert_array_equal(first_labels, labels[:10])


def test_unknown_task_mixture_split_and_limit_errors():
    with pytest.raises(data_lib.UnknownTaskError, match="digits_rgb32_v1") as error:
        task_data.load_task_arrays("digits_rgb32_v2", "train")
    assert isinstance(error.value, ValueError)
    with pytest.raises(ValueError, match="is a mixture"):
        task_data.load_task_arrays("offline_image_rgb32_v1", "train")
    with pytest.raises(ValueError, match="no split 'dev'"):
        task_data.load_task_arrays(TASK, "dev")
    with pytest.raises(ValueError, match="max_examples=0"):
        task_data.load_task_arrays(TASK, "train", max_examples=0)


def test_missing_data_propagates(monkeypatch):
    def missing():
        raise tasks.MissingDataError("needs the pip package scikit-image")

    monkeypatch.setattr(image_sources, "load_lfw_faces", missing)
    with pytest.raises(tasks.MissingDataError, match="scikit-image"):
        task_data.load_task_arrays("lfw_faces_rgb32_v1", "test", max_examples=3)


def test_search_task_data():
    data = task_data.search_task_data(
        TASK, eval_batch_size=64, max_train_examples=100, max_eval_examples=70
    )
    assert data.num_classes == 10
    assert data.metadata == {"seqio_task": TASK, "num_classes": 10, "image_shape": [32, 32, 3]}
    assert [len(b["label"]) for b in data.validation_batches] == [64, 64]
    assert sum(int(b["_mask"].sum()) for b in data.validation_batches) == 70
    val_images, _ = task_data.load_task_arrays(TASK, "validation")
    np.testing.assert_array_equal(data.validation_batches[0]["image"], val_images[:64])
    stream = data.train_batches_fn({"flip": False, "brightness": 0.0}, batch_size=16, seed=3)
    batch = next(stream)
    assert batch["image"].shape == (16, 32, 32, 3) and batch["label"].shape == (16,)
    train_images, _ = task_data.load_task_arrays(TASK, "train", max_examples=100)
    # Every row comes from the first 100 train examples.
    flat = train_images.reshape(100, -1)
    for row in batch["image"].reshape(16, -1):
        assert np.any(np.all(flat == row, axis=1))
    replay = next(data.train_batches_fn({}, batch_size=16, seed=3))
    np.testing.assert_array_equal(replay["label"], batch["label"])
