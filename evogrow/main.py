"""The evogrow CLI behind run.sh: gin-configured commands and the main job.

    python -m evogrow.main COMMAND --gin_file=F ... --gin.NAME=VALUE ...
        [--gin_search_paths=DIR,DIR] [--coordinator_address=HOST:PORT
        --process_count=N --process_index=I] [--add_task NAME ...
        [--no_immunity_check]] [--task NAME]
    python -m evogrow.main grow --checkpoint DIR --expand REQUESTS --out DIR
    python -m evogrow.main store check STORE_DIR | store backup STORE_DIR DEST

COMMAND: train, eval, infer (the trainer), pretrain_root, evolve (--add_task NAME
introduces a task and checks that the earlier tasks' test predictions stay bit-identical,
unless --no_immunity_check), baseline (the evolution's baselines), export_system, agent (--task
NAME: one asynchronous agent on a stored system), agents_ray (several agents as Ray
tasks), or main (the default): the
embedded demonstration (gin/experiments/munet_demo.gin) that reuses or pretrains the
root ViT, evolves a muNet system over three offline image tasks, adds a fourth, and
prints the per-task table and the picture of the system. `store check` verifies a
store read-only (exit 0 when healthy, 1 with the reason); `store backup` copies a live
store with SQLite's online backup API. Flags live only here; everything else is bound
by gin.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import time
from collections.abc import Callable, Sequence

MAIN_JOB_GIN = "gin/experiments/munet_demo.gin"

# command -> "module:function" of the gin-configured entry point.
COMMANDS = {
    "main": "evolution.demo:demo",
    "train": "evogrow.train:train",
    "eval": "evogrow.eval:evaluate",
    "infer": "evogrow.infer:infer",
    "pretrain_root": "evolution.roots.root:pretrain_root",
    "evolve": "evolution.evolve:evolve",
    "baseline": "evolution.baseline_run:baseline",
    "export_system": "evolution.export.system_checkpoint:export_system",
    "export_system_t5x": "evolution.export.t5x_export:export_system_t5x",
    "agent": "evolution.agent_main:agent",
    "agents_ray": "evolution.ray_main:agents_ray",
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
    parser.add_argument(
        "--add_task", action="append", default=[], help="evolve: introduce this task (repeat)"
    )
    parser.add_argument(
        "--no_immunity_check",
        action="store_true",
        help="evolve --add_task: skip checking the earlier tasks' predictions",
    )
    parser.add_argument("--task", default=None, help="agent: the task the agent works on")
    parsed = parser.parse_args(args)
    bindings = [*parsed.gin_bindings, *bindings]
    if parsed.task is not None:
        if parsed.command != "agent":
            raise LaunchError(f"--task is a flag of 'agent', not of {parsed.command!r}.")
        bindings.append(f"TASK = {parsed.task!r}")
    if parsed.add_task:
        if parsed.command != "evolve":
            raise LaunchError(f"--add_task is a flag of 'evolve', not of {parsed.command!r}.")
        bindings.append(f"ADD_TASKS = {list(parsed.add_task)!r}")
    if parsed.no_immunity_check:
        if parsed.command != "evolve":
            raise LaunchError(
                f"--no_immunity_check is a flag of 'evolve', not of {parsed.command!r}."
            )
        bindings.append("IMMUNITY_CHECK = False")
    return parsed, bindings


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
    """Adds a fresh, timestamped RUN_DIR unless the user bound one."""
    if any(b.split("=")[0].strip() == "RUN_DIR" for b in bindings):
        return bindings
    from evogrow import gin_utils

    run_dir = os.path.join(gin_utils.REPO_ROOT, "runs", time.strftime("munet_demo-%Y%m%d-%H%M%S"))
    return [f"RUN_DIR = '{run_dir}'", *bindings]


def _use_compilation_cache() -> None:
    """Keeps compiled XLA programs across runs (JAX's persistent compilation cache).

    The evolution compiles one train step per distinct candidate architecture; a second
    run (a resumed search, the demo again, a benchmark) reuses them. The folder is
    $EVOGROW_XLA_CACHE (default ~/.cache/evogrow/xla; "off" disables it); a cache that
    the caller configured already (e.g. the tests') is left alone.
    """
    import jax

    folder = os.environ.get("EVOGROW_XLA_CACHE", os.path.expanduser("~/.cache/evogrow/xla"))
    if folder == "off" or getattr(jax.config, "jax_compilation_cache_dir", None):
        return
    jax.config.update("jax_compilation_cache_dir", folder)


def _store_command(argv: Sequence[str]) -> int:
    """`store check STORE_DIR` / `store backup STORE_DIR DEST`: 0 healthy, 1 otherwise."""
    parser = argparse.ArgumentParser(prog="./run.sh store")
    actions = parser.add_subparsers(dest="action", required=True)
    check = actions.add_parser("check", help="verify a store read-only; deletes nothing")
    check.add_argument("store_dir")
    backup = actions.add_parser("backup", help="copy a live store, then check the copy")
    backup.add_argument("store_dir")
    backup.add_argument("destination")
    args = parser.parse_args(argv)
    from evolution import store
    from evolution.store import check as store_check

    try:
        if args.action == "check":
            result = store_check.check_store(args.store_dir)
        else:
            result = store_check.backup_store(args.store_dir, args.destination)
    except store.StoreError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    if not result.healthy:
        print(f"error: {result.summary()}", file=sys.stderr)
        return 1
    if args.action == "backup":
        print(f"backed up {args.store_dir} to {args.destination}")
    print(result.summary())
    return 0


def _user_errors(command: str) -> tuple[type[Exception], ...]:
    """Exceptions of `command` that mean bad input, reported in one line."""
    from models import task_shapes
    from tasks import registry
    from training import checkpoints, settings

    errors: tuple[type[Exception], ...] = (
        registry.UnknownTaskError,
        registry.TaskMetadataError,
        task_shapes.TaskShapeError,
        settings.SettingError,
        checkpoints.CheckpointNotFoundError,
        checkpoints.CheckpointMetadataError,
    )
    if COMMANDS[command].startswith("evolution."):
        from evolution import evolve
        from evolution import store as store_lib
        from evolution.agents import agent_cycle, agent_view
        from evolution.export import system_checkpoint, system_model
        from evolution.roots import root

        errors += (evolve.EvolveError, root.RootNotFoundError, store_lib.StoreError)
        errors += (agent_cycle.AgentError, agent_view.AgentStateError)
        errors += (system_checkpoint.ExportError, system_model.MissingTaskError)
        if command == "export_system_t5x":
            from evolution.export import t5x_export

            errors += (t5x_export.T5XNotInstalledError,)
    return errors


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
    if argv and argv[0] == "store":  # plain arguments, no gin
        return _store_command(list(argv[1:]))
    args, bindings = _parse_args(argv)
    if args.command not in COMMANDS:
        raise LaunchError(f"unknown command {args.command!r}; commands: {', '.join(COMMANDS)}")
    _setup_logging(args.log_level)

    from training import distributed

    distributed.initialize(args.coordinator_address, args.process_count, args.process_index)
    if args.process_index > 0:
        logger.setLevel(logging.WARNING)  # progress lines come from process 0

    import gin

    from evogrow import gin_utils

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
    _use_compilation_cache()
    entry = gin.get_configurable(_entry_point(args.command))
    try:
        entry()
    except _user_errors(args.command) as error:
        raise LaunchError(gin_utils.error_message(error)) from error
    if args.command == "main":
        print(f"main job wall time: {time.perf_counter() - start:.0f} s")
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
