"""muNet benchmark, text variant: the evolved system from the MiniLM root against baselines.

    python -m benchmarks munet_text [--seeds S] [--tasks T ...] [--rounds R] [--generations G]
        [--candidates D] [--validations V] [--steps_per_validation B] [--num_layers K]
        [--sequence_length L] [--scale S] [--out DIR]

The text counterpart of `benchmarks.munet` on the offline text classification tasks
(tasks/offline_text.py; default sms_spam_v1, trec6_v1, movie_sentiment_v1), starting
from the pretrained all-MiniLM-L6-v2 encoder (`evolution.roots.text_root`: its embeddings and
bottom K blocks, post-norm, mean pooling):

1. evolve: R rounds of task iterations round-robin (`search.evolve_round_robin`), with
   adapters, clones, top-block removal and hyperparameter mutations; no block addition
   (depth growth is not function-preserving for a post-norm encoder, `growth.rules`),
   and the image augmentations pinned off (`text_root.text_search_space`);
2. baselines as muNet.ipynb trains them (`evolution.agents.baselines`, as in
   `benchmarks.munet`): per task D replicas from the root with the default
   hyperparameters, each trained for one evolutionary chain's steps in parallel, the
   best-validation one kept: "Finetune all", "Freeze bottom layers:K" (default half the
   blocks), "Adapters:X" before every block;
3. report: per task and mean test accuracy, the parameters each task pays for (muNet's
   accounting, mu2Net+'s beside it), FLOPs per example, a Markdown table (mean ± std
   over the S seeds of `--seeds`) and a plot of accuracy against parameters.

CPU sizing (2 shared cores): MiniLM's 6 blocks at length 64 take about 1.4 s per
training step at batch 16; the defaults (K=2 blocks, L=32 ids, batch 16: about 0.3 s
per step with every block training, 0.1 s with the blocks frozen; G=2, D=2, V=2, B=25)
train a 50-step candidate in about 15 s (compilation and validation included). Train,
validation and test splits are used whole (the `--max_*_examples` options take seeded
random subsets).

The last line is one JSON object with evolved_mean_acc, finetune_mean_acc,
adapters_mean_acc, freeze_mean_acc, params_ratio (the evolved system's mean accounted
parameters per task over fine-tuning's, muNet's accounting), params_ratio_mu2net_plus
and the FLOPs per task of each method, each the mean over the seeds with its _std.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from typing import Any

import numpy as np

import tasks
from benchmarks import methods
from evolution import store as store_lib
from evolution.agents import baselines
from evolution.export import inference
from evolution.roots import text_root
from evolution.search import loop as search
from evolution.search.data import batches, task_data
from evolution.search.execution import placement
from evolution.search.space import mutations

logger = logging.getLogger("evogrow")

DEFAULT_TASKS = ("sms_spam_v1", "trec6_v1", "movie_sentiment_v1")
_PREDICT_BATCH = 256


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks munet_text")
    parser.add_argument("--seeds", type=int, default=3, help="runs with seeds N, N + 1, ...")
    parser.add_argument("--tasks", nargs="+", default=list(DEFAULT_TASKS))
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--generations", type=int, default=2)
    parser.add_argument("--candidates", type=int, default=2)
    parser.add_argument("--validations", type=int, default=2)
    parser.add_argument("--steps_per_validation", type=int, default=25)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--num_layers", type=int, default=2, help="MiniLM blocks kept (1-6)")
    parser.add_argument("--sequence_length", type=int, default=32)
    parser.add_argument("--scale", type=float, default=0.9)
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
    # Random subsets (seeded), not the first examples; None: the whole split.
    parser.add_argument("--max_train_examples", type=int, default=None)
    parser.add_argument("--max_eval_examples", type=int, default=None)
    parser.add_argument("--max_test_examples", type=int, default=None)
    parser.add_argument("--out", default=None, help="default: runs/bench_munet_text-TIMESTAMP")
    return parser.parse_args(argv)


def _load(name: str, split: str, args: argparse.Namespace) -> tuple[np.ndarray, np.ndarray]:
    """One split of a text task as (token ids [N, L] int32, labels [N])."""
    return task_data.load_task_arrays(name, split, sequence_length=args.sequence_length)


def _subset(
    arrays: tuple[np.ndarray, np.ndarray], size: int | None, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """A seeded random subset of `size` examples in source order (None: all of them).

    Not the first `size`: the offline splits keep their source's order, which is not
    shuffled (movie_sentiment's first hundreds are nearly all positive).
    """
    inputs, labels = arrays
    if size is None or size >= len(labels):
        return inputs, labels
    keep = np.sort(np.random.default_rng(seed).permutation(len(labels))[:size])
    return inputs[keep], labels[keep]


def _test_accuracy(store: store_lib.Store, name: str, inputs: np.ndarray, labels: Any) -> float:
    """Test accuracy of a task's published best path (batched; the last batch is short)."""
    predicted = [
        inference.predict_classes(store, name, inputs[begin : begin + _PREDICT_BATCH])
        for begin in range(0, len(labels), _PREDICT_BATCH)
    ]
    return float(np.mean(np.concatenate(predicted) == np.asarray(labels)))


def _load_tasks(names: list[str], args: argparse.Namespace) -> tuple[dict, dict]:
    """Each task's search data and test split (token ids, labels)."""
    data: dict[str, search.TaskData] = {}
    test: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for name in names:
        train = _subset(_load(name, "train", args), args.max_train_examples, args.seed)
        validation = _subset(_load(name, "validation", args), args.max_eval_examples, args.seed)
        test[name] = _subset(_load(name, "test", args), args.max_test_examples, args.seed)
        data[name] = search.TaskData(
            train_batches_fn=batches.array_train_batches(*train, feature="inputs"),
            validation_batches=batches.array_eval_batches(*validation, 64, feature="inputs"),
            num_classes=tasks.info(name).num_classes,
            metadata={"seqio_task": name, "sequence_length": args.sequence_length},
        )
        logger.info("%s: %d train, %d validation examples", name, len(train[1]), len(validation[1]))
    return data, test


def _one_seed(
    args: argparse.Namespace,
    config: search.SearchConfig,
    folder: str,
    data: dict[str, search.TaskData],
    test: dict[str, tuple[np.ndarray, np.ndarray]],
) -> dict:
    """Evolves and trains the baselines for one seed; its figures and timings."""
    names = list(data)
    store = store_lib.open_store(os.path.join(folder, "store"))
    try:
        text_root.seed_text_root(store, num_layers=args.num_layers, max_len=args.sequence_length)
        root_params = store.load_state().root_params()
        evolve_start = time.perf_counter()
        results = search.evolve_round_robin(
            store, data, config, iterations=args.rounds * len(names)
        )
        evolve_wall = time.perf_counter() - evolve_start
        steps_per_candidate = args.validations * args.steps_per_validation
        chain = methods.chain_steps(results, steps_per_candidate)
        accuracy = {name: _test_accuracy(store, name, *test[name]) for name in names}
        evolved = methods.evolved_figures(store, accuracy)
        baseline_start = time.perf_counter()
        baseline_results = baselines.run_baselines(
            store=store,
            tasks={
                name: baselines.BaselineTask(
                    data=data[name], test_images=test[name][0], test_labels=test[name][1]
                )
                for name in names
            },
            methods=baselines.METHODS,
            steps_per_task=chain,
            steps_per_validation=args.steps_per_validation,
            replicas=args.candidates,
            devices=placement.search_devices(config.devices),
            batch_size=args.batch_size,
            seed=config.seed,
            freeze_layers=args.freeze_layers,
            adapter_size=args.adapter_size,
            hparam_values=text_root.NO_AUGMENTATION,
        )
        baseline_wall = time.perf_counter() - baseline_start
    finally:
        store.close()
    wall = sum(r.wall_seconds for r in results)
    return {
        "rows": {"evolved": evolved, **methods.baseline_figures(baseline_results)},
        "variants": sorted({r.spec.name for r in baseline_results}),
        "root_params": root_params,
        "timings": {
            "evolve_wall_s": evolve_wall,
            "baselines_wall_s": baseline_wall,
            "evolution_overhead_share": (
                sum(r.overhead_seconds for r in results) / wall if wall else 0.0
            ),
        },
        "chain_steps_per_task": chain,
        "evolution_steps_per_task": methods.evolution_steps(results, steps_per_candidate),
    }


def main(argv: list[str]) -> int:
    """Runs the benchmark; prints the table, then the JSON summary as the last line.

    Args:
      argv: the benchmark's arguments.

    Returns:
      the exit status.
    """
    args = _parse(argv)
    configs = methods.search_configs(
        args,
        mutation_options=mutations.MutationOptions(add_blocks=False, adapters=args.adapters),
        space=text_root.text_search_space(),
    )
    out = methods.start_run(args.out, "bench_munet_text")
    names = list(args.tasks)
    start = time.perf_counter()
    data, test = _load_tasks(names, args)
    data_wall = time.perf_counter() - start
    runs = [
        _one_seed(args, config, os.path.join(out, f"seed_{config.seed}"), data, test)
        for config in configs
    ]
    print(f"root: MiniLM embeddings + {args.num_layers} blocks, {runs[0]['root_params']} params")
    comparison = methods.compare_methods(
        names,
        [run["rows"] for run in runs],
        out,
        table_name="munet_text.md",
        title="muNet benchmark (text)",
    )
    summary = {
        "tasks": len(names),
        "task_names": names,
        "seeds": [config.seed for config in configs],
        **comparison.summary,
        **methods.mean_and_std([run["timings"] for run in runs]),
        "variants": runs[0]["variants"],
        "replicas": args.candidates,
        "root_params": runs[0]["root_params"],
        "root": f"all-MiniLM-L6-v2, bottom {args.num_layers} blocks, length {args.sequence_length}",
        "chain_steps_per_task": [run["chain_steps_per_task"] for run in runs],
        "evolution_steps_per_task": [run["evolution_steps_per_task"] for run in runs],
        "data_wall_s": data_wall,
        "total_wall_s": time.perf_counter() - start,
    }
    print(comparison.table)
    print(f"plot: {comparison.plot}\ntable: {comparison.table_file}")
    print(json.dumps(summary))
    return 0
