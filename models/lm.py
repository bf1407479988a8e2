"""Decoder-only language model with the t5x contract (seqio DecoderFeatureConverter batches)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import clu.metrics as clu_metrics
import jax
import jax.numpy as jnp
import optax
import seqio

from models import base
from models.decoder import Decoder

Batch = Mapping[str, jax.Array]


class DecoderOnlyLMModel(base.BaseModel):
    """Next-token prediction on `decoder_input_tokens` -> `decoder_target_tokens`.

    Attributes:
      module: a `models.decoder.Decoder`.
      optimizer_def: optimizer (optax GradientTransformation, or t5x's under t5x).
      z_loss: coefficient of the log-partition penalty (T5's z-loss), 0 disables.
    """

    FEATURE_CONVERTER_CLS = seqio.DecoderFeatureConverter

    def __init__(self, module: Decoder, optimizer_def: Any = None, *, z_loss: float = 0.0):
        super().__init__(optimizer_def=optimizer_def)
        self.module = module
        self.z_loss = z_loss

    def _logits(self, params, batch: Batch, dropout_rng=None) -> jax.Array:
        rngs = {"dropout": dropout_rng} if dropout_rng is not None else None
        return self.module.apply(  # type: ignore[return-value]
            {"params": params},
            batch["decoder_input_tokens"],
            batch.get("decoder_segment_ids"),
            batch.get("decoder_positions"),
            deterministic=dropout_rng is None,
            rngs=rngs,
        )

    def _token_log_likelihood(self, logits: jax.Array, targets: jax.Array) -> jax.Array:
        return -optax.softmax_cross_entropy_with_integer_labels(logits, targets)

    def loss_fn(self, params, batch: Batch, dropout_rng) -> tuple[jax.Array, dict[str, Any]]:
        """Weighted mean token cross-entropy (+ z-loss) and clu metrics.

        Args:
          params: model parameters (unboxed).
          batch: decoder features; `decoder_loss_weights` masks padding.
          dropout_rng: PRNG key for dropout, or None for a deterministic pass.

        Returns:
          (scalar loss, {'loss': Average per token, 'accuracy': token Accuracy}).
        """
        logits = self._logits(params, batch, dropout_rng)
        targets = batch["decoder_target_tokens"]
        weights = batch.get("decoder_loss_weights", (targets > 0).astype(jnp.float32))
        weights = weights.astype(jnp.float32)
        per_token = -self._token_log_likelihood(logits, targets)
        if self.z_loss:
            per_token = per_token + self.z_loss * jnp.square(jax.nn.logsumexp(logits, axis=-1))
        loss = jnp.sum(per_token * weights) / jnp.maximum(jnp.sum(weights), 1.0)
        mask = weights > 0
        metrics = {
            "loss": clu_metrics.Average.from_model_output(per_token, mask=mask),
            "accuracy": clu_metrics.Accuracy.from_model_output(
                logits=logits, labels=targets, mask=mask
            ),
        }
        return loss, metrics

    def score_batch(self, params, batch: Batch, return_intermediates: bool = False):
        """Scores the target sequences.

        Args:
          params: model parameters (unboxed).
          batch: decoder features; `decoder_loss_weights` selects the scored tokens.
          return_intermediates: unsupported (raises NotImplementedError).

        Returns:
          Sum of weighted target-token log-likelihoods per sequence [B].
        """
        if return_intermediates:
            raise NotImplementedError("DecoderOnlyLMModel returns no intermediates.")
        logits = self._logits(params, batch)
        targets = batch["decoder_target_tokens"]
        weights = batch.get("decoder_loss_weights", (targets > 0).astype(jnp.float32))
        return jnp.sum(self._token_log_likelihood(logits, targets) * weights, axis=-1)

    def predict_batch_with_aux(self, params, batch: Batch, rng=None):
        """Greedy decoding from BOS for the batch's length (no cache: for small models).

        Args:
          params: model parameters.
          batch: needs `decoder_input_tokens` [B, L] (only its shape is used).
          rng: unused (greedy).

        Returns:
          (tokens [B, L] int32, {'scores': sum of the chosen tokens' log-probabilities}).
        """
        del rng
        shape = batch["decoder_input_tokens"].shape

        def step(i, state):
            tokens, scores = state
            inputs = jnp.pad(tokens[:, :-1], ((0, 0), (1, 0)))  # BOS = 0, then shifted outputs
            logits = self._logits(params, {"decoder_input_tokens": inputs})[:, i]
            log_probs = jax.nn.log_softmax(logits)
            choice = jnp.argmax(logits, axis=-1).astype(jnp.int32)
            tokens = tokens.at[:, i].set(choice)
            return tokens, scores + jnp.take_along_axis(log_probs, choice[:, None], -1)[:, 0]

        init = (jnp.zeros(shape, jnp.int32), jnp.zeros(shape[:1], jnp.float32))
        tokens, scores = jax.lax.fori_loop(0, shape[1], step, init)
        return tokens, {"scores": scores}

    def get_initial_variables(self, rng, input_shapes, input_types=None):
        """Initial variables {'params': boxed with logical axis names}.

        Args:
          rng: PRNG key.
          input_shapes: needs `decoder_input_tokens` (batch first); others ignored.
          input_types: unused (tokens are int32).

        Returns:
          The module's variables from `init`.
        """
        del input_types
        if "decoder_input_tokens" not in input_shapes:
            raise KeyError(
                f"input_shapes lacks 'decoder_input_tokens': got {sorted(input_shapes)}."
            )
        tokens = jnp.zeros(tuple(input_shapes["decoder_input_tokens"]), jnp.int32)
        return self.module.init({"params": rng, "dropout": rng}, tokens)
