"""What the muNet benchmarks share: their run folder, the root ViT, the methods' report.

`bench munet` (images), `bench munet_text` (text) and `bench agents` each start a run
folder with progress logging (`start_run`); the image benchmarks reuse or pretrain the
same root ViT (`image_root`); the two muNet benchmarks compare the evolved system with
the baselines the same way (`evolution_steps`, `compare_methods`): a Markdown table, a
plot of accuracy against parameters and the JSON summary's method keys.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import numpy as np

from evolution.report import summaries
from evolution.roots import root
from evolution.search import loop as search

logger = logging.getLogger("evogrow")

# The root ViT of the image benchmarks (and of the main job): Fashion-MNIST, 2000 steps.
ROOT_SETTINGS = dict(
    steps=2000, batch_size=128, learning_rate=2e-3, warmup_steps=200, weight_decay=0.05, seed=0
)


def start_run(out: str | None, prefix: str) -> str:
    """Sets up progress logging and makes the run folder.

    Args:
      out: the folder asked for (None: runs/<prefix>-<timestamp>).
      prefix: the benchmark's folder prefix, e.g. "bench_munet".

    Returns:
      The absolute run folder (created).
    """
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s] %(message)s")
    logger.setLevel(logging.INFO)
    folder = os.path.abspath(out or os.path.join("runs", time.strftime(f"{prefix}-%Y%m%d-%H%M%S")))
    os.makedirs(folder, exist_ok=True)
    return folder


def image_root(root_dir: str) -> root.RootResult:
    """Reuses the root ViT in `root_dir`, or pretrains it there; prints what it is.

    Args:
      root_dir: the root's folder.

    Returns:
      The root (`evolution.roots.root.ensure_root`).
    """
    made = root.ensure_root(root_dir=root_dir, **ROOT_SETTINGS)
    print(f"root: {made.num_params} params, Fashion-MNIST test accuracy {made.test_accuracy:.4f}")
    return made


def evolution_steps(results: Sequence[search.TaskResult], steps_per_candidate: int) -> dict:
    """Training steps the evolution spent on each task (all candidates, accepted or not).

    Args:
      results: the task iterations' results.
      steps_per_candidate: V x B.

    Returns:
      task -> steps (what each baseline is given on that task).
    """
    steps: dict[str, int] = defaultdict(int)
    for result in results:
        steps[result.task] += len(result.candidates) * steps_per_candidate
    return dict(steps)


def _table(
    names: Sequence[str],
    evolved: dict[str, tuple[float, float]],
    by_method: dict[str, list[Any]],
) -> str:
    """Markdown: per task, accuracy and accounted parameters of every method."""
    methods = ["evolved", *by_method]
    header = "| task | " + " | ".join(f"{m} acc | {m} params" for m in methods) + " |"
    lines = [header, "|" + "---|" * (1 + 2 * len(methods))]
    rows: dict[str, dict[str, tuple[float, float]]] = {"evolved": evolved}
    rows.update(
        {
            m: {r.task: (r.test_accuracy, r.accounted_params) for r in rs}
            for m, rs in by_method.items()
        }
    )
    for name in [*names, "mean"]:
        cells = []
        for method in methods:
            if name == "mean":
                acc = float(np.mean([rows[method][n][0] for n in names]))
                params = float(np.mean([rows[method][n][1] for n in names]))
            else:
                acc, params = rows[method][name]
            cells.append(f"{acc:.4f} | {params / 1e3:.1f}k")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


@dataclasses.dataclass(frozen=True)
class Comparison:
    """The evolved system against the baselines.

    Attributes:
      table: the Markdown table (also written to the run folder).
      table_file: where the table is.
      plot: the accuracy-against-parameters PNG.
      summary: the JSON summary's method keys: evolved_mean_acc, finetune_mean_acc,
        adapters_mean_acc, freeze_mean_acc, params_ratio, evolved_params_per_task,
        finetune_params_per_task.
    """

    table: str
    table_file: str
    plot: str
    summary: dict[str, float]


def compare_methods(
    names: Sequence[str],
    evolved: dict[str, tuple[float, float]],
    baseline_results: Sequence[Any],
    out: str,
    *,
    table_name: str,
    title: str,
) -> Comparison:
    """Tabulates and plots per-task accuracy and accounted parameters of every method.

    Args:
      names: the tasks, in table order.
      evolved: task -> (test accuracy, accounted parameters) of the evolved system.
      baseline_results: `baselines.BaselineResult`s (finetune, freeze, adapters).
      out: the run folder.
      table_name: the Markdown file's name in `out`.
      title: the plot's title.

    Returns:
      The comparison.
    """
    by_method: dict[str, list[Any]] = defaultdict(list)
    for result in baseline_results:
        by_method[result.method].append(result)
    table = _table(names, evolved, dict(by_method))
    table_file = os.path.join(out, table_name)
    with open(table_file, "w") as f:
        f.write(table + "\n")
    points = [(n, "evolved", acc, params) for n, (acc, params) in evolved.items()]
    points += [(r.task, r.method, r.test_accuracy, r.accounted_params) for r in baseline_results]
    plot = summaries.plot_accuracy_vs_params(
        points, os.path.join(out, "accuracy_vs_params.png"), title=title
    )

    def mean_acc(method: str) -> float:
        return float(np.mean([r.test_accuracy for r in by_method[method]]))

    evolved_params = float(np.mean([p for _, p in evolved.values()]))
    finetune_params = float(np.mean([r.accounted_params for r in by_method["finetune"]]))
    summary = {
        "evolved_mean_acc": float(np.mean([a for a, _ in evolved.values()])),
        "finetune_mean_acc": mean_acc("finetune"),
        "adapters_mean_acc": mean_acc("adapters"),
        "freeze_mean_acc": mean_acc("freeze"),
        "params_ratio": evolved_params / finetune_params,
        "evolved_params_per_task": evolved_params,
        "finetune_params_per_task": finetune_params,
    }
    return Comparison(table, table_file, plot, summary)
