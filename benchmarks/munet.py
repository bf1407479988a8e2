"""muNet benchmark: the evolved multitask system against baselines from the same root.

    python -m benchmarks munet [--rounds R] [--generations G] [--candidates D]
        [--validations V] [--steps_per_validation B] [--scale S] [--mu MU] [--seed N]
        [--out DIR]

On the six offline image tasks of `evolution_image_rgb32_v1` (digits, LFW faces,
textures, shape type, shape count, MNIST-1D; all 32x32x3), starting from the root ViT
pretrained on Fashion-MNIST (`evolution.roots.root`, the main job's root, reused when present):

1. evolve: R rounds of task iterations round-robin (`evolution.evolve.evolve`); by
   default one round of 3 generations x 2 candidates x 3 validations x 40 steps, score
   scale 0.95, and each task's first candidates mutating at mu = 0.3 (the top of
   mu2Net+'s range: with six candidates per task the self-tuned rates cannot climb from
   the notebooks' 0.1, and at 0.1 a task clones about one root component per child);
2. baselines (`evolution.agents.baselines`): full fine-tuning, freeze the bottom half of the
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
import os
import time

from benchmarks import methods
from evolution import evolve as evolve_lib
from evolution import store as store_lib
from evolution.agents import baselines
from evolution.search import loop as search
from evolution.search import mutations, task_data
from tasks import offline_image


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks munet")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--generations", type=int, default=3)
    parser.add_argument("--candidates", type=int, default=2)
    parser.add_argument("--validations", type=int, default=3)
    parser.add_argument("--steps_per_validation", type=int, default=40)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--scale", type=float, default=0.95)
    parser.add_argument(
        "--mu",
        type=float,
        default=0.3,
        help="mutation rate of each task's first candidates (mu2Net+ tunes it from there)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--adapters", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--max_train_examples", type=int, default=None)
    parser.add_argument("--root_dir", default="runs/root_fashion_mnist")
    parser.add_argument("--out", default=None, help="default: runs/bench_munet-TIMESTAMP")
    return parser.parse_args(argv)


def main(argv: list[str]) -> int:
    """Runs the benchmark; prints the table, then the JSON summary as the last line.

    Args:
      argv: the benchmark's arguments.

    Returns:
      the exit status.
    """
    args = _parse(argv)
    # Settings first: a bad one is refused before any folder or root is made.
    config = search.SearchConfig(
        generations=args.generations,
        candidates_per_generation=args.candidates,
        num_validations=args.validations,
        steps_per_validation=args.steps_per_validation,
        batch_size=args.batch_size,
        scale=args.scale,
        mu=args.mu,
        seed=args.seed,
        mutation_options=mutations.MutationOptions(max_layers=8, adapters=args.adapters),
    )
    out = methods.start_run(args.out, "bench_munet")
    names = offline_image.evolution_members()
    start = time.perf_counter()
    made = methods.image_root(args.root_dir)
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
    steps = methods.evolution_steps(outcome.results, args.validations * args.steps_per_validation)

    store = store_lib.open_store(store_dir)
    try:
        state = store.load_state()
        evolved = {}
        for name in names:
            path = state.best_path(name)
            assert path is not None
            evolved[name] = (
                outcome.test_accuracy[name],
                state.accounted_params(path, accounting="munet"),
            )
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

    comparison = methods.compare_methods(
        names, evolved, results, out, table_name="munet.md", title="muNet benchmark"
    )
    summary = {
        "tasks": len(names),
        **comparison.summary,
        "steps_per_task": steps,
        "evolve_wall_s": evolve_wall,
        "baselines_wall_s": baseline_wall,
        "evolution_overhead_share": outcome.overhead_share,
        "total_wall_s": time.perf_counter() - start,
        "root_test_acc": made.test_accuracy,
        "text_variant": "./run.sh bench munet_text",
    }
    print(comparison.table)
    print(f"plot: {comparison.plot}\nsystem picture: {outcome.files['picture_png']}")
    print(f"table: {comparison.table_file}")
    print(json.dumps(summary))
    return 0
