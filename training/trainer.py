"""Train state, partitioned train/eval steps, and on-device metric accumulation.

The host loop only dispatches: each train step merges its clu metrics into an
accumulator that stays on device (inside the same jitted call), so nothing is fetched
until a log or eval point asks for it (`compute_metrics`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax

Metrics = Mapping[str, Any]  # name -> clu metric (a pytree)


@flax.struct.dataclass
class TrainState:
    """Everything a training run updates.

    Attributes:
      step: number of optimizer steps taken (int32 scalar).
      params: model parameters (unboxed).
      opt_state: optax optimizer state.
    """

    step: jax.Array
    params: Any
    opt_state: Any


@flax.struct.dataclass
class MetricsAccumulator:
    """Metrics merged over steps, kept on device until a report asks for them.

    Attributes:
      metrics: name -> clu metric, the merge of every step so far (zeros before the first).
      num_steps: how many steps were merged (int32 scalar).
    """

    metrics: dict[str, Any]
    num_steps: jax.Array

    @classmethod
    def empty(cls, abstract_metrics: Metrics) -> MetricsAccumulator:
        """Returns a zero-step accumulator shaped like `abstract_metrics` (traceable)."""
        zeros = jax.tree.map(lambda leaf: jnp.zeros(leaf.shape, leaf.dtype), dict(abstract_metrics))
        return cls(metrics=zeros, num_steps=jnp.zeros((), jnp.int32))


def merge_metrics(acc: MetricsAccumulator, new: Metrics) -> MetricsAccumulator:
    """Merges one step's metrics into the accumulator with clu's `merge` (traceable).

    Args:
      acc: the accumulator so far; its values are ignored when it has no step.
      new: this step's metrics, shaped like the accumulator's.

    Returns:
      the updated accumulator.
    """
    merged = {name: acc.metrics[name].merge(metric) for name, metric in new.items()}
    # Zeros are the identity of additive metrics (Average, Accuracy) only, so the first
    # step's metrics replace them; a select rather than lax.cond keeps the step one kernel.
    first = acc.num_steps == 0
    merged = jax.tree.map(lambda m, n: jnp.where(first, n, m), merged, dict(new))
    return MetricsAccumulator(metrics=merged, num_steps=acc.num_steps + 1)


def compute_metrics(acc: MetricsAccumulator) -> dict[str, float]:
    """Fetches an accumulator to the host and computes every metric (blocks on it).

    Args:
      acc: an accumulator of at least one step.

    Returns:
      name -> float value.
    """
    metrics = jax.device_get(acc.metrics)
    return {name: float(metric.compute()) for name, metric in metrics.items()}


def abstract_variables(model: Any, input_shapes: Mapping, input_types: Mapping) -> Any:
    """Returns the model's variables as ShapeDtypeStructs (boxes with axis names kept).

    Args:
      model: a t5x-contract model.
      input_shapes: feature -> global batch shape.
      input_types: feature -> dtype.

    Returns:
      the abstract variables dict (with 'params').
    """
    return jax.eval_shape(
        lambda rng: model.get_initial_variables(rng, input_shapes, input_types),
        jax.random.key(0),
    )


class Trainer:
    """Partitioned train and eval steps of one model.

    Args:
      model: a t5x-contract model (`loss_fn`, `get_initial_variables`, `optimizer_def`).
      partitioner: an `training.partitioning.Partitioner`.
      input_shapes: feature -> global train batch shape.
      input_types: feature -> dtype.
      rng: base key of dropout; step t uses `fold_in(rng, t)`.
      trainable_mask: a pytree of bools shaped like the params (True = trains), or a
        callable of the (abstract) params returning one; None trains every leaf. Frozen
        leaves get no gradient and no optimizer state, and the step returns them as
        they came (bit for bit).
    """

    def __init__(
        self,
        model: Any,
        partitioner: Any,
        input_shapes: Mapping[str, tuple[int, ...]],
        input_types: Mapping[str, Any],
        rng: jax.Array,
        trainable_mask: Any = None,
    ):
        self.model = model
        self.partitioner = partitioner
        self.optimizer: optax.GradientTransformation = model.optimizer_def
        self._input_shapes = dict(input_shapes)
        self._input_types = dict(input_types)
        self._dropout_rng = rng
        self._trainable_mask = trainable_mask

        boxed = abstract_variables(model, input_shapes, input_types)["params"]
        self.param_specs = partitioner.param_specs(boxed)
        abstract_params = nn.unbox(boxed)
        self._mask = None if trainable_mask is None else self._mask_of(abstract_params)
        self.abstract_state = jax.eval_shape(self._state_from_params, abstract_params)
        state_specs = partitioner.state_specs(
            self.abstract_state, self.param_specs, abstract_params
        )
        if self._mask is not None:
            # The optimizer state mirrors the trainable leaves only (frozen ones are None).
            trainable_specs = jax.tree.map(
                lambda keep, spec: spec if keep else None, self._mask, self.param_specs
            )
            state_specs = state_specs.replace(
                opt_state=partitioner.state_specs(
                    self.abstract_state.opt_state,
                    trainable_specs,
                    self.trainable_params(abstract_params),
                )
            )
        self.state_shardings = partitioner.shardings(state_specs)
        batch_sharding = partitioner.batch_sharding
        batch_shardings = {key: batch_sharding for key in input_shapes}
        stacked_shardings = {key: partitioner.stacked_batch_sharding for key in input_shapes}

        abstract_metrics = jax.eval_shape(
            self._loss_and_grads, abstract_params, self._abstract_batch(), jax.random.key(0)
        )[0][1]
        self._abstract_metrics = abstract_metrics
        replicated = partitioner.replicated
        self._init_state = partitioner.partition(
            self._init_state_fn, in_shardings=(replicated,), out_shardings=self.state_shardings
        )
        self._state_from = partitioner.partition(
            self._state_from_params,
            in_shardings=(self.state_shardings.params,),
            out_shardings=self.state_shardings,
        )
        self._train_step = partitioner.partition(
            self._train_step_fn,
            in_shardings=(self.state_shardings, replicated, batch_shardings),
            out_shardings=(self.state_shardings, replicated),
            donate_argnums=(0, 1),
        )
        self._train_steps = partitioner.partition(
            self._train_steps_fn,
            in_shardings=(self.state_shardings, replicated, stacked_shardings),
            out_shardings=(self.state_shardings, replicated),
            donate_argnums=(0, 1),
        )
        self._eval_step = partitioner.partition(
            self._eval_step_fn,
            in_shardings=(self.state_shardings.params, replicated, batch_shardings),
            out_shardings=replicated,
            donate_argnums=(1,),
        )
        self._empty = partitioner.partition(
            self._empty_fn, in_shardings=(), out_shardings=replicated
        )

    # ----------------------------------------------------------------- pure functions
    def _abstract_batch(self) -> dict[str, jax.ShapeDtypeStruct]:
        return {
            key: jax.ShapeDtypeStruct(shape, self._input_types[key])
            for key, shape in self._input_shapes.items()
        }

    def _mask_of(self, params: Any) -> Any:
        mask = self._trainable_mask
        return mask(params) if callable(mask) else mask

    def trainable_params(self, params: Any) -> Any:
        """The trainable leaves of `params` (frozen leaves are None; all without a mask)."""
        if self._mask is None:
            return params
        return jax.tree.map(lambda keep, leaf: leaf if keep else None, self._mask, params)

    def _merge(self, params: Any, trainable: Any) -> Any:
        if self._mask is None:
            return trainable
        return jax.tree.map(
            lambda keep, leaf, new: new if keep else leaf,
            self._mask,
            params,
            trainable,
            is_leaf=lambda node: node is None,
        )

    def _state_from_params(self, params: Any) -> TrainState:
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            opt_state=self.optimizer.init(self.trainable_params(params)),
        )

    def _init_state_fn(self, rng: jax.Array) -> TrainState:
        variables = self.model.get_initial_variables(rng, self._input_shapes, self._input_types)
        return self._state_from_params(nn.unbox(variables["params"]))

    def _loss_and_grads(self, params: Any, batch: Mapping, dropout_rng: Any) -> Any:
        """((loss, metrics), grads of the trainable leaves) at `params`."""

        def loss_fn(trainable: Any) -> Any:
            return self.model.loss_fn(self._merge(params, trainable), batch, dropout_rng)

        return jax.value_and_grad(loss_fn, has_aux=True)(self.trainable_params(params))

    def _train_step_fn(
        self, state: TrainState, acc: MetricsAccumulator, batch: Mapping
    ) -> tuple[TrainState, MetricsAccumulator]:
        dropout_rng = jax.random.fold_in(self._dropout_rng, state.step)
        (_, metrics), grads = self._loss_and_grads(state.params, batch, dropout_rng)
        trainable = self.trainable_params(state.params)
        updates, opt_state = self.optimizer.update(grads, state.opt_state, trainable)
        params = self._merge(state.params, optax.apply_updates(trainable, updates))
        new_state = TrainState(step=state.step + 1, params=params, opt_state=opt_state)
        return new_state, merge_metrics(acc, metrics)

    def _train_steps_fn(
        self, state: TrainState, acc: MetricsAccumulator, batches: Mapping
    ) -> tuple[TrainState, MetricsAccumulator]:
        def body(carry: Any, batch: Mapping) -> tuple[Any, None]:
            state, acc = carry
            return self._train_step_fn(state, acc, batch), None

        return jax.lax.scan(body, (state, acc), batches)[0]

    def _eval_step_fn(
        self, params: Any, acc: MetricsAccumulator, batch: Mapping
    ) -> MetricsAccumulator:
        _, metrics = self.model.loss_fn(params, batch, None)
        return merge_metrics(acc, metrics)

    def _empty_fn(self) -> MetricsAccumulator:
        return MetricsAccumulator.empty(self._abstract_metrics)

    # ----------------------------------------------------------------------- host API
    def for_model(self, model: Any) -> Trainer:
        """Returns a trainer of `model` (e.g. grown) with this one's mesh, shapes and keys.

        Its steps compile on first use (once per growth event).
        """
        return Trainer(
            model,
            self.partitioner,
            self._input_shapes,
            self._input_types,
            self._dropout_rng,
            self._trainable_mask,
        )

    def train_step_flops(self) -> float:
        """Returns XLA's cost analysis of one train step: FLOPs over the global batch.

        Lowers the step for abstract arguments (nothing runs or compiles).
        """
        state = jax.tree.map(
            lambda leaf, sharding: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding),
            self.abstract_state,
            self.state_shardings,
        )
        acc = jax.eval_shape(self._empty_fn)
        cost = self._train_step.lower(state, acc, self._abstract_batch()).cost_analysis()
        if isinstance(cost, list | tuple):  # older JAX: one dict per computation
            cost = cost[0]
        return float(cost["flops"])

    def init_state(self, rng: jax.Array) -> TrainState:
        """Initializes a train state from scratch, directly in its shardings.

        Args:
          rng: the parameter initialization key.

        Returns:
          the partitioned train state at step 0.
        """
        return self._init_state(rng)

    def state_from_params(self, params: Any) -> TrainState:
        """A step-0 train state of given params (fresh optimizer state), in its shardings.

        Args:
          params: unboxed params shaped like the model's (numpy or device arrays).

        Returns:
          the partitioned train state.
        """
        return self._state_from(params)

    def empty_metrics(self) -> MetricsAccumulator:
        """Returns a fresh (zero-step) metrics accumulator on device."""
        return self._empty()

    def train_step(
        self, state: TrainState, acc: MetricsAccumulator, batch: Mapping
    ) -> tuple[TrainState, MetricsAccumulator]:
        """One optimizer step; donates `state` and `acc` (do not reuse them).

        Args:
          state: the train state.
          acc: the metrics accumulator.
          batch: feature -> global array sharded along 'data' (or a numpy array of the
            global batch, which the step places at dispatch).

        Returns:
          (new state, accumulator with this step's metrics merged in).
        """
        return self._train_step(state, acc, batch)

    def train_steps(
        self, state: TrainState, acc: MetricsAccumulator, batches: Mapping
    ) -> tuple[TrainState, MetricsAccumulator]:
        """Several optimizer steps in one dispatch (a scan of `train_step`); donates like it.

        The steps are the same as that many `train_step` calls on the batches in order
        (same dropout keys, same merged metrics); the host pays one dispatch for all.

        Args:
          state: the train state.
          acc: the metrics accumulator.
          batches: feature -> [steps, global batch, ...], the steps' batches stacked,
            sharded along 'data' on the batch axis (`Partitioner.shard_batch(...,
            stacked=True)`) or as numpy.

        Returns:
          (new state, accumulator with every step's metrics merged in).
        """
        return self._train_steps(state, acc, batches)

    def evaluate(
        self, params: Any, batches: Iterator[Mapping], on_batch: Callable[[], None] | None = None
    ) -> dict[str, float]:
        """Averages the loss_fn metrics (no dropout) over every batch of `batches`.

        Args:
          params: the (partitioned) params.
          batches: yields global batches shaped like the train batches.
          on_batch: called after each batch is dispatched (progress hooks, tests).

        Returns:
          name -> value; empty when `batches` is empty.
        """
        acc = self.empty_metrics()
        num = 0
        for batch in batches:
            acc = self._eval_step(params, acc, batch)
            num += 1
            if on_batch is not None:
                on_batch()
        return compute_metrics(acc) if num else {}
