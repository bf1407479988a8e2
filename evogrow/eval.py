"""`evaluate`: score a checkpoint's predictions on a dataset (t5x/eval.py's surface).

Restores only the params (shape-checked), predicts every example of every task of the
config's split with `predict_batch`, and writes accuracy (and the task's metric_fns) to
summaries and `metrics.jsonl` under `output_dir`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import numpy as np

from evogrow.train import SummarizeConfigFn
from training import checkpoints as checkpoints_lib
from training import data as data_lib
from training import evaluation as evaluation_lib
from training import partitioning, reporting
from training import trainer as trainer_lib
from training.partitioning import Partitioner

logger = logging.getLogger("evogrow")


def restore_params(
    model: Any,
    partitioner: Partitioner,
    dataset_cfg: data_lib.DatasetConfig,
    restore_checkpoint_cfg: checkpoints_lib.RestoreCheckpointConfig,
) -> tuple[Any, Any, Any, int]:
    """Restores a checkpoint's params into the partitioner's shardings.

    A checkpoint of a grown run restores into the architecture it recorded (the returned
    model), not the one of the gin file.

    Args:
      model: the t5x-contract model whose params to restore.
      partitioner: mesh and axis rules.
      dataset_cfg: gives the batch shapes the model is initialised (abstractly) with.
      restore_checkpoint_cfg: the model directory (`path`) and `step` (None: latest).

    Returns:
      (model for the checkpoint's architecture, params, param shardings, step).

    Raises:
      ValueError: no `path` in the config.
      CheckpointShapeError: the checkpoint does not fit the model.
    """
    if not restore_checkpoint_cfg.path:
        raise ValueError("restore_checkpoint_cfg.path must name a model directory")
    directory = checkpoints_lib.resolve_directory(restore_checkpoint_cfg.path)
    checkpointer = checkpoints_lib.Checkpointer(directory, read_only=True)
    model = checkpoints_lib.model_for_checkpoint(
        model, checkpointer.read_metadata(restore_checkpoint_cfg.step)
    )
    layout = partitioner.get_data_layout(dataset_cfg.batch_size)
    task = data_lib.subtask_names(dataset_cfg)[0]
    spec = data_lib.get_eval_batches(
        dataset_cfg,
        task,
        shard_id=layout.shard_id,
        num_shards=layout.num_shards,
        per_host_batch_size=layout.per_host_batch_size,
        feature_converter_cls=model.FEATURE_CONVERTER_CLS,
        num_batches=1,
    )[0]
    shapes = {k: (layout.batch_size, *v.shape[1:]) for k, v in spec.items()}
    types = {k: v.dtype for k, v in spec.items()}
    boxed = trainer_lib.abstract_variables(model, shapes, types)["params"]
    shardings = partitioner.shardings(partitioner.param_specs(boxed))
    target = partitioning.with_shardings(nn.unbox(boxed), shardings)
    items, meta = checkpointer.restore({"params": target}, restore_checkpoint_cfg.step)
    checkpointer.close()
    logger.info("restored params of %s step %d", directory, meta["step"])
    return model, items["params"], shardings, int(meta["step"])


def mixture_summary(per_task: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """The row of a whole mixture: accuracy over all its examples and the task mean.

    Args:
      per_task: task -> {"accuracy", "num_examples", ...} of each member task.

    Returns:
      {"accuracy" (example-weighted), "mean_task_accuracy", "num_examples"}.
    """
    total = float(sum(v["num_examples"] for v in per_task.values()))
    weighted = sum(v["accuracy"] * v["num_examples"] for v in per_task.values())
    return {
        "accuracy": weighted / total if total else 0.0,
        "mean_task_accuracy": float(np.mean([v["accuracy"] for v in per_task.values()])),
        "num_examples": total,
    }


def evaluate(
    *,
    model: Any,
    dataset_cfg: data_lib.DatasetConfig,
    restore_checkpoint_cfg: checkpoints_lib.RestoreCheckpointConfig,
    partitioner: Partitioner,
    output_dir: str,
    summarize_config_fn: SummarizeConfigFn | None = None,
) -> dict[str, dict[str, float]]:
    """Evaluates a checkpoint's predictions on every task of `dataset_cfg`.

    Args:
      model: a t5x-contract model.
      dataset_cfg: the data (split, batch size); mixtures are evaluated task by task.
      restore_checkpoint_cfg: which checkpoint (`path`: a model directory, `step`).
      partitioner: mesh and axis rules.
      output_dir: summaries (`inference_eval/TASK`) and `metrics.jsonl` go here.
      summarize_config_fn: (output_dir, writer, step) -> None; records the config.

    Returns:
      task -> {"accuracy", "num_examples", ...}.
    """
    model, params, shardings, step = restore_params(
        model, partitioner, dataset_cfg, restore_checkpoint_cfg
    )
    evaluator = evaluation_lib.from_dataset_config(dataset_cfg, model.FEATURE_CONVERTER_CLS)
    inference = evaluation_lib.PartitionedInference(
        model, partitioner, shardings, dataset_cfg.batch_size
    )
    future, _ = evaluator.evaluate(
        compute_metrics=True, step=step, predict_fn=inference.predict_fn(params)
    )
    metrics = future.result()
    if len(metrics) > 1:  # a mixture: one more row for all of it
        metrics[dataset_cfg.mixture_or_task_name] = mixture_summary(metrics)
    os.makedirs(output_dir, exist_ok=True)
    for task, values in metrics.items():
        writer = reporting.create_writer(os.path.join(output_dir, "inference_eval", task))
        if summarize_config_fn is not None:
            summarize_config_fn(output_dir, writer, step)
        writer.write_scalars(step, values)
        writer.close()
        reporting.append_history(
            output_dir,
            {
                "step": step,
                "kind": "inference_eval",
                "task": task,
                "split": dataset_cfg.split,
                **values,
            },
        )
        shown = reporting.format_metrics(values)
        logger.info("eval %s (%s) step %d: %s", task, dataset_cfg.split, step, shown)
    return metrics
