"""The main job (`./run.sh`): the whole muNet system on the embedded offline default.

1. Reuse or pretrain the root ViT (`evolution.roots.root.ensure_root`; Fashion-MNIST).
2. Evolve a system over three offline image tasks, round-robin (`evolution.evolve`).
3. Introduce a fourth task (dynamic task introduction) and evolve it alone.
4. Check immunity: the first three tasks' test predictions are bit-identical before and
   after the fourth joined; print the per-task table and where the picture is.

Running it again with the same RUN_DIR resumes: the root is reused and the task
iterations the store records as done are skipped.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

from evolution import evolve as evolve_lib
from evolution import store as store_lib
from evolution.roots import root
from evolution.search import loop as search

logger = logging.getLogger("evogrow")


def demo(
    *,
    run_dir: str,
    root_dir: str,
    root_settings: Mapping[str, Any],
    tasks: Sequence[str],
    new_task: str,
    search_config: search.SearchConfig,
    rounds: int = 1,
    new_task_rounds: int = 1,
    eval_batch_size: int = 256,
    max_train_examples: int | None = None,
    max_eval_examples: int | None = None,
) -> dict[str, Any]:
    """Runs the demonstration and prints what it found.

    Args:
      run_dir: this run's folder (store/, report_initial/, report/).
      root_dir: the root's folder, shared across runs so the root is pretrained once.
      root_settings: `root.pretrain_root`'s arguments other than `root_dir`.
      tasks: the first tasks of the system (seqio task names).
      new_task: the task introduced afterwards.
      search_config: each task iteration's settings.
      rounds: rounds over `tasks`.
      new_task_rounds: iterations of the new task.
      eval_batch_size: validation batch size.
      max_train_examples: cap on each task's training examples (None: all).
      max_eval_examples: cap on each task's validation examples (None: all).

    Returns:
      {"root_test_accuracy", "test_accuracy" (per task), "immune" (bool; None where an earlier run
      added the new task and checked it), "files"}.
    """
    if new_task in tasks:
        raise evolve_lib.EvolveError(f"new_task {new_task!r} is already one of tasks {tasks}.")
    made = root.ensure_root(root_dir=root_dir, **dict(root_settings))
    print(
        f"root: {made.num_params} params, test accuracy {made.test_accuracy:.4f} on "
        f"{made.task} ({'reused' if made.reused else 'pretrained now'}: {root_dir})"
    )
    store_dir = os.path.join(run_dir, "store")
    common: dict[str, Any] = dict(
        store_dir=store_dir,
        root_dir=root_dir,
        search_config=search_config,
        eval_batch_size=eval_batch_size,
        max_train_examples=max_train_examples,
        max_eval_examples=max_eval_examples,
    )
    # A resumed run skips what the store records as done (adding a task twice is refused).
    stage = evolve_lib.introduction_state(store_dir, new_task)
    if stage == "absent":
        print(f"== evolving {len(tasks)} tasks: {', '.join(tasks)}")
        evolve_lib.evolve(
            tasks=tasks, rounds=rounds, output_dir=os.path.join(run_dir, "report_initial"), **common
        )
    report_dir = os.path.join(run_dir, "report")
    immune: bool | None
    if stage == "done":
        print(f"== {new_task} was added by an earlier run of {run_dir}; reporting")
        with store_lib.open_store(store_dir, read_only=True) as store:
            accuracy, table, files = evolve_lib.write_report(store, report_dir, step=0)
        print(table)
        immune = None  # checked, and printed, by the run that added the task
    else:
        print(f"== adding task {new_task}")
        outcome = evolve_lib.evolve(
            add_tasks=[new_task], rounds=new_task_rounds, output_dir=report_dir, **common
        )
        accuracy, files = outcome.test_accuracy, outcome.files
        immune = outcome.immune  # evolve's immunity check of the earlier tasks
    print(f"system picture: {files['picture_png']} (and .svg)")
    return {
        "root_test_accuracy": made.test_accuracy,
        "test_accuracy": accuracy,
        "immune": immune,
        "files": files,
    }
