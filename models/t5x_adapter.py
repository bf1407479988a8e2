"""Runs an evogrow model under t5x's own train / eval / infer binaries.

evogrow models return `module.init` variables whose params are boxed in
`nn.LogicallyPartitioned` (evogrow's trainer reads the logical axis names from the
boxes). t5x instead wants plain params plus a `params_axes` collection in the legacy
`flax.linen.partitioning` format (`kernel_axes: AxisMetadata(names=...)`), which its
PjitPartitioner and OptaxWrapper read. `T5XModel` wraps any evogrow model, converts its
variables with `t5x_variables`, and carries t5x's optimizer definition; every other call
is forwarded unchanged. Nothing here imports t5x (gin/t5x/*.gin bind it).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax
import flax.linen as nn
import jax
from flax import traverse_util
from flax.linen import partitioning as flax_partitioning


def t5x_variables(variables: Mapping[str, Any]) -> dict[str, Any]:
    """Converts boxed `module.init` variables into t5x's {'params', 'params_axes'} form.

    Args:
      variables: a mapping with only a 'params' collection whose leaves are
        `nn.LogicallyPartitioned` boxes (scalars may be plain arrays).

    Returns:
      {'params': the unboxed params, 'params_axes': the same nesting with each leaf key
      `name` renamed `name_axes` and holding `AxisMetadata(names=logical axis names)`}.

    Raises:
      ValueError: another collection is present (t5x would treat it as flax_mutables,
        which evogrow models do not take), or a non-scalar param has no axis names.
    """
    variables = dict(variables)
    boxed = variables.pop("params")
    if variables:
        raise ValueError(f"t5x runs evogrow models on params only; got {sorted(variables)}")
    params = nn.unbox(boxed)
    names = traverse_util.flatten_dict(flax.core.unfreeze(nn.get_partition_spec(boxed)))
    shapes = traverse_util.flatten_dict(flax.core.unfreeze(jax.tree.map(jax.numpy.shape, params)))
    axes = {}
    for path, spec in names.items():
        if len(tuple(spec)) != len(shapes[path]):
            raise ValueError(
                f"param {'/'.join(path)} of shape {shapes[path]} has logical axis names "
                f"{tuple(spec)}: every non-scalar param needs one name per dimension"
            )
        axes[path[:-1] + (f"{path[-1]}_axes",)] = flax_partitioning.AxisMetadata(names=tuple(spec))
    return {"params": params, "params_axes": traverse_util.unflatten_dict(axes)}


class T5XModel:
    """t5x's model interface around an evogrow model.

    Args:
      model: an evogrow t5x-contract model (`FEATURE_CONVERTER_CLS`, `loss_fn`,
        `predict_batch`, `score_batch`, `get_initial_variables`).
      optimizer_def: a t5x OptimizerDef, e.g. `t5x.optimizers.adamw(learning_rate=...)`
        (None for eval / infer); the wrapped model's own optax optimizer is not used.
    """

    def __init__(self, model: Any, optimizer_def: Any = None):
        self.model = model
        self.optimizer_def = optimizer_def
        # t5x reads `model.FEATURE_CONVERTER_CLS` and calls it with pack=...
        self.FEATURE_CONVERTER_CLS = model.FEATURE_CONVERTER_CLS

    def get_initial_variables(
        self,
        rng: jax.Array,
        input_shapes: Mapping[str, tuple[int, ...]],
        input_types: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Returns the wrapped model's variables in t5x's form (see `t5x_variables`)."""
        return t5x_variables(self.model.get_initial_variables(rng, input_shapes, input_types))

    def loss_fn(self, params: Any, batch: Mapping[str, jax.Array], dropout_rng: Any):
        """Forwards to the wrapped model: (scalar loss, {name: clu Metric})."""
        return self.model.loss_fn(params, batch, dropout_rng)

    def eval_fn(self, params: Any, batch: Mapping[str, jax.Array]):
        """Deterministic loss and metrics (t5x's training-eval)."""
        return self.model.loss_fn(params, batch, None)

    def predict_batch(self, params: Any, batch: Mapping[str, jax.Array], rng: Any = None):
        """Forwards to the wrapped model's `predict_batch`."""
        return self.model.predict_batch(params, batch, rng)

    def predict_batch_with_aux(
        self, params: Any, batch: Mapping[str, jax.Array], rng: Any = None
    ) -> tuple[jax.Array, Mapping[str, jax.Array]]:
        """The wrapped model's `predict_batch_with_aux`, or its predictions with no aux."""
        if hasattr(self.model, "predict_batch_with_aux"):
            return self.model.predict_batch_with_aux(params, batch, rng)
        return self.model.predict_batch(params, batch, rng), {}

    def score_batch(
        self, params: Any, batch: Mapping[str, jax.Array], return_intermediates: bool = False
    ):
        """Forwards to the wrapped model's `score_batch`."""
        if return_intermediates:
            return self.model.score_batch(params, batch, return_intermediates=True)
        return self.model.score_batch(params, batch)
