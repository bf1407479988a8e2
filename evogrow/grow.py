"""`./run.sh grow`: grows a saved checkpoint for staged training across separate runs.

    ./run.sh grow --checkpoint runs/stage1 --expand "mlp_dim=256,add_layer@2" --out runs/stage2
    ./run.sh train --gin_file=... --gin.MODEL_DIR="'runs/stage2'" --gin.TRAIN_STEPS=...

The checkpoint's recorded architecture is grown with `growth.expand`, together with its
optimizer state, and saved under `--out` at the same step with the grown architecture and
the growth recorded. A training run whose MODEL_DIR is `--out` resumes from it with the
grown model (its gin file may still describe the small one). The growth key is the one
in-run growth at that step would use, so both give the same state.
"""

from __future__ import annotations

import argparse
import logging
import os
import types
from collections.abc import Sequence
from typing import Any

import growth
from training import checkpoints as checkpoints_lib
from training import growth_schedule as growth_schedule_lib

logger = logging.getLogger("evogrow")


class GrowCheckpointError(ValueError):
    """The checkpoint cannot be grown as asked (missing, no architecture, output exists)."""


def grow_checkpoint(
    checkpoint: str,
    requests: str | Sequence[str],
    out: str,
    *,
    step: int | None = None,
    seed: int | None = None,
) -> dict[str, Any]:
    """Grows the params and optimizer state of a checkpoint into a new model directory.

    Args:
      checkpoint: a model directory (or its `checkpoints/` folder) written by evogrow.
      requests: growth requests, e.g. "mlp_dim=256,add_layer@2".
      out: the new model directory (its `checkpoints/` must not exist yet).
      step: which checkpoint step (None: the latest).
      seed: PRNG seed of the new free entries (None: the run's recorded seed).

    Returns:
      the metadata written with the grown checkpoint.

    Raises:
      GrowCheckpointError: no checkpoint there, no recorded architecture, or `out`
        already holds checkpoints.
      growth.GrowthError: a request is malformed or not exact for the model.
    """
    source_dir = checkpoints_lib.resolve_directory(checkpoint)
    if not os.path.isdir(source_dir):
        raise GrowCheckpointError(f"no checkpoint directory at {checkpoint!r}")
    out_dir = os.path.join(out, "checkpoints")
    if os.path.isdir(out_dir) and os.listdir(out_dir):  # before reading and growing
        raise GrowCheckpointError(f"{out_dir} already holds checkpoints; choose a new --out")
    source = checkpoints_lib.Checkpointer(source_dir, read_only=True)
    try:
        meta = source.read_metadata(step)
        architecture = meta.get("architecture", {})
        if not architecture.get("config_class"):
            raise GrowCheckpointError(
                f"{source_dir} step {meta['step']} records no architecture config; only "
                "checkpoints written by evogrow's trainer can be grown"
            )
        config = checkpoints_lib.architecture_config(architecture)
        items = source.restore_on_host(("params", "opt_state"), meta["step"])
    except FileNotFoundError as error:
        raise GrowCheckpointError(str(error)) from error
    finally:
        source.close()
    at_step = int(meta["step"])
    run_seed = int(meta.get("seed", 0)) if seed is None else seed
    parsed = [str(r) for r in growth.parse_requests(requests)]
    new_config, params, opt_state = growth.expand(
        config,
        items["params"],
        parsed,
        rng=growth_schedule_lib.growth_rng(run_seed, at_step),
        opt_state=items["opt_state"],
    )
    new_meta = {key: value for key, value in meta.items() if key != "step"}
    new_meta["architecture"] = {
        **architecture,
        "config": checkpoints_lib.architecture_metadata_of_config(new_config),
    }
    event = growth_schedule_lib.GrowthEvent(at_step, tuple(parsed)).to_json()
    new_meta["growth_events"] = [*meta.get("growth_events", []), event]
    new_meta["grown_from"] = os.path.abspath(source_dir)
    target = checkpoints_lib.Checkpointer(
        out_dir, checkpoints_lib.SaveCheckpointConfig(period=0, async_save=False)
    )
    try:
        target.save(at_step, types.SimpleNamespace(params=params, opt_state=opt_state), new_meta)
    finally:
        target.close()
    logger.info("grew %s step %d with %s into %s", source_dir, at_step, ", ".join(parsed), out_dir)
    return {"step": at_step, **new_meta}


def main(argv: Sequence[str]) -> int:
    """CLI: `python -m evogrow.main grow --checkpoint DIR --expand REQUESTS --out DIR`.

    Args:
      argv: the arguments after `grow`.

    Returns:
      the exit status (0 ok, 2 user error).
    """
    parser = argparse.ArgumentParser(prog="./run.sh grow", description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", required=True, help="model directory to grow")
    parser.add_argument(
        "--expand",
        required=True,
        action="append",
        help='growth requests, e.g. "mlp_dim=256,num_heads=8,add_layer@2" (repeatable)',
    )
    parser.add_argument("--out", required=True, help="new model directory")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (latest)")
    parser.add_argument("--seed", type=int, default=None, help="seed of new free entries")
    parser.add_argument(
        "--t5x",
        action="store_true",
        help="grow a t5x checkpoint (checkpoint_N/); needs t5x and --gin_file of its MODEL",
    )
    parser.add_argument("--gin_file", action="append", default=[], help="t5x model gin file")
    parser.add_argument("--gin_bindings", action="append", default=[], help="NAME = VALUE")
    from evogrow import gin_utils

    flags, bindings = gin_utils.rewrite_gin_args(argv)
    args = parser.parse_args(flags)
    requests = [r for chunk in args.expand for r in chunk.split(",") if r.strip()]
    if args.t5x:
        return _grow_t5x(args, requests, [*args.gin_bindings, *bindings])
    meta = grow_checkpoint(args.checkpoint, requests, args.out, step=args.step, seed=args.seed)
    print(
        f"grown checkpoint: {os.path.join(args.out, 'checkpoints')} step {meta['step']} "
        f"({', '.join(meta['growth_events'][-1]['requests'])})"
    )
    print(f"architecture: {meta['architecture']['config']}")
    return 0


def _grow_t5x(args: argparse.Namespace, requests: list[str], bindings: list[str]) -> int:
    from evogrow import t5x_growth

    if not args.gin_file:
        raise GrowCheckpointError(
            "--t5x needs --gin_file of the model (t5x checkpoints do not record it), "
            "e.g. --gin_file=gin/t5x/tiny_model.gin"
        )
    config = t5x_growth.load_model_config(args.gin_file, bindings)
    new_config, path = t5x_growth.grow_t5x_checkpoint(
        args.checkpoint, requests, args.out, config=config, seed=args.seed or 0
    )
    print(f"grown t5x checkpoint: {path}")
    print("bind these in the next t5x stage (with MODEL_DIR pointing at --out):")
    for binding in t5x_growth.grown_gin_bindings(config, new_config):
        print(f"  --gin.{binding.replace(' = ', '=')}")
    return 0
