"""Classification models with the t5x contract: images (ViT, routed paths) and text (encoder).

A wrapper owns a Linen module mapping the input feature (and, for routed multitask
modules, the `task_id` feature) to logits, and implements loss_fn / predict_batch /
score_batch / get_initial_variables as t5x's BaseModel specifies, so our trainer and
t5x's binaries drive it the same way.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import clu.metrics as clu_metrics
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from models import base, feature_converters

Batch = Mapping[str, jax.Array]


class ClassifierModel(base.BaseModel):
    """A t5x-contract classifier around a module `(inputs[, task_id], deterministic) -> logits`.

    Attributes:
      module: the Linen module; its `config` attribute (if any) is the architecture.
      optimizer_def: optimizer (optax GradientTransformation, or t5x's under t5x).
      input_feature: the batch key holding the model input.
      route_feature: batch key passed as `task_id` to routed modules, or None.
      label_smoothing: label smoothing of the training loss.
    """

    FEATURE_CONVERTER_CLS: Any = None
    INPUT_FEATURE = "image"
    INPUT_DTYPE = jnp.float32

    def __init__(
        self,
        module: nn.Module,
        optimizer_def: Any = None,
        *,
        route_feature: str | None = None,
        label_smoothing: float = 0.0,
    ):
        super().__init__(optimizer_def=optimizer_def)
        self.module = module
        self.input_feature = self.INPUT_FEATURE
        self.route_feature = route_feature
        self.label_smoothing = label_smoothing

    def _logits(self, params, batch: Batch, dropout_rng=None) -> jax.Array:
        args = [batch[self.input_feature]]
        if self.route_feature is not None:
            args.append(batch[self.route_feature])
        rngs = {"dropout": dropout_rng} if dropout_rng is not None else None
        logits: jax.Array = self.module.apply(  # type: ignore[assignment]
            {"params": params}, *args, deterministic=dropout_rng is None, rngs=rngs
        )
        return logits.astype(jnp.float32)

    def loss_fn(self, params, batch: Batch, dropout_rng) -> tuple[jax.Array, dict[str, Any]]:
        """Mean softmax cross-entropy and clu metrics (loss, accuracy).

        Args:
          params: model parameters (unboxed).
          batch: features incl. `label` int32 [B].
          dropout_rng: PRNG key for dropout, or None for a deterministic pass.

        Returns:
          (scalar loss, {'loss': Average, 'accuracy': Accuracy}).
        """
        logits = self._logits(params, batch, dropout_rng)
        labels = batch["label"].astype(jnp.int32)
        targets = jax.nn.one_hot(labels, logits.shape[-1])
        if self.label_smoothing:
            targets = optax.smooth_labels(targets, self.label_smoothing)
        per_example = optax.softmax_cross_entropy(logits, targets)
        correct = (jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32)
        # clu's Average and Accuracy of the batch, with both sums in one reduction (a
        # kernel less per device and step than clu's from_model_output, which sums each).
        loss_sum, correct_sum = jnp.sum(jnp.stack([per_example, correct]).reshape(2, -1), axis=1)
        count = jnp.int32(labels.size)
        metrics = {
            "loss": clu_metrics.Average(total=loss_sum, count=count),
            "accuracy": clu_metrics.Accuracy(total=correct_sum, count=count),
        }
        return jnp.mean(per_example), metrics

    def predict_batch_with_aux(self, params, batch: Batch, rng=None):
        """Predicts a class for each example.

        Args:
          params: model parameters (unboxed).
          batch: features; `label` is not needed.
          rng: unused (classification is deterministic).

        Returns:
          (class ids int32 [B], {'logits': [B, K], 'scores': log-prob of the prediction}).
        """
        del rng  # classification is deterministic
        logits = self._logits(params, batch)
        log_probs = jax.nn.log_softmax(logits)
        predictions = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        scores = jnp.take_along_axis(log_probs, predictions[:, None], axis=-1)[:, 0]
        return predictions, {"logits": logits, "scores": scores}

    def score_batch(self, params, batch: Batch, return_intermediates: bool = False):
        """Scores the labels.

        Args:
          params: model parameters (unboxed).
          batch: features incl. `label` int32 [B].
          return_intermediates: unsupported (raises NotImplementedError).

        Returns:
          Log-probability of each example's `label` [B].
        """
        if return_intermediates:
            raise NotImplementedError("Classifiers have no intermediates to return.")
        log_probs = jax.nn.log_softmax(self._logits(params, batch))
        labels = batch["label"].astype(jnp.int32)
        return jnp.take_along_axis(log_probs, labels[:, None], axis=-1)[:, 0]

    def get_initial_variables(self, rng, input_shapes, input_types=None):
        """Initial variables {'params': boxed with logical axis names}.

        Args:
          rng: PRNG key.
          input_shapes: feature -> shape, batch first (extra features are ignored).
          input_types: feature -> dtype, optional.

        Returns:
          The module's variables from `init`.
        """
        input_types = input_types or {}
        if self.input_feature not in input_shapes:
            raise KeyError(
                f"input_shapes lacks '{self.input_feature}': got {sorted(input_shapes)}."
            )
        shape = tuple(input_shapes[self.input_feature])
        args = [jnp.zeros(shape, input_types.get(self.input_feature, self.INPUT_DTYPE))]
        if self.route_feature is not None:
            args.append(jnp.zeros(shape[:1], jnp.int32))
        return self.module.init({"params": rng, "dropout": rng}, *args, deterministic=True)


class ImageClassifierModel(ClassifierModel):
    """Image classification: batch `image` float32 [B, H, W, C], `label` int32 [B]."""

    FEATURE_CONVERTER_CLS = feature_converters.ImageClassificationFeatureConverter
    INPUT_FEATURE = "image"
    INPUT_DTYPE = jnp.float32


class TextClassifierModel(ClassifierModel):
    """Text classification: batch `inputs` int32 [B, L] (0 = padding), `label` int32 [B]."""

    FEATURE_CONVERTER_CLS = feature_converters.TextClassificationFeatureConverter
    INPUT_FEATURE = "inputs"
    INPUT_DTYPE = jnp.int32
