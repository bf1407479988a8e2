"""Growing a live, partitioned training state (parameters and optimizer state) mid-run.

`grow_train_state` plans the growth from the trainer's abstract state (shapes only),
builds the grown model (models/growth_hooks.py) and its `Trainer` (new abstract state,
shardings derived again from the logical axis names, steps compiled on first use), and
grows the params and the optax state together in one jitted program whose outputs have
the new trainer's shardings. Each device computes its own shards of the grown state from
the shards it holds: nothing is gathered to a host, on one device, on a mesh, or across
processes. A growth event is that one compiled program plus the recompile of the steps.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Sequence
from typing import Any

import jax

import growth
from models import growth_hooks
from training import trainer as trainer_lib


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
      seconds: wall time of planning and of the grown state's program (its compilation
        included; the train step's is not).
    """

    trainer: trainer_lib.Trainer
    state: trainer_lib.TrainState
    config_before: Any
    config_after: Any
    num_params_before: int
    num_params_after: int
    seconds: float


def check_grown(grown: Any, expected: Any, what: str) -> None:
    """Checks the grown abstract tree against the grown model's abstract state.

    Args:
      grown: ShapeDtypeStructs of what growth produces.
      expected: ShapeDtypeStructs of the grown model's state (its trainer's).
      what: name of the tree for error messages.

    Raises:
      ValueError: the trees differ in structure, or a shape or dtype differs (a growth
        rule and the model disagree).
    """
    leaves, treedef = jax.tree.flatten(grown)
    expected_leaves, expected_def = jax.tree.flatten(expected)
    if treedef != expected_def:  # type: ignore[operator]
        raise ValueError(
            f"grown {what} do not have the grown model's structure:\n  grown: {treedef}\n"
            f"  model: {expected_def}"
        )
    for leaf, spec in zip(leaves, expected_leaves, strict=True):
        if (tuple(leaf.shape), leaf.dtype) != (tuple(spec.shape), spec.dtype):
            raise ValueError(
                f"grown {what}: {leaf.shape} {leaf.dtype} but the model has "
                f"{spec.shape} {spec.dtype}"
            )


def _count(params: Any) -> int:
    return int(sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(params)))


def grow_train_state(
    trainer: trainer_lib.Trainer,
    state: trainer_lib.TrainState,
    requests: str | Sequence[str],
    rng: jax.Array,
) -> GrowthResult:
    """Grows a partitioned train state without changing the function the model computes.

    Args:
      trainer: the trainer of the current model.
      state: its train state (not donated; still valid afterwards), on the trainer's
        shardings.
      requests: growth requests (growth/requests.py), applied in order.
      rng: PRNG key of the new free entries (`growth_schedule.growth_rng`).

    Returns:
      the grown trainer and state, with sizes and timing.

    Raises:
      growth.GrowthError: a request is malformed or not exact for this model.
    """
    start = time.perf_counter()
    config = growth_hooks.model_config(trainer.model)
    old = trainer.abstract_state
    expansion = growth.plan_expansion(config, old.params, requests, opt_state=old.opt_state)
    new_trainer = trainer.for_model(growth_hooks.with_config(trainer.model, expansion.config))
    abstract, shardings = new_trainer.abstract_state, new_trainer.state_shardings
    grown_params, grown_opt_state = expansion.abstract_state(old.params, old.opt_state)
    check_grown(grown_params, abstract.params, "params")
    check_grown(grown_opt_state, abstract.opt_state, "optimizer state")
    params, opt_state = expansion.apply(
        state.params,
        state.opt_state,
        rng=rng,
        out_shardings=(shardings.params, shardings.opt_state),
    )
    new_state = trainer_lib.TrainState(step=state.step, params=params, opt_state=opt_state)
    jax.block_until_ready(new_state)
    new_config = expansion.config
    return GrowthResult(
        trainer=new_trainer,
        state=new_state,
        config_before=config,
        config_after=new_config,
        num_params_before=_count(old.params),
        num_params_after=_count(abstract.params),
        seconds=time.perf_counter() - start,
    )
