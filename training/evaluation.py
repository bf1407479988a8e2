"""The classification evaluator: built from a predict function, it yields metrics.

One evaluator serves our launchers and t5x's binaries. It keeps seqio.Evaluator's
interface, the one t5x builds and calls (`inference_evaluator_cls(mixture_or_task_name=...,
feature_converter=..., eval_split=..., ...)`, then `eval_tasks`, `model_feature_shapes`,
`evaluate(...)` and `close()`); seqio.Evaluator itself cannot serve our classification
tasks: it measures every output feature with `shape[0]` (a rank-0 `label` raises
IndexError) and decodes targets as token sequences. Metrics come from t5x-style infer
functions (a dataset of (index, features) -> [(index, output), ...]), as in big_vision's
evaluators/classification.py: accuracy of `predict_fn` against the `label` feature (plus
the task's `predict_metric_fns`), and the mean log-likelihood of the label from `score_fn`.
t5x supplies those functions itself; `PartitionedInference` builds them from a model and
our `Partitioner`. Gin binds the class in gin/t5x/*.gin with
`inference_evaluator_cls = @evaluation.ClassificationEvaluator`; this module imports
neither t5x nor gin.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
import seqio
import tensorflow as tf
from absl import logging
from clu import metric_writers
from jax.experimental import multihost_utils

from training import data as data_lib

# t5x's predict/score functions: dataset of (index, features) -> [(index, output), ...].
ModelFn = Callable[[tf.data.Dataset], Any]
TaskMetrics = dict[str, float]


def _eval_tasks(
    mixture_or_task_name: str | seqio.DatasetProviderBase, split: str, module: str | None
) -> list[seqio.Task]:
    provider = (
        mixture_or_task_name
        if isinstance(mixture_or_task_name, seqio.DatasetProviderBase)
        else data_lib.get_mixture_or_task(mixture_or_task_name, module)
    )
    return [task for task in seqio.get_subtasks(provider) if split in task.splits]


def _sorted_outputs(indices_and_outputs: Sequence[tuple[int, Any]]) -> np.ndarray:
    """Orders t5x's (index, output) pairs by example index; padding examples are gone."""
    ordered = sorted(indices_and_outputs, key=lambda pair: int(pair[0]))
    return np.asarray([output for _, output in ordered])


class ClassificationEvaluator:
    """Evaluates classification tasks from a predict function, with seqio.Evaluator's API.

    Args:
      mixture_or_task_name: a registered task or mixture (each sub-task is evaluated on
        its own), or the provider itself.
      feature_converter: the model's feature converter, built with `pack=False`.
      eval_split: the split to evaluate; tasks without it are skipped.
      use_cached: read the seqio cache.
      seed: seed for the (unshuffled) task pipeline's random preprocessors.
      sequence_length: task feature lengths; None measures them on the data (rank-0
        features get None, others the largest size along their sequence dimension).
      num_examples: evaluate only the first examples of each task (None: all).
      use_memory_cache: keep the converted examples in memory between evaluations.
      log_dir: where metrics are appended as JSON lines (`<task>-metrics.jsonl`) and
        written as TensorBoard scalars (`<task>/`, tags `eval/<metric>`, like seqio).
      logger_cls: accepted for seqio compatibility; a falsy value disables the JSON log.
      label_feature: the task feature holding the integer class.
      module: module to import before looking up `mixture_or_task_name` (registers it;
        None imports nothing).
    """

    def __init__(
        self,
        mixture_or_task_name: str | seqio.DatasetProviderBase,
        feature_converter: seqio.FeatureConverter,
        eval_split: str = "validation",
        use_cached: bool = False,
        seed: int | None = 42,
        sequence_length: Mapping[str, int | None] | None = None,
        num_examples: int | None = None,
        use_memory_cache: bool = True,
        log_dir: str | None = None,
        logger_cls: Sequence[Any] | None = None,
        label_feature: str = "label",
        module: str | None = None,
    ):
        if feature_converter.pack:
            raise ValueError("During evaluation, packing can't be used.")
        self._label_feature = label_feature
        self._log_dir = log_dir if logger_cls is None or len(logger_cls) else None
        self._eval_tasks = _eval_tasks(mixture_or_task_name, eval_split, module)
        self._labels: dict[str, np.ndarray] = {}
        self._model_datasets: dict[str, tf.data.Dataset] = {}
        self._model_feature_shapes: dict[str, tuple[int, ...]] = {}
        if not self._eval_tasks:
            logging.warning("No task of %s has split %r.", mixture_or_task_name, eval_split)
            return

        def task_dataset(task: seqio.Task, lengths) -> tf.data.Dataset:
            ds = task.get_dataset(
                sequence_length=lengths,
                split=eval_split,
                shuffle=False,
                num_epochs=1,
                seed=seed,
                use_cached=use_cached,
            )
            return ds.take(num_examples) if num_examples else ds

        if sequence_length is None:
            sequence_length = self._measure_lengths(
                feature_converter, [task_dataset(task, None) for task in self._eval_tasks]
            )
            logging.info("Evaluation feature lengths measured: %s", sequence_length)
        for task in self._eval_tasks:
            ds = task_dataset(task, sequence_length)
            if use_memory_cache:
                ds = ds.cache()
            labels = np.asarray([ex[label_feature] for ex in ds.as_numpy_iterator()])
            if not len(labels):
                raise ValueError(f"split {eval_split!r} of {task.name!r} has no example")
            self._labels[task.name] = labels.reshape(len(labels))
            # t5x's infer_fn needs a known length: the dataset is padded to whole batches.
            cardinality = tf.data.experimental.assert_cardinality(len(labels))
            model_ds = feature_converter(ds.apply(cardinality), sequence_length)
            self._model_datasets[task.name] = model_ds.enumerate()
        self._model_feature_shapes = {
            key: tuple(spec.shape) for key, spec in model_ds.element_spec.items()
        }

    @staticmethod
    def _measure_lengths(
        feature_converter: seqio.FeatureConverter, datasets: Sequence[tf.data.Dataset]
    ) -> dict[str, int | None]:
        specs = feature_converter.TASK_FEATURES
        lengths: dict[str, int | None] = {
            key: None if spec.rank == 0 else 0 for key, spec in specs.items()
        }
        for ds in datasets:
            for ex in ds.as_numpy_iterator():
                for key, spec in specs.items():
                    if spec.rank:
                        size = int(np.shape(ex[key])[spec.sequence_dim])
                        lengths[key] = max(lengths[key] or 0, size)
        return lengths

    @property
    def eval_tasks(self) -> Sequence[seqio.Task]:
        """The tasks that have the evaluation split."""
        return self._eval_tasks

    @property
    def model_feature_shapes(self) -> Mapping[str, tuple[int, ...]]:
        """Per-example shapes of the converted features (t5x builds input_shapes from it)."""
        return self._model_feature_shapes

    def evaluate(
        self,
        *,
        compute_metrics: bool,
        step: int | None = None,
        predict_fn: ModelFn | None = None,
        score_fn: ModelFn | None = None,
        predict_with_aux_fn: ModelFn | None = None,
        model_fns: Mapping[Any, ModelFn] | None = None,
    ) -> tuple[concurrent.futures.Future, dict[str, dict[str, np.ndarray]]]:
        """Runs the model over every task and computes accuracy / label log-likelihood.

        Args:
          compute_metrics: whether this process computes (and logs) the metrics.
          step: the checkpoint step, for the log.
          predict_fn: an infer function over `predict_batch` (class ids [B]).
          score_fn: an infer function over `score_batch` (log p(label) [B]).
          predict_with_aux_fn: unused (accepted for seqio compatibility).
          model_fns: unused (accepted for seqio compatibility).

        Returns:
          A future of {task: {"accuracy", "num_examples", "log_likelihood", ...}} (None
          when `compute_metrics` is False), and the raw outputs {task: {"predictions",
          "scores"}}, ordered by example index.
        """
        del predict_with_aux_fn, model_fns
        outputs: dict[str, dict[str, np.ndarray]] = {}
        for task in self._eval_tasks:
            model_ds = self._model_datasets[task.name]
            outputs[task.name] = {}
            if predict_fn is not None:
                outputs[task.name]["predictions"] = _sorted_outputs(predict_fn(model_ds))
            if score_fn is not None:
                outputs[task.name]["scores"] = _sorted_outputs(score_fn(model_ds))
        future: concurrent.futures.Future = concurrent.futures.Future()
        if not compute_metrics:
            future.set_result(None)
            return future, outputs
        all_metrics = {
            task.name: self._metrics(task, outputs[task.name]) for task in self._eval_tasks
        }
        for name, metrics in all_metrics.items():
            logging.info("%s step %s: %s", name, step, metrics)
            self._log(name, step, metrics)
        future.set_result(all_metrics)
        return future, outputs

    def records(self, task_name: str, output: Mapping[str, np.ndarray]) -> list[dict[str, Any]]:
        """JSON-safe records of one task's outputs, one per example.

        Args:
          task_name: one of `eval_tasks`' names.
          output: that task's outputs from `evaluate` ("predictions" and/or "scores").

        Returns:
          {"index", "label", "prediction" and/or "score"} dicts in example order.
        """
        labels = self._labels[task_name]
        keys = {"predictions": "prediction", "scores": "score"}
        return [
            {
                "index": index,
                "label": _to_json(label),
                **{keys[key]: _to_json(values[index]) for key, values in output.items()},
            }
            for index, label in enumerate(labels)
        ]

    def _metrics(self, task: seqio.Task, output: Mapping[str, np.ndarray]) -> TaskMetrics:
        labels = self._labels[task.name]
        metrics: TaskMetrics = {}
        if "predictions" in output:
            predictions = np.asarray(output["predictions"]).reshape(len(labels))
            metrics["accuracy"] = float(np.mean(predictions == labels))
        metrics["num_examples"] = float(len(labels))
        if "predictions" in output:
            for fn in getattr(task, "predict_metric_fns", None) or []:
                metrics.update({k: float(v) for k, v in fn(labels, predictions).items()})
        if "scores" in output:
            metrics["log_likelihood"] = float(np.mean(output["scores"]))
        return metrics

    def _log(self, task_name: str, step: int | None, metrics: TaskMetrics) -> None:
        """Appends a JSON line and writes TensorBoard scalars `eval/<metric>` per task."""
        if not self._log_dir:
            return
        tf.io.gfile.makedirs(self._log_dir)
        path = os.path.join(self._log_dir, f"{task_name}-metrics.jsonl")
        with tf.io.gfile.GFile(path, "a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        writer = metric_writers.SummaryWriter(os.path.join(self._log_dir, task_name))
        writer.write_scalars(step or 0, {f"eval/{k}": v for k, v in metrics.items()})
        writer.close()

    def close(self) -> None:
        """Nothing to release; kept for the seqio.Evaluator interface."""


def from_dataset_config(
    cfg: data_lib.DatasetConfig, feature_converter_cls: Callable[..., seqio.FeatureConverter]
) -> ClassificationEvaluator:
    """The evaluator of every task of a launcher's dataset config.

    Args:
      cfg: the data (task or mixture, split, feature lengths, seed, module).
      feature_converter_cls: the model's `FEATURE_CONVERTER_CLS`.

    Returns:
      a `ClassificationEvaluator` of `cfg`'s split, without logs of its own (the
      launchers write their summaries).
    """
    return ClassificationEvaluator(
        cfg.mixture_or_task_name,
        feature_converter_cls(pack=False),
        eval_split=cfg.split,
        use_cached=cfg.use_cached,
        seed=cfg.seed,
        sequence_length=dict(cfg.task_feature_lengths or {}),
        module=cfg.module,
    )


class PartitionedInference:
    """t5x-style infer functions of a model whose params live on our `Partitioner`'s mesh.

    Every process predicts on its shard of the dataset (padded to full batches with a
    mask); outputs come back replicated, so every process returns all (index, output)
    pairs and computes the same metrics.

    Args:
      model: a t5x-contract model (`predict_batch`, `score_batch`).
      partitioner: the run's `Partitioner`.
      param_shardings: shardings of the params.
      batch_size: global batch size of the predictions.
    """

    def __init__(self, model: Any, partitioner: Any, param_shardings: Any, batch_size: int):
        self._model = model
        self._partitioner = partitioner
        self._param_shardings = param_shardings
        self._batch_size = batch_size
        self._layout = partitioner.get_data_layout(batch_size)
        self._compiled: dict[str, Any] = {}

    def predict_fn(self, params: Any) -> ModelFn:
        """Returns the infer function of `predict_batch` (a class per example) at `params`."""
        return lambda ds: self._infer("predict_batch", params, ds)

    def score_fn(self, params: Any) -> ModelFn:
        """Returns the infer function of `score_batch` (log p(label) per example) at `params`."""
        return lambda ds: self._infer("score_batch", params, ds)

    def _host_batches(self, ds: tf.data.Dataset) -> list[dict[str, np.ndarray]]:
        layout = self._layout
        ds = ds.shard(layout.num_shards, layout.shard_id)
        batches = []
        for indices, features in ds.batch(layout.per_host_batch_size).as_numpy_iterator():
            batch = {
                **features,
                "_index": np.asarray(indices, np.int32),
                "_mask": np.ones(len(indices), np.int32),
            }
            batches.append(data_lib.pad_batch(batch, layout.per_host_batch_size))
        if not batches:
            raise ValueError(
                f"data shard {layout.shard_id} of {layout.num_shards} has no example: "
                "evaluate a split with at least as many examples as data shards"
            )
        if jax.process_count() > 1:  # every process runs the same number of batches
            counts = multihost_utils.process_allgather(np.int32(len(batches)))
            batches += [data_lib.empty_batch_like(batches[0])] * (
                int(np.max(counts)) - len(batches)
            )
        return batches

    def _compile(self, method: str, first_batch: Mapping[str, np.ndarray]) -> Any:
        if method not in self._compiled:

            def infer(params: Any, batch: Mapping[str, Any]) -> dict[str, Any]:
                model_batch = {k: v for k, v in batch.items() if not k.startswith("_")}
                output = getattr(self._model, method)(params, model_batch)
                return {"output": output, "_mask": batch["_mask"], "_index": batch["_index"]}

            batch_sharding = self._partitioner.batch_sharding
            self._compiled[method] = self._partitioner.partition(
                infer,
                in_shardings=(self._param_shardings, {k: batch_sharding for k in first_batch}),
                out_shardings=self._partitioner.replicated,
            )
        return self._compiled[method]

    def _infer(self, method: str, params: Any, ds: tf.data.Dataset) -> list[tuple[int, Any]]:
        batches = self._host_batches(ds)
        infer = self._compile(method, batches[0])
        outputs = [
            infer(params, self._partitioner.shard_batch(batch, self._batch_size))
            for batch in batches
        ]
        pairs = []
        for out in jax.device_get(outputs):
            for i in np.flatnonzero(out["_mask"]):
                pairs.append((int(out["_index"][i]), out["output"][i]))
        return pairs


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
