"""Agents benchmark: k asynchronous muNet agent processes under one wall-clock budget.

    python -m benchmarks agents [--budget_s W] [--ks 1,2,4] [--tasks A,B,C,D]
        [--generations G] [--candidates D] [--validations V] [--steps_per_validation B]
        [--multipath_paths P] [--multipath_steps S] [--small] [--out DIR]

On four offline image tasks of `evolution_image_rgb32_v1` (digits, textures, shape type,
shape count; 32x32x3), from the root ViT pretrained on Fashion-MNIST (`evolution.roots.root`,
the muNet benchmark's root, reused when present), for each k:

1. a fresh store seeded with the root; one muNet agent per task, each a separate
   process started through the real entry point (`python -m evogrow.main agent
   --gin_file=gin/runs/agent.gin --task T ...`), k at a time, in waves so that every task
   gets an agent within the budget W: len(tasks)/k waves of W*k/len(tasks) seconds each
   (k=1: one agent after another, W/4 each; k=4: all four for W). An agent starts no
   cycle after its wave's length, and is killed at the wave's end (its unfinished cycle
   is lost, the store stays consistent): the budget is hard. Process start-up (imports,
   data, compilation) counts against it. Agent processes run with the persistent XLA
   cache off, so every k compiles the same way (no k profits from an earlier k's cache);
2. per task, the test accuracy of the task's best published path. A task is SOLVED when
   it has a published path whose test accuracy exceeds the majority-class rate of its
   test split by `--solved_margin` (what predicting the most frequent class gets; the
   root with a fresh zero head predicts class 0, which is never better). A task without a
   path counts at its majority-class rate in the mean accuracy;
3. throughput: candidates trained in completed cycles (parsed from the agents' cycle
   logs) per hour of the phase's measured wall time, and its scaling over k=1.

Then, on the largest k's store, a multipath agent per task (`evolution.agents.multipath_agent`,
one cycle, in this process): its test accuracy against its path_0, the task's best
single path.

Prints two Markdown tables (also written to DIR/agents.md), writes a plot, and ends with
one JSON line: agents_k{k}_{tasks_solved,mean_acc,candidates,candidates_per_hour,
throughput_scaling}, multipath_mean_gain, multipath_mean_acc, single_path_mean_acc, ...
On this 2-core machine the agents of one wave share the cores with each other (and with
anything else running), so scaling beyond the core count is not expected.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import re
import subprocess
import sys
import time
from typing import Any

import numpy as np

from benchmarks import methods
from evolution import store as store_lib
from evolution.agents import agent_cycle, agent_run, multipath_agent
from evolution.export import inference
from evolution.roots import root
from evolution.search.data import task_data
from tasks import offline_image

logger = logging.getLogger("evogrow")

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEFAULT_TASKS = tuple(
    offline_image.rgb32_task_name(base)
    for base in ("digits", "textures", "shape_type", "shape_count")
)
_CYCLE_LINE = re.compile(
    r"agent (?P<agent>\S+): cycle (?P<cycle>\d+) published (?P<path>\S+) \((?:new|kept)\): "
    r"quality (?P<quality>[\d.]+), score [\d.]+, (?P<candidates>\d+) candidates, .*; "
    r"(?P<wall>[\d.]+)s \("
)


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks agents")
    parser.add_argument("--budget_s", type=float, default=None, help="W (default 240; small 70)")
    parser.add_argument("--ks", default=None, help="comma-separated k (default 1,2,4; small 1,2)")
    parser.add_argument("--tasks", default=None, help="comma-separated tasks (default 4)")
    parser.add_argument("--generations", type=int, default=1)
    parser.add_argument("--candidates", type=int, default=2)
    parser.add_argument("--validations", type=int, default=2)
    parser.add_argument("--steps_per_validation", type=int, default=None, help="default 25")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--scale", type=float, default=0.9)
    parser.add_argument("--max_train_examples", type=int, default=None)
    parser.add_argument("--multipath_paths", type=int, default=2)
    parser.add_argument("--multipath_steps", type=int, default=None, help="default 200")
    parser.add_argument("--solved_margin", type=float, default=0.05)
    parser.add_argument(
        "--small",
        action="store_true",
        help="a ~3 minute smoke run: 2 tasks, k in {1,2}, W=70 s, cycles of one candidate of "
        "2x10 steps, 512 train examples, 20 multipath steps",
    )
    parser.add_argument("--root_dir", default="runs/root_fashion_mnist")
    parser.add_argument("--out", default=None, help="default: runs/bench_agents-TIMESTAMP")
    args = parser.parse_args(argv)
    small = args.small
    args.budget_s = args.budget_s or (70.0 if small else 240.0)
    args.ks = [int(k) for k in (args.ks or ("1,2" if small else "1,2,4")).split(",")]
    names = args.tasks.split(",") if args.tasks else list(DEFAULT_TASKS[: 2 if small else 4])
    args.tasks = names
    args.steps_per_validation = args.steps_per_validation or (10 if small else 25)
    args.multipath_steps = args.multipath_steps or (20 if small else 200)
    if small:
        args.candidates, args.validations = 1, 2
        args.max_train_examples = args.max_train_examples or 512
    for k in args.ks:
        if k < 1 or len(names) % k:
            parser.error(f"k={k} must divide the number of tasks ({len(names)}).")
    return args


@dataclasses.dataclass
class AgentRun:
    """One agent process of a wave: what it logged and how it ended."""

    task: str
    wave: int
    log_path: str
    lifetime_s: float = 0.0
    exit_code: int | None = None
    killed: bool = False
    cycles: int = 0
    candidates: int = 0
    cycle_seconds: float = 0.0


def _agent_command(args: argparse.Namespace, store_dir: str, task: str, seconds: float) -> list:
    bindings = {
        "STORE_DIR": repr(store_dir),
        "MAX_SECONDS": f"{seconds:.1f}",
        "GENERATIONS": args.generations,
        "CANDIDATES": args.candidates,
        "VALIDATIONS": args.validations,
        "STEPS_PER_VALIDATION": args.steps_per_validation,
        "BATCH_SIZE": args.batch_size,
        "SCALE": args.scale,
        "MAX_TRAIN_EXAMPLES": args.max_train_examples,
        "ADAPTERS": True,
    }
    flags = [f"--gin.{name}={value}" for name, value in bindings.items()]
    return [sys.executable, "-m", "evogrow.main", "agent", "--gin_file=gin/runs/agent.gin"] + [
        "--task",
        task,
        *flags,
    ]


def _read_cycles(run: AgentRun) -> None:
    with open(run.log_path, errors="replace") as f:
        for line in f:
            match = _CYCLE_LINE.search(line)
            if match:
                run.cycles += 1
                run.candidates += int(match["candidates"])
                run.cycle_seconds += float(match["wall"])


def _run_wave(
    args: argparse.Namespace, store_dir: str, tasks: list[str], wave: int, seconds: float, logs: str
) -> list[AgentRun]:
    """Starts one agent process per task, kills what still runs after `seconds`."""
    env = {**os.environ, "EVOGROW_XLA_CACHE": "off", "TF_CPP_MIN_LOG_LEVEL": "2"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO_ROOT, env.get("PYTHONPATH")) if p)
    runs, processes = [], []
    start = time.monotonic()
    for task in tasks:
        run = AgentRun(task=task, wave=wave, log_path=os.path.join(logs, f"{task}.log"))
        with open(run.log_path, "w") as log:
            command = _agent_command(args, store_dir, task, seconds)
            processes.append(
                subprocess.Popen(
                    command, stdout=log, stderr=subprocess.STDOUT, cwd=REPO_ROOT, env=env
                )
            )
        runs.append(run)
    for run, process in zip(runs, processes, strict=True):
        try:
            process.wait(timeout=max(0.0, start + seconds - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.kill()  # the hard budget: the store never shows a half-published cycle
            process.wait()
            run.killed = True
        run.lifetime_s = time.monotonic() - start
        run.exit_code = process.returncode
        _read_cycles(run)
    return runs


def _majority_rate(labels: np.ndarray) -> float:
    return float(np.bincount(np.asarray(labels)).max() / len(labels))


def _test_accuracies(store_dir: str, tests: dict[str, tuple]) -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    with store_lib.open_store(store_dir) as store:
        state = store.load_state()
        for task, (images, labels) in tests.items():
            if task not in state.tasks or state.best_path(task) is None:
                out[task] = None
                continue
            predicted = inference.predict_classes(store, task, images)
            out[task] = float(np.mean(predicted == np.asarray(labels)))
    return out


def _phase(args: argparse.Namespace, k: int, out: str, tests: dict[str, tuple]) -> dict[str, Any]:
    """One k: a fresh store, len(tasks)/k waves of k agent processes, then test accuracy."""
    store_dir = os.path.abspath(os.path.join(out, f"k{k}", "store"))
    with store_lib.open_store(store_dir) as store:
        root.seed_store(store, args.root_dir)
    waves = [args.tasks[i : i + k] for i in range(0, len(args.tasks), k)]
    wave_seconds = args.budget_s / len(waves)
    runs: list[AgentRun] = []
    start = time.monotonic()
    for index, tasks in enumerate(waves):
        logs = os.path.join(out, f"k{k}", f"wave{index}")
        os.makedirs(logs, exist_ok=True)
        runs += _run_wave(args, store_dir, tasks, index, wave_seconds, logs)
    wall = time.monotonic() - start
    accuracy = _test_accuracies(store_dir, tests)
    majority = {task: _majority_rate(labels) for task, (_, labels) in tests.items()}
    solved = [
        t for t, a in accuracy.items() if a is not None and a > majority[t] + args.solved_margin
    ]
    candidates = sum(r.candidates for r in runs)
    result = {
        "k": k,
        "store_dir": store_dir,
        "wall_s": wall,
        "wave_s": wave_seconds,
        "tasks_solved": len(solved),
        "solved": solved,
        "test_accuracy": accuracy,
        "mean_acc": float(np.mean([majority[t] if a is None else a for t, a in accuracy.items()])),
        "candidates": candidates,
        "cycles": sum(r.cycles for r in runs),
        "candidates_per_hour": candidates / (wall / 3600.0),
        "cycle_share": sum(r.cycle_seconds for r in runs) / max(1e-9, k * wall),
        "killed": sum(r.killed for r in runs),
        "failed": [r.task for r in runs if not r.killed and r.exit_code != 0],
    }
    logger.info("k=%d: %s", k, {n: v for n, v in result.items() if n != "store_dir"})
    return result


def _multipath(args: argparse.Namespace, store_dir: str, tests: dict[str, tuple]) -> dict:
    """One multipath agent cycle per task on a store; its report per task (or the wait)."""
    settings = multipath_agent.MultipathSettings(
        num_paths=args.multipath_paths,
        steps=args.multipath_steps,
        steps_per_validation=args.multipath_steps // 4,
        batch_size=args.batch_size,
        wait_seconds=0.0,
    )
    out = {}
    for task in args.tasks:
        config = agent_cycle.AgentConfig(task, agent_cycle.MULTIPATH, multipath=settings)
        data = task_data.search_task_data(
            task, eval_batch_size=256, max_train_examples=args.max_train_examples
        )
        (result,) = agent_run.run_agent(
            store_dir=store_dir, config=config, data=data, test_data=tests[task], cycles=1
        )
        assert isinstance(result, multipath_agent.MultipathCycle)
        out[task] = dict(result.trained) if result.trained else {"waiting": result.message}
    return out


def _tables(args: argparse.Namespace, phases: list[dict], paths: dict) -> str:
    names = args.tasks
    lines = [
        "| k | wave s | tasks solved | mean test acc | " + " | ".join(names) + " | candidates "
        "| candidates/h | scaling vs k=1 | cycle share |",
        "|" + "---|" * (9 + len(names) - 1),
    ]
    base = phases[0]["candidates_per_hour"]
    for p in phases:
        accs = [
            "-" if p["test_accuracy"][t] is None else f"{p['test_accuracy'][t]:.4f}" for t in names
        ]
        scaling = p["candidates_per_hour"] / base if base else float("nan")
        lines.append(
            f"| {p['k']} | {p['wave_s']:.0f} | {p['tasks_solved']}/{len(names)} | "
            f"{p['mean_acc']:.4f} | " + " | ".join(accs) + f" | {p['candidates']} | "
            f"{p['candidates_per_hour']:.0f} | {scaling:.2f} | {p['cycle_share']:.2f} |"
        )
    lines += [
        "",
        "| task | path_0 test acc | multipath test acc | gain | path_0 val | multipath val "
        "| companions |",
        "|---|---|---|---|---|---|---|",
    ]
    for task in names:
        r = paths.get(task, {})
        if "test_accuracy" not in r:
            lines.append(f"| {task} | - | - | - | - | - | {r.get('waiting', 'no path')} |")
            continue
        lines.append(
            f"| {task} | {r['single_path_test_accuracy']:.4f} | {r['test_accuracy']:.4f} | "
            f"{r['test_gain']:+.4f} | {r['single_path_quality']:.4f} | {r['quality']:.4f} | "
            f"{', '.join(r['companion_tasks'])} |"
        )
    return "\n".join(lines)


def _plot(phases: list[dict], path: str) -> str:
    import matplotlib  # noqa: PLC0415 - only when plotting

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    ks = [p["k"] for p in phases]
    figure, (left, right) = plt.subplots(1, 2, figsize=(9, 3.5))
    base = phases[0]["candidates_per_hour"] or 1.0
    left.plot(ks, [p["candidates_per_hour"] / base for p in phases], "o-", label="measured")
    left.plot(ks, [k / ks[0] for k in ks], "--", color="gray", label="linear")
    left.set(xlabel="agents at a time (k)", ylabel="throughput vs k=1", xticks=ks)
    left.legend()
    right.plot(ks, [p["mean_acc"] for p in phases], "o-")
    right.set(xlabel="agents at a time (k)", ylabel="mean test accuracy", xticks=ks)
    figure.suptitle("muNet agents under one wall-clock budget")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def main(argv: list[str]) -> int:
    """Runs the benchmark; prints the tables, then the JSON summary as the last line.

    Args:
      argv: the benchmark's arguments.

    Returns:
      the exit status.
    """
    args = _parse(argv)
    out = methods.start_run(args.out, "bench_agents")
    args.root_dir = os.path.abspath(args.root_dir)
    start = time.perf_counter()
    methods.image_root(args.root_dir)
    tests = {t: task_data.load_task_arrays(t, "test") for t in args.tasks}
    phases = [_phase(args, k, out, tests) for k in args.ks]
    multipath_start = time.perf_counter()
    paths = _multipath(args, phases[-1]["store_dir"], tests)
    multipath_wall = time.perf_counter() - multipath_start
    table = _tables(args, phases, paths)
    with open(os.path.join(out, "agents.md"), "w") as f:
        f.write(table + "\n")
    plot = _plot(phases, os.path.join(out, "agents.png"))

    summary: dict[str, Any] = {"tasks": len(args.tasks), "budget_s": args.budget_s, "ks": args.ks}
    base = phases[0]["candidates_per_hour"]
    for p in phases:
        key = f"agents_k{p['k']}"
        summary[f"{key}_tasks_solved"] = p["tasks_solved"]
        summary[f"{key}_mean_acc"] = p["mean_acc"]
        summary[f"{key}_candidates"] = p["candidates"]
        summary[f"{key}_candidates_per_hour"] = p["candidates_per_hour"]
        summary[f"{key}_throughput_scaling"] = p["candidates_per_hour"] / base if base else None
        summary[f"{key}_wall_s"] = p["wall_s"]
        summary[f"{key}_failed_agents"] = len(p["failed"])
    trained = [r for r in paths.values() if "test_accuracy" in r]
    summary["multipath_k"] = phases[-1]["k"]
    summary["multipath_tasks"] = len(trained)
    if trained:
        summary["multipath_mean_acc"] = float(np.mean([r["test_accuracy"] for r in trained]))
        summary["single_path_mean_acc"] = float(
            np.mean([r["single_path_test_accuracy"] for r in trained])
        )
        summary["multipath_mean_gain"] = float(np.mean([r["test_gain"] for r in trained]))
        summary["multipath_mean_val_gain"] = float(np.mean([r["gain"] for r in trained]))
        summary["multipath_tasks_improved"] = sum(r["test_gain"] > 0 for r in trained)
    summary["multipath_wall_s"] = multipath_wall
    summary["solved_rule"] = f"test acc > majority-class rate + {args.solved_margin}"
    summary["small"] = bool(args.small)
    summary["total_wall_s"] = time.perf_counter() - start
    print(table)
    print(f"plot: {plot}\ntable: {out}/agents.md")
    print(json.dumps(summary))
    return 0
