"""An inference evaluator built from a model's `predict_batch`: accuracy and predictions.

Every process predicts on its shard of each task's split (padded to full batches with a
mask); predictions come back replicated, so every process sees all of them, in the same
order, and computes the same metrics. Task `metric_fns` of the seqio task, when it has
any, are applied to (labels, predictions) as well.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from training import data as data_lib


class ClassificationEvaluator:
    """Evaluates predictions of every task of a dataset config against its labels.

    Args:
      model: a t5x-contract model (`predict_batch`, `FEATURE_CONVERTER_CLS`).
      partitioner: the run's `Partitioner`.
      dataset_cfg: which split and batch size to evaluate (tasks of a mixture each).
      param_shardings: shardings of the params.
      mode: "predict" (`predict_batch`: a class per example) or "score" (`score_batch`:
        a log-likelihood per example); records carry it under that name.
    """

    def __init__(
        self,
        model: Any,
        partitioner: Any,
        dataset_cfg: data_lib.DatasetConfig,
        param_shardings: Any,
        mode: str = "predict",
    ):
        if mode not in ("predict", "score"):
            raise ValueError(f"mode must be 'predict' or 'score', got {mode!r}")
        self.mode = mode
        self._output_key = "prediction" if mode == "predict" else "score"
        self._model = model
        self._partitioner = partitioner
        self._cfg = dataset_cfg
        self._layout = partitioner.get_data_layout(dataset_cfg.batch_size)
        self.task_names = data_lib.subtask_names(dataset_cfg)
        self._batches: dict[str, list[dict[str, np.ndarray]]] = {}
        self._param_shardings = param_shardings
        self._predict: Any = None

    def _predict_fn(self, params: Any, batch: Mapping[str, Any]) -> dict[str, Any]:
        model_batch = {k: v for k, v in batch.items() if not k.startswith("_")}
        if self.mode == "predict":
            output = self._model.predict_batch(params, model_batch)
        else:
            output = self._model.score_batch(params, model_batch)
        return {
            self._output_key: output,
            "label": batch["label"],
            "_mask": batch["_mask"],
            "_index": batch["_index"],
        }

    def _task_batches(self, task: str) -> list[dict[str, np.ndarray]]:
        if task not in self._batches:
            batches = data_lib.get_eval_batches(
                self._cfg,
                task,
                shard_id=self._layout.shard_id,
                num_shards=self._layout.num_shards,
                per_host_batch_size=self._layout.per_host_batch_size,
                feature_converter_cls=self._model.FEATURE_CONVERTER_CLS,
            )
            if not batches:
                raise ValueError(f"split {self._cfg.split!r} of {task!r} is empty here")
            if jax.process_count() > 1:
                counts = multihost_utils.process_allgather(np.int32(len(batches)))
                batches += [data_lib.empty_batch_like(batches[0])] * (
                    int(np.max(counts)) - len(batches)
                )
            self._batches[task] = batches
        return self._batches[task]

    def _compiled_predict(self, first_batch: Mapping[str, np.ndarray]) -> Any:
        if self._predict is None:
            batch_sharding = self._partitioner.batch_sharding
            self._predict = self._partitioner.partition(
                self._predict_fn,
                in_shardings=(self._param_shardings, {k: batch_sharding for k in first_batch}),
                out_shardings=self._partitioner.replicated,
            )
        return self._predict

    def predict(self, params: Any, task: str) -> list[dict[str, Any]]:
        """Predicts every example of `task`'s split.

        Args:
          params: the (partitioned) params.
          task: one of `task_names`.

        Returns:
          records {"index", "label", "prediction" (or "score")} sorted by index, padding
          removed.
        """
        batches = self._task_batches(task)
        predict = self._compiled_predict(batches[0])
        outputs = []
        for batch in batches:
            outputs.append(
                predict(params, self._partitioner.shard_batch(batch, self._cfg.batch_size))
            )
        host = [jax.device_get(out) for out in outputs]
        records = []
        for out in host:
            for i in np.flatnonzero(out["_mask"]):
                records.append(
                    {
                        "index": int(out["_index"][i]),
                        "label": _to_json(out["label"][i]),
                        self._output_key: _to_json(out[self._output_key][i]),
                    }
                )
        return sorted(records, key=lambda r: r["index"])

    def evaluate(
        self, params: Any
    ) -> tuple[dict[str, dict[str, float]], dict[str, list[dict[str, Any]]]]:
        """Predicts every task and scores it.

        Args:
          params: the (partitioned) params.

        Returns:
          (metrics, predictions): task -> {"accuracy", "num_examples", task metrics...},
          and task -> prediction records.
        """
        metrics, predictions = {}, {}
        for task in self.task_names:
            records = self.predict(params, task)
            predictions[task] = records
            metrics[task] = score(records, _task_metric_fns(task, self._cfg.module))
        return metrics, predictions


def score(records: Sequence[Mapping[str, Any]], metric_fns: Sequence[Any] = ()) -> dict:
    """Accuracy (and any seqio metric_fns) of prediction records.

    Args:
      records: {"label", "prediction"} dicts.
      metric_fns: callables (targets, predictions) -> {name: value}.

    Returns:
      {"accuracy", "num_examples", ...}.
    """
    labels = [r["label"] for r in records]
    preds = [r["prediction"] for r in records]
    result = {
        "accuracy": float(np.mean([p == t for p, t in zip(preds, labels, strict=True)]))
        if records
        else 0.0,
        "num_examples": float(len(records)),
    }
    for fn in metric_fns:
        result.update({k: float(v) for k, v in fn(labels, preds).items()})
    return result


def _task_metric_fns(task: str, module: str | None) -> list[Any]:
    provider = data_lib.get_mixture_or_task(task, module)
    return list(getattr(provider, "predict_metric_fns", None) or [])


def write_predictions(
    output_dir: str, task: str, step: int, records: Sequence[Mapping[str, Any]]
) -> str:
    """Writes prediction records as JSON lines (process 0 only).

    Args:
      output_dir: directory of the files.
      task: task name (part of the file name).
      step: checkpoint step (part of the file name).
      records: JSON-safe dicts.

    Returns:
      the file path.
    """
    path = os.path.join(output_dir, f"{task}-{step:06d}.jsonl")
    if jax.process_index() == 0:
        os.makedirs(output_dir, exist_ok=True)
        with open(path, "w") as f:
            for record in records:
                f.write(json.dumps(dict(record)) + "\n")
    return path


def _to_json(value: Any) -> Any:
    value = np.asarray(value)
    return value.item() if value.ndim == 0 else value.tolist()
