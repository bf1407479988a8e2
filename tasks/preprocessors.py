"""seqio preprocessors shared by the task registrations (pure tf.data maps)."""

from __future__ import annotations

import functools
from collections.abc import Mapping

import seqio
import tensorflow as tf

from tasks.vocabularies import MINILM_VOCABULARY

AUTOTUNE = tf.data.AUTOTUNE


def image_to_float(image: tf.Tensor) -> tf.Tensor:
    """uint8 [0, 255] or bool -> float32 [0, 1]; float images pass through as float32."""
    if image.dtype == tf.uint8:
        return tf.cast(image, tf.float32) / 255.0
    return tf.cast(image, tf.float32)


def resize_image(image: tf.Tensor, size: tuple[int, int], channels: int) -> tf.Tensor:
    """Resizes a float [H, W, C] image to `size` (bilinear, antialiased), with `channels`.

    Grey images are repeated to three channels; RGB images are averaged to one channel.
    """
    image = tf.image.resize(image, size, method="bilinear", antialias=True)
    image = tf.clip_by_value(image, 0.0, 1.0)
    have = image.shape[-1]
    if have == channels:
        return image
    if have == 1:
        return tf.tile(image, [1, 1, channels])
    if channels == 1:
        return tf.reduce_mean(image, axis=-1, keepdims=True)
    raise ValueError(f"cannot turn {have} channels into {channels}")


def scale_image(dataset: tf.data.Dataset) -> tf.data.Dataset:
    """Maps `image` to float32 in [0, 1] and `label` to int32."""

    def fn(ex):
        return {"image": image_to_float(ex["image"]), "label": tf.cast(ex["label"], tf.int32)}

    return dataset.map(fn, num_parallel_calls=AUTOTUNE)


def resize_images(
    dataset: tf.data.Dataset, *, size: tuple[int, int], channels: int
) -> tf.data.Dataset:
    """Resizes float `image` features to `size` x `channels` (see `resize_image`)."""

    def fn(ex):
        return {**ex, "image": resize_image(ex["image"], size, channels)}

    return dataset.map(fn, num_parallel_calls=AUTOTUNE)


def add_task_id(dataset: tf.data.Dataset, *, task_id: int) -> tf.data.Dataset:
    """Adds the constant int32 feature `task_id` (the task's index in its mixture)."""
    return dataset.map(lambda ex: {**ex, "task_id": tf.constant(task_id, tf.int32)})


def tokenize_for_classification(
    dataset: tf.data.Dataset,
    sequence_length: Mapping[str, int] | None = None,
    *,
    max_length: int,
) -> tf.data.Dataset:
    """Turns {"text", "label"} into {"inputs": [CLS] word pieces [SEP], "label"}.

    Word pieces are cut so that `inputs` has at most sequence_length["inputs"] ids
    (or `max_length` when no sequence length is given); [SEP] is always kept.
    """
    length = (sequence_length or {}).get("inputs") or max_length
    cls_sep = MINILM_VOCABULARY.cls_id, MINILM_VOCABULARY.eos_id

    def fn(ex):
        pieces = MINILM_VOCABULARY.encode_tf(ex["text"])[: length - 2]
        inputs = tf.concat([[cls_sep[0]], tf.cast(pieces, tf.int32), [cls_sep[1]]], axis=0)
        return {"inputs": inputs, "label": tf.cast(ex["label"], tf.int32)}

    return dataset.map(fn, num_parallel_calls=AUTOTUNE)


def split_targets(
    dataset: tf.data.Dataset,
    sequence_length: Mapping[str, int] | None = None,
    *,
    max_length: int,
) -> tf.data.Dataset:
    """Cuts tokenized `targets` into consecutive pieces that leave room for EOS.

    Pieces have sequence_length["targets"] - 1 tokens (or `max_length` - 1), the last one
    possibly fewer, so that `append_eos_after_trim` then drops nothing.
    """
    length = (sequence_length or {}).get("targets") or max_length
    piece = max(length - 1, 1)

    def fn(ex):
        tokens = ex["targets"]
        n = tf.size(tokens, out_type=tf.int64)
        num_full = n // piece
        rest = n - num_full * piece
        last = tf.reshape(rest, [1])
        lengths = tf.concat(
            [tf.fill([num_full], tf.cast(piece, tf.int64)), tf.boolean_mask(last, last > 0)], 0
        )
        pieces = tf.RaggedTensor.from_row_lengths(tokens, lengths)
        return tf.data.Dataset.from_tensor_slices({"targets": pieces})

    return dataset.flat_map(fn).map(lambda ex: {"targets": ex["targets"]})


def lm_preprocessors(max_length: int) -> list:
    """The preprocessors of a byte-level decoder-only language-modelling task."""
    return [
        functools.partial(seqio.preprocessors.tokenize, copy_pretokenized=False),
        functools.partial(split_targets, max_length=max_length),
        seqio.preprocessors.append_eos_after_trim,
    ]
