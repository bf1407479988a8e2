"""`./run.sh baseline`: the muNet benchmark's baselines on seqio tasks, with a report.

    ./run.sh baseline --gin_file=gin/runs/baseline.gin --gin.STORE_DIR=... --gin.OUTPUT_DIR=...

Runs `evolution.agents.baselines.run_baselines` (full fine-tuning, freeze bottom k, residual
adapters, each D replicas from the store's root, the best-validation one kept, never
written to the store) on seqio tasks read
with `evolution.search.data.task_data`, prints a Markdown table with a mean row per method and
writes `baselines.json` and `baselines.md`.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from evolution import store as store_lib
from evolution.agents.baselines import BaselineResult, BaselineTask, check_methods, run_baselines
from evolution.search.data import task_data

logger = logging.getLogger("evogrow")


def summarize(results: Sequence[BaselineResult]) -> dict[str, dict[str, float]]:
    """Per method: the number of tasks and the means of accuracies and parameter counts.

    Args:
      results: from `run_baselines`.

    Returns:
      method -> {"tasks", "mean_test_accuracy", "mean_validation_accuracy",
      "mean_accounted_params" (mu2Net+'s accounting), "mean_accounted_params_munet",
      "mean_trainable_params"}.
    """
    out: dict[str, dict[str, float]] = {}
    for method in dict.fromkeys(r.method for r in results):
        mine = [r for r in results if r.method == method]
        out[method] = {
            "mean_test_accuracy": float(np.mean([r.test_accuracy for r in mine])),
            "mean_validation_accuracy": float(np.mean([r.validation_accuracy for r in mine])),
            "mean_accounted_params": float(np.mean([r.accounted_params for r in mine])),
            "mean_accounted_params_munet": float(np.mean([r.accounted_params_munet for r in mine])),
            "mean_trainable_params": float(np.mean([r.trainable_params for r in mine])),
            "tasks": len(mine),
        }
    return out


def markdown_table(results: Sequence[BaselineResult]) -> str:
    """A Markdown table: one row per (task, method), then each method's mean."""
    lines = [
        "| task | method | test acc | val acc | accounted params (muNet) "
        "| accounted params (mu2Net+) | trainable params | replicas x steps |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r.task} | {r.spec.name} | {r.test_accuracy:.4f} | {r.validation_accuracy:.4f} "
            f"| {r.accounted_params_munet:,.0f} | {r.accounted_params:,.0f} "
            f"| {r.trainable_params:,} | {r.replicas} x {r.steps} |"
        )
    for method, s in summarize(results).items():
        lines.append(
            f"| mean ({int(s['tasks'])} tasks) | {method} | {s['mean_test_accuracy']:.4f} "
            f"| {s['mean_validation_accuracy']:.4f} | {s['mean_accounted_params_munet']:,.0f} "
            f"| {s['mean_accounted_params']:,.0f} | {s['mean_trainable_params']:,.0f} | |"
        )
    return "\n".join(lines)


def baseline(
    *,
    store_dir: str,
    methods: Sequence[str],
    tasks: Sequence[str],
    steps: int,
    steps_per_validation: int,
    output_dir: str,
    steps_per_task: Mapping[str, int] | None = None,
    replicas: int = 1,
    batch_size: int = 32,
    eval_batch_size: int = 256,
    max_train_examples: int | None = None,
    max_eval_examples: int | None = None,
    max_test_examples: int | None = None,
    validation_split: str = "validation",
    freeze_layers: int | None = None,
    adapter_size: int | None = None,
    hparam_values: Mapping[str, Any] | None = None,
    seed: int = 0,
) -> list[BaselineResult]:
    """Entry point: trains the baselines on offline tasks from a store's root, reports them.

    Prints a Markdown table (task, method, test and validation accuracy, accounted and
    trainable params, and each method's mean) and writes output_dir/baselines.json
    (results, per-method summary, settings) and output_dir/baselines.md.

    Args:
      store_dir: an existing store with a root (read only).
      methods: baseline methods to run.
      tasks: task names (`evolution.search.data.task_data`).
      steps: training steps of each replica per task (unless in `steps_per_task`).
      steps_per_validation: B.
      output_dir: where the report goes.
      steps_per_task: task -> steps of each replica, e.g. one evolutionary chain's.
      replicas: D, replicas per task trained from the root in parallel on the local
        devices; the best-validation one is kept (muNet's protocol).
      batch_size: training batch size.
      eval_batch_size: validation and test batch size.
      max_train_examples: cap on training examples per task (None: all).
      max_eval_examples: cap on validation examples per task (None: all).
      max_test_examples: cap on test examples per task (None: all).
      validation_split: the split validated on.
      freeze_layers: k of "freeze" (None: half the root's blocks).
      adapter_size: width of "adapters" (None: the space's default).
      hparam_values: overrides of the space's default hyperparameter values.
      seed: seeds initialisation and data.

    Returns:
      The results.

    Raises:
      FileNotFoundError: `store_dir` is not a directory.
      ValueError: an unknown method, or the store has no root.
    """
    if not os.path.isdir(store_dir):
        raise FileNotFoundError(f"No store at {store_dir!r}: run the evolution first.")
    check_methods(methods)
    loaded = {}
    for name in tasks:
        logger.info("baseline: loading %s", name)
        data = task_data.search_task_data(
            name,
            eval_batch_size=eval_batch_size,
            max_train_examples=max_train_examples,
            max_eval_examples=max_eval_examples,
            validation_split=validation_split,
        )
        images, labels = task_data.load_task_arrays(name, "test", max_examples=max_test_examples)
        loaded[name] = BaselineTask(data, images, labels)
    per_task = {name: int((steps_per_task or {}).get(name, steps)) for name in tasks}
    options: dict[str, Any] = dict(
        steps_per_validation=steps_per_validation,
        replicas=replicas,
        hparam_values=dict(hparam_values or {}),
        seed=seed,
        freeze_layers=freeze_layers,
        adapter_size=adapter_size,
        batch_size=batch_size,
    )
    with store_lib.open_store(store_dir) as store:
        root_params = store.load_state().root_params()
        results = run_baselines(
            store=store, tasks=loaded, methods=methods, steps_per_task=per_task, **options
        )
    table = markdown_table(results)
    print(table)
    os.makedirs(output_dir, exist_ok=True)
    settings = {"store_dir": store_dir, "methods": list(methods), "steps_per_task": per_task}
    report = {
        "results": [r.to_json() for r in results],
        "summary": summarize(results),
        "root_params": root_params,
        "settings": {**settings, **options},
    }
    with open(os.path.join(output_dir, "baselines.json"), "w") as f:
        json.dump(report, f, indent=2)
    with open(os.path.join(output_dir, "baselines.md"), "w") as f:
        f.write(table + "\n")
    logger.info("baseline: report in %s", os.path.join(output_dir, "baselines.json"))
    return results
