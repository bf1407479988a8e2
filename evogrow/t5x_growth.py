"""Growing a t5x checkpoint of an evogrow model, so that the next t5x stage restores it.

t5x (with its default `OrbaxCheckpointManagerInterface`) writes each step as
`MODEL_DIR/checkpoint_N/` holding an orbax PyTree item `state` = {"target": params,
"state": {"step", "param_states": the optax state, named tuples as dicts}} and a
`dataset` item. t5x checkpoints do not record the architecture, so it comes from the
t5x gin file of the model (`MODEL`, e.g. gin/t5x/tiny_model.gin). The grown step is
written to `OUT/checkpoint_N/`; the next stage runs t5x.train with `MODEL_DIR=OUT` and
the grown sizes, which `grown_gin_bindings` prints.

    ./run.sh grow --t5x --gin_file=gin/t5x/tiny_model.gin --checkpoint DIR \
        --expand "mlp_dim=256" --out DIR

Reading and writing use orbax only; t5x is needed to parse its gin files.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Sequence
from typing import Any

import gin
import jax
import numpy as np
import orbax.checkpoint as ocp

import growth
from models import growth_hooks
from training import growth_schedule as growth_schedule_lib

_STEP_DIR = re.compile(r"^checkpoint_(\d+)$")
_SIZE_FIELDS = ("hidden", "mlp_dim", "num_heads", "qk_dim", "v_dim", "num_layers", "norm_eps")


class T5XCheckpointError(ValueError):
    """The path holds no t5x checkpoint of the expected layout, or the output exists."""


def find_step_dir(path: str) -> str:
    """Returns the `checkpoint_N` folder: `path` itself, or the latest one inside it.

    Raises:
      T5XCheckpointError: no `checkpoint_N` folder there.
    """
    path = os.path.normpath(path)
    if _STEP_DIR.match(os.path.basename(path)) and os.path.isdir(path):
        return path
    steps = sorted(
        (int(m.group(1)), name)
        for name in (os.listdir(path) if os.path.isdir(path) else [])
        if (m := _STEP_DIR.match(name))
    )
    if not steps:
        raise T5XCheckpointError(f"no t5x checkpoint_N folder at {path!r}")
    return os.path.join(path, steps[-1][1])


@gin.configurable
def model_from_gin(model: Any = gin.REQUIRED) -> Any:
    """Returns the gin-bound model (bind `model_from_gin.model = %MODEL`)."""
    return model


def load_model_config(gin_files: Sequence[str], bindings: Sequence[str]) -> Any:
    """Parses t5x model gin files and returns the evogrow model config they describe.

    Args:
      gin_files: gin files binding MODEL (e.g. gin/t5x/tiny_model.gin).
      bindings: extra gin bindings.

    Returns:
      the architecture config dataclass of MODEL.
    """
    from evogrow import gin_utils

    gin.clear_config()
    try:
        gin_utils.parse_gin(
            [os.getcwd(), *gin_utils.DEFAULT_GIN_SEARCH_PATHS],
            list(gin_files),
            [*bindings, "evogrow.t5x_growth.model_from_gin.model = %MODEL"],
        )
        return growth_hooks.model_config(model_from_gin())
    finally:
        gin.clear_config()


def grown_gin_bindings(before: Any, after: Any) -> list[str]:
    """Gin bindings that turn the `before` config into `after` (sizes that changed)."""
    module = type(after).__module__.rsplit(".", 1)[-1]  # the gin files' import alias
    name = f"{module}.{type(after).__name__}"
    return [
        f"{name}.{field} = {getattr(after, field)!r}"
        for field in _SIZE_FIELDS
        if getattr(before, field) != getattr(after, field)
    ]


def grow_t5x_checkpoint(
    checkpoint: str,
    requests: str | Sequence[str],
    out: str,
    *,
    config: Any,
    seed: int = 0,
) -> tuple[Any, str]:
    """Grows a t5x checkpoint's params and optax state into `out/checkpoint_N`.

    Args:
      checkpoint: a t5x model directory (latest step) or one `checkpoint_N` folder.
      requests: growth requests, e.g. "mlp_dim=256,add_layer@2".
      out: the new model directory.
      config: the architecture of the checkpoint (`load_model_config`).
      seed: PRNG seed of new free entries.

    Returns:
      (grown config, path of the written `checkpoint_N`).

    Raises:
      T5XCheckpointError: no checkpoint, an unexpected layout, or the output exists.
      growth.GrowthError: a request is malformed or not exact for the model.
    """
    step_dir = find_step_dir(checkpoint)
    state_dir = os.path.join(step_dir, "state")
    if not os.path.isdir(state_dir):
        raise T5XCheckpointError(
            f"{step_dir} has no orbax `state` item; only t5x's Orbax checkpoint format "
            "(OrbaxCheckpointManagerInterface, t5x's default) is supported"
        )
    target_dir = os.path.join(out, os.path.basename(step_dir))
    if os.path.exists(target_dir):
        raise T5XCheckpointError(f"{target_dir} already exists; choose a new --out")
    with ocp.PyTreeCheckpointer() as checkpointer:
        tree = checkpointer.metadata(state_dir).item_metadata.tree
        restore_args = jax.tree.map(
            lambda _: ocp.RestoreArgs(restore_type=np.ndarray),
            tree,
            is_leaf=lambda x: hasattr(x, "shape"),
        )
        state = checkpointer.restore(
            state_dir, args=ocp.args.PyTreeRestore(restore_args=restore_args)
        )
    if set(state) != {"state", "target"} or "param_states" not in state["state"]:
        raise T5XCheckpointError(
            f"{state_dir} holds {sorted(state)}, not t5x's {{'state', 'target'}} train state"
        )
    step = int(np.asarray(state["state"]["step"]))
    new_config, params, param_states = growth.expand(
        config,
        state["target"],
        requests,
        rng=growth_schedule_lib.growth_rng(seed, step),
        opt_state=state["state"]["param_states"],
    )
    grown = {"state": {**state["state"], "param_states": param_states}, "target": params}
    shutil.copytree(step_dir, target_dir, ignore=shutil.ignore_patterns("state"))
    with ocp.PyTreeCheckpointer() as checkpointer:
        checkpointer.save(os.path.join(target_dir, "state"), grown)
    return new_config, target_dir
