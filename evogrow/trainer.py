"""Train state, partitioned train/eval steps, and on-device metric accumulation.

The host loop only dispatches: each train step merges its clu metrics into an
accumulator that stays on device (inside the same jitted call), so nothing is fetched
until a log or eval point asks for it (`compute_metrics`). The accumulator packs the
metrics' fields into as few vectors as their dtypes allow (`MetricsLayout`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from clu import metrics as clu_metrics

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


_WORD = "int32"  # storage of every 4-byte field: float32 fields ride as their bits


def _storage(dtype: str) -> str:
    """The packed vector a field of `dtype` rides in: one for all 4-byte types."""
    return _WORD if jnp.dtype(dtype).itemsize == 4 else dtype


def _view(x: Any, dtype: str) -> Any:
    """Reinterprets the bits of `x` (numpy or jax) as `dtype` (same item size)."""
    if jnp.dtype(x.dtype) == jnp.dtype(dtype):
        return x
    if isinstance(x, np.ndarray):
        return x.view(dtype)
    return jax.lax.bitcast_convert_type(x, jnp.dtype(dtype))


@dataclasses.dataclass(frozen=True)
class MetricsLayout:
    """Where each leaf of a metrics tree sits in an accumulator's packed vectors.

    Fields of 4-byte types (float32, int32, uint32) share one int32 vector, float32 ones
    as their bits, so a step merges them in one fused kernel and passes one buffer;
    fields of other types get a vector per type. In a vector, fields of one dtype form one
    contiguous segment, which merging views back as that dtype.

    Attributes:
      treedef: the tree structure of the metrics (name -> clu metric).
      storage: the dtype of each packed vector, in order (`int32` first).
      segments: per vector, its (dtype, offset, size) runs; the int32 run of the int32
        vector ends with the step count.
      leaves: per leaf, (vector index, offset, shape, dtype).
      additive: every metric merges by adding its fields (clu's `Average` and
        subclasses such as `Accuracy`), so merging into zeros gives the metric itself.
    """

    treedef: Any
    storage: tuple[str, ...]
    segments: tuple[tuple[tuple[str, int, int], ...], ...]
    leaves: tuple[tuple[int, int, tuple[int, ...], str], ...]
    additive: bool

    @classmethod
    def of(cls, metrics: Metrics) -> MetricsLayout:
        """Returns the layout of `metrics` (arrays or ShapeDtypeStructs)."""
        leaves, treedef = jax.tree.flatten(dict(metrics))
        dtypes = [str(jnp.dtype(leaf.dtype)) for leaf in leaves]
        # The step count is an int32 field, so the int32 vector and run always exist.
        sizes: dict[str, int] = {_WORD: 1}
        for leaf, dtype in zip(leaves, dtypes, strict=True):
            sizes[dtype] = sizes.get(dtype, 0) + math.prod(leaf.shape)
        storage = tuple(sorted({_storage(d) for d in sizes}, key=lambda s: (s != _WORD, s)))
        segments: list[list[tuple[str, int, int]]] = [[] for _ in storage]
        starts: dict[str, int] = {}
        for dtype in sorted(sizes):
            runs = segments[storage.index(_storage(dtype))]
            starts[dtype] = sum(size for _, _, size in runs)
            runs.append((dtype, starts[dtype], sizes[dtype]))
        placed = []
        for leaf, dtype in zip(leaves, dtypes, strict=True):
            placed.append((storage.index(_storage(dtype)), starts[dtype], tuple(leaf.shape), dtype))
            starts[dtype] += math.prod(leaf.shape)
        additive = all(
            type(metric).merge is clu_metrics.Average.merge for metric in dict(metrics).values()
        )
        return cls(treedef, storage, tuple(map(tuple, segments)), tuple(placed), additive)

    def _runs(self, metrics: Metrics, num_steps: Any) -> dict[str, jax.Array]:
        """Returns dtype -> that dtype's fields, concatenated (int32's end with `num_steps`)."""
        parts: dict[str, list[jax.Array]] = {}
        for (_, _, _, dtype), leaf in zip(self.leaves, jax.tree.leaves(dict(metrics)), strict=True):
            parts.setdefault(dtype, []).append(jnp.ravel(leaf).astype(dtype))
        parts.setdefault(_WORD, []).append(jnp.reshape(num_steps, (1,)).astype(jnp.int32))
        return {dtype: jnp.concatenate(part) for dtype, part in parts.items()}

    def pack(self, metrics: Metrics, num_steps: Any) -> tuple[jax.Array, ...]:
        """Packs `metrics` and a step count into the layout's vectors (traceable)."""
        runs = self._runs(metrics, num_steps)
        return tuple(
            jnp.concatenate([_view(runs[dtype], store) for dtype, _, _ in segs])
            for store, segs in zip(self.storage, self.segments, strict=True)
        )

    def add(self, vectors: tuple[jax.Array, ...], metrics: Metrics) -> tuple[jax.Array, ...]:
        """Adds `metrics` and one step to packed vectors, each run in its own dtype (traceable).

        Elementwise over each whole vector (a select between its runs' sums), so the add
        updates the donated accumulator in place.
        """
        runs = self._runs(metrics, jnp.ones((), jnp.int32))
        out = []
        for vector, store, segs in zip(vectors, self.storage, self.segments, strict=True):
            position = jnp.arange(vector.shape[0])
            total = vector
            for dtype, start, size in segs:
                pad = (start, vector.shape[0] - start - size)
                summed = _view(_view(vector, dtype) + jnp.pad(runs[dtype], pad), store)
                if len(segs) == 1:
                    total = summed
                else:
                    in_run = (position >= start) & (position < start + size)
                    total = jnp.where(in_run, summed, total)
            out.append(total)
        return tuple(out)

    def unpack(self, vectors: tuple[Any, ...]) -> tuple[Any, Any]:
        """Returns (metrics tree, step count) of packed vectors (numpy or jax)."""
        leaves = [
            _view(vectors[index][offset : offset + math.prod(shape)], dtype).reshape(shape)
            for index, offset, shape, dtype in self.leaves
        ]
        _, start, size = next(s for s in self.segments[0] if s[0] == _WORD)
        return jax.tree.unflatten(self.treedef, leaves), vectors[0][start + size - 1]


@flax.struct.dataclass
class MetricsAccumulator:
    """Metrics merged over steps, on device, packed as `MetricsLayout` says.

    A step's outputs and the next step's inputs are then one buffer (float32 and int32
    fields) instead of one per metric field, and an additive merge compiles to one fused
    kernel that updates it in place.

    Attributes:
      vectors: the packed metric fields; the first (int32) holds the step count.
      layout: where each metric field sits (static).
    """

    vectors: tuple[jax.Array, ...]
    layout: MetricsLayout = flax.struct.field(pytree_node=False)

    @classmethod
    def empty(cls, layout: MetricsLayout) -> MetricsAccumulator:
        """Returns a zero-step accumulator of `layout` (traceable)."""
        return cls(
            vectors=tuple(
                jnp.zeros((sum(size for _, _, size in segs),), store)
                for store, segs in zip(layout.storage, layout.segments, strict=True)
            ),
            layout=layout,
        )

    @property
    def num_steps(self) -> Any:
        """How many steps were merged."""
        return self.layout.unpack(self.vectors)[1]


def merge_metrics(acc: MetricsAccumulator, new: Metrics) -> MetricsAccumulator:
    """Merges one step's metrics into the accumulator (traceable, any clu metric kind).

    Args:
      acc: the accumulator so far; its values are ignored when it has no step.
      new: this step's metrics, with the accumulator's layout.

    Returns:
      the updated accumulator.
    """
    layout = acc.layout
    if layout.additive:
        # Merging adds every field and the empty accumulator is zeros: one fused add.
        return MetricsAccumulator(vectors=layout.add(acc.vectors, new), layout=layout)
    metrics, num_steps = layout.unpack(acc.vectors)
    merged = {name: metrics[name].merge(metric) for name, metric in new.items()}
    # A select, not lax.cond: a conditional in the step costs more than the merge itself.
    first = num_steps == 0
    merged = jax.tree.map(lambda m, n: jnp.where(first, n, m), merged, dict(new))
    return MetricsAccumulator(vectors=layout.pack(merged, num_steps + 1), layout=layout)


def compute_metrics(acc: MetricsAccumulator) -> dict[str, float]:
    """Fetches an accumulator to the host and computes every metric (blocks on it).

    Args:
      acc: an accumulator of at least one step.

    Returns:
      name -> float value.
    """
    metrics, _ = acc.layout.unpack(jax.device_get(acc.vectors))
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
      partitioner: an `evogrow.partitioning.Partitioner`.
      input_shapes: feature -> global train batch shape.
      input_types: feature -> dtype.
      rng: base key of dropout; step t uses `fold_in(rng, t)`.
    """

    def __init__(
        self,
        model: Any,
        partitioner: Any,
        input_shapes: Mapping[str, tuple[int, ...]],
        input_types: Mapping[str, Any],
        rng: jax.Array,
    ):
        self.model = model
        self.partitioner = partitioner
        self.optimizer: optax.GradientTransformation = model.optimizer_def
        self._input_shapes = dict(input_shapes)
        self._input_types = dict(input_types)
        self._dropout_rng = rng

        boxed = abstract_variables(model, input_shapes, input_types)["params"]
        self.param_specs = partitioner.param_specs(boxed)
        abstract_params = nn.unbox(boxed)
        self.abstract_state = jax.eval_shape(self._state_from_params, abstract_params)
        state_specs = partitioner.state_specs(
            self.abstract_state, self.param_specs, abstract_params
        )
        self.state_shardings = partitioner.shardings(state_specs)
        batch_sharding = partitioner.batch_sharding
        batch_shardings = {key: batch_sharding for key in input_shapes}
        stacked_shardings = {key: partitioner.stacked_batch_sharding for key in input_shapes}

        abstract_metrics = jax.eval_shape(
            self._loss_and_grads, abstract_params, self._abstract_batch(), jax.random.key(0)
        )[0][1]
        self._metrics_layout = MetricsLayout.of(abstract_metrics)
        replicated = partitioner.replicated
        self._init_state = partitioner.partition(
            self._init_state_fn, in_shardings=(replicated,), out_shardings=self.state_shardings
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

    def _state_from_params(self, params: Any) -> TrainState:
        return TrainState(
            step=jnp.zeros((), jnp.int32), params=params, opt_state=self.optimizer.init(params)
        )

    def _init_state_fn(self, rng: jax.Array) -> TrainState:
        variables = self.model.get_initial_variables(rng, self._input_shapes, self._input_types)
        return self._state_from_params(nn.unbox(variables["params"]))

    def _loss_and_grads(self, params: Any, batch: Mapping, dropout_rng: Any) -> Any:
        return jax.value_and_grad(self.model.loss_fn, has_aux=True)(params, batch, dropout_rng)

    def _train_step_fn(
        self, state: TrainState, acc: MetricsAccumulator, batch: Mapping
    ) -> tuple[TrainState, MetricsAccumulator]:
        dropout_rng = jax.random.fold_in(self._dropout_rng, state.step)
        (_, metrics), grads = self._loss_and_grads(state.params, batch, dropout_rng)
        updates, opt_state = self.optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
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
        return MetricsAccumulator.empty(self._metrics_layout)

    # ----------------------------------------------------------------------- host API
    def for_model(self, model: Any) -> Trainer:
        """Returns a trainer of `model` (e.g. grown) with this one's mesh, shapes and keys.

        Its steps compile on first use (once per growth event).
        """
        return Trainer(
            model, self.partitioner, self._input_shapes, self._input_types, self._dropout_rng
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
            global batch, which the step places at dispatch: `evogrow.data.HostBatches`).

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
