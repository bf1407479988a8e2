"""A partitioner on `jax.sharding`: a ('data', 'model') mesh and logical axis rules as data.

Parameters carry logical axis names (`nn.with_logical_partitioning`); the rules map them to
mesh axes. Shardings of the whole train state are derived from the *abstract* state
(`jax.eval_shape`), so after a growth event they are simply derived again from the new
shapes. Batches are sharded along 'data'; every process feeds its own rows of the global
batch (`DataLayout`).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from training import settings

LogicalRules = Sequence[tuple[str, str | None]]


def default_logical_axis_rules() -> tuple[tuple[str, str | None], ...]:
    """Returns the models' standard rules (`models.partitioning`), data only.

    Returns:
      (logical axis name, mesh axis or None) pairs.
    """
    from models.partitioning import standard_logical_axis_rules

    return tuple(standard_logical_axis_rules())


@dataclasses.dataclass(frozen=True)
class DataLayout:
    """Which rows of the global batch this process reads.

    Attributes:
      batch_size: global batch size.
      shard_id: index of this process's data shard (seqio `ShardInfo.index`).
      num_shards: number of distinct data shards over all processes.
      per_host_batch_size: rows this process contributes to each global batch.
    """

    batch_size: int
    shard_id: int
    num_shards: int
    per_host_batch_size: int


class Partitioner:
    """Builds the device mesh, derives shardings and compiles partitioned steps.

    Args:
      num_partitions: size of the 'model' mesh axis (model parallelism); the 'data' axis
        takes the remaining devices. Ignored when `model_parallel_submesh` is given.
      model_parallel_submesh: t5x-style submesh shape; its product is the 'model' size.
      logical_axis_rules: (logical name, mesh axis) pairs; None uses the models' standard
        rules.
      devices: devices of the mesh; None uses all global devices.

    Raises:
      settings.SettingError: the 'model' size does not divide the devices.
    """

    def __init__(
        self,
        num_partitions: int | None = 1,
        model_parallel_submesh: Sequence[int] | None = None,
        logical_axis_rules: LogicalRules | None = None,
        devices: Sequence[jax.Device] | None = None,
    ):
        devices = list(devices if devices is not None else jax.devices())
        if model_parallel_submesh:
            model_size = math.prod(model_parallel_submesh)
        else:
            model_size = num_partitions or 1
        if (
            not isinstance(model_size, numbers.Integral)
            or model_size < 1
            or len(devices) % model_size
        ):
            raise settings.SettingError(
                f"num_partitions={model_size!r} (NUM_PARTITIONS) does not divide the "
                f"{len(devices)} devices (valid: a divisor of {len(devices)})"
            )
        auto = (jax.sharding.AxisType.Auto,) * 2
        self.mesh: jax.sharding.Mesh = jax.make_mesh(
            (len(devices) // model_size, model_size),
            ("data", "model"),
            axis_types=auto,
            devices=devices,
        )
        if logical_axis_rules is None:
            logical_axis_rules = default_logical_axis_rules()
        self.logical_axis_rules: tuple[tuple[str, str | None], ...] = tuple(
            (name, axis) for name, axis in logical_axis_rules
        )

    # ----------------------------------------------------------------------- data layout
    def get_data_layout(self, batch_size: int) -> DataLayout:
        """Returns which shard of the data this process reads and how many rows.

        Processes whose devices cover the same rows of the 'data' axis (model parallelism
        across processes) read the same shard.

        Args:
          batch_size: global batch size; must divide evenly over the 'data' axis.

        Returns:
          the `DataLayout` of this process.

        Raises:
          settings.SettingError: `batch_size` does not divide over the 'data' axis.
        """
        data_size = self.mesh.shape["data"]
        if batch_size % data_size:
            raise settings.SettingError(
                f"batch size {batch_size} is not divisible by the {data_size} data replicas "
                f"(BATCH_SIZE / EVAL_BATCH_SIZE: use a multiple of {data_size})"
            )
        rows_by_process: dict[int, set[int]] = {}
        for row, device_row in enumerate(self.mesh.devices):
            for device in device_row:
                rows_by_process.setdefault(device.process_index, set()).add(row)
        distinct = sorted({tuple(sorted(rows)) for rows in rows_by_process.values()})
        mine = tuple(sorted(rows_by_process[jax.process_index()]))
        return DataLayout(
            batch_size=batch_size,
            shard_id=distinct.index(mine),
            num_shards=len(distinct),
            per_host_batch_size=batch_size * len(mine) // data_size,
        )

    # ----------------------------------------------------------------------- shardings
    def logical_to_mesh_spec(self, logical_axes: Sequence[str | None]) -> PartitionSpec:
        """Maps one array's logical axis names to a mesh PartitionSpec by the rules.

        Each dimension takes the first rule of its name whose mesh axis is still free in
        this array (a mesh axis shards at most one dimension); unknown names, and names
        repeated within an array (e.g. a patch kernel's two `patch` axes), fall back to
        replication.

        Args:
          logical_axes: one logical name (or None) per dimension.

        Returns:
          the PartitionSpec on ('data', 'model').
        """
        used: set[str] = set()
        mesh_axes: list[str | None] = []
        for name in logical_axes:
            choice = None
            for rule_name, mesh_axis in self.logical_axis_rules:
                if rule_name == name and (mesh_axis is None or mesh_axis not in used):
                    choice = mesh_axis
                    break
            if choice is not None:
                used.add(choice)
            mesh_axes.append(choice)
        return PartitionSpec(*mesh_axes)

    def logical_to_mesh_specs(self, logical_specs: Any) -> Any:
        """Maps a pytree of logical PartitionSpecs to mesh PartitionSpecs by the rules."""
        return jax.tree.map(self.logical_to_mesh_spec, logical_specs, is_leaf=_is_spec)

    def param_specs(self, abstract_boxed_params: Any) -> Any:
        """Returns mesh PartitionSpecs of (abstract) params boxed with logical names.

        Args:
          abstract_boxed_params: params as returned by `get_initial_variables` (under
            `jax.eval_shape`), leaves boxed in `nn.LogicallyPartitioned` or plain.

        Returns:
          a pytree of `PartitionSpec` with the structure of the unboxed params.
        """
        return self.logical_to_mesh_specs(nn.get_partition_spec(abstract_boxed_params))

    def state_specs(self, abstract_state: Any, param_specs: Any, params: Any) -> Any:
        """Returns mesh PartitionSpecs for a whole train state.

        Every subtree of the state shaped like the params (the params themselves, Adam's
        moments, ...) is partitioned like the params; any other leaf (step counters,
        scalars) is replicated.

        Args:
          abstract_state: the (abstract) train state.
          param_specs: PartitionSpecs of the params (from `param_specs`).
          params: the (abstract, unboxed) params, used to recognise params-like subtrees.

        Returns:
          a pytree of `PartitionSpec` with the structure of `abstract_state`.
        """
        params_def = jax.tree.structure(params)
        spec_leaves = jax.tree.leaves(param_specs, is_leaf=_is_spec)

        def is_params_like(node: Any) -> bool:
            if node is None or isinstance(node, jax.ShapeDtypeStruct | jax.Array):
                return False
            try:
                node_def: Any = jax.tree.structure(node)
                return node_def == params_def
            except (TypeError, ValueError):
                return False

        def spec_of(node: Any) -> Any:
            if is_params_like(node):
                return jax.tree.unflatten(params_def, spec_leaves)
            return PartitionSpec()

        return jax.tree.map(spec_of, abstract_state, is_leaf=is_params_like)

    def sharding(self, spec: PartitionSpec) -> NamedSharding:
        """Returns the NamedSharding of `spec` on this mesh."""
        return NamedSharding(self.mesh, spec)

    def shardings(self, specs: Any) -> Any:
        """Maps a pytree of PartitionSpecs to NamedShardings on this mesh."""
        return jax.tree.map(self.sharding, specs, is_leaf=_is_spec)

    @property
    def replicated(self) -> NamedSharding:
        """A fully replicated sharding on this mesh."""
        return self.sharding(PartitionSpec())

    @property
    def batch_sharding(self) -> NamedSharding:
        """Sharding of a batch array: the leading axis along 'data'."""
        return self.sharding(PartitionSpec("data"))

    @property
    def stacked_batch_sharding(self) -> NamedSharding:
        """Sharding of several steps' batches stacked on a leading axis: rows along 'data'."""
        return self.sharding(PartitionSpec(None, "data"))

    def shard_batch(
        self, local_batch: Mapping[str, np.ndarray], batch_size: int, stacked: bool = False
    ) -> dict:
        """Assembles this process's rows into global arrays sharded along 'data'.

        Args:
          local_batch: feature -> numpy array of `per_host_batch_size` rows (with
            `stacked`: [steps, per_host_batch_size, ...], several steps' batches).
          batch_size: global batch size.
          stacked: the arrays carry a leading steps axis (`Trainer.train_steps`).

        Returns:
          feature -> global `jax.Array`.
        """
        sharding = self.stacked_batch_sharding if stacked else self.batch_sharding
        if jax.process_count() == 1:  # every row is local: one (cheaper) transfer call
            return jax.device_put(dict(local_batch), sharding)
        lead = 1 if stacked else 0
        return {
            key: jax.make_array_from_process_local_data(
                sharding,
                value,
                (*value.shape[:lead], batch_size, *value.shape[lead + 1 :]),
            )
            for key, value in local_batch.items()
        }

    # --------------------------------------------------------------------- compilation
    def partition(
        self,
        fn: Callable[..., Any],
        in_shardings: Any,
        out_shardings: Any,
        donate_argnums: Sequence[int] = (),
    ) -> PartitionedFunction:
        """Jits `fn` with the given shardings; it traces under this mesh and rules.

        Args:
          fn: the step function.
          in_shardings: shardings of the positional arguments.
          out_shardings: shardings of the outputs.
          donate_argnums: arguments whose buffers the outputs may reuse.

        Returns:
          a callable with the signature of `fn`.
        """
        jitted = jax.jit(
            fn,
            in_shardings=in_shardings,
            out_shardings=out_shardings,
            donate_argnums=tuple(donate_argnums),
        )
        return PartitionedFunction(jitted, self)

    def context(self) -> _MeshAndRules:
        """A context manager that sets the mesh and the logical axis rules."""
        return _MeshAndRules(self)


class _MeshAndRules:
    """Enters `jax.set_mesh(mesh)` and `nn.logical_axis_rules(rules)` together."""

    def __init__(self, partitioner: Partitioner):
        self._partitioner = partitioner
        self._contexts: list[Any] = []

    def __enter__(self) -> None:
        self._contexts = [
            jax.set_mesh(self._partitioner.mesh),
            nn.logical_axis_rules(self._partitioner.logical_axis_rules),
        ]
        for context in self._contexts:
            context.__enter__()

    def __exit__(self, *exc: Any) -> None:
        for context in reversed(self._contexts):
            context.__exit__(*exc)


class PartitionedFunction:
    """A jitted step compiled ahead of time under the partitioner's contexts.

    The first call with a new argument signature lowers and compiles under the mesh and
    the logical axis rules (model code calls `nn.with_logical_constraint`); later calls
    go straight to the compiled executable, so the hot loop pays no retracing checks
    and no context switching.
    """

    def __init__(self, jitted: Any, partitioner: Partitioner):
        self._jitted = jitted
        self._partitioner = partitioner
        self._compiled: dict[Any, Any] = {}
        self._last: Any = None

    def lower(self, *args: Any) -> Any:
        """Lowers the function for `args` (arrays or ShapeDtypeStructs)."""
        with self._partitioner.context():
            return self._jitted.lower(*args)

    def __call__(self, *args: Any) -> Any:
        """Runs the compiled executable for the signature of `args` (compiling it once)."""
        if self._last is not None:
            try:
                return self._last(*args)
            except (TypeError, ValueError):
                pass  # a new argument signature: compile (or reuse) its executable
        signature = jax.tree.map(lambda x: (np.shape(x), str(getattr(x, "dtype", ""))), args)
        key = (jax.tree.structure(args), tuple(jax.tree.leaves(signature)))
        if key not in self._compiled:
            self._compiled[key] = self.lower(*args).compile()
        self._last = self._compiled[key]
        return self._last(*args)


def with_shardings(abstract_tree: Any, shardings: Any) -> Any:
    """Attaches each leaf's sharding to an abstract tree (a restore target for orbax).

    Args:
      abstract_tree: leaves with `.shape` and `.dtype` (e.g. from `jax.eval_shape`).
      shardings: a matching tree of shardings.

    Returns:
      the tree of `jax.ShapeDtypeStruct(shape, dtype, sharding=...)`.
    """
    return jax.tree.map(
        lambda leaf, sharding: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding),
        abstract_tree,
        shardings,
    )


def _is_spec(node: Any) -> bool:
    return isinstance(node, PartitionSpec)
