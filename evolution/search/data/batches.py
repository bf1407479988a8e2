"""Training and validation batches for the search, built from in-memory arrays.

`TrainBatchesFn` is what a candidate's training stream comes from (the generation's
data hyperparameters decide augmentation); `array_train_batches` implements it over
arrays, `array_eval_batches` makes fixed-shape, masked validation batches, and `TaskData`
holds a task's training stream and validation batches for the search. Batches carry
the model family's input feature (`evolution.system.families`): "image" (float images, the
default) or "inputs" (int32 token ids of the text encoder, 0 = padding, never
augmented).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Protocol

import numpy as np

from evolution.search.data import augment

Batch = Mapping[str, Any]


class TrainBatchesFn(Protocol):
    """Makes a candidate's training stream for its generation's data hyperparameters."""

    def __call__(
        self, data_values: Mapping[str, Any], *, batch_size: int, seed: int
    ) -> Iterator[Batch]:
        """Returns an endless iterator of {"image" [B, H, W, C] float, "label" [B] int}.

        A text task's batches carry "inputs" [B, L] int32 token ids instead of "image"
        (the model family's input feature).

        Args:
          data_values: the generation's data hyperparameter values (e.g. "flip",
            "brightness"), resolved from the search space.
          batch_size: rows per batch.
          seed: the candidate's data seed (shuffling and augmentation).
        """
        ...


def array_train_batches(
    images: np.ndarray, labels: np.ndarray, *, feature: str = "image"
) -> TrainBatchesFn:
    """A `TrainBatchesFn` over in-memory arrays: shuffled epochs, augmented.

    Each epoch is a fresh permutation from the candidate's seed; each batch is then
    augmented by `augment.augment_batch` (crop, flip, brightness, contrast, saturation,
    hue, from the same generator). Other data hyperparameters are ignored (the image
    size is the path's resolution, applied by the model). Features other than "image"
    (token ids) keep their dtype and are never augmented.

    Args:
      images: [N, H, W, C] float images (or [N, L] int token ids for "inputs").
      labels: [N] integer labels.
      feature: the batch key of `images` (the family's input feature).

    Returns:
      The function.
    """
    if feature != "image":
        return _plain_train_batches(feature, np.asarray(images), labels)
    images = np.asarray(images, np.float32)
    labels = np.asarray(labels, np.int32)
    if len(images) != len(labels) or not len(labels):
        raise ValueError(f"{len(images)} images and {len(labels)} labels: need equal, > 0.")

    def make(data_values: Mapping[str, Any], *, batch_size: int, seed: int) -> Iterator[Batch]:
        augment.check_values(data_values)
        rng = np.random.default_rng(seed)

        def stream() -> Iterator[Batch]:
            for take in _shuffled_epochs(len(labels), batch_size, rng):
                batch = augment.augment_batch(images[take], data_values, rng)
                yield {"image": batch, "label": labels[take]}

        return stream()

    return make


def _plain_train_batches(feature: str, inputs: np.ndarray, labels: np.ndarray) -> TrainBatchesFn:
    """`array_train_batches` without augmentation: shuffled epochs of `inputs` as they are."""
    labels = np.asarray(labels, np.int32)
    if len(inputs) != len(labels) or not len(labels):
        raise ValueError(f"{len(inputs)} inputs and {len(labels)} labels: need equal, > 0.")

    def make(data_values: Mapping[str, Any], *, batch_size: int, seed: int) -> Iterator[Batch]:
        del data_values  # the augmentations are image augmentations
        rng = np.random.default_rng(seed)

        def stream() -> Iterator[Batch]:
            for take in _shuffled_epochs(len(labels), batch_size, rng):
                yield {feature: inputs[take], "label": labels[take]}

        return stream()

    return make


def _shuffled_epochs(size: int, batch_size: int, rng: np.random.Generator) -> Iterator[np.ndarray]:
    """Endless batches of indices into `size` rows: shuffled epochs, a batch may span two.

    Each epoch's permutation is drawn lazily, when the indices left run short, so draws
    a caller makes from `rng` between batches (augmentation) interleave with it as they
    would if the loop were inline.
    """
    order = np.empty(0, np.int64)
    while True:
        while len(order) < batch_size:
            order = np.concatenate([order, rng.permutation(size)])
        take, order = order[:batch_size], order[batch_size:]
        yield take


def array_eval_batches(
    images: np.ndarray, labels: np.ndarray, batch_size: int, *, feature: str = "image"
) -> list[dict[str, np.ndarray]]:
    """Fixed-shape evaluation batches; the last is zero-padded with `_mask` 0 rows.

    Args:
      images: [N, H, W, C] float images (or [N, L] int token ids for "inputs").
      labels: [N] integer labels.
      batch_size: rows per batch.
      feature: the batch key of `images`; only "image" is cast to float32, other
        features keep their dtype (padding rows are zeros: all-padding token rows).

    Returns:
      Batches with `feature`, "label" and "_mask".
    """
    images = np.asarray(images, np.float32) if feature == "image" else np.asarray(images)
    labels = np.asarray(labels, np.int32)
    batches = []
    for begin in range(0, len(labels), batch_size):
        real = len(labels[begin : begin + batch_size])
        pad = batch_size - real
        batches.append(
            {
                feature: np.concatenate(
                    [images[begin : begin + real], np.zeros((pad, *images.shape[1:]), images.dtype)]
                ),
                "label": np.concatenate([labels[begin : begin + real], np.zeros(pad, np.int32)]),
                "_mask": np.concatenate([np.ones(real, np.int32), np.zeros(pad, np.int32)]),
            }
        )
    return batches


@dataclasses.dataclass(frozen=True)
class TaskData:
    """What `evolve_round_robin` needs to iterate one task.

    Attributes:
      train_batches_fn: makes each candidate's training stream.
      validation_batches: the fixed validation batches.
      num_classes: classes of the task's head when it is new (None: inferred).
      metadata: JSON-safe facts stored with a new task.
    """

    train_batches_fn: TrainBatchesFn
    validation_batches: Sequence[Batch]
    num_classes: int | None = None
    metadata: Mapping[str, Any] | None = None
