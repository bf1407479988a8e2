"""A PNG of a run's training curves, drawn from its `metrics.jsonl` (matplotlib, Agg).

Growth events (records of kind "growth") are drawn as dashed vertical lines labelled
with their requests, so a loss curve that continues smoothly through them shows that
growth preserved the function.
"""

from __future__ import annotations

import os
from collections import defaultdict

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 - the backend must be chosen first

from training import reporting  # noqa: E402


def plot_training_curves(model_dir: str, filename: str = "training_curves.png") -> str:
    """Plots loss and accuracy over steps for every split/task of a run.

    Args:
      model_dir: the run's directory (reads `metrics.jsonl`).
      filename: name of the PNG inside `model_dir`.

    Returns:
      the PNG's path.
    """
    series: dict[str, dict[str, list[tuple[int, float]]]] = {
        "loss": defaultdict(list),
        "accuracy": defaultdict(list),
    }
    growths = []
    for record in reporting.read_history(model_dir):
        if record["kind"] == "growth":
            growths.append(record)
            continue
        label = record["kind"]
        if "task" in record:
            label += f" ({record['task']}, {record.get('split', '?')})"
        for metric, curves in series.items():
            if metric in record:
                curves[label].append((record["step"], record[metric]))
    labels = sorted({label for curves in series.values() for label in curves})
    colors = {label: f"C{i}" for i, label in enumerate(labels)}  # same color in both panels
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, (metric, curves) in zip(axes, series.items(), strict=True):
        for label, points in sorted(curves.items()):
            points.sort()
            steps, values = zip(*points, strict=True)
            ax.plot(steps, values, marker=".", label=label, color=colors[label])
        for number, event in enumerate(growths):
            ax.axvline(event["step"], color="0.4", linestyle="--", linewidth=0.8)
            ax.annotate(
                f"grow: {', '.join(event['requests'])}",
                xy=(event["step"], 1.0),
                xycoords=("data", "axes fraction"),
                xytext=(2, -10 - 10 * (number % 3)),
                textcoords="offset points",
                fontsize=6,
                color="0.3",
            )
        ax.set_xlabel("step")
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
        if curves:
            ax.legend(fontsize=8)
    if growths:  # the no-dropout loss on the growth step's batch, before and after
        growth_steps = [event["step"] for event in growths]
        axes[0].scatter(
            growth_steps,
            [e["loss_before"] for e in growths],
            marker="o",
            s=30,
            facecolors="none",
            edgecolors="k",
            label="loss before growth",
        )
        axes[0].scatter(
            growth_steps,
            [e["loss_after"] for e in growths],
            marker="x",
            s=20,
            color="r",
            label="loss after growth",
        )
        axes[0].legend(fontsize=8)
    axes[0].set_yscale("log")
    fig.suptitle(os.path.basename(os.path.normpath(model_dir)))
    fig.tight_layout()
    path = os.path.join(model_dir, filename)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
