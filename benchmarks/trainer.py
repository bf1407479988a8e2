"""Trainer overhead: our full training loop vs a minimal hand-written jitted loop.

    python -m benchmarks trainer [--repeats N]

For a tiny and a small ViT on digits, on 1 device and on 8 simulated CPU devices (each
device count in its own subprocess), it measures steady-state steps/s of

- ours: `evogrow.train.train` as configured by default (tf.data input pipeline, put on
  device by a background thread (`training.data.DevicePrefetcher`), blocks of
  steps in one dispatch (`steps_per_execution`: 10 on a CPU host; `--steps_per_execution
  1` dispatches every step, as the baseline does), on-device metric merging,
  asynchronous summaries every 100 steps, asynchronous checkpoints every 1000 steps and
  at the end), timed by its own reports after the first one (compilation excluded);
- baseline: a jitted flax + optax step (the same model, loss_fn, optimizer, shardings
  and batches, pre-read into memory), timed after warm-up steps.

Rounds run the two back to back, the baseline first in even rounds and ours first in
odd ones. Both loops are timed the same way, over windows of `WINDOW` steps that end
when the window's last step has finished on device (ours: each report, whose thread
waits for that step's metrics; the baseline: a watcher thread that waits for the step
counter of every `WINDOW`-th step, so the dispatch loop never blocks). Noise on a shared
machine only ever slows a loop down, so each loop's speed is its best window over all
rounds (as `timeit` takes the minimum over repeats; a window holds everything the loop
does every `WINDOW` steps, summaries included), and the ratio is best(ours) /
best(baseline). The table also shows the median over rounds of each round's ratio of
median windows: the two loops of a round run back to back, so pairing them cancels the
machine's slower drifts. Prints a table; the last line is a JSON object of the ratios
ours/baseline: the four best-window ratios (`<size>_<n>dev_ratio`) and the four median
ones.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Any

import flax.linen as nn
import jax
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec

from evogrow import train
from training import checkpoints, data, partitioning, reporting

TASK = "digits_v1"
_HEADS = {"qk_dim": 16, "v_dim": 16, "patch_size": 2}
# size -> (ViT config, batch size, timed steps: whole windows); a step takes about 5 ms
# and 40 ms on 2 idle CPU cores.
SIZES: dict[str, tuple[dict[str, Any], int, int]] = {
    "tiny": ({"hidden": 32, "mlp_dim": 64, "num_heads": 2, "num_layers": 2, **_HEADS}, 32, 600),
    "small": ({"hidden": 64, "mlp_dim": 128, "num_heads": 4, "num_layers": 3, **_HEADS}, 128, 300),
}
DEVICE_COUNTS = (1, 8)
RULES = None  # the models' standard rules
WARMUP_STEPS = 100  # our first report comes at step 100 (the gin default stats_period)
WINDOW = 100  # steps per timed window: our report period


def build_model(size: str) -> Any:
    """Returns the ViT classifier of `size` for digits, with the default optimizer."""
    import tasks
    from models import classifier, vit

    info = tasks.info(TASK)
    assert info.image_shape is not None, f"{TASK} is not an image task"
    config = vit.ViTConfig(
        **SIZES[size][0], image_shape=info.image_shape, num_classes=info.num_classes
    )
    return classifier.ImageClassifierModel(
        module=vit.ViT(config=config), optimizer_def=optax.adamw(1e-3, weight_decay=1e-4)
    )


def _dataset_cfg(batch_size: int) -> data.DatasetConfig:
    return data.DatasetConfig(TASK, None, "train", batch_size, shuffle=True, module="tasks")


def ours_window_rates(
    model: Any, batch_size: int, steps: int, steps_per_execution: int | None = None
) -> list[float]:
    """Runs our default training loop for `steps` timed steps; returns each window's steps/s.

    The windows are the intervals between our own reports (every `WINDOW` steps) after
    the first one (compilation excluded). `steps_per_execution` None is the default.
    """
    with tempfile.TemporaryDirectory() as model_dir:
        train.train(
            model=model,
            train_dataset_cfg=_dataset_cfg(batch_size),
            train_eval_dataset_cfg=None,
            infer_eval_dataset_cfg=None,
            checkpoint_cfg=checkpoints.CheckpointConfig(
                checkpoints.SaveCheckpointConfig(period=1000, keep=3, async_save=True)
            ),
            partitioner=partitioning.Partitioner(logical_axis_rules=RULES),
            model_dir=model_dir,
            total_steps=WARMUP_STEPS + steps,
            eval_steps=1,  # no eval data set: nothing is evaluated
            eval_period=0,
            stats_period=WINDOW,
            random_seed=0,
            steps_per_execution=steps_per_execution,
        )
        reports = [r for r in reporting.read_history(model_dir) if r["kind"] == "train"]
    return [float(report["steps_per_sec"]) for report in reports[1:]]


def host_batches(batch_size: int, num: int) -> list[dict[str, np.ndarray]]:
    """The first `num` batches of our train stream (seed 0), read into memory."""
    ds = data.get_train_dataset(
        _dataset_cfg(batch_size),
        shard_id=0,
        num_shards=1,
        per_host_batch_size=batch_size,
        feature_converter_cls=_feature_converter(),
        default_seed=0,
    )
    return list(ds.take(num).as_numpy_iterator())


def _feature_converter() -> Any:
    from models import classifier

    return classifier.ImageClassifierModel.FEATURE_CONVERTER_CLS


def baseline_window_rates(model: Any, batches: list[dict[str, np.ndarray]]) -> list[float]:
    """A minimal jitted flax + optax loop over `batches`; returns each window's steps/s.

    Windows of `WINDOW` steps after `WARMUP_STEPS`; a watcher thread waits for each
    window's last step (its step counter) while the loop keeps dispatching, as our
    reporter's thread waits for the metrics.
    """
    mesh = jax.make_mesh(
        (jax.device_count(), 1), ("data", "model"), axis_types=(jax.sharding.AxisType.Auto,) * 2
    )
    replicated = NamedSharding(mesh, PartitionSpec())
    batch_sharding = NamedSharding(mesh, PartitionSpec("data"))
    shapes = {k: v.shape for k, v in batches[0].items()}
    types = {k: v.dtype for k, v in batches[0].items()}
    tx = model.optimizer_def

    def init(rng):
        params = nn.unbox(model.get_initial_variables(rng, shapes, types)["params"])
        return params, tx.init(params)

    def step(params, opt_state, step_num, batch):
        rng = jax.random.fold_in(jax.random.key(1), step_num)
        grads, _ = jax.grad(model.loss_fn, has_aux=True)(params, batch, rng)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, step_num + 1

    finished: list[float] = []  # when each window's last step finished
    with (
        jax.set_mesh(mesh),
        concurrent.futures.ThreadPoolExecutor(max_workers=1) as watcher,
    ):
        params, opt_state = jax.jit(init, out_shardings=replicated)(jax.random.key(0))
        step_num = jax.device_put(np.int32(0), replicated)
        train_step = jax.jit(
            step,
            in_shardings=(replicated, replicated, replicated, batch_sharding),
            out_shardings=(replicated, replicated, replicated),
            donate_argnums=(0, 1),
        )

        def wait(counter: jax.Array) -> None:
            counter.block_until_ready()
            finished.append(time.perf_counter())

        for i, batch in enumerate(batches):
            device_batch = jax.device_put(batch, batch_sharding)
            params, opt_state, step_num = train_step(params, opt_state, step_num, device_batch)
            if i + 1 >= WARMUP_STEPS and (i + 1 - WARMUP_STEPS) % WINDOW == 0:
                watcher.submit(wait, step_num)
    return [WINDOW / (end - start) for start, end in itertools.pairwise(finished)]


def measure_here(
    repeats: int, steps_per_execution: int | None = None
) -> dict[str, dict[str, float]]:
    """Measures every size on this process's devices.

    Each of `repeats` rounds runs the baseline and ours back to back, alternating which
    goes first.

    Args:
      repeats: rounds per size.
      steps_per_execution: ours' steps per dispatch (None: its default).

    Returns:
      size -> {"ours", "baseline" (best window's steps/s over all rounds), "ratio" (of
      the bests), "median_ratio" (median over rounds of the ratio of the round's median
      windows), "windows" (per loop)}.
    """
    with tempfile.TemporaryDirectory() as cache_dir:
        # Later rounds reuse the compiled steps instead of compiling them again.
        jax.config.update("jax_compilation_cache_dir", cache_dir)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
        results = {}
        for size, (_, batch_size, steps) in SIZES.items():
            model = build_model(size)
            batches = host_batches(batch_size, WARMUP_STEPS + steps)
            ours: list[list[float]] = []
            base: list[list[float]] = []
            for round_index in range(repeats):
                # Alternate which loop goes first, so that neither always runs in the
                # other's wake (its threads winding down, the allocator's state).
                if round_index % 2 == 0:
                    base.append(baseline_window_rates(model, batches))
                    ours.append(ours_window_rates(model, batch_size, steps, steps_per_execution))
                else:
                    ours.append(ours_window_rates(model, batch_size, steps, steps_per_execution))
                    base.append(baseline_window_rates(model, batches))
            best_ours = max(max(windows) for windows in ours)
            best_base = max(max(windows) for windows in base)
            paired = [np.median(o) / np.median(b) for o, b in zip(ours, base, strict=True)]
            results[size] = {
                "ours": best_ours,
                "baseline": best_base,
                "ratio": best_ours / best_base,
                "median_ratio": float(np.median(paired)),
                "windows": sum(len(windows) for windows in ours),
            }
    return results


def _run_child(
    devices: int, repeats: int, steps_per_execution: int | None
) -> dict[str, dict[str, float]]:
    env = dict(os.environ, PJRT_NPROC="16", TF_CPP_MIN_LOG_LEVEL="2", JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    if devices > 1:
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    cmd = [sys.executable, "-m", "benchmarks.trainer", "--child", f"--repeats={repeats}"]
    if steps_per_execution is not None:
        cmd.append(f"--steps_per_execution={steps_per_execution}")
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"benchmark child ({devices} devices) failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str]) -> int:
    """Runs the benchmark (or, with --child, one device count's measurements).

    Args:
      argv: [--repeats N] [--steps_per_execution K] [--child].

    Returns:
      the exit status.
    """
    parser = argparse.ArgumentParser(prog="python -m benchmarks trainer")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--steps_per_execution",
        type=int,
        default=None,
        help="our loop's steps per dispatch (default: the trainer's default)",
    )
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.steps_per_execution is not None and args.steps_per_execution < 1:
        parser.error(f"--steps_per_execution={args.steps_per_execution}: use 1 or more")
    if args.child:
        print(json.dumps(measure_here(args.repeats, args.steps_per_execution)))
        return 0
    ratios = {}
    print(
        f"{'size':6} {'devices':>7} {'ours steps/s':>13} {'baseline steps/s':>17} {'ratio':>6}"
        f" {'median ratio':>13}"
    )
    for devices in DEVICE_COUNTS:
        for size, result in _run_child(devices, args.repeats, args.steps_per_execution).items():
            ratio = result["ratio"]
            ratios[f"{size}_{devices}dev_ratio"] = round(ratio, 4)
            ratios[f"{size}_{devices}dev_median_ratio"] = round(result["median_ratio"], 4)
            print(
                f"{size:6} {devices:>7} {result['ours']:>13.1f} "
                f"{result['baseline']:>17.1f} {ratio:>6.3f} {result['median_ratio']:>13.3f}"
            )
    print(json.dumps(ratios))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
