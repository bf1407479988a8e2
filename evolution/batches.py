"""Training and validation batches for the search, built from in-memory arrays.

`TrainBatchesFn` is what a candidate's training stream comes from (the generation's
data hyperparameters decide augmentation); `array_train_batches` implements it over
arrays, `array_eval_batches` makes fixed-shape, masked validation batches.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any, Protocol

import numpy as np

Batch = Mapping[str, Any]


class TrainBatchesFn(Protocol):
    """Makes a candidate's training stream for its generation's data hyperparameters."""

    def __call__(
        self, data_values: Mapping[str, Any], *, batch_size: int, seed: int
    ) -> Iterator[Batch]:
        """Returns an endless iterator of {"image" [B, H, W, C] float, "label" [B] int}.

        Args:
          data_values: the generation's data hyperparameter values (e.g. "flip",
            "brightness"), resolved from the search space.
          batch_size: rows per batch.
          seed: the candidate's data seed (shuffling and augmentation).
        """
        ...


def array_train_batches(images: np.ndarray, labels: np.ndarray) -> TrainBatchesFn:
    """A `TrainBatchesFn` over in-memory arrays: shuffled epochs plus flip and brightness.

    Each epoch is a fresh permutation from the candidate's seed; "flip" flips each image
    left-right with probability 1/2, "brightness" adds a uniform offset in
    [-delta, delta] per image. Other data hyperparameters are ignored (the default
    space pins them to no-ops).

    Args:
      images: [N, H, W, C] float images.
      labels: [N] integer labels.

    Returns:
      The function.
    """
    images = np.asarray(images, np.float32)
    labels = np.asarray(labels, np.int32)
    if len(images) != len(labels) or not len(labels):
        raise ValueError(f"{len(images)} images and {len(labels)} labels: need equal, > 0.")

    def make(data_values: Mapping[str, Any], *, batch_size: int, seed: int) -> Iterator[Batch]:
        flip = bool(data_values.get("flip", False))
        brightness = float(data_values.get("brightness", 0.0))
        rng = np.random.default_rng(seed)

        def stream() -> Iterator[Batch]:
            order = np.empty(0, np.int64)
            while True:
                while len(order) < batch_size:
                    order = np.concatenate([order, rng.permutation(len(labels))])
                take, order = order[:batch_size], order[batch_size:]
                batch = images[take]
                if flip:
                    flips = rng.random(batch_size) < 0.5
                    batch = np.where(flips[:, None, None, None], batch[:, :, ::-1], batch)
                if brightness:
                    batch = batch + rng.uniform(-brightness, brightness, (batch_size, 1, 1, 1))
                yield {"image": batch.astype(np.float32), "label": labels[take]}

        return stream()

    return make


def array_eval_batches(
    images: np.ndarray, labels: np.ndarray, batch_size: int
) -> list[dict[str, np.ndarray]]:
    """Fixed-shape evaluation batches; the last is zero-padded with `_mask` 0 rows.

    Args:
      images: [N, H, W, C] float images.
      labels: [N] integer labels.
      batch_size: rows per batch.

    Returns:
      Batches with "image", "label" and "_mask".
    """
    images = np.asarray(images, np.float32)
    labels = np.asarray(labels, np.int32)
    batches = []
    for begin in range(0, len(labels), batch_size):
        real = len(labels[begin : begin + batch_size])
        pad = batch_size - real
        batches.append(
            {
                "image": np.concatenate(
                    [images[begin : begin + real], np.zeros((pad, *images.shape[1:]), np.float32)]
                ),
                "label": np.concatenate([labels[begin : begin + real], np.zeros(pad, np.int32)]),
                "_mask": np.concatenate([np.ones(real, np.int32), np.zeros(pad, np.int32)]),
            }
        )
    return batches
