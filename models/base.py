"""The t5x model contract: `BaseModel` is t5x's own class when t5x is importable.

evogrow runs without t5x (it is not on PyPI), so this module falls back to an abstract
class with the same constructor and method signatures (t5x/models.py `BaseModel`). Our
wrappers subclass whichever is available, so under t5x they are genuine t5x models.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping
from typing import Any

import jax

try:  # t5x is optional: see docs/usage.md, "Using t5x".
    from t5x import models as _t5x_models
except ImportError:  # pragma: no cover - depends on the environment
    _t5x_models = None

T5X_AVAILABLE = _t5x_models is not None

if _t5x_models is not None:
    BaseModel = _t5x_models.BaseModel
else:

    class BaseModel(abc.ABC):  # type: ignore[no-redef]
        """Abstract model with t5x's BaseModel surface (used when t5x is absent).

        Attributes:
          FEATURE_CONVERTER_CLS: the seqio FeatureConverter class the model consumes.
          optimizer_def: the optimizer (an optax GradientTransformation here; a t5x
            OptimizerDef under t5x).
        """

        FEATURE_CONVERTER_CLS: Any

        def __init__(self, optimizer_def: Any):
            self.optimizer_def = optimizer_def

        @abc.abstractmethod
        def loss_fn(self, params, batch: Mapping[str, jax.Array], dropout_rng):
            """Computes the training loss.

            Args:
              params: model parameters.
              batch: features from FEATURE_CONVERTER_CLS.
              dropout_rng: PRNG key for dropout, or None for a deterministic pass.

            Returns:
              (scalar loss, dict of clu metrics).
            """

        def eval_fn(self, params, batch: Mapping[str, jax.Array]):
            """Deterministic loss and metrics (no dropout).

            Args:
              params: model parameters.
              batch: features from FEATURE_CONVERTER_CLS.

            Returns:
              (scalar loss, dict of clu metrics), as loss_fn with dropout_rng=None.
            """
            return self.loss_fn(params, batch, dropout_rng=None)

        def predict_batch(self, params, batch: Mapping[str, jax.Array], rng=None):
            """Predictions for a batch.

            Args:
              params: model parameters.
              batch: features from FEATURE_CONVERTER_CLS.
              rng: PRNG key for sampling decoders, or None.

            Returns:
              The first output of predict_batch_with_aux.
            """
            return self.predict_batch_with_aux(params, batch, rng=rng)[0]

        @abc.abstractmethod
        def predict_batch_with_aux(self, params, batch: Mapping[str, jax.Array], rng=None):
            """Predictions with auxiliary outputs.

            Args:
              params: model parameters.
              batch: features from FEATURE_CONVERTER_CLS.
              rng: PRNG key for sampling decoders, or None.

            Returns:
              (predictions, dict of auxiliary outputs such as scores).
            """

        @abc.abstractmethod
        def score_batch(
            self, params, batch: Mapping[str, jax.Array], return_intermediates: bool = False
        ):
            """Scores each example.

            Args:
              params: model parameters.
              batch: features from FEATURE_CONVERTER_CLS, targets included.
              return_intermediates: also return intermediate activations.

            Returns:
              One score (log-likelihood) per example [B].
            """

        @abc.abstractmethod
        def get_initial_variables(self, rng, input_shapes, input_types=None):
            """Initialises the model.

            Args:
              rng: PRNG key.
              input_shapes: feature name -> shape (batch first).
              input_types: feature name -> dtype, optional.

            Returns:
              Variables {'params': ...} for inputs of these shapes.
            """
