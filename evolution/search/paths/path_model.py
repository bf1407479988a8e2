"""A path as a model of the trainer's contract: forward pass, classification loss, metrics.

A muNet path is a chain of components keyed by slot ("embed", ..., "block_i", "head");
`forward` runs it. `PathModel` wraps a path in the t5x model contract (`loss_fn`,
`get_initial_variables`, `optimizer_def`) so that candidates train through
`training.trainer.Trainer` and `training.loop.run` like every other run; which of its
slots train is the trainer's mask, not the model's business.

Accuracy and loss are `MaskedMean` metrics: clu averages whose value is computed on the
host in double precision from the float32 sums, so a validation accuracy is exactly
correct / count, as the search has always compared and stored it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from clu import metrics as clu_metrics

from evolution.search.space import mutations
from evolution.system import families
from models import adapters

Params = Any
Batch = Mapping[str, Any]
MASK_KEY = "_mask"  # eval batches: 1 for a real row, 0 for padding


def forward(
    config: families.ModelConfig,
    slots: Sequence[str],
    params_by_slot: Mapping[str, Params],
    inputs: Any,
) -> jax.Array:
    """Runs a path's components (including residual adapters) on a batch of inputs.

    The components are applied by the config's family (`evolution.system.families`); a
    residual adapter (slot "adapter_i") maps the running activation to itself plus its
    bottleneck branch, whatever the family.

    Args:
      config: the path's config (`vit.ViTConfig`, `encoder.EncoderConfig`).
      slots: the path's slots in order ("embed", ..., "adapter_0", "block_0", ..., "head").
      params_by_slot: slot -> the component's (unboxed) parameters.
      inputs: the family's input feature: [B, H, W, C] float images (ViT) or [B, L]
        int32 token ids, 0 = padding (encoder).

    Returns:
      Logits [B, classes].
    """
    family = families.family_of(config)
    context = family.context(config, inputs)
    x = inputs
    for slot in slots:
        params = params_by_slot[slot]
        if mutations.slot_kind(slot) == "adapter":
            size = int(np.shape(params["down"]["kernel"])[-1])
            x = adapters.ResidualAdapter(config, size).apply({"params": params}, x)
        else:
            x = family.apply_component(config, slot, params, x, context)
    return x


@flax.struct.dataclass
class MaskedMean(clu_metrics.Average):
    """An average of (optionally masked) values whose value is total / count on the host.

    `compute` runs on fetched values (`trainer.compute_metrics`) and divides in double
    precision; with no row at all it is 0.
    """

    def compute(self) -> float:
        """The total / count as a Python float (0 when nothing was counted)."""
        count = float(self.count)
        return float(self.total) / count if count else 0.0


def classification_loss(logits: jax.Array, batch: Batch) -> tuple[jax.Array, dict[str, Any]]:
    """Mean softmax cross-entropy of the labels, and the loss and accuracy metrics.

    Args:
      logits: [B, classes].
      batch: with "label" [B] int and optionally `MASK_KEY` [B] (rows with 0 do not
        count towards the accuracy; the loss is the mean over every row).

    Returns:
      (loss, {"loss": MaskedMean, "accuracy": MaskedMean}).
    """
    logits = logits.astype(jnp.float32)
    loss = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]))
    hits = (jnp.argmax(logits, axis=-1) == batch["label"]).astype(jnp.float32)
    mask = batch.get(MASK_KEY)
    accuracy = MaskedMean.from_model_output(hits, mask=None if mask is None else mask > 0)
    return loss, {"loss": MaskedMean.from_model_output(loss), "accuracy": accuracy}


def signature(tree: Any) -> tuple[Any, ...]:
    """The tree's structure and its leaves' shapes and dtypes (hashable: a cache key)."""
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    return (treedef, tuple((tuple(np.shape(x)), str(jnp.result_type(x))) for x in leaves))


def abstract_tree(tree: Any) -> Any:
    """The tree's leaves as ShapeDtypeStructs (shapes and dtypes only)."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), jnp.result_type(x)), tree)


class PathModel:
    """A path of given slots and parameter shapes in the t5x model contract.

    Args:
      config: the path's config.
      slots: its slots in order.
      abstract_params: slot -> the component's parameters as ShapeDtypeStructs.
      optimizer: the optimizer (`optimizer_def`).
    """

    def __init__(
        self,
        config: families.ModelConfig,
        slots: Sequence[str],
        abstract_params: Mapping[str, Any],
        optimizer: optax.GradientTransformation,
    ):
        self.config = config
        self.slots = tuple(slots)
        self.optimizer_def = optimizer
        self._abstract_params = dict(abstract_params)
        self._input_key = families.family_of(config).input_key

    def get_initial_variables(
        self, rng: jax.Array, input_shapes: Mapping, input_types: Mapping
    ) -> dict[str, Any]:
        """Zero parameters of the path's shapes.

        A path starts from given parameters (`Trainer.state_from_params`); these only
        give the trainer the shapes.
        """
        del rng, input_shapes, input_types
        zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), self._abstract_params)
        return {"params": zeros}

    def logits(self, params: Mapping[str, Params], batch: Batch) -> jax.Array:
        """The path's logits on a batch (its family's input feature)."""
        return forward(self.config, self.slots, params, batch[self._input_key])

    def loss_fn(
        self, params: Mapping[str, Params], batch: Batch, dropout_rng: Any
    ) -> tuple[jax.Array, dict[str, Any]]:
        """`classification_loss` of the path's logits (components have no dropout)."""
        del dropout_rng
        return classification_loss(self.logits(params, batch), batch)
