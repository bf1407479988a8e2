"""Trainer overhead: our full training loop vs a minimal hand-written jitted loop.

    python -m evogrow.bench trainer [--repeats N]

For a tiny and a small ViT on digits, on 1 device and on 8 simulated CPU devices (each
device count in its own subprocess), it measures steady-state steps/s of

- ours: `evogrow.train.train` as configured by default (tf.data input pipeline with
  device prefetch, on-device metric merging, asynchronous summaries every 100 steps,
  asynchronous checkpoints every 1000 steps and at the end), timed by its own reports
  after the first one (compilation excluded);
- baseline: a jitted flax + optax step (the same model, loss_fn, optimizer, shardings
  and batches, pre-read into memory), timed after warm-up steps.

Rounds run the two back to back. Noise on a shared machine only ever slows a loop down,
so each loop's speed is its best round (as `timeit` takes the minimum time) and the ratio
is best(ours) / best(baseline); the table also shows the median of the rounds' ratios.
Prints a table; the last line is a JSON object of the four ratios ours/baseline.
"""

from __future__ import annotations

import argparse
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

from evogrow import checkpoints, data, partitioning, reporting, train

TASK = "digits_v1"
_HEADS = {"qk_dim": 16, "v_dim": 16, "patch_size": 2}
# size -> (ViT config, batch size, timed steps); a step takes about 5 ms and 40 ms on 2
# idle CPU cores.
SIZES: dict[str, tuple[dict[str, Any], int, int]] = {
    "tiny": ({"hidden": 32, "mlp_dim": 64, "num_heads": 2, "num_layers": 2, **_HEADS}, 32, 600),
    "small": ({"hidden": 64, "mlp_dim": 128, "num_heads": 4, "num_layers": 3, **_HEADS}, 128, 100),
}
DEVICE_COUNTS = (1, 8)
RULES = None  # the models' standard rules
WARMUP_STEPS = 100  # our first report comes at step 100 (the gin default stats_period)


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


def ours_steps_per_sec(model: Any, batch_size: int, steps: int) -> float:
    """Runs our default training loop for `steps` and returns its steady steps/s."""
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
            eval_steps=0,
            eval_period=0,
            stats_period=100,
            random_seed=0,
        )
        reports = [r for r in reporting.read_history(model_dir) if r["kind"] == "train"]
    timed, seconds, previous = 0, 0.0, reports[0]["step"]
    for report in reports[1:]:
        interval = report["step"] - previous
        timed += interval
        seconds += interval / report["steps_per_sec"]
        previous = report["step"]
    return timed / seconds


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


def baseline_steps_per_sec(model: Any, batches: list[dict[str, np.ndarray]]) -> float:
    """A minimal jitted flax + optax loop over `batches`; returns steps/s after warm-up."""
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

    with jax.set_mesh(mesh):
        params, opt_state = jax.jit(init, out_shardings=replicated)(jax.random.key(0))
        step_num = jax.device_put(np.int32(0), replicated)
        train_step = jax.jit(
            step,
            in_shardings=(replicated, replicated, replicated, batch_sharding),
            out_shardings=(replicated, replicated, replicated),
            donate_argnums=(0, 1),
        )
        start = 0.0
        for i, batch in enumerate(batches):
            if i == WARMUP_STEPS:
                jax.block_until_ready(params)
                start = time.perf_counter()
            device_batch = jax.device_put(batch, batch_sharding)
            params, opt_state, step_num = train_step(params, opt_state, step_num, device_batch)
        jax.block_until_ready(params)
    return (len(batches) - WARMUP_STEPS) / (time.perf_counter() - start)


def measure_here(repeats: int) -> dict[str, dict[str, float]]:
    """Measures every size on this process's devices.

    Each of `repeats` rounds runs the baseline and then ours back to back.

    Args:
      repeats: rounds per size.

    Returns:
      size -> {"ours", "baseline" (best steps/s), "ratio" (of the bests),
      "median_round_ratio"}.
    """
    with tempfile.TemporaryDirectory() as cache_dir:
        # Later rounds reuse the compiled steps instead of compiling them again.
        jax.config.update("jax_compilation_cache_dir", cache_dir)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
        results = {}
        for size, (_, batch_size, steps) in SIZES.items():
            model = build_model(size)
            batches = host_batches(batch_size, WARMUP_STEPS + steps)
            ours, base = [], []
            for _ in range(repeats):
                base.append(baseline_steps_per_sec(model, batches))
                ours.append(ours_steps_per_sec(model, batch_size, steps))
            results[size] = {
                "ours": float(np.max(ours)),
                "baseline": float(np.max(base)),
                "ratio": float(np.max(ours) / np.max(base)),
                "median_round_ratio": float(np.median(np.array(ours) / np.array(base))),
            }
    return results


def _run_child(devices: int, repeats: int) -> dict[str, dict[str, float]]:
    env = dict(os.environ, PJRT_NPROC="16", TF_CPP_MIN_LOG_LEVEL="2", JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    if devices > 1:
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    cmd = [sys.executable, "-m", "evogrow.bench.trainer", "--child", f"--repeats={repeats}"]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"benchmark child ({devices} devices) failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str]) -> int:
    """Runs the benchmark (or, with --child, one device count's measurements).

    Args:
      argv: [--repeats N] [--child].

    Returns:
      the exit status.
    """
    parser = argparse.ArgumentParser(prog="python -m evogrow.bench trainer")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(measure_here(args.repeats)))
        return 0
    ratios = {}
    print(
        f"{'size':6} {'devices':>7} {'ours steps/s':>13} {'baseline steps/s':>17} {'ratio':>6}"
        f" {'median of rounds':>17}"
    )
    for devices in DEVICE_COUNTS:
        for size, result in _run_child(devices, args.repeats).items():
            ratio = result["ratio"]
            ratios[f"{size}_{devices}dev_ratio"] = round(ratio, 4)
            print(
                f"{size:6} {devices:>7} {result['ours']:>13.1f} "
                f"{result['baseline']:>17.1f} {ratio:>6.3f} {result['median_round_ratio']:>17.3f}"
            )
    print(json.dumps(ratios))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
