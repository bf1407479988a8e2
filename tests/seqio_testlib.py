"""Registers the in-memory image tasks of the system tests as seqio tasks (test split only)."""

import functools
from collections.abc import Callable, Mapping

import numpy as np
import seqio
import tensorflow as tf

Arrays = Callable[[str], tuple[np.ndarray, np.ndarray]]


def _dataset(split, shuffle_files=False, seed=None, *, task, arrays, task_id):
    del split, shuffle_files, seed
    images, labels = arrays(task)
    ids = np.full(len(labels), task_id, np.int32)
    return tf.data.Dataset.from_tensor_slices({"image": images, "label": labels, "task_id": ids})


def register_image_tasks(arrays: Arrays, task_ids: Mapping[str, int]) -> None:
    """Adds each task of `task_ids` (once) with `arrays(task)` as its test split.

    Examples carry `image`, `label` and the task's `task_id`, as the system model's
    mixtures expect.
    """
    feature = seqio.PassThroughVocabulary(0)
    for task, task_id in task_ids.items():
        if task in seqio.TaskRegistry.names():
            continue
        seqio.TaskRegistry.add(
            task,
            source=seqio.FunctionDataSource(
                functools.partial(_dataset, task=task, arrays=arrays, task_id=task_id),
                splits=("test",),
            ),
            output_features={
                "image": seqio.Feature(feature, dtype=tf.float32, rank=3),
                "label": seqio.Feature(feature, dtype=tf.int32, rank=0),
                "task_id": seqio.Feature(feature, dtype=tf.int32, rank=0),
            },
            preprocessors=[],
            metric_fns=[],
        )
