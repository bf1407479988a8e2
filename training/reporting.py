"""Metric summaries and progress lines, written off the training thread.

The train loop hands a device-side metrics accumulator to `MetricsReporter.report` and
goes on dispatching steps; a single background worker waits for the values, computes
them, writes TensorBoard summaries (clu metric_writers), appends them to
`metrics.jsonl` (what the training-curve plot reads) and logs a progress line with
steps/s and the ETA.
"""

from __future__ import annotations

import concurrent.futures
import json
import logging
import os
import time
from collections.abc import Mapping
from typing import Any

import jax
from clu import metric_writers

from training import trainer as trainer_lib

logger = logging.getLogger("evogrow")

HISTORY_FILE = "metrics.jsonl"


def create_writer(logdir: str) -> metric_writers.MetricWriter:
    """Returns TensorBoard + logging writers on process 0, logging only elsewhere."""
    return metric_writers.create_default_writer(
        logdir, just_logging=jax.process_index() > 0, asynchronous=True
    )


def append_history(model_dir: str, record: Mapping[str, Any]) -> None:
    """Appends one JSON record to `model_dir/metrics.jsonl` (process 0 only).

    Args:
      model_dir: the run's directory.
      record: JSON-safe values, e.g. {"step", "kind", "task", "split", "loss", "accuracy"};
        kind is "train", "training_eval", "inference_eval" or "growth", split the data
        split. A "wall_time" (seconds since the epoch, as in TensorBoard) is added.
    """
    if jax.process_index() != 0:
        return
    os.makedirs(model_dir, exist_ok=True)
    with open(os.path.join(model_dir, HISTORY_FILE), "a") as f:
        f.write(json.dumps({**record, "wall_time": round(time.time(), 3)}) + "\n")


def read_history(model_dir: str) -> list[dict[str, Any]]:
    """Returns every record of `model_dir/metrics.jsonl` (empty when missing)."""
    path = os.path.join(model_dir, HISTORY_FILE)
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def format_metrics(values: Mapping[str, float]) -> str:
    """Formats metrics as "name=value ..." sorted by name (steps_per_sec left out)."""
    return " ".join(f"{k}={v:.4g}" for k, v in sorted(values.items()) if k != "steps_per_sec")


def format_duration(seconds: float) -> str:
    """Formats seconds as H:MM:SS."""
    seconds = max(int(seconds), 0)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class MetricsReporter:
    """Writes train metrics asynchronously and prints progress.

    Args:
      model_dir: the run's directory (summaries under `train/`, history file).
      total_steps: the last step of the run, for the ETA.
      start_step: the step the run starts (or resumes) at.
      writer: the train summary writer.
    """

    def __init__(
        self,
        model_dir: str,
        total_steps: int,
        start_step: int,
        writer: metric_writers.MetricWriter,
    ):
        self._model_dir = model_dir
        self._total_steps = total_steps
        self._writer = writer
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1)
        self._pending: list[concurrent.futures.Future] = []
        self._last = (start_step, time.perf_counter())
        self.latest: dict[str, float] = {}

    def report(self, step: int, acc: trainer_lib.MetricsAccumulator) -> None:
        """Queues `acc` (metrics up to `step`) for writing; returns at once.

        Args:
          step: the step the metrics end at.
          acc: the device accumulator; it must not be donated afterwards.
        """
        self._pending = [f for f in self._pending if not f.done()]
        self._pending.append(self._executor.submit(self._write, step, acc))

    def _write(self, step: int, acc: trainer_lib.MetricsAccumulator) -> None:
        values = trainer_lib.compute_metrics(acc)
        now = time.perf_counter()
        last_step, last_time = self._last
        self._last = (step, now)
        rate = (step - last_step) / max(now - last_time, 1e-9)
        values["steps_per_sec"] = rate
        self.latest = values
        self._writer.write_scalars(step, values)
        append_history(self._model_dir, {"step": step, "kind": "train", **values})
        eta = (self._total_steps - step) / rate if rate > 0 else 0.0
        shown = format_metrics(values)
        logger.info(
            "step %d/%d %s | %.1f steps/s | ETA %s",
            step,
            self._total_steps,
            shown,
            rate,
            format_duration(eta),
        )

    def flush(self) -> None:
        """Waits for every queued report (re-raising its errors) and flushes the writer."""
        for future in self._pending:
            future.result()
        self._pending = []
        self._writer.flush()

    def close(self) -> None:
        """Flushes, stops the worker and closes the writer."""
        try:
            self.flush()
        finally:
            self._executor.shutdown()
            self._writer.close()
