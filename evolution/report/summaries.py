"""Seeing the evolved system: a table, plots, TensorBoard scalars and progress lines.

`system_table` summarises every task's best path (quality, accounted parameters under
muNet's and mu2Net+'s accounting, what it
owns and shares, the mutations that made it); `plot_accuracy_vs_params` compares the
evolved system with baselines (finetune, freeze, adapters); `write_tensorboard` logs
per-task and system scalars; `format_progress` is the search's progress line. The
picture of the system itself is `render_system` / `render_system_files`
(evolution/report/system_picture.py, re-exported here).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 - the backend must be chosen first
from matplotlib.lines import Line2D  # noqa: E402

from evolution.report.system_picture import (  # noqa: E402
    compact_number,
    drawn_paths,
    render_system,
    render_system_files,
    root_task,
    save_figure,
    task_colors,
)
from evolution.system import state as system  # noqa: E402

__all__ = [
    "compact_number",
    "format_progress",
    "plot_accuracy_vs_params",
    "render_system",
    "render_system_files",
    "system_table",
    "system_totals",
    "task_rows",
    "tensorboard_scalars",
    "write_tensorboard",
]

_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">")


def _evolved_tasks(state: system.SystemState) -> list[str]:
    root = root_task(state)
    return [task for task in state.task_order() if task != root]


def task_rows(
    state: system.SystemState,
    *,
    test_accuracy: Mapping[str, float] | None = None,
    baselines: Mapping[str, Mapping[str, float]] | None = None,
) -> list[dict[str, Any]]:
    """One record per task (root's excluded), in task order: what `system_table` shows.

    Args:
      state: the system.
      test_accuracy: task -> the best path's test accuracy (optional).
      baselines: method -> task -> that method's accuracy (optional).

    Returns:
      Dicts with "task", "path" (id or None without an active path), "generation",
      "quality", "test_accuracy", "accounted_params" and "params_over_root" (mu2Net+'s
      accounting, `state.accounted_params`: the root counts as a user),
      "accounted_params_munet" and "params_over_root_munet" (muNet's: the root's lock is
      no user), "owned" (components the task created), "shared" (created by
      another task or the root), "applied" (mutations, `path.metrics["applied"]`) and
      "baselines" ({method: accuracy or None}).
    """
    root_params = state.root_params() if state.root_path_id is not None else None
    rows = []
    for task in _evolved_tasks(state):
        best = state.best_path(task)
        row: dict[str, Any] = {
            "task": task,
            "path": None,
            "generation": None,
            "quality": None,
            "test_accuracy": None if test_accuracy is None else test_accuracy.get(task),
            "accounted_params": None,
            "params_over_root": None,
            "accounted_params_munet": None,
            "params_over_root_munet": None,
            "owned": None,
            "shared": None,
            "applied": [],
            "baselines": {m: accs.get(task) for m, accs in (baselines or {}).items()},
        }
        if best is not None:
            ids = list(dict.fromkeys(best.component_ids))
            owned = sum(state.components[cid].task == task for cid in ids)
            accounted = state.accounted_params(best, system.MU2NET_PLUS)
            accounted_munet = state.accounted_params(best, system.MUNET)
            row.update(
                path=best.id,
                generation=best.generation,
                quality=best.quality,
                accounted_params=accounted,
                params_over_root=None if not root_params else accounted / root_params,
                accounted_params_munet=accounted_munet,
                params_over_root_munet=None if not root_params else accounted_munet / root_params,
                owned=owned,
                shared=len(ids) - owned,
                applied=list(best.metrics.get("applied") or []),
            )
        rows.append(row)
    return rows


def system_totals(state: system.SystemState) -> dict[str, float]:
    """Totals of the live system: the root path and every task's best active path.

    Args:
      state: the system.

    Returns:
      {"tasks": evolved tasks with an active path, "components": distinct components
      they use, "params": those components' parameters, "params_over_root": params / P
      (absent without a root), "published_components": every stored component}.
    """
    paths = drawn_paths(state)
    live = list(dict.fromkeys(cid for path in paths for cid in path.component_ids))
    root = root_task(state)
    totals: dict[str, float] = {
        "tasks": float(sum(path.task != root for path in paths)),
        "components": float(len(live)),
        "params": float(sum(state.components[cid].num_params for cid in live)),
        "published_components": float(len(state.components)),
    }
    if state.root_path_id is not None:
        totals["params_over_root"] = totals["params"] / max(state.root_params(), 1)
    return totals


def _cell(value: Any, spec: str = "") -> str:
    if value is None:
        return "-"
    text = format(value, spec) if spec else str(value)
    return text.replace("|", "\\|")


def system_table(
    state: system.SystemState,
    *,
    test_accuracy: Mapping[str, float] | None = None,
    baselines: Mapping[str, Mapping[str, float]] | None = None,
) -> str:
    """A Markdown table of every task's best path, then a line of system totals.

    Args:
      state: the system.
      test_accuracy: task -> test accuracy of its best path (adds a column).
      baselines: method -> task -> accuracy (adds a column per method, e.g. finetune).

    Returns:
      The Markdown text.
    """
    rows = task_rows(state, test_accuracy=test_accuracy, baselines=baselines)
    methods = list(baselines or {})
    header = ["task", "best path", "generation", "validation quality"]
    header += ["test accuracy"] if test_accuracy is not None else []
    header += [f"{method} accuracy" for method in methods]
    header += ["params (muNet)", "x root (muNet)", "params (mu2Net+)", "x root (mu2Net+)"]
    header += ["owned / shared", "mutations"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [_cell(row["task"]), _cell(row["path"]), _cell(row["generation"])]
        cells.append(_cell(row["quality"], ".4f"))
        if test_accuracy is not None:
            cells.append(_cell(row["test_accuracy"], ".4f"))
        cells += [_cell(row["baselines"][method], ".4f") for method in methods]
        cells.append(_cell(row["accounted_params_munet"], ",.0f"))
        cells.append(_cell(row["params_over_root_munet"], ".3f"))
        cells.append(_cell(row["accounted_params"], ",.0f"))
        cells.append(_cell(row["params_over_root"], ".3f"))
        owned = "-" if row["owned"] is None else f"{row['owned']} / {row['shared']}"
        cells.append(owned)
        cells.append(_cell(", ".join(row["applied"]) or None))
        lines.append("| " + " | ".join(cells) + " |")
    totals = system_totals(state)
    summary = (
        f"System: {totals['tasks']:.0f} tasks, {totals['components']:.0f} components in use "
        f"({totals['published_components']:.0f} stored), {totals['params']:,.0f} params"
    )
    if "params_over_root" in totals:
        summary += f" ({totals['params_over_root']:.3f} x root)"
    return "\n".join(lines) + "\n\n" + summary + ".\n"


def plot_accuracy_vs_params(
    points: Sequence[tuple[str, str, float, float]],
    out_png: str,
    *,
    title: str | None = None,
) -> str:
    """Scatters accuracy against parameters (log x): a marker per method, a colour per task.

    Args:
      points: (task, method, accuracy, params) tuples, e.g. the evolved system's
        accounted parameters and test accuracy next to finetune / freeze / adapters.
      out_png: the image to write (format from the extension).
      title: the plot's title (default "accuracy vs parameters").

    Returns:
      `out_png`.

    Raises:
      ValueError: no points, or a non-positive parameter count (log scale).
    """
    if not points:
        raise ValueError("No points to plot.")
    bad = [p for p in points if not p[3] > 0]
    if bad:
        raise ValueError(f"Parameter counts must be positive on a log axis: {bad}.")
    tasks = list(dict.fromkeys(p[0] for p in points))
    methods = list(dict.fromkeys(p[1] for p in points))
    colors = task_colors(tasks)
    markers = {m: _MARKERS[i % len(_MARKERS)] for i, m in enumerate(methods)}
    fig, ax = plt.subplots(figsize=(8, 5))
    for task, method, accuracy, params in points:
        ax.scatter(
            params,
            accuracy,
            color=colors[task],
            marker=markers[method],
            s=60,
            edgecolors="black",
            linewidths=0.5,
            zorder=2,
        )
    ax.set_xscale("log")
    ax.set_xlabel("parameters (accounted)")
    ax.set_ylabel("accuracy")
    ax.grid(True, which="both", alpha=0.3)
    ax.set_title(title or "accuracy vs parameters")
    method_handles = [
        Line2D([], [], linestyle="", marker=markers[m], color="0.4", markersize=8, label=m)
        for m in methods
    ]
    task_handles = [
        Line2D([], [], linestyle="", marker="o", color=colors[t], markersize=8, label=t)
        for t in tasks
    ]
    first = ax.legend(
        handles=method_handles,
        title="method",
        loc="upper left",
        bbox_to_anchor=(1.01, 1.0),
        fontsize=8,
        frameon=False,
    )
    ax.add_artist(first)
    ax.legend(
        handles=task_handles,
        title="task",
        loc="lower left",
        bbox_to_anchor=(1.01, 0.0),
        fontsize=8,
        frameon=False,
    )
    save_figure(fig, out_png)
    return out_png


def tensorboard_scalars(
    state: system.SystemState,
    *,
    test_accuracy: Mapping[str, float] | None = None,
) -> dict[str, float]:
    """The scalars `write_tensorboard` logs, by tag.

    Args:
      state: the system.
      test_accuracy: task -> test accuracy of its best path (optional).

    Returns:
      "<metric>/<task>" for quality, score, accounted_params and params_over_root
      (mu2Net+'s accounting, and the same with "_munet" for muNet's), and
      test_accuracy (when known) of each task's best path, and "system/<total>" for
      the `system_totals`.
    """
    scalars: dict[str, float] = {}
    for row in task_rows(state, test_accuracy=test_accuracy):
        task = row["task"]
        best = state.best_path(task)
        values = {
            "quality": row["quality"],
            "score": None if best is None else best.score,
            "accounted_params": row["accounted_params"],
            "params_over_root": row["params_over_root"],
            "accounted_params_munet": row["accounted_params_munet"],
            "params_over_root_munet": row["params_over_root_munet"],
            "test_accuracy": row["test_accuracy"],
        }
        for name, value in values.items():
            if value is not None:
                scalars[f"{name}/{task}"] = float(value)
    for name, value in system_totals(state).items():
        scalars[f"system/{name}"] = float(value)
    return scalars


def write_tensorboard(
    log_dir: str,
    state: system.SystemState,
    *,
    step: int,
    test_accuracy: Mapping[str, float] | None = None,
) -> None:
    """Writes the system's scalars (`tensorboard_scalars`) at `step` as TensorBoard events.

    Uses a clu default writer, as training/reporting.py does (TensorBoard on process 0,
    logging elsewhere), synchronously, and closes it.

    Args:
      log_dir: the summary folder.
      state: the system.
      step: the summary step (e.g. the number of task iterations so far).
      test_accuracy: task -> test accuracy of its best path (optional).
    """
    # clu brings TensorFlow in: imported only when summaries are written.
    import jax
    from clu import metric_writers

    writer = metric_writers.create_default_writer(
        log_dir, just_logging=jax.process_index() > 0, asynchronous=False
    )
    try:
        writer.write_scalars(step, tensorboard_scalars(state, test_accuracy=test_accuracy))
        writer.flush()
    finally:
        writer.close()


def _duration(seconds: float) -> str:
    seconds = max(int(seconds), 0)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def format_progress(
    task: str,
    generation: int,
    generations: int,
    best_score: float | None,
    best_quality: float | None,
    candidates_per_hour: float,
    eta_seconds: float | None = None,
) -> str:
    """The search's progress line.

    Args:
      task: the task being evolved.
      generation: generations done (1-based when reported after one).
      generations: generations in this task iteration.
      best_score: the task's best score so far (None: none yet).
      best_quality: that path's validation quality (None: none yet).
      candidates_per_hour: the candidate throughput.
      eta_seconds: estimated time left (None leaves it out).

    Returns:
      E.g. "digits_rgb32_v1: generation 3/10 | best score 0.9120 (quality 0.9310) |
      42.0 candidates/hour | ETA 0:12:34".
    """
    score = "-" if best_score is None else f"{best_score:.4f}"
    quality = "-" if best_quality is None else f"{best_quality:.4f}"
    line = (
        f"{task}: generation {generation}/{generations} | best score {score} "
        f"(quality {quality}) | {candidates_per_hour:.1f} candidates/hour"
    )
    if eta_seconds is not None:
        line += f" | ETA {_duration(eta_seconds)}"
    return line
