"""`infer`: write a checkpoint's predictions as JSON lines (t5x/infer.py's surface).

One file per task, `output_dir/TASK-STEP.jsonl`, one line per example:
{"index", "label", "prediction"} (mode "predict") or {"index", "label", "score"}
(mode "score").
"""

from __future__ import annotations

import logging
from typing import Any

from evogrow.eval import restore_params
from training import checkpoints as checkpoints_lib
from training import data as data_lib
from training import evaluation as evaluation_lib
from training.partitioning import Partitioner

logger = logging.getLogger("evogrow")


def infer(
    *,
    mode: str = "predict",
    model: Any,
    dataset_cfg: data_lib.DatasetConfig,
    restore_checkpoint_cfg: checkpoints_lib.RestoreCheckpointConfig,
    partitioner: Partitioner,
    output_dir: str,
) -> dict[str, str]:
    """Predicts (or scores) every example of every task of `dataset_cfg`.

    Args:
      mode: "predict" (`predict_batch`) or "score" (`score_batch`).
      model: a t5x-contract model.
      dataset_cfg: the data (split, batch size); mixtures are written task by task.
      restore_checkpoint_cfg: which checkpoint (`path`: a model directory, `step`).
      partitioner: mesh and axis rules.
      output_dir: where the JSON lines files go.

    Returns:
      task -> path of its predictions file.
    """
    model, params, shardings, step = restore_params(
        model, partitioner, dataset_cfg, restore_checkpoint_cfg
    )
    evaluator = evaluation_lib.ClassificationEvaluator(
        model, partitioner, dataset_cfg, shardings, mode=mode
    )
    paths = {}
    for task in evaluator.task_names:
        records = evaluator.predict(params, task)
        paths[task] = evaluation_lib.write_predictions(output_dir, task, step, records)
        logger.info("wrote %d %s records of %s to %s", len(records), mode, task, paths[task])
    return paths
