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
    if mode not in ("predict", "score"):
        raise ValueError(f"mode must be 'predict' or 'score', got {mode!r}")
    model, params, shardings, step = restore_params(
        model, partitioner, dataset_cfg, restore_checkpoint_cfg
    )
    evaluator = evaluation_lib.from_dataset_config(dataset_cfg, model.FEATURE_CONVERTER_CLS)
    inference = evaluation_lib.PartitionedInference(
        model, partitioner, shardings, dataset_cfg.batch_size
    )
    if mode == "predict":
        _, outputs = evaluator.evaluate(
            compute_metrics=False, predict_fn=inference.predict_fn(params)
        )
    else:
        _, outputs = evaluator.evaluate(compute_metrics=False, score_fn=inference.score_fn(params))
    paths = {}
    for task, output in outputs.items():
        records = evaluator.records(task, output)
        paths[task] = evaluation_lib.write_predictions(output_dir, task, step, records)
        logger.info("wrote %d %s records of %s to %s", len(records), mode, task, paths[task])
    return paths
