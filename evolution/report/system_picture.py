"""A picture of the evolved system, drawn like the muNet papers' figures (matplotlib, Agg).

Levels are stacked from the input embedding at the bottom to the heads on top, in slot
order (embed, cls, pos, then adapter_i before block_i, final_norm, head; a router path's
connectors and router above the heads). Every drawn
path (the root's and each task's best active path) has a lane and a colour; each
component it uses is a box, and the path is a coloured line through its boxes. A
component shared by several drawn paths is drawn once, near the middle of its users'
lanes, with a thick edge and one line per user through it. A box's colour is the task
that created it (grey for the root's). A router path runs through its members' boxes
at their own levels. Each path is labelled above its top box with its task's name and
accuracy.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 - the backend must be chosen first
from matplotlib import patches as mpatches  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402

from evolution.search.paths import router_path  # noqa: E402
from evolution.system import state as system  # noqa: E402

ROOT_COLOR = "#a9a9a9"
_PREFIX_SLOTS = ("embed", "cls", "pos")
_SUFFIX_SLOTS = ("final_norm", "head")
_LAYER_RE = re.compile(r"(adapter|block)_(\d+)")
_LANE_INCHES = 1.3  # Horizontal room of one lane: a wrapped task name fits in it.
_LEVEL_INCHES = 0.36
_LABEL_FONT = 7.5
_LABEL_CHARS = 16


def slot_level_key(slot: str) -> tuple[int, int, int, str]:
    """Sort key of a slot from the input (embed) up to the head, then a router's slots.

    Args:
      slot: a slot name ("embed", "adapter_2", "block_2", "head", "connector_1", ...).

    Returns:
      A key ordering prefix slots, then adapter_i before block_i by i, then any other
      slot (by name), then final_norm and head, then a router path's connectors by index
      and its router.
    """
    if slot in _PREFIX_SLOTS:
        return (0, _PREFIX_SLOTS.index(slot), 0, "")
    layer = _LAYER_RE.fullmatch(slot)
    if layer:
        return (1, int(layer.group(2)), 0 if layer.group(1) == "adapter" else 1, "")
    if slot in _SUFFIX_SLOTS:
        return (3, _SUFFIX_SLOTS.index(slot), 0, "")
    if router_path.CONNECTOR_SLOT_PATTERN.fullmatch(slot):
        return (4, int(slot.rsplit("_", 1)[1]), 0, "")
    if slot == router_path.ROUTER_SLOT:
        return (5, 0, 0, "")
    return (2, 0, 0, slot)


def drawn_components(path: system.Path) -> list[tuple[str, str]]:
    """The (level, component id) boxes a path runs through, bottom to top.

    A router path's member components stand at their members' levels ("m1/block_0" at
    "block_0"), so a member's box is the one its own path draws; a component two members
    share is one box.

    Args:
      path: a drawn path.

    Returns:
      Distinct (level slot, component id) pairs in `slot_level_key` order.
    """
    pairs = dict.fromkeys((router_path.member_slot(s), cid) for s, cid in path.components)
    return sorted(pairs, key=lambda pair: slot_level_key(pair[0]))


def root_task(state: system.SystemState) -> str | None:
    """The root path's task (None without a root)."""
    return None if state.root_path_id is None else state.paths[state.root_path_id].task


def task_colors(tasks: Sequence[str]) -> dict[str, Any]:
    """A distinct colour per task (none grey: grey is the root's), stable in task order.

    Args:
      tasks: the task names, in order.

    Returns:
      task -> matplotlib colour.
    """
    if len(tasks) <= 9:
        cmap, greys = plt.get_cmap("tab10"), {7}
    else:
        cmap, greys = plt.get_cmap("tab20"), {14, 15}
    palette = [cmap(i) for i in range(cmap.N) if i not in greys]
    return {task: palette[i % len(palette)] for i, task in enumerate(tasks)}


def drawn_paths(state: system.SystemState) -> list[system.Path]:
    """The paths the picture draws: the root path, then each task's best active path.

    Args:
      state: the system.

    Returns:
      The paths, root first, then in task order (tasks without an active path skipped).
    """
    paths = []
    root = root_task(state)
    if state.root_path_id is not None:
        paths.append(state.paths[state.root_path_id])
    for task in state.task_order():
        best = state.best_path(task) if task != root else None
        if best is not None and best.id != state.root_path_id:
            paths.append(best)
    return paths


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where everything goes.

    Attributes:
      levels: slot names from bottom to top (only those some drawn path uses).
      paths: the drawn paths; path i runs in lane i.
      x: (slot, component id) -> horizontal position of the component's box.
      users: (slot, component id) -> lanes of the drawn paths using it, ascending.
    """

    levels: tuple[str, ...]
    paths: tuple[system.Path, ...]
    x: Mapping[tuple[str, str], float]
    users: Mapping[tuple[str, str], tuple[int, ...]]


def _spread(preferred: Sequence[float], gap: float) -> list[float]:
    """Positions closest (least squares) to `preferred` with neighbours >= `gap` apart."""
    order = sorted(range(len(preferred)), key=lambda i: (preferred[i], i))
    clusters: list[list[int]] = []

    def start(members: list[int]) -> float:
        return sum(preferred[m] - k * gap for k, m in enumerate(members)) / len(members)

    for index in order:
        clusters.append([index])
        while len(clusters) > 1:
            left, right = clusters[-2], clusters[-1]
            if start(left) + len(left) * gap <= start(right) + 1e-9:
                break
            clusters[-2:] = [left + right]
    positions = [0.0] * len(preferred)
    for members in clusters:
        first = start(members)
        for k, m in enumerate(members):
            positions[m] = first + k * gap
    return positions


def layout(state: system.SystemState) -> Layout:
    """Places every drawn path's components: one box per (slot, component) pair.

    A box sits at the mean of its users' lanes, moved apart from its level's other boxes
    as little as possible, so a component shared by several paths is drawn once.

    Args:
      state: the system.

    Returns:
      The layout.
    """
    paths = drawn_paths(state)
    users: dict[tuple[str, str], list[int]] = {}
    for lane, path in enumerate(paths):
        for pair in drawn_components(path):
            users.setdefault(pair, []).append(lane)
    levels = sorted({slot for slot, _ in users}, key=slot_level_key)
    x: dict[tuple[str, str], float] = {}
    for level in levels:
        pairs = sorted((p for p in users if p[0] == level), key=lambda p: (min(users[p]), p[1]))
        preferred = [sum(users[p]) / len(users[p]) for p in pairs]
        for pair, position in zip(pairs, _spread(preferred, 1.0), strict=True):
            x[pair] = position
    return Layout(
        levels=tuple(levels),
        paths=tuple(paths),
        x=x,
        users={pair: tuple(lanes) for pair, lanes in users.items()},
    )


def _wrap_greedy(name: str, width: int) -> list[str]:
    lines: list[str] = []
    for token in re.split(r"(?<=[_/])", name):
        while len(token) > width:
            lines.append(token[:width])
            token = token[width:]
        if lines and len(lines[-1]) + len(token) <= width:
            lines[-1] += token
        elif token:
            lines.append(token)
    return lines or [name]


def _wrap(name: str, width: int = _LABEL_CHARS) -> list[str]:
    """Splits a task name after '_' or '/' into the fewest lines of <= `width` characters.

    Among splits into that many lines, the one with the shortest longest line.
    """
    lines = _wrap_greedy(name, width)
    for narrower in range(width - 1, 0, -1):
        candidate = _wrap_greedy(name, narrower)
        if len(candidate) > len(lines):
            break
        lines = candidate
    return lines


def compact_number(value: float) -> str:
    """Formats a count compactly: 950, 12.3K, 4.56M, 1.2B."""
    for factor, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(value) >= factor:
            return f"{value / factor:.3g}{suffix}"
    return f"{value:.0f}"


def _metric_lines(path: system.Path, metrics: Mapping[str, float] | None) -> list[str]:
    if metrics is None:
        return [] if path.quality is None else [f"val {path.quality:.3f}"]
    lines = []
    for name, value in metrics.items():
        shown = f"{value:.3f}" if abs(value) < 10 else compact_number(value)
        lines.append(f"{name} {shown}")
    return lines


def _live_components(state: system.SystemState, paths: Sequence[system.Path]) -> list[str]:
    return list(dict.fromkeys(cid for path in paths for cid in path.component_ids))


def _default_title(state: system.SystemState, paths: Sequence[system.Path]) -> str:
    live = _live_components(state, paths)
    total = sum(state.components[cid].num_params for cid in live)
    tasks = len(paths) - (state.root_path_id is not None)
    title = f"{tasks} tasks, {len(live)} components, {compact_number(total)} params"
    if state.root_path_id is not None:
        title += f" ({total / max(state.root_params(), 1):.2f} x root)"
    return title


def render_system(
    state: system.SystemState,
    out_path: str,
    *,
    task_metrics: Mapping[str, Mapping[str, float]] | None = None,
    title: str | None = None,
) -> str:
    """Draws the root path and every task's best active path (SVG or PNG by extension).

    Args:
      state: the system.
      out_path: the file to write; ".svg" writes an SVG (text kept as text, so task
        names can be searched), anything else what matplotlib infers (e.g. ".png").
      task_metrics: task -> {metric name: value} shown under the task's name on top
        of its head (e.g. {"acc": 0.91}); None shows each path's validation quality.
      title: the figure's title; None summarises tasks, components and parameters.

    Returns:
      `out_path`.

    Raises:
      ValueError: the system has no path to draw.
    """
    plan = layout(state)
    if not plan.paths:
        raise ValueError("The system has no root path and no active task path to draw.")
    root = root_task(state)
    colors = task_colors([t for t in state.task_order() if t != root])
    labels = []
    for path in plan.paths:
        metrics = None if task_metrics is None else task_metrics.get(path.task, {})
        labels.append(_wrap(path.task) + _metric_lines(path, metrics))
    label_lines = max(len(lines) for lines in labels)
    label_units = label_lines * _LABEL_FONT * 1.3 / 72 / _LEVEL_INCHES + 0.4
    xs = list(plan.x.values())
    x_lo, x_hi = min(xs) - 0.6, max(xs) + 0.6
    y_lo, y_hi = -0.7, len(plan.levels) - 0.5 + label_units
    width = max(5.0, (x_hi - x_lo) * _LANE_INCHES) + 3.0  # + level names and legend
    height = max(3.0, (y_hi - y_lo) * _LEVEL_INCHES) + 0.8

    with plt.rc_context({"svg.fonttype": "none"}):
        fig, ax = plt.subplots(figsize=(width, height))
        ax.set_xlim(x_lo, x_hi)
        ax.set_ylim(y_lo, y_hi)
        figure = _Figure(ax, plan, root, colors)
        figure.draw_paths()
        figure.draw_components(state)
        figure.draw_labels(labels)
        ax.set_yticks(range(len(plan.levels)), plan.levels, fontsize=8)
        ax.set_xticks([])
        for side in ("top", "right", "bottom"):
            ax.spines[side].set_visible(False)
        ax.tick_params(axis="y", length=0)
        figure.draw_legend()
        ax.set_title(title if title is not None else _default_title(state, plan.paths))
        save_figure(fig, out_path)
    return out_path


def save_figure(fig: Any, out_path: str) -> None:
    """Writes a report figure (150 dpi, cropped to its content) and closes it.

    Args:
      fig: the matplotlib figure.
      out_path: the file; its folder is created when missing.
    """
    out_dir = os.path.dirname(out_path)
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
    fig.savefig(out_path, dpi=150, bbox_inches="tight")
    plt.close(fig)


_BOX_WIDTH = 0.78


def _box_height(slot: str) -> float:
    return 0.42 if slot.startswith("adapter_") else 0.6


class _Figure:
    """The parts of the system picture, drawn on one matplotlib axes.

    Args:
      ax: the axes (limits set).
      plan: the layout.
      root: the root's task (None: no root path).
      colors: task -> color of the tasks other than the root's.
    """

    def __init__(self, ax: Any, plan: Layout, root: str | None, colors: Mapping[str, Any]):
        self.ax = ax
        self.plan = plan
        self.root = root
        self.colors = colors
        self.level_y = {level: float(i) for i, level in enumerate(plan.levels)}

    def _lane_color(self, path: system.Path) -> Any:
        return ROOT_COLOR if path.task == self.root else self.colors[path.task]

    def draw_paths(self) -> None:
        """One line per path through its components (the root's dashed).

        Paths that share a component pass through it side by side.
        """
        plan = self.plan
        for lane, path in enumerate(plan.paths):
            points = []
            for pair in drawn_components(path):
                lanes = plan.users[pair]
                step = min(0.12, 0.7 * _BOX_WIDTH / len(lanes))
                offset = (lanes.index(lane) - (len(lanes) - 1) / 2) * step
                points.append((plan.x[pair] + offset, self.level_y[pair[0]]))
            line_x, line_y = zip(*points, strict=True)
            self.ax.plot(
                line_x,
                line_y,
                color=self._lane_color(path),
                linewidth=2.0,
                linestyle="--" if path.task == self.root else "-",
                solid_capstyle="round",
                zorder=1,
            )

    def draw_components(self, state: system.SystemState) -> None:
        """A box per component in its creator's color (bold edge: shared), with its size."""
        for pair, x in self.plan.x.items():
            slot, component_id = pair
            component = state.components[component_id]
            shared = len(self.plan.users[pair]) > 1
            if component.task == self.root:
                face = ROOT_COLOR
            else:
                face = self.colors.get(component.task, "white")
            h = _box_height(slot)
            w = _BOX_WIDTH * (0.8 if slot.startswith("adapter_") else 1.0)
            self.ax.add_patch(
                mpatches.FancyBboxPatch(
                    (x - w / 2, self.level_y[slot] - h / 2),
                    w,
                    h,
                    boxstyle="round,pad=0,rounding_size=0.08",
                    facecolor=face,
                    edgecolor="black",
                    linewidth=1.8 if shared else 0.6,
                    alpha=0.95,
                    zorder=2,
                )
            )
            self.ax.text(
                x,
                self.level_y[slot],
                compact_number(component.num_params),
                ha="center",
                va="center",
                fontsize=6.5,
                zorder=3,
            )

    def draw_labels(self, labels: Sequence[Sequence[str]]) -> None:
        """Each path's label lines above its top component (its head, or its router)."""
        plan = self.plan
        for lane, (path, lines) in enumerate(zip(plan.paths, labels, strict=True)):
            pair = drawn_components(path)[-1]
            y = self.level_y[pair[0]] + _box_height(pair[0]) / 2 + 0.1
            self.ax.text(
                plan.x[pair],
                y,
                "\n".join(lines),
                ha="center",
                va="bottom",
                fontsize=_LABEL_FONT,
                color="black",
                fontweight="bold" if plan.paths[lane].task != self.root else "normal",
                linespacing=1.1,
                zorder=3,
            )

    def draw_legend(self) -> None:
        """Who created each color, what a bold edge and the two line styles mean."""
        root = self.root
        handles: list[Any] = (
            [mpatches.Patch(facecolor=ROOT_COLOR, edgecolor="black", label=f"{root} (root)")]
            if root is not None
            else []
        )
        handles += [
            mpatches.Patch(facecolor=color, edgecolor="black", label=task)
            for task, color in self.colors.items()
        ]
        handles.append(
            mpatches.Patch(facecolor="white", edgecolor="black", linewidth=1.8, label="shared")
        )
        handles.append(Line2D([], [], color="0.3", linewidth=2.0, label="a task's best path"))
        if root is not None:
            handles.append(
                Line2D([], [], color=ROOT_COLOR, linewidth=2.0, linestyle="--", label="root path")
            )
        self.ax.legend(
            handles=handles,
            loc="upper left",
            bbox_to_anchor=(1.01, 1.0),
            fontsize=8,
            title="created by",
            title_fontsize=8,
            frameon=False,
        )


def render_system_files(
    state: system.SystemState,
    out_dir: str,
    *,
    name: str = "system",
    task_metrics: Mapping[str, Mapping[str, float]] | None = None,
    title: str | None = None,
) -> tuple[str, str]:
    """Writes the system's picture as both `<out_dir>/<name>.svg` and `.png`.

    Args:
      state: the system.
      out_dir: the folder (created if missing).
      name: the files' base name.
      task_metrics: as in `render_system`.
      title: as in `render_system`.

    Returns:
      (the SVG's path, the PNG's path).
    """
    os.makedirs(out_dir, exist_ok=True)
    svg = render_system(
        state, os.path.join(out_dir, f"{name}.svg"), task_metrics=task_metrics, title=title
    )
    png = render_system(
        state, os.path.join(out_dir, f"{name}.png"), task_metrics=task_metrics, title=title
    )
    return svg, png
