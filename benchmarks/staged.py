"""Staged training benchmark: grow a decoder LM during training vs train it at full size.

    python -m benchmarks staged [--steps N] [--batch B] [--seq_len L] [--task NAME]

Both runs use evogrow's trainer on an offline byte-level corpus (fortunes_lm_v1 when the
Debian `fortunes` package is installed, else pydoc_lm_v1), the same optimizer (AdamW,
linear warmup, then a constant learning rate), batches and evaluation:

- scratch: the final-size model for N steps. Its last validation loss is the target.
- staged: a smaller model that grows function-preservingly (growth/) to the same final
  size at scheduled steps, trained for 1.25 N steps; its compute is counted up to its
  first evaluation at or below the target.

Training compute to reach the target is counted in FLOPs (XLA's cost analysis of each
architecture's train step times the steps it ran) and in wall time (from the run's
start, compilation and growth included). `saving_pct` is the staged run's FLOP saving.
Writes the loss curves against FLOPs and steps to a PNG; the last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
import time
from typing import Any

import flax.linen as nn
import jax
import numpy as np
import optax

from evogrow import train as train_lib
from models import decoder, growth_hooks, lm
from training import checkpoints, data, partitioning, reporting
from training import growth_schedule as growth_schedule_lib
from training import trainer as trainer_lib

# The final architecture both runs end with, and the staged run's start and growth.
FINAL = dict(hidden=128, mlp_dim=512, num_heads=4, qk_dim=32, v_dim=32, num_layers=4)
START = dict(hidden=64, mlp_dim=256, num_heads=2, qk_dim=32, v_dim=32, num_layers=2)
# fraction of the scratch run's steps -> requests
STAGES = (
    (0.15, ("num_heads=4", "mlp_dim=512", "add_layer@1", "add_layer@3")),
    (0.35, ("hidden=128",)),
)
LEARNING_RATE = 2e-3
WARMUP_STEPS = 50


def _optimizer() -> optax.GradientTransformation:
    schedule = optax.join_schedules(
        [
            optax.linear_schedule(0.0, LEARNING_RATE, WARMUP_STEPS),
            optax.constant_schedule(LEARNING_RATE),
        ],
        [WARMUP_STEPS],
    )
    return optax.adamw(schedule, weight_decay=1e-4)


def _model(sizes: dict, seq_len: int) -> lm.DecoderOnlyLMModel:
    config = decoder.DecoderConfig(**sizes, max_len=seq_len)
    return lm.DecoderOnlyLMModel(decoder.Decoder(config), _optimizer())


def _task() -> str:
    from tasks import text_sources

    return "fortunes_lm_v1" if text_sources.fortunes_available() else "pydoc_lm_v1"


def _dataset(task: str, split: str, batch: int, seq_len: int) -> data.DatasetConfig:
    return data.DatasetConfig(
        task, {"targets": seq_len}, split, batch, shuffle=split == "train", module="tasks"
    )


def _flops_per_step(model: Any, batch: int, seq_len: int) -> float:
    shapes = {
        key: (batch, seq_len)
        for key in ("decoder_input_tokens", "decoder_target_tokens", "decoder_loss_weights")
    }
    types = {key: np.int32 for key in shapes}
    partitioner = partitioning.Partitioner()
    trainer = trainer_lib.Trainer(model, partitioner, shapes, types, jax.random.key(0))
    return trainer.train_step_flops()


def _run(
    name: str,
    model: Any,
    steps: int,
    schedule: growth_schedule_lib.GrowthSchedule | None,
    task: str,
    args: argparse.Namespace,
    workdir: str,
) -> tuple[list[dict], float]:
    model_dir = os.path.join(workdir, name)
    start = time.time()
    train_lib.train(
        model=model,
        train_dataset_cfg=_dataset(task, "train", args.batch, args.seq_len),
        train_eval_dataset_cfg=_dataset(task, "validation", args.batch, args.seq_len),
        infer_eval_dataset_cfg=None,
        checkpoint_cfg=checkpoints.CheckpointConfig(save=None),
        partitioner=partitioning.Partitioner(),
        model_dir=model_dir,
        total_steps=steps,
        eval_steps=args.eval_batches,
        eval_period=args.eval_period,
        stats_period=args.eval_period,
        random_seed=0,
        growth_schedule=schedule,
    )
    return reporting.read_history(model_dir), start


def _evals(history: list[dict]) -> list[dict]:
    return [r for r in history if r["kind"] == "training_eval"]


def _stage_flops(steps: list[int], flops: list[float], at_step: int) -> float:
    """FLOPs of the first `at_step` steps when stage i runs from steps[i] at flops[i]/step."""
    total = 0.0
    bounds = [*steps, float("inf")]
    for i, per_step in enumerate(flops):
        begin, end = bounds[i], min(bounds[i + 1], at_step)
        total += max(0.0, end - begin) * per_step
    return total


def _plot(path: str, curves: dict[str, tuple[list, list, list]], target: float, stages) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name, (steps, flops, losses) in curves.items():
        axes[0].plot(steps, losses, marker=".", label=name)
        axes[1].plot(np.array(flops) / 1e12, losses, marker=".", label=name)
    for ax in axes:
        ax.axhline(target, color="0.5", linestyle=":", label="target (scratch final)")
        ax.set_ylabel("validation loss")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    for step in stages:
        axes[0].axvline(step, color="0.4", linestyle="--", linewidth=0.8)
    axes[0].set_xlabel("step (dashed: growth)")
    axes[1].set_xlabel("training compute (TFLOPs, XLA cost analysis)")
    fig.suptitle("staged growth vs from-scratch training (decoder LM)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str]) -> int:
    """Runs the benchmark and prints the table, the PNG path and the JSON line.

    Args:
      argv: [--steps N] [--batch B] [--seq_len L] [--eval_period K] [--eval_batches E]
        [--task NAME] [--out DIR].

    Returns:
      the exit status.
    """
    parser = argparse.ArgumentParser(prog="python -m benchmarks staged")
    parser.add_argument("--steps", type=int, default=400, help="steps of the scratch run")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq_len", type=int, default=128)
    parser.add_argument("--eval_period", type=int, default=20)
    parser.add_argument("--eval_batches", type=int, default=4)
    parser.add_argument("--task", default=None, help="an offline LM task (default: fortunes)")
    parser.add_argument("--out", default=None, help="where the runs and the PNG go")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("evogrow").setLevel(logging.INFO)  # the trainer's progress lines
    task = args.task or _task()
    workdir = args.out or tempfile.mkdtemp(prefix="evogrow-bench-staged-")
    staged_steps = args.steps + args.steps // 4
    grow_steps = [max(1, round(f * args.steps)) for f, _ in STAGES]
    schedule = growth_schedule_lib.GrowthSchedule(
        {step: list(requests) for step, (_, requests) in zip(grow_steps, STAGES, strict=True)}
    )

    # The staged run's architectures, from growth itself applied to the small model.
    small = _model(START, args.seq_len)
    configs = [growth_hooks.model_config(small)]
    for _, requests in STAGES:
        configs.append(_grown_config(configs[-1], requests, args))
    final = growth_hooks.model_config(_model(FINAL, args.seq_len))
    sizes = ("hidden", "mlp_dim", "num_heads", "qk_dim", "v_dim", "num_layers")
    assert all(getattr(configs[-1], k) == getattr(final, k) for k in sizes), configs[-1]
    stage_models = [growth_hooks.with_config(small, c) for c in configs]
    flops = [_flops_per_step(m, args.batch, args.seq_len) for m in stage_models]
    scratch_flops = _flops_per_step(_model(FINAL, args.seq_len), args.batch, args.seq_len)
    print(f"task {task}; batch {args.batch} x {args.seq_len} tokens; {args.steps} scratch steps")
    for i, (config, f) in enumerate(zip(configs, flops, strict=True)):
        shown = {k: getattr(config, k) for k in sizes}
        print(f"  staged stage {i} from step {([0, *grow_steps])[i]}: {shown}, {f:.3g} FLOPs/step")
    print(f"  scratch: {FINAL}, {scratch_flops:.3g} FLOPs/step")

    print("training from scratch ...", flush=True)
    scratch_history, scratch_start = _run(
        "scratch", _model(FINAL, args.seq_len), args.steps, None, task, args, workdir
    )
    scratch_evals = _evals(scratch_history)
    target = scratch_evals[-1]["loss"]
    print(f"target validation loss {target:.4f}; training the staged model ...", flush=True)
    staged_history, staged_start = _run(
        "staged", small, staged_steps, schedule, task, args, workdir
    )
    staged_evals = _evals(staged_history)
    reached = next((r for r in staged_evals if r["loss"] <= target), None)

    scratch_to_target = args.steps * scratch_flops
    scratch_wall = scratch_evals[-1]["wall_time"] - scratch_start
    result: dict[str, Any] = {
        "task": task,
        "scratch_steps": args.steps,
        "target_loss": round(target, 5),
        "scratch_flops": scratch_to_target,
        "scratch_wall_s": round(scratch_wall, 1),
    }
    if reached is None:
        print(f"the staged run did not reach {target:.4f} within {staged_steps} steps")
        result.update(staged_reached=False, saving_pct=None, wall_saving_pct=None)
    else:
        staged_to_target = _stage_flops([0, *grow_steps], flops, reached["step"])
        staged_wall = reached["wall_time"] - staged_start
        result.update(
            staged_reached=True,
            staged_steps=reached["step"],
            staged_flops=staged_to_target,
            staged_wall_s=round(staged_wall, 1),
            saving_pct=round(100 * (1 - staged_to_target / scratch_to_target), 1),
            wall_saving_pct=round(100 * (1 - staged_wall / scratch_wall), 1),
        )
    print(f"{'run':8} {'steps':>6} {'TFLOPs':>8} {'wall s':>7} {'val loss':>9}")
    print(
        f"{'scratch':8} {args.steps:>6} {scratch_to_target / 1e12:>8.3f} "
        f"{scratch_wall:>7.1f} {target:>9.4f}"
    )
    if reached is not None:
        print(
            f"{'staged':8} {reached['step']:>6} {result['staged_flops'] / 1e12:>8.3f} "
            f"{result['staged_wall_s']:>7.1f} {reached['loss']:>9.4f}"
        )
    curves = {
        "scratch": (
            [r["step"] for r in scratch_evals],
            [r["step"] * scratch_flops for r in scratch_evals],
            [r["loss"] for r in scratch_evals],
        ),
        "staged": (
            [r["step"] for r in staged_evals],
            [_stage_flops([0, *grow_steps], flops, r["step"]) for r in staged_evals],
            [r["loss"] for r in staged_evals],
        ),
    }
    png = os.path.join(workdir, "staged_vs_scratch.png")
    _plot(png, curves, target, grow_steps)
    print(f"curves: {png}")
    result["png"] = png
    print(json.dumps(result))
    return 0


def _grown_config(config: Any, requests: tuple[str, ...], args: argparse.Namespace) -> Any:
    """The config `growth.expand` produces from `config` (on abstract-size zero params)."""
    import growth

    model = growth_hooks.with_config(_model(START, args.seq_len), config)
    shapes = {"decoder_input_tokens": (1, args.seq_len), "decoder_target_tokens": (1, args.seq_len)}
    abstract = trainer_lib.abstract_variables(model, shapes, {k: np.int32 for k in shapes})
    params = jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), nn.unbox(abstract["params"]))
    new_config, _, _ = growth.expand(config, params, list(requests), rng=jax.random.key(0))
    return new_config
