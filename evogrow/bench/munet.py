"""muNet benchmark: the evolved multitask system against baselines from the same root.

    python -m evogrow.bench munet [--rounds R] [--generations G] [--candidates D]
        [--validations V] [--steps_per_validation B] [--scale S] [--out DIR]

On the six offline image tasks of `evolution_image_rgb32_v1` (digits, LFW faces,
textures, shape type, shape count, MNIST-1D; all 32x32x3), starting from the root ViT
pretrained on Fashion-MNIST (`evolution.root`, the main job's root, reused when present):

1. evolve: R rounds of task iterations round-robin (`evolution.evolve.evolve`);
2. baselines (`evolution.baselines`): full fine-tuning, freeze the bottom half of the
   blocks, residual adapters, each given exactly as many training steps per task as
   the evolution spent on that task (every candidate's V x B steps; the papers scale
   their baselines the same way);
3. report: per task and mean test accuracy, parameters each task pays for (the
   evolution's accounting: shared components divided among their users), wall times, a
   Markdown table and a plot of accuracy against parameters.

The last line is one JSON object with evolved_mean_acc, finetune_mean_acc,
adapters_mean_acc, freeze_mean_acc and params_ratio (the evolved system's mean accounted
parameters per task over fine-tuning's).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from collections import defaultdict
from typing import Any

import numpy as np

from evolution import baselines, mutations, report, root, search, task_data
from evolution import evolve as evolve_lib
from evolution import store as store_lib
from tasks import offline_image

logger = logging.getLogger("evogrow")

ROOT_SETTINGS = dict(
    steps=2000, batch_size=128, learning_rate=2e-3, warmup_steps=200, weight_decay=0.05, seed=0
)


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m evogrow.bench munet")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--generations", type=int, default=3)
    parser.add_argument("--candidates", type=int, default=2)
    parser.add_argument("--validations", type=int, default=3)
    parser.add_argument("--steps_per_validation", type=int, default=40)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--scale", type=float, default=0.9)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--adapters", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--max_train_examples", type=int, default=None)
    parser.add_argument("--root_dir", default="runs/root_fashion_mnist")
    parser.add_argument("--out", default=None, help="default: runs/bench_munet-TIMESTAMP")
    return parser.parse_args(argv)


def _evolution_steps(results: list[search.TaskResult], steps_per_candidate: int) -> dict:
    """Training steps the evolution spent on each task (all candidates, accepted or not)."""
    steps: dict[str, int] = defaultdict(int)
    for result in results:
        steps[result.task] += len(result.candidates) * steps_per_candidate
    return dict(steps)


def _table(
    names: list[str],
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


def main(argv: list[str]) -> int:
    """Runs the benchmark; prints the table, then the JSON summary as the last line.

    Args:
      argv: the benchmark's arguments.

    Returns:
      the exit status.
    """
    args = _parse(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s] %(message)s")
    logger.setLevel(logging.INFO)
    out = args.out or os.path.join("runs", time.strftime("bench_munet-%Y%m%d-%H%M%S"))
    os.makedirs(out, exist_ok=True)
    names = offline_image.evolution_members()
    start = time.perf_counter()

    made = root.ensure_root(root_dir=args.root_dir, **ROOT_SETTINGS)
    print(f"root: {made.num_params} params, Fashion-MNIST test accuracy {made.test_accuracy:.4f}")
    config = search.SearchConfig(
        generations=args.generations,
        candidates_per_generation=args.candidates,
        num_validations=args.validations,
        steps_per_validation=args.steps_per_validation,
        batch_size=args.batch_size,
        scale=args.scale,
        seed=args.seed,
        mutation_options=mutations.MutationOptions(max_layers=8, adapters=args.adapters),
    )
    store_dir = os.path.join(out, "store")
    evolve_start = time.perf_counter()
    outcome = evolve_lib.evolve(
        store_dir=store_dir,
        root_dir=args.root_dir,
        search_config=config,
        tasks=names,
        rounds=args.rounds,
        max_train_examples=args.max_train_examples,
        output_dir=os.path.join(out, "evolved"),
    )
    evolve_wall = time.perf_counter() - evolve_start
    steps = _evolution_steps(list(outcome.results), args.validations * args.steps_per_validation)

    store = store_lib.open_store(store_dir)
    try:
        state = store.load_state()
        evolved = {}
        for name in names:
            path = state.best_path(name)
            assert path is not None
            evolved[name] = (outcome.test_accuracy[name], state.accounted_params(path))
        baseline_tasks = {}
        for name in names:
            images, labels = task_data.load_task_arrays(name, "test")
            baseline_tasks[name] = baselines.BaselineTask(
                data=task_data.search_task_data(
                    name, eval_batch_size=256, max_train_examples=args.max_train_examples
                ),
                test_images=images,
                test_labels=labels,
            )
        baseline_start = time.perf_counter()
        results = baselines.run_baselines(
            store=store,
            tasks=baseline_tasks,
            methods=baselines.METHODS,
            steps_per_task=steps,
            steps_per_validation=args.steps_per_validation,
            batch_size=args.batch_size,
            seed=args.seed,
        )
        baseline_wall = time.perf_counter() - baseline_start
    finally:
        store.close()

    by_method: dict[str, list[Any]] = defaultdict(list)
    for result in results:
        by_method[result.method].append(result)
    table = _table(names, evolved, dict(by_method))
    points = [(n, "evolved", acc, params) for n, (acc, params) in evolved.items()]
    points += [(r.task, r.method, r.test_accuracy, r.accounted_params) for r in results]
    plot = report.plot_accuracy_vs_params(
        points, os.path.join(out, "accuracy_vs_params.png"), title="muNet benchmark"
    )
    with open(os.path.join(out, "munet.md"), "w") as f:
        f.write(table + "\n")

    def mean_acc(method: str) -> float:
        return float(np.mean([r.test_accuracy for r in by_method[method]]))

    evolved_params = float(np.mean([p for _, p in evolved.values()]))
    finetune_params = float(np.mean([r.accounted_params for r in by_method["finetune"]]))
    summary = {
        "tasks": len(names),
        "evolved_mean_acc": float(np.mean([a for a, _ in evolved.values()])),
        "finetune_mean_acc": mean_acc("finetune"),
        "adapters_mean_acc": mean_acc("adapters"),
        "freeze_mean_acc": mean_acc("freeze"),
        "params_ratio": evolved_params / finetune_params,
        "evolved_params_per_task": evolved_params,
        "finetune_params_per_task": finetune_params,
        "steps_per_task": steps,
        "evolve_wall_s": evolve_wall,
        "baselines_wall_s": baseline_wall,
        "evolution_overhead_share": outcome.overhead_share,
        "total_wall_s": time.perf_counter() - start,
        "root_test_acc": made.test_accuracy,
        "text_variant": "not run: the search builds ViT paths only (see the issue note)",
    }
    print(table)
    print(f"plot: {plot}\nsystem picture: {outcome.files['picture_png']}\ntable: {out}/munet.md")
    print(json.dumps(summary))
    return 0
