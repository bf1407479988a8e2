"""The evolved system as a t5x checkpoint, for t5x's own eval and infer binaries.

`export_system_t5x` writes the system of a store's best paths (`evolution.export.system_model`,
one route per task of a mixture) in the layout t5x restores:

    MODEL_DIR/system.json      the routes (`SystemConfig.to_json()`) and where they came from
    MODEL_DIR/checkpoint_0/    t5x's orbax checkpoint of an `InferenceState`: `state` =
                               {"target": {component_id: params}, "state": {"step": 0}}

It saves with t5x's own `OrbaxCheckpointManagerInterface` (t5x's default checkpoint
manager), so it needs t5x importable (docs/usage.md, "Using t5x"). t5x checkpoints do not record
an architecture, so the model is rebuilt from `system.json` by `load_t5x_system_model`,
the gin factory of gin/t5x/system_model.gin; gin wraps it in
`models.t5x_adapter.T5XModel`, which gives t5x plain params and `params_axes`. Then

    python -m t5x.eval --gin_search_paths=gin --gin_file=gin/t5x/system_eval.gin \
      --gin.CHECKPOINT_PATH="'MODEL_DIR/checkpoint_0'" --gin.EVAL_OUTPUT_DIR="'E'"
    python -m t5x.infer --gin_search_paths=gin --gin_file=gin/t5x/system_infer.gin \
      --gin.CHECKPOINT_PATH="'MODEL_DIR/checkpoint_0'" --gin.INFER_OUTPUT_DIR="'I'"

evaluate the whole system on the mixture in one run: accuracy per task from
`training.evaluation.ClassificationEvaluator`, one prediction per example from infer.
The checkpoint has no optimizer state: t5x's eval and infer restore params only.
"""

from __future__ import annotations

import json
import os
import re
import types
from typing import Any

import flax
import jax
import numpy as np

from evolution import store as store_lib
from evolution.export import system_checkpoint, system_model
from models import partitioning as axis_rules
from models import t5x_adapter
from training import checkpoints as checkpoints_lib
from training import data as data_lib

DEFAULT_MIXTURE = system_checkpoint.DEFAULT_MIXTURE
EXPORT_STEP = 0
SYSTEM_FILE = "system.json"
T5X_INSTALL_HINT = (
    "t5x is not importable. It is not on PyPI: install it with airio and jestimator from "
    "GitHub as docs/usage.md, 'Using t5x', shows (pip install --no-deps "
    "'git+https://github.com/google-research/jestimator' 'git+https://github.com/google/airio' "
    "'git+https://github.com/google-research/t5x' plus their listed dependencies), or put an "
    "existing t5x installation on PYTHONPATH."
)
_STEP_DIR = re.compile(r"^checkpoint_\d+$")


class T5XNotInstalledError(ImportError):
    """t5x is needed (to write its checkpoint format) and cannot be imported."""


def _import_t5x() -> types.SimpleNamespace:
    """t5x's checkpoints, partitioning and utils modules, or a clear error."""
    try:
        from t5x import checkpoints, partitioning, utils
    except ImportError as error:
        raise T5XNotInstalledError(f"{T5X_INSTALL_HINT} ({error})") from error
    return types.SimpleNamespace(checkpoints=checkpoints, partitioning=partitioning, utils=utils)


def model_dir_of(checkpoint_path: str) -> str:
    """The exported model directory of a t5x checkpoint path.

    Args:
      checkpoint_path: the model directory itself or one `checkpoint_N` folder in it
        (t5x's CHECKPOINT_PATH).

    Returns:
      The directory that holds `system.json`.
    """
    path = os.path.normpath(checkpoint_path)
    return os.path.dirname(path) if _STEP_DIR.match(os.path.basename(path)) else path


def read_t5x_system_config(checkpoint_path: str) -> system_model.SystemConfig:
    """The routes written by `export_system_t5x` beside the t5x checkpoint.

    Args:
      checkpoint_path: the exported model directory or its `checkpoint_N` folder.

    Returns:
      The config.

    Raises:
      FileNotFoundError: no `system.json` there (not a system exported for t5x).
    """
    path = os.path.join(model_dir_of(checkpoint_path), SYSTEM_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"No {SYSTEM_FILE} at {path}: {checkpoint_path!r} is not a system exported by "
            "evolution.export.t5x_export.export_system_t5x."
        )
    with open(path) as f:
        return system_model.SystemConfig.from_json(json.load(f)[system_checkpoint.METADATA_KEY])


def load_t5x_system_model(
    *,
    checkpoint_path: str,
    mixture_or_task_name: str | None = None,
    module: str | None = "tasks",
) -> system_model.SystemModel:
    """The system model of a t5x export (the gin factory of gin/t5x/system_model.gin).

    Args:
      checkpoint_path: the exported model directory or its `checkpoint_N` folder.
      mixture_or_task_name: when given, every task of it must have a route.
      module: imported to register `mixture_or_task_name`.

    Returns:
      The model (unwrapped; gin wraps it in `models.t5x_adapter.T5XModel`). t5x restores
      its params from the checkpoint.

    Raises:
      FileNotFoundError: not a system exported for t5x.
      ValueError: a task of the mixture has no route.
    """
    config = read_t5x_system_config(checkpoint_path)
    if mixture_or_task_name:
        dataset_cfg = data_lib.DatasetConfig(
            mixture_or_task_name=mixture_or_task_name,
            task_feature_lengths=None,
            split="test",
            batch_size=1,
            shuffle=False,
            module=module,
        )
        config.check_covers(data_lib.subtask_names(dataset_cfg))
    return system_model.SystemModel(config)


def t5x_gin_bindings(
    *, checkpoint_dir: str, mixture_or_task_name: str, module: str | None
) -> list[str]:
    """The gin bindings that point t5x's eval / infer at an exported system.

    Args:
      checkpoint_dir: the written `checkpoint_N` folder.
      mixture_or_task_name: the routed mixture.
      module: the module registering it.

    Returns:
      `NAME = value` bindings (pass each as `--gin.NAME=value`).
    """
    return [
        f"CHECKPOINT_PATH = {checkpoint_dir!r}",
        f"MIXTURE_OR_TASK_NAME = {mixture_or_task_name!r}",
        f"MIXTURE_OR_TASK_MODULE = {module!r}",
    ]


def _partitioner(t5x: types.SimpleNamespace) -> Any:
    # Single-partition, as gin/t5x/system_{eval,infer}.gin evaluate with.
    return t5x.partitioning.PjitPartitioner(
        num_partitions=1, logical_axis_rules=axis_rules.standard_logical_axis_rules()
    )


def export_system_t5x(
    *,
    store_dir: str,
    model_dir: str,
    mixture_or_task_name: str = DEFAULT_MIXTURE,
    module: str | None = "tasks",
) -> str:
    """Writes the system of a store's best paths as a t5x checkpoint, plus its routes.

    Args:
      store_dir: the store (`evolution.store.open_store`).
      model_dir: a new directory: gets `system.json` and `checkpoint_0/`.
      mixture_or_task_name: the tasks to route (each needs a best active path).
      module: imported to register `mixture_or_task_name`.

    Returns:
      The written `checkpoint_0` folder (t5x's CHECKPOINT_PATH). The gin bindings for
      t5x's eval and infer are printed.

    Raises:
      T5XNotInstalledError: t5x is not importable.
      ValueError: `model_dir` is not empty, there is no store, a task of the mixture has
        no active path, or the stored parameters do not fit the paths.
    """
    t5x = _import_t5x()
    model_dir = os.path.abspath(model_dir)
    if os.path.isdir(model_dir) and os.listdir(model_dir):
        raise ValueError(f"{model_dir} is not empty; export the system to a fresh model_dir.")
    if not os.path.isdir(store_dir):
        raise ValueError(f"No store at {store_dir!r}.")
    task_ids = system_checkpoint.task_ids_of(mixture_or_task_name, module)
    store = store_lib.open_store(store_dir, read_only=True)
    try:
        model, params = system_model.SystemModel.from_store(store, task_ids)
    finally:
        store.close()
    params = jax.tree_util.tree_map(np.asarray, params)
    wrapped = t5x_adapter.T5XModel(model)
    partitioner = _partitioner(t5x)
    image_shape = model.config.routes[0].config.image_shape
    initializer = t5x.utils.TrainStateInitializer(
        optimizer_def=None,
        init_fn=wrapped.get_initial_variables,
        input_shapes={model.INPUT_FEATURE: (1, *image_shape)},
        partitioner=partitioner,
    )
    abstract = initializer.global_train_state_shape
    checkpoints_lib.check_shapes(params, flax.core.unfreeze(abstract.params))
    state = abstract.replace(step=np.zeros((), np.int32), params=flax.core.freeze(params))

    # t5x's manager falls back to the parent of a directory that does not exist yet.
    os.makedirs(model_dir, exist_ok=True)
    manager = t5x.checkpoints.OrbaxCheckpointManagerInterface(
        directory=model_dir, train_state=abstract, partitioner=partitioner
    )
    try:
        manager.save(state)
        manager.wait_until_finished()
    finally:
        manager.close()
    # Written last: a system.json means a complete export.
    with open(os.path.join(model_dir, SYSTEM_FILE), "w") as f:
        record = {
            system_checkpoint.METADATA_KEY: model.config.to_json(),
            "export": {
                "store_dir": os.path.abspath(store_dir),
                "mixture": mixture_or_task_name,
                "module": module,
                "step": EXPORT_STEP,
            },
        }
        json.dump(record, f, indent=1, sort_keys=True)
    checkpoint_dir = t5x.checkpoints.get_checkpoint_dir(model_dir, EXPORT_STEP)
    bindings = t5x_gin_bindings(
        checkpoint_dir=checkpoint_dir, mixture_or_task_name=mixture_or_task_name, module=module
    )
    routes = ", ".join(f"{r.task_id}:{r.task}->{r.path_id}" for r in model.config.routes)
    print(f"exported {len(model.config.routes)} routes ({routes}), {len(params)} components")
    print("t5x eval / infer: --gin_search_paths=gin --gin_file=gin/t5x/system_{eval,infer}.gin")
    for binding in bindings:
        name, value = binding.split(" = ", 1)
        print(f'  --gin.{name}="{value}"')
    return checkpoint_dir
