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
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from evolution.report import summaries
from evolution.roots import root
from evolution.search import loop as search
from evolution.search.paths import flops
from evolution.system import state as system
from evolution.system.architecture import model_config_of

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


def search_configs(args: Any, **fields: Any) -> list[search.SearchConfig]:
    """One search configuration per seed N, N + 1, ... from a muNet benchmark's arguments.

    Args:
      args: the parsed arguments (seeds, seed, generations, candidates, validations,
        steps_per_validation, batch_size, scale).
      **fields: the benchmark's own SearchConfig fields (mutation options, space, mu).

    Returns:
      the configurations, in seed order.

    Raises:
      ValueError: if fewer than one seed is asked for.
    """
    if args.seeds < 1:
        raise ValueError(f"--seeds={args.seeds} < 1: ask for at least one seed.")
    return [
        search.SearchConfig(
            generations=args.generations,
            candidates_per_generation=args.candidates,
            num_validations=args.validations,
            steps_per_validation=args.steps_per_validation,
            batch_size=args.batch_size,
            scale=args.scale,
            seed=args.seed + i,
            **fields,
        )
        for i in range(args.seeds)
    ]


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
      task -> steps (the evolution's compute on the task, which D baseline replicas of
      one chain's steps each match).
    """
    steps: dict[str, int] = defaultdict(int)
    for result in results:
        steps[result.task] += len(result.candidates) * steps_per_candidate
    return dict(steps)


def chain_steps(results: Sequence[search.TaskResult], steps_per_candidate: int) -> dict:
    """Training steps of one evolutionary chain on each task (muNet's baseline length).

    muNet.ipynb's `exp_config_set_baseline_common` trains each baseline replica for
    task iterations x generations x V validation intervals: a chain of candidates, each
    the child of one from an earlier generation, trains that long.

    Args:
      results: the task iterations' results.
      steps_per_candidate: V x B.

    Returns:
      task -> steps (each baseline replica's on that task).
    """
    steps: dict[str, int] = defaultdict(int)
    for result in results:
        generations = len({record.generation for record in result.candidates})
        steps[result.task] += generations * steps_per_candidate
    return dict(steps)


@dataclasses.dataclass(frozen=True)
class TaskFigures:
    """One method's figures on one task.

    Attributes:
      accuracy: test accuracy.
      params: accounted parameters by muNet's accounting (the root is not a user).
      params_mu2net_plus: accounted parameters by mu2Net+'s (the root is a user).
      flops: FLOPs of one example through the task's path.
    """

    accuracy: float
    params: float
    params_mu2net_plus: float
    flops: float


def baseline_figures(results: Sequence[Any]) -> dict[str, dict[str, TaskFigures]]:
    """The baselines' figures by method and task.

    Args:
      results: `baselines.BaselineResult`s.

    Returns:
      method -> task -> figures (test accuracy, both accountings, FLOPs).
    """
    rows: dict[str, dict[str, TaskFigures]] = defaultdict(dict)
    for r in results:
        rows[r.method][r.task] = TaskFigures(
            r.test_accuracy, r.accounted_params_munet, r.accounted_params, r.flops
        )
    return dict(rows)


def evolved_figures(store: Any, accuracy: Mapping[str, float]) -> dict[str, TaskFigures]:
    """The evolved system's figures: each task's best path in the store.

    Args:
      store: the evolution's store (`evolution.store.Store`).
      accuracy: task -> the best path's test accuracy.

    Returns:
      task -> figures; params by muNet's accounting (`SystemState.accounted_params`),
      params_mu2net_plus by mu2Net+'s (the state as stored).
    """
    state = store.load_state()
    out = {}
    for name, acc in accuracy.items():
        path = state.best_path(name)
        if path is None:
            raise ValueError(f"The store has no active path for task {name!r}.")
        out[name] = TaskFigures(
            accuracy=float(acc),
            params=state.accounted_params(path, system.MUNET),
            params_mu2net_plus=state.accounted_params(path, system.MU2NET_PLUS),
            flops=flops.path_flops(model_config_of(path), path.components, store.load_params),
        )
    return out


def _table(names: Sequence[str], rows: Mapping[str, Sequence[Mapping[str, TaskFigures]]]) -> str:
    """Markdown: per task, accuracy, accounted parameters (muNet's / mu2Net+'s) and FLOPs.

    With several seeds a cell is "mean ± std" over them.
    """
    methods = list(rows)
    header = "| task | " + " | ".join(
        f"{m} acc | {m} params (muNet / mu2Net+) | {m} MFLOPs" for m in methods
    )
    lines = [header + " |", "|" + "---|" * (1 + 3 * len(methods))]

    def cell(values: Sequence[float], fmt: str, unit: str = "") -> str:
        mean = format(float(np.mean(values)), fmt) + unit
        if len(values) == 1:
            return mean
        return f"{mean} ± {format(float(np.std(values)), fmt)}{unit}"

    for name in [*names, "mean"]:
        cells = []
        for method in methods:
            picked = [
                [seed[n] for n in (names if name == "mean" else [name])] for seed in rows[method]
            ]
            acc = [float(np.mean([f.accuracy for f in fs])) for fs in picked]
            params = [float(np.mean([f.params for f in fs])) / 1e3 for fs in picked]
            plus = [float(np.mean([f.params_mu2net_plus for f in fs])) / 1e3 for fs in picked]
            mflops = [float(np.mean([f.flops for f in fs])) / 1e6 for fs in picked]
            paid = f"{cell(params, '.1f', 'k')} / {cell(plus, '.1f', 'k')}"
            cells.append(f"{cell(acc, '.4f')} | {paid} | {cell(mflops, '.2f')}")
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
        adapters_mean_acc, freeze_mean_acc, params_ratio (muNet's accounting),
        params_ratio_mu2net_plus, evolved_params_per_task, finetune_params_per_task,
        <method>_flops_per_task; with several seeds each has its _std beside it.
      rows: method -> one task -> figures mapping per seed.
    """

    table: str
    table_file: str
    plot: str
    summary: dict[str, float]
    rows: dict[str, list[dict[str, TaskFigures]]]


def _summary(names: Sequence[str], rows: Mapping[str, Mapping[str, TaskFigures]]) -> dict:
    """One seed's summary keys (see `Comparison.summary`)."""

    def mean(method: str, field: str) -> float:
        return float(np.mean([getattr(rows[method][n], field) for n in names]))

    summary = {f"{m}_mean_acc": mean(m, "accuracy") for m in rows}
    summary.update(
        params_ratio=mean("evolved", "params") / mean("finetune", "params"),
        params_ratio_mu2net_plus=(
            mean("evolved", "params_mu2net_plus") / mean("finetune", "params_mu2net_plus")
        ),
        evolved_params_per_task=mean("evolved", "params"),
        finetune_params_per_task=mean("finetune", "params"),
        evolved_params_per_task_mu2net_plus=mean("evolved", "params_mu2net_plus"),
        finetune_params_per_task_mu2net_plus=mean("finetune", "params_mu2net_plus"),
    )
    summary.update({f"{m}_flops_per_task": mean(m, "flops") for m in rows})
    return summary


def mean_and_std(summaries: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """Each key's mean over the seeds' summaries, and beside it "<key>_std".

    Args:
      summaries: one summary per seed, the same keys.

    Returns:
      key -> mean and key_std -> population standard deviation (0 for one seed).
    """
    out: dict[str, float] = {}
    for key in summaries[0]:
        values = [float(s[key]) for s in summaries]
        out[key] = float(np.mean(values))
        out[f"{key}_std"] = float(np.std(values))
    return out


def compare_methods(
    names: Sequence[str],
    rows: Sequence[Mapping[str, Mapping[str, TaskFigures]]],
    out: str,
    *,
    table_name: str,
    title: str,
) -> Comparison:
    """Tabulates and plots per-task accuracy, accounted parameters and FLOPs of every method.

    Args:
      names: the tasks, in table order.
      rows: per seed, method ("evolved", "finetune", "freeze", "adapters") -> task ->
        figures (`baseline_figures` for the baselines).
      out: the run folder.
      table_name: the Markdown file's name in `out`.
      title: the plot's title.

    Returns:
      The comparison; its summary holds the mean over seeds and each key's _std.
    """
    methods = list(rows[0])
    by_method = {m: [dict(seed[m]) for seed in rows] for m in methods}
    table = _table(names, by_method)
    table_file = os.path.join(out, table_name)
    with open(table_file, "w") as f:
        f.write(table + "\n")
    points = [
        (n, method, figures.accuracy, figures.params)
        for seed in rows
        for method, per_task in seed.items()
        for n, figures in per_task.items()
    ]
    plot = summaries.plot_accuracy_vs_params(
        points, os.path.join(out, "accuracy_vs_params.png"), title=title
    )
    summary = mean_and_std([_summary(names, seed) for seed in rows])
    return Comparison(table, table_file, plot, summary, by_method)
