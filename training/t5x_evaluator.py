"""A classification evaluator that t5x's eval and train binaries accept as a seqio.Evaluator.

t5x builds its inference evaluator as `inference_evaluator_cls(mixture_or_task_name=...,
feature_converter=..., eval_split=..., ...)` and then only uses `eval_tasks`,
`model_feature_shapes`, `evaluate(...)` and `close()`. `seqio.Evaluator` itself cannot
serve our classification tasks: it measures every output feature with `shape[0]` (a
rank-0 `label` raises IndexError) and decodes targets as token sequences. This class
keeps that interface and computes classification metrics from the predict function
(big_vision's evaluators/classification.py does the same): accuracy of
`predict_fn` against the `label` feature, and the mean log-likelihood of the label from
`score_fn`. It imports neither t5x nor gin; gin binds it in gin/t5x/*.gin with
`inference_evaluator_cls = @t5x_evaluator.ClassificationEvaluator`.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import seqio
import tensorflow as tf
from absl import logging
from clu import metric_writers

# t5x's predict/score functions: dataset of (index, features) -> [(index, output), ...].
ModelFn = Callable[[tf.data.Dataset], Any]
TaskMetrics = dict[str, float]


def _eval_tasks(mixture_or_task_name: str | seqio.DatasetProviderBase, split: str):
    provider = (
        mixture_or_task_name
        if isinstance(mixture_or_task_name, seqio.DatasetProviderBase)
        else seqio.get_mixture_or_task(mixture_or_task_name)
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
    ):
        if feature_converter.pack:
            raise ValueError("During evaluation, packing can't be used.")
        self._label_feature = label_feature
        self._log_dir = log_dir if logger_cls is None or len(logger_cls) else None
        self._eval_tasks = _eval_tasks(mixture_or_task_name, eval_split)
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
          predict_fn: t5x's infer function over `predict_batch` (class ids [B]).
          score_fn: t5x's infer function over `score_batch` (log p(label) [B]).
          predict_with_aux_fn: unused (accepted for seqio compatibility).
          model_fns: unused (accepted for seqio compatibility).

        Returns:
          A future of {task: {"accuracy": ..., "log_likelihood": ...}} (None when
          `compute_metrics` is False), and the raw outputs {task: {"predictions",
          "scores"}}.
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
        all_metrics = {name: self._metrics(name, out) for name, out in outputs.items()}
        for name, metrics in all_metrics.items():
            logging.info("%s step %s: %s", name, step, metrics)
            self._log(name, step, metrics)
        future.set_result(all_metrics)
        return future, outputs

    def _metrics(self, task_name: str, output: Mapping[str, np.ndarray]) -> TaskMetrics:
        labels = self._labels[task_name]
        metrics: TaskMetrics = {"num_examples": float(len(labels))}
        if "predictions" in output:
            predictions = np.asarray(output["predictions"]).reshape(len(labels))
            metrics["accuracy"] = float(np.mean(predictions == labels))
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
