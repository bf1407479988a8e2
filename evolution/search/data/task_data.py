"""Registered seqio image and text tasks as in-memory arrays, and the search's `TaskData`.

The muNet search and the root's pretraining train on small offline data sets held in
memory (evolution/search/data/batches.py), but data still reaches them only by seqio task name
(STYLE.md: data is a seqio task or mixture): `load_task_arrays` reads a registered task
split once per process through `seqio.get_dataset`, unshuffled, so every process and
every run sees the same examples in the same order.

Image tasks give float images under "image" (the ViT's input); text classification
tasks (tasks/offline_text.py) give int32 MiniLM word-piece ids [N, L], 0-padded to the
sequence length, under "inputs" (the text encoder's input).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os

import numpy as np
import seqio

import tasks
from evolution.search.data import batches
from models.feature_converters import (
    ImageClassificationFeatureConverter,
    TextClassificationFeatureConverter,
)
from training import data as data_lib

TASKS_MODULE = "tasks"
_READ_BATCH = 1024
# modality -> the batch feature the search's model reads (`evolution.system.families`).
FEATURES = {"image": "image", "text": "inputs"}
# In a store's folder: the metadata derived from the data of tasks registered with plain
# seqio, so that later runs on the store do not read a task's data again to learn it.
INFO_CACHE_FILE = "task_info.json"
_CACHED_FIELDS = ("modality", "num_classes", "image_shape", "text_max_length", "vocabulary_name")
# task -> metadata read from a store's cache by this process.
_FROM_CACHE: dict[str, tasks.TaskInfo] = {}


def _read_cache(cache_dir: str) -> dict:
    path = os.path.join(cache_dir, INFO_CACHE_FILE)
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return dict(json.load(f))


def _write_cache(cache_dir: str, entries: dict) -> None:
    path = os.path.join(cache_dir, INFO_CACHE_FILE)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(entries, f, indent=1, sort_keys=True)
    os.replace(tmp, path)


def task_info(task_name: str, cache_dir: str | None = None) -> tasks.TaskInfo:
    """What the search needs to know about an image or text classification task.

    The task's own metadata when it has some (`tasks.add_task`, `tasks.set_info`);
    otherwise the metadata cached in `cache_dir`, or, the first time, what `tasks.info`
    derives from the task's data (then written to the cache).

    Args:
      task_name: a seqio task (registered by `import tasks` or a module imported before).
      cache_dir: a store's folder holding `INFO_CACHE_FILE` (None: no cache).

    Returns:
      The task's metadata.

    Raises:
      training.data.UnknownTaskError: no such task (the message lists close names).
      ValueError: a mixture.
      tasks.TaskMetadataError: a task that is neither image nor text classification, or
        whose features or data do not say what the search needs (the message names
        what is missing).
    """
    provider = data_lib.get_mixture_or_task(task_name, TASKS_MODULE)  # UnknownTaskError
    if isinstance(provider, seqio.Mixture):
        raise ValueError(
            f"{task_name!r} is a mixture; the search reads one task at a time: use one of "
            f"{', '.join(task.name for task in provider.tasks)}."
        )
    cached = _read_cache(cache_dir).get(task_name) if cache_dir else None
    if task_name in tasks.registered_names():
        info = tasks.info(task_name)
    else:
        if task_name in _FROM_CACHE:
            info = _FROM_CACHE[task_name]
        elif cached is not None:
            shape = cached.get("image_shape")
            info = tasks.TaskInfo(
                name=task_name,
                **{**cached, "image_shape": tuple(shape) if shape else None},
                splits=tuple(provider.splits),
            )
        else:
            info = tasks.info(task_name)  # reads the task's data once per process
        _FROM_CACHE[task_name] = dataclasses.replace(info, num_examples=None)
        # A store that has not cached it yet gets it, whichever of the above found it.
        if cache_dir and cached is None:
            entries = _read_cache(cache_dir)
            entries[task_name] = {k: getattr(info, k) for k in _CACHED_FIELDS}
            _write_cache(cache_dir, entries)
    if not ((info.modality == "image" and info.image_shape is not None) or info.modality == "text"):
        raise tasks.TaskMetadataError(
            f"{task_name!r} is a {info.modality} task; the search needs an image task "
            "(an 'image' feature [H, W, C] and an integer 'label') or a text "
            "classification task ('inputs' word-piece ids and an integer 'label')."
        )
    if info.num_classes < 1:
        raise tasks.TaskMetadataError(
            f"{task_name!r}: its 'label' feature gives no classes to learn."
        )
    return info


def _task_info(task_name: str) -> tasks.TaskInfo:
    """The metadata of an image or text classification task (`task_info`, no cache)."""
    return task_info(task_name)


def feature_of(task_name: str) -> str:
    """The batch feature a task's examples go under: "image" or "inputs" (text)."""
    return FEATURES[_task_info(task_name).modality]


@functools.cache
def _read_split(
    task_name: str, split: str, max_examples: int | None, sequence_length: int | None
) -> tuple[np.ndarray, np.ndarray]:
    info = _task_info(task_name)
    if split not in info.splits:
        raise ValueError(f"{task_name!r} has no split {split!r}; splits: {list(info.splits)}.")
    feature = FEATURES[info.modality]
    if feature == "image":
        lengths: dict[str, int] = {}
        converter: seqio.FeatureConverter = ImageClassificationFeatureConverter()
        dtype: type = np.float32
    else:
        lengths = {"inputs": int(sequence_length or info.text_max_length or 0)}
        converter = TextClassificationFeatureConverter()
        dtype = np.int32
    dataset = seqio.get_dataset(
        task_name,
        task_feature_lengths=lengths,
        dataset_split=split,
        shuffle=False,
        num_epochs=1,
        feature_converter=converter,
        use_cached=False,
        verbose=False,
    )
    if max_examples is not None:
        dataset = dataset.take(max_examples)
    images: list[np.ndarray] = []
    labels: list[np.ndarray] = []
    for batch in dataset.batch(_READ_BATCH).as_numpy_iterator():
        images.append(np.asarray(batch[feature], dtype))
        labels.append(np.asarray(batch["label"], np.int32))
    if not labels:
        raise ValueError(f"{task_name!r} split {split!r} holds no examples.")
    image_array, label_array = np.concatenate(images), np.concatenate(labels)
    # Shared by every caller of this process: read-only, so no caller can alter another's.
    image_array.setflags(write=False)
    label_array.setflags(write=False)
    return image_array, label_array


def load_task_arrays(
    task_name: str,
    split: str,
    *,
    max_examples: int | None = None,
    sequence_length: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """One split of a registered seqio image or text task as arrays, in the source's order.

    Reads `seqio.get_dataset` (unshuffled, one epoch, the image or text classification
    feature converter) once per (task, split, max_examples, sequence_length) and
    process; later calls return the same arrays.

    Args:
      task_name: a task registered by `import tasks`, e.g. "digits_rgb32_v1" or
        "sms_spam_v1".
      split: "train", "validation" or "test".
      max_examples: keep only the first this many examples (None: all).
      sequence_length: text tasks only: token ids per example ([CLS] and [SEP]
        included, 0-padded; None: the task's `text_max_length`). Ignored for images.

    Returns:
      (images float32 [N, H, W, C], labels int32 [N]) for an image task, (token ids
      int32 [N, L], labels int32 [N]) for a text task; read-only (copy to modify).

    Raises:
      training.data.UnknownTaskError: no task of that name (a ValueError; the message
        lists close names).
      tasks.MissingDataError: the task's data is not on this machine (the message says
        what to install).
      ValueError: a mixture, a task neither image nor text classification, an unknown
        split, an empty split, or a sequence length below 2.
    """
    if max_examples is not None and int(max_examples) < 1:
        raise ValueError(f"max_examples={max_examples} must be >= 1 (or None for all).")
    if sequence_length is not None and int(sequence_length) < 2:
        raise ValueError(f"sequence_length={sequence_length} must be >= 2 ([CLS] and [SEP]).")
    length = (
        None if sequence_length is None or feature_of(task_name) == "image" else sequence_length
    )
    return _read_split(
        task_name,
        split,
        None if max_examples is None else int(max_examples),
        None if length is None else int(length),
    )


def check_task(task_name: str) -> None:
    """Refuses a name that is not a registered image or text classification task.

    Args:
      task_name: the task's registered name.

    Raises:
      training.data.UnknownTaskError: no task of that name (the message lists close names).
      ValueError: a mixture, or a task of another modality.
    """
    _task_info(task_name)


def search_task_data(
    task_name: str,
    *,
    eval_batch_size: int,
    max_train_examples: int | None = None,
    max_eval_examples: int | None = None,
    validation_split: str = "validation",
    sequence_length: int | None = None,
    cache_dir: str | None = None,
) -> batches.TaskData:
    """What `search.evolve_task` / `evolve_round_robin` need for one seqio task.

    Args:
      task_name: a registered image or text task, e.g. "digits_rgb32_v1", "trec6_v1".
      eval_batch_size: rows per validation batch (the last batch is padded and masked).
      max_train_examples: use only the first this many train examples (None: all).
      max_eval_examples: use only the first this many validation examples (None: all).
      validation_split: the split candidates are scored on.
      sequence_length: text tasks: token ids per example (see `load_task_arrays`).
      cache_dir: a store's folder caching metadata derived from data (`task_info`).

    Returns:
      TaskData: shuffled, augmentable train batches (`batches.array_train_batches`),
      fixed validation batches (`batches.array_eval_batches`), under "image" or
      "inputs" (`feature_of`), the task's class count (`task_info`), and metadata
      {"seqio_task", "num_classes", "image_shape"} ("sequence_length" for text).

    Raises:
      As `load_task_arrays`.
    """
    info = task_info(task_name, cache_dir)
    feature = FEATURES[info.modality]
    train_inputs, train_labels = load_task_arrays(
        task_name, "train", max_examples=max_train_examples, sequence_length=sequence_length
    )
    eval_inputs, eval_labels = load_task_arrays(
        task_name, validation_split, max_examples=max_eval_examples, sequence_length=sequence_length
    )
    shape_key = "image_shape" if feature == "image" else "sequence_length"
    shape = [int(v) for v in train_inputs.shape[1:]]
    return batches.TaskData(
        train_batches_fn=batches.array_train_batches(train_inputs, train_labels, feature=feature),
        validation_batches=batches.array_eval_batches(
            eval_inputs, eval_labels, eval_batch_size, feature=feature
        ),
        num_classes=int(info.num_classes),
        metadata={
            "seqio_task": task_name,
            "num_classes": int(info.num_classes),
            shape_key: shape if feature == "image" else shape[0],
        },
    )
