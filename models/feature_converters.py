"""seqio feature converters for classification: task features pass through to the model.

Image features have no length to pad, so `task_feature_lengths` may omit them (t5x
passes {} when TASK_FEATURE_LENGTHS is None); text `inputs` are padded or trimmed to the
length given. A `task_id` feature (multitask mixtures) passes through when present.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import seqio
import tensorflow as tf

Spec: Any = seqio.FeatureConverter.FeatureSpec
OPTIONAL_FEATURES = ("task_id",)


class _ClassificationFeatureConverter(seqio.FeatureConverter):
    """Keeps the model features of each example; packing does not apply."""

    TASK_FEATURES: Mapping[str, Any] = {}
    MODEL_FEATURES: Mapping[str, Any] = {}
    PACKING_FEATURE_DTYPE = None
    LENGTH_FEATURES: tuple[str, ...] = ()

    def __init__(self, pack: bool = False, **kwargs):
        if pack:
            raise ValueError(
                f"{type(self).__name__}: packing does not apply to classification; "
                "set pack=False in the dataset config."
            )
        super().__init__(pack=False, **kwargs)

    def __call__(self, ds: tf.data.Dataset, task_feature_lengths: Mapping[str, int] | None):
        """Validates the features and converts the dataset (lengths only for token features)."""
        lengths = dict(task_feature_lengths or {})
        for key in self.LENGTH_FEATURES:
            if key not in lengths:
                raise ValueError(
                    f"{type(self).__name__} needs a length for '{key}' "
                    f"(TASK_FEATURE_LENGTHS = {{'{key}': N}})."
                )
        for key, spec in self.TASK_FEATURES.items():
            if key not in ds.element_spec:
                raise ValueError(
                    f"Dataset lacks feature '{key}'; it has {sorted(ds.element_spec)}."
                )
            if ds.element_spec[key].dtype != spec.dtype:
                raise ValueError(
                    f"Feature '{key}' has dtype {ds.element_spec[key].dtype}; "
                    f"expected {spec.dtype}."
                )
        return self._convert_features(ds, lengths)

    def _convert_features(self, ds: tf.data.Dataset, task_feature_lengths: Mapping[str, int]):
        keep = list(self.MODEL_FEATURES) + [k for k in OPTIONAL_FEATURES if k in ds.element_spec]

        def convert(ex):
            out = {key: ex[key] for key in keep}
            for key in self.LENGTH_FEATURES:
                length = task_feature_lengths[key]
                tokens = out[key][:length]
                out[key] = tf.pad(tokens, [[0, length - tf.shape(tokens)[0]]])
                out[key].set_shape([length])
            if "task_id" in out:
                out["task_id"] = tf.cast(out["task_id"], tf.int32)
            return out

        return ds.map(convert, num_parallel_calls=tf.data.AUTOTUNE)

    def get_model_feature_lengths(self, task_feature_lengths: Mapping[str, int]) -> dict[str, int]:
        """Lengths of the model features.

        Args:
          task_feature_lengths: feature name -> length, as given to the converter.

        Returns:
          Token features keep their task lengths; images have none.
        """
        return {key: task_feature_lengths[key] for key in self.LENGTH_FEATURES}


class ImageClassificationFeatureConverter(_ClassificationFeatureConverter):
    """`image` float32 [H, W, C] and `label` int32 (+ `task_id`) pass through."""

    TASK_FEATURES = {"image": Spec(dtype=tf.float32, rank=3), "label": Spec(dtype=tf.int32, rank=0)}
    MODEL_FEATURES = TASK_FEATURES


class TextClassificationFeatureConverter(_ClassificationFeatureConverter):
    """`inputs` int32 [L] padded to its length, and `label` int32 (+ `task_id`)."""

    TASK_FEATURES = {"inputs": Spec(dtype=tf.int32), "label": Spec(dtype=tf.int32, rank=0)}
    MODEL_FEATURES = TASK_FEATURES
    LENGTH_FEATURES = ("inputs",)
