"""The evolved system as one evogrow checkpoint, written and read back.

`export_system` writes it; `load_system_model` rebuilds the model from it (the gin
factory of eval and infer).

t5x users evaluate a checkpoint directory, so the system is exported once:

    ./run.sh export_system --gin_file=gin/evolution/export_system.gin \
        --gin.STORE_DIR="'S'" --gin.MODEL_DIR="'M'"
    ./run.sh eval --gin_file=gin/evolution/eval_system.gin \
        --gin.CHECKPOINT_PATH="'M'" --gin.EVAL_OUTPUT_DIR="'E'"

By default the export routes every task the system has, and eval / infer score the
tasks the checkpoint routes (`system_mixture`); naming a mixture narrows either.

The checkpoint (M/checkpoints/0) holds the pool {component_id: parameters}, each shared
component once, and in its metadata the routes (`SystemConfig.to_json()`: for each task of
the mixture its `task_id`, best path, slots and architecture), so the model is rebuilt
from the directory alone, whatever the store has published since. Task ids are read from
the tasks' own data: the `task_id` feature their examples carry.
"""

from __future__ import annotations

import hashlib
import logging
import os
import types
from collections.abc import Sequence

import flax.linen as nn
import jax
import numpy as np
import seqio

from evolution import store as store_lib
from evolution.export import system_model
from training import checkpoints as checkpoints_lib
from training import data as data_lib

logger = logging.getLogger("evogrow")

# The six-task mixture `evolution.export.t5x_export` routes by default.
DEFAULT_MIXTURE = "evolution_image_rgb32_v1"

EXPORT_STEP = 0
# The checkpoint metadata key holding `SystemConfig.to_json()`.
METADATA_KEY = "system"


class ExportError(ValueError):
    """The export's target cannot take the system (it holds checkpoints already)."""


def task_ids_of(
    mixture_or_task_name: str | Sequence[str], module: str | None = "tasks"
) -> dict[str, int]:
    """Each task's `task_id`, as the first example of its data carries it.

    Args:
      mixture_or_task_name: a seqio mixture (each of its tasks) or task, or task names.
      module: imported first to register the names.

    Returns:
      task name -> task_id, in the mixture's order.

    Raises:
      training.data.UnknownTaskError: an unknown name.
      ValueError: a task without a `task_id` feature or without examples.
    """
    if isinstance(mixture_or_task_name, str):
        names: Sequence[str] = [mixture_or_task_name]
    else:
        names = mixture_or_task_name
    members: list[seqio.Task] = []
    for name in names:
        provider = data_lib.get_mixture_or_task(name, module)
        members += provider.tasks if isinstance(provider, seqio.Mixture) else [provider]
    ids = {}
    for task in members:
        if "task_id" not in task.output_features:
            raise ValueError(
                f"Task {task.name!r} has no 'task_id' feature, by which the system routes; "
                "use the `_rgb32_v1` variants (tasks/offline_image.py)."
            )
        split = "test" if "test" in task.splits else task.splits[0]
        dataset = task.get_dataset(None, split=split, shuffle=False, num_epochs=1)
        first = next(iter(dataset.take(1).as_numpy_iterator()), None)
        if first is None:
            raise ValueError(f"Task {task.name!r} split {split!r} holds no examples.")
        ids[task.name] = int(np.asarray(first["task_id"]))
    return ids


def export_system(
    *,
    store_dir: str,
    model_dir: str,
    mixture_or_task_name: str | None = None,
    module: str | None = "tasks",
) -> str:
    """Writes the system of a store's best paths, one route per task, as a checkpoint.

    Args:
      store_dir: the store (`evolution.store.open_store`).
      model_dir: a new model directory; the checkpoint goes to `model_dir/checkpoints`.
      mixture_or_task_name: the tasks to route (each needs a best active path); None:
        every task of the system with a path (the root's task aside).
      module: imported to register the tasks.

    Returns:
      The checkpoint directory.

    Raises:
      ExportError: `model_dir` holds checkpoints already.
      system_model.MissingTaskError: a task of the mixture has no active path in the
        store.
      ValueError: the stored parameters do not fit the paths.
    """
    directory = os.path.join(model_dir, "checkpoints")
    if os.path.isdir(directory) and os.listdir(directory):
        raise ExportError(f"{directory} is not empty; export the system to a fresh model_dir.")
    if not os.path.isdir(store_dir):
        raise ValueError(f"No store at {store_dir!r}.")
    store = store_lib.open_store(store_dir, read_only=True)
    try:
        task_ids = task_ids_of(mixture_or_task_name or _system_tasks(store, store_dir), module)
        model, params = system_model.SystemModel.from_store(store, task_ids)
    finally:
        store.close()
    params = jax.tree_util.tree_map(np.asarray, params)
    _check_fits(model, params)
    metadata = {
        "architecture": checkpoints_lib.architecture_metadata(model),
        METADATA_KEY: model.config.to_json(),
        "export": {
            "store_dir": os.path.abspath(store_dir),
            "mixture": mixture_or_task_name or list(task_ids),
        },
    }
    # No optimizer state: a zero counter stands in, as orbax refuses an empty item.
    state = types.SimpleNamespace(params=params, opt_state={"count": np.zeros((), np.int32)})
    checkpointer = checkpoints_lib.Checkpointer(
        directory, checkpoints_lib.SaveCheckpointConfig(period=0, async_save=False)
    )
    try:
        checkpointer.save(EXPORT_STEP, state, metadata)
    finally:
        checkpointer.close()
    for route in model.config.routes:
        logger.info("route task_id %d: %s -> path %s", route.task_id, route.task, route.path_id)
    logger.info(
        "exported %d tasks, %d components to %s",
        len(model.config.routes),
        len(params),
        directory,
    )
    return directory


def _system_tasks(store: store_lib.Store, store_dir: str) -> list[str]:
    """The system's tasks with a path, in the order they joined (the root's task aside)."""
    system_state = store.load_state()
    root_id = system_state.root_path_id
    root_task = system_state.paths[root_id].task if root_id else None
    names = [
        t
        for t in system_state.task_order()
        if t != root_task and system_state.best_path(t) is not None
    ]
    if not names:
        raise ValueError(f"The store {store_dir!r} has no evolved task to export.")
    return names


def _check_fits(model: system_model.SystemModel, params: dict) -> None:
    """Raises CheckpointShapeError unless the pool has exactly the model's shapes."""
    image_shape = model.config.routes[0].config.image_shape
    abstract = jax.eval_shape(
        lambda rng: model.get_initial_variables(rng, {"image": (1, *image_shape)}),
        jax.random.key(0),
    )
    checkpoints_lib.check_shapes(params, nn.unbox(abstract["params"]))


def read_system_config(model_dir: str, step: int | None = None) -> system_model.SystemConfig:
    """The routes recorded in a system checkpoint (written by `export_system`).

    Args:
      model_dir: the model directory (or its `checkpoints/` folder).
      step: the checkpoint step; None takes the latest.

    Returns:
      The config.

    Raises:
      FileNotFoundError: no such checkpoint.
      ValueError: the checkpoint holds no system (e.g. one written by train).
    """
    directory = checkpoints_lib.resolve_directory(model_dir)
    checkpointer = checkpoints_lib.Checkpointer(directory, read_only=True)
    try:
        metadata = checkpointer.read_metadata(step)
    finally:
        checkpointer.close()
    if METADATA_KEY not in metadata:
        raise ValueError(
            f"The checkpoint in {directory} holds no evolved system (no '{METADATA_KEY}' "
            "metadata); write one with evolution.export.system_checkpoint.export_system."
        )
    return system_model.SystemConfig.from_json(metadata[METADATA_KEY])


def system_mixture(*, model_dir: str, step: int | None = None) -> str:
    """A seqio mixture of the tasks a system checkpoint routes (eval's default data).

    Registered in this process under a name derived from the tasks, once.

    Args:
      model_dir: the model directory written by `export_system`.
      step: the checkpoint step; None takes the latest.

    Returns:
      The mixture's name.
    """
    tasks = read_system_config(model_dir, step).tasks
    digest = hashlib.sha1(",".join(tasks).encode()).hexdigest()[:10]
    name = f"exported_system_{digest}"
    if name not in seqio.MixtureRegistry.names():
        seqio.MixtureRegistry.add(name, [(task, 1.0) for task in tasks])
    return name


def load_system_model(
    *,
    model_dir: str,
    step: int | None = None,
    mixture_or_task_name: str | None = None,
    module: str | None = "tasks",
) -> system_model.SystemModel:
    """The system model of a checkpoint directory (the gin factory of eval / infer).

    Args:
      model_dir: the model directory written by `export_system` (or its checkpoints/).
      step: the checkpoint step; None takes the latest.
      mixture_or_task_name: when given, every task of it must have a route.
      module: imported to register `mixture_or_task_name`.

    Returns:
      The model; its params come from the same checkpoint (`evogrow.eval.restore_params`).

    Raises:
      ValueError: the checkpoint holds no system, or a task of the mixture has no route.
    """
    config = read_system_config(model_dir, step)
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
