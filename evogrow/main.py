"""The evogrow CLI behind run.sh: gin-configured train / eval / infer, and the main job.

    python -m evogrow.main [main|train|eval|infer] --gin_file=F ... --gin.NAME=VALUE ...
        [--gin_search_paths=DIR,DIR] [--coordinator_address=HOST:PORT
        --process_count=N --process_index=I]
    python -m evogrow.main grow --checkpoint DIR --expand REQUESTS --out DIR

`main` (the default) trains the embedded experiment (gin/experiments/digits_vit.gin) on
offline data, evaluates it, saves a checkpoint and a PNG of the training curves, and
prints the final test accuracy. Flags live only here; everything else is bound by gin.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import time
from collections.abc import Callable, Sequence

MAIN_JOB_GIN = "gin/experiments/digits_vit.gin"

# command -> "module:function" of the gin-configured entry point.
COMMANDS = {
    "main": "evogrow.train:train",
    "train": "evogrow.train:train",
    "eval": "evogrow.eval:evaluate",
    "infer": "evogrow.infer:infer",
}

logger = logging.getLogger("evogrow")


class LaunchError(Exception):
    """A user error the launcher reports in one line (exit status 2)."""


def _parse_args(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    from evogrow import gin_utils

    args, bindings = gin_utils.rewrite_gin_args(argv)
    parser = argparse.ArgumentParser(prog="python -m evogrow.main", description=__doc__)
    parser.add_argument("command", nargs="?", default="main", help=", ".join(COMMANDS))
    parser.add_argument("--gin_file", action="append", default=[], help="gin file (repeat)")
    parser.add_argument("--gin_bindings", action="append", default=[], help="NAME = VALUE")
    parser.add_argument(
        "--gin_search_paths",
        default="",
        help="comma-separated folders gin files are relative to (default: cwd, repo root)",
    )
    parser.add_argument("--coordinator_address", default="127.0.0.1:23456")
    parser.add_argument("--process_count", type=int, default=1)
    parser.add_argument("--process_index", type=int, default=0)
    parser.add_argument("--log_level", default="INFO")
    parsed = parser.parse_args(args)
    return parsed, [*parsed.gin_bindings, *bindings]


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=logging.WARNING,
        format="%(asctime)s %(levelname).1s %(name)s] %(message)s",
        datefmt="%H:%M:%S",
    )
    logger.setLevel(level.upper())


def _entry_point(command: str) -> Callable:
    module_name, function_name = COMMANDS[command].split(":")
    return getattr(importlib.import_module(module_name), function_name)


def _main_job_bindings(bindings: list[str]) -> list[str]:
    """Adds a fresh, timestamped MODEL_DIR unless the user bound one."""
    if any(b.split("=")[0].strip() == "MODEL_DIR" for b in bindings):
        return bindings
    from evogrow import gin_utils

    model_dir = os.path.join(gin_utils.REPO_ROOT, "runs", time.strftime("digits_vit-%Y%m%d-%H%M%S"))
    return [f"MODEL_DIR = '{model_dir}'", *bindings]


def _report_main_job(model_dir: str, wall_seconds: float) -> None:
    from evogrow import curves, reporting

    png = curves.plot_training_curves(model_dir)
    final = [r for r in reporting.read_history(model_dir) if r["kind"] == "inference_eval"]
    print(f"training curves: {png}")
    print(f"checkpoints: {os.path.join(model_dir, 'checkpoints')}")
    if final:
        last = final[-1]
        print(
            f"final {last.get('split', '')} accuracy: {last['accuracy']:.4f} "
            f"({last['task']}, {int(last['num_examples'])} examples, step {last['step']}, "
            f"wall time {wall_seconds:.0f} s)"
        )


def run(argv: Sequence[str]) -> int:
    """Runs one CLI command.

    Args:
      argv: the arguments after the program name.

    Returns:
      the process exit status.
    """
    start = time.perf_counter()
    if argv and argv[0] == "grow":  # plain flags, no gin: evogrow/grow.py
        _setup_logging("INFO")
        from evogrow import grow

        try:
            return grow.main(list(argv[1:]))
        except ValueError as error:  # GrowthError, GrowCheckpointError, shape errors
            raise LaunchError(str(error)) from error
    args, bindings = _parse_args(argv)
    if args.command not in COMMANDS:
        raise LaunchError(f"unknown command {args.command!r}; commands: {', '.join(COMMANDS)}")
    _setup_logging(args.log_level)

    from evogrow import distributed

    distributed.initialize(args.coordinator_address, args.process_count, args.process_index)
    if args.process_index > 0:
        logger.setLevel(logging.WARNING)  # progress lines come from process 0

    import gin

    from evogrow import data, gin_utils

    gin_files = list(args.gin_file)
    if args.command == "main":
        gin_files = gin_files or [MAIN_JOB_GIN]
        bindings = _main_job_bindings(bindings)
    if not gin_files:
        raise LaunchError(f"'{args.command}' needs at least one --gin_file")
    search_paths = [p for p in args.gin_search_paths.split(",") if p] or [
        os.getcwd(),
        *gin_utils.DEFAULT_GIN_SEARCH_PATHS,
    ]
    gin_utils.parse_gin(search_paths, gin_files, bindings)
    entry = gin.get_configurable(_entry_point(args.command))
    try:
        entry()
    except data.UnknownTaskError as error:
        raise LaunchError(str(error)) from error
    if args.command == "main":
        import jax

        if jax.process_index() == 0:
            _report_main_job(gin.query_parameter("%MODEL_DIR"), time.perf_counter() - start)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry: runs `run` and turns user errors into one-line messages.

    Args:
      argv: arguments after the program name (default: sys.argv[1:]).

    Returns:
      the exit status (0 ok, 2 user error).
    """
    from evogrow import gin_utils

    try:
        return run(sys.argv[1:] if argv is None else argv)
    except (LaunchError, gin_utils.GinConfigError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
