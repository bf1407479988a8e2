"""muNet benchmark: the evolved multitask system against baselines from the same root.

    python -m benchmarks munet [--seeds S] [--rounds R] [--generations G] [--candidates D]
        [--validations V] [--steps_per_validation B] [--scale S] [--mu MU] [--seed N]
        [--freeze_layers K] [--adapter_size X] [--max_train_examples N] [--out DIR]

On the six offline image tasks of `evolution_image_rgb32_v1` (digits, LFW faces,
textures, shape type, shape count, MNIST-1D; all 32x32x3), starting from the root ViT
pretrained on Fashion-MNIST (`evolution.roots.root`, the main job's root, reused when
present), for each of S seeds (N, N + 1, ...):

1. evolve: R rounds of task iterations round-robin (`evolution.evolve.evolve`); by
   default one round of 3 generations x 2 candidates x 3 validations x 40 steps, score
   scale 0.95, and each task's first candidates mutating at mu = 0.3 (the top of
   mu2Net+'s range: with six candidates per task the self-tuned rates cannot climb from
   the notebooks' 0.1, and at 0.1 a task clones about one root component per child);
2. baselines as muNet.ipynb trains them (`evolution.agents.baselines`, "Finetune all",
   "Freeze bottom layers:K", "Adapters:X" before every block): per task D replicas
   from the root with the default hyperparameters, each trained for one evolutionary
   chain's steps (task iterations x G x V x B, `methods.chain_steps`) in parallel on
   the search's devices, the best-validation replica kept; the total compute equals
   the evolution's on the task, and no baseline trains longer than the chain that
   trained the evolved path;
3. report: per task and mean test accuracy, parameters each task pays for (muNet's
   accounting: the root is not a user, so a root component one task uses is paid in
   full; mu2Net+'s, where the root counts as a user, beside it), FLOPs per example,
   wall times, a Markdown table (mean ± std over the seeds) and a plot of accuracy
   against parameters.

The last line is one JSON object with evolved_mean_acc, finetune_mean_acc,
adapters_mean_acc, freeze_mean_acc, params_ratio (the evolved system's mean accounted
parameters per task over fine-tuning's, muNet's accounting), params_ratio_mu2net_plus,
the FLOPs per task of each method, each the mean over the seeds with its _std beside it.
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
from evolution.search.data import task_data
from evolution.search.execution import placement
from evolution.search.space import mutations
from tasks import offline_image


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks munet")
    parser.add_argument("--seeds", type=int, default=3, help="runs with seeds N, N + 1, ...")
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
    parser.add_argument(
        "--freeze_layers", type=int, default=None, help="K (default: half the root's blocks)"
    )
    parser.add_argument(
        "--adapter_size",
        type=int,
        default=baselines.NOTEBOOK_ADAPTER_SIZE,
        help=f"X, one of muNet.ipynb's {baselines.NOTEBOOK_ADAPTER_SIZES}",
    )
    parser.add_argument("--max_train_examples", type=int, default=None)
    parser.add_argument("--root_dir", default="runs/root_fashion_mnist")
    parser.add_argument("--out", default=None, help="default: runs/bench_munet-TIMESTAMP")
    return parser.parse_args(argv)


def _baseline_tasks(names: list[str], max_train_examples: int | None) -> dict:
    """Each task's training stream, validation batches and test split."""
    loaded = {}
    for name in names:
        images, labels = task_data.load_task_arrays(name, "test")
        loaded[name] = baselines.BaselineTask(
            data=task_data.search_task_data(
                name, eval_batch_size=256, max_train_examples=max_train_examples
            ),
            test_images=images,
            test_labels=labels,
        )
    return loaded


def _one_seed(args: argparse.Namespace, config: search.SearchConfig, folder: str) -> dict:
    """Evolves and trains the baselines for one seed; its figures and timings."""
    names = offline_image.evolution_members()
    store_dir = os.path.join(folder, "store")
    evolve_start = time.perf_counter()
    outcome = evolve_lib.evolve(
        store_dir=store_dir,
        root_dir=args.root_dir,
        search_config=config,
        tasks=names,
        rounds=args.rounds,
        max_train_examples=args.max_train_examples,
        output_dir=os.path.join(folder, "evolved"),
    )
    evolve_wall = time.perf_counter() - evolve_start
    steps_per_candidate = args.validations * args.steps_per_validation
    chain = methods.chain_steps(outcome.results, steps_per_candidate)
    with store_lib.open_store(store_dir) as store:
        evolved = methods.evolved_figures(store, {n: outcome.test_accuracy[n] for n in names})
        baseline_start = time.perf_counter()
        results = baselines.run_baselines(
            store=store,
            tasks=_baseline_tasks(names, args.max_train_examples),
            methods=baselines.METHODS,
            steps_per_task=chain,
            steps_per_validation=args.steps_per_validation,
            replicas=args.candidates,
            devices=placement.search_devices(config.devices),
            batch_size=args.batch_size,
            seed=config.seed,
            freeze_layers=args.freeze_layers,
            adapter_size=args.adapter_size,
        )
        baseline_wall = time.perf_counter() - baseline_start
    return {
        "rows": {"evolved": evolved, **methods.baseline_figures(results)},
        "variants": sorted({r.spec.name for r in results}),
        "timings": {
            "evolve_wall_s": evolve_wall,
            "baselines_wall_s": baseline_wall,
            "evolution_overhead_share": outcome.overhead_share,
        },
        "chain_steps_per_task": chain,
        "evolution_steps_per_task": methods.evolution_steps(outcome.results, steps_per_candidate),
        "picture": outcome.files["picture_png"],
    }


def main(argv: list[str]) -> int:
    """Runs the benchmark; prints the table, then the JSON summary as the last line.

    Args:
      argv: the benchmark's arguments.

    Returns:
      the exit status.
    """
    args = _parse(argv)
    # Settings first: a bad one is refused before any folder or root is made.
    configs = methods.search_configs(
        args,
        mu=args.mu,
        mutation_options=mutations.MutationOptions(max_layers=8, adapters=args.adapters),
    )
    out = methods.start_run(args.out, "bench_munet")
    names = offline_image.evolution_members()
    start = time.perf_counter()
    made = methods.image_root(args.root_dir)
    runs = [_one_seed(args, config, os.path.join(out, f"seed_{config.seed}")) for config in configs]
    comparison = methods.compare_methods(
        names, [run["rows"] for run in runs], out, table_name="munet.md", title="muNet benchmark"
    )
    summary = {
        "tasks": len(names),
        "seeds": [config.seed for config in configs],
        **comparison.summary,
        **methods.mean_and_std([run["timings"] for run in runs]),
        "variants": runs[0]["variants"],
        "replicas": args.candidates,
        "chain_steps_per_task": [run["chain_steps_per_task"] for run in runs],
        "evolution_steps_per_task": [run["evolution_steps_per_task"] for run in runs],
        "total_wall_s": time.perf_counter() - start,
        "root_test_acc": made.test_accuracy,
        "text_variant": "./run.sh bench munet_text",
    }
    print(comparison.table)
    print(f"plot: {comparison.plot}\nsystem pictures: {[run['picture'] for run in runs]}")
    print(f"table: {comparison.table_file}")
    print(json.dumps(summary))
    return 0
