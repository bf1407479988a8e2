"""Growing a live, partitioned training state (parameters and optimizer state) mid-run.

`grow_train_state` gathers the state to the host, applies `growth.expand` to the params
and the optax state together, builds the grown model (models/growth_hooks.py) and its
`Trainer` (new abstract state, shardings derived again from the logical axis names, steps
compiled on first use), and places the grown arrays in the new shardings. Works on one
device, on a simulated or real mesh, and across processes (every process computes the
same grown host arrays and keeps its own shards).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

import growth
from evogrow import trainer as trainer_lib
from models import growth_hooks


@dataclasses.dataclass(frozen=True)
class GrowthResult:
    """What one growth did.

    Attributes:
      trainer: the trainer of the grown model.
      state: the grown, partitioned train state (same step).
      config_before: the architecture before.
      config_after: the architecture after.
      num_params_before: parameter count before.
      num_params_after: parameter count after.
      seconds: wall time of gather, expansion and placement (compilation excluded).
    """

    trainer: trainer_lib.Trainer
    state: trainer_lib.TrainState
    config_before: Any
    config_after: Any
    num_params_before: int
    num_params_after: int
    seconds: float


def to_host(tree: Any) -> Any:
    """Copies a tree of (possibly multi-process sharded) arrays to host numpy arrays.

    Args:
      tree: a pytree of jax arrays.

    Returns:
      the same tree of full numpy arrays (gathered across processes where needed).
    """

    def fetch(leaf: Any) -> np.ndarray:
        if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
            return np.asarray(multihost_utils.process_allgather(leaf, tiled=True))
        return np.asarray(jax.device_get(leaf))

    return jax.tree.map(fetch, tree)


def place(tree: Any, abstract: Any, shardings: Any, what: str) -> Any:
    """Places full host arrays into shardings, checking them against the abstract tree.

    Args:
      tree: host arrays (numpy or jax).
      abstract: ShapeDtypeStructs of the same structure (the model's expected state).
      shardings: a sharding per leaf.
      what: name of the tree for error messages.

    Returns:
      the tree as global jax arrays in `shardings`, cast to the abstract dtypes.

    Raises:
      ValueError: the trees differ in structure or a shape differs (a growth rule and
        the model disagree).
    """
    leaves, treedef = jax.tree.flatten(tree)
    expected, expected_def = jax.tree.flatten(abstract)
    if treedef != expected_def:  # type: ignore[operator]
        raise ValueError(
            f"grown {what} do not have the grown model's structure:\n  grown: {treedef}\n"
            f"  model: {expected_def}"
        )
    placed = []
    for leaf, spec, sharding in zip(leaves, expected, jax.tree.leaves(shardings), strict=True):
        host = np.asarray(leaf, dtype=spec.dtype)
        if host.shape != tuple(spec.shape):
            raise ValueError(f"grown {what}: shape {host.shape} but the model has {spec.shape}")
        placed.append(jax.make_array_from_callback(host.shape, sharding, _slicer(host)))
    return jax.tree.unflatten(treedef, placed)


def _slicer(host: np.ndarray) -> Any:
    """Returns index -> host[index], the per-shard callback of `make_array_from_callback`."""
    return lambda index: host[index]


def _count(params: Any) -> int:
    return int(sum(np.prod(np.shape(leaf)) for leaf in jax.tree.leaves(params)))


def grow_train_state(
    trainer: trainer_lib.Trainer,
    state: trainer_lib.TrainState,
    requests: str | Sequence[str],
    rng: jax.Array,
) -> GrowthResult:
    """Grows a partitioned train state without changing the function the model computes.

    Args:
      trainer: the trainer of the current model.
      state: its train state (not donated; still valid afterwards).
      requests: growth requests (growth/requests.py), applied in order.
      rng: PRNG key of the new free entries (`growth_schedule.growth_rng`).

    Returns:
      the grown trainer and state, with sizes and timing.

    Raises:
      growth.GrowthError: a request is malformed or not exact for this model.
    """
    start = time.perf_counter()
    config = growth_hooks.model_config(trainer.model)
    params, opt_state = to_host((state.params, state.opt_state))
    new_config, new_params, new_opt_state = growth.expand(
        config, params, requests, rng=rng, opt_state=opt_state
    )
    new_trainer = trainer.for_model(growth_hooks.with_config(trainer.model, new_config))
    abstract, shardings = new_trainer.abstract_state, new_trainer.state_shardings
    new_state = trainer_lib.TrainState(
        step=state.step,
        params=place(new_params, abstract.params, shardings.params, "params"),
        opt_state=place(new_opt_state, abstract.opt_state, shardings.opt_state, "optimizer state"),
    )
    return GrowthResult(
        trainer=new_trainer,
        state=new_state,
        config_before=config,
        config_after=new_config,
        num_params_before=_count(params),
        num_params_after=_count(new_params),
        seconds=time.perf_counter() - start,
    )
