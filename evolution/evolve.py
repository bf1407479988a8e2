"""`./run.sh evolve`: evolve a stored muNet system over seqio tasks, or add tasks to it.

    ./run.sh evolve --gin_file=gin/experiments/munet_offline.gin [--add_task NAME ...]

One call is a *run*: a deterministic plan of task iterations (`search.evolve_task`) on
the store in `store_dir`, then a report of the whole system (test accuracy per task, a
Markdown table, a picture of the system, accuracy against parameters, TensorBoard
scalars) in `output_dir`.

- Continuing (no --add_task): `rounds` rounds over the run's tasks (the store's tasks
  followed by `tasks` it does not hold yet, round-robin as in the papers).
- Dynamic task introduction (--add_task NAME): each new task gets `rounds` iterations;
  the tasks already in the store are not iterated and, because their components are
  locked, their predictions stay bit-identical: the run checks this on their test
  splits and prints the result (`immunity_check`).
- The root comes from `root_dir` (`evolution.roots.root`, `./run.sh pretrain_root`) when the
  store has none yet.
- Nothing is lost on a crash: every task iteration publishes its best path in one store
  transaction, and that publication is the iteration's progress record. The run's plan
  is kept in the store's settings (`evolve_run:<agent>`), with the publication it
  started after; the iterations done are the agent's publications since. Running the
  same command again skips them; a new or re-created store has no record, so it is
  never taken as finished. A task already in the system cannot be added again.
- Nothing is created (no store, no root seeded, no report folder) before the task
  names, the root and the request are checked.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from evolution import store as store_lib
from evolution.export import inference
from evolution.report import summaries, system_picture
from evolution.roots import root
from evolution.search import loop as search
from evolution.search.data import task_data
from evolution.system import state as system

logger = logging.getLogger("evogrow")

RUN_SETTING = "evolve_run:{agent}"
SUMMARY_FILE = "evolve_summary.json"


class EvolveError(ValueError):
    """A run that cannot start as configured; the message says what to change."""


@dataclasses.dataclass(frozen=True)
class EvolveOutcome:
    """What a run did and wrote.

    Attributes:
      results: the task iterations run now (not the ones a resumed run skipped).
      test_accuracy: task -> test accuracy of its best path, for every evolved task.
      table: the Markdown table of the system.
      files: name -> path of each file written (picture_svg, picture_png, plot,
        summary, tensorboard).
      overhead_share: the evolution's own share of the iterations' wall time
        (everything but training, validation and compilation).
      immune: after introducing tasks, whether every earlier task's test predictions
        stayed bit-identical; None when not checked.
    """

    results: tuple[search.TaskResult, ...]
    test_accuracy: dict[str, float]
    table: str
    files: dict[str, str]
    overhead_share: float
    immune: bool | None = None


def _plan(known: Sequence[str], tasks: Sequence[str], add_tasks: Sequence[str], rounds: int):
    """The run's task iterations in order."""
    if add_tasks:
        already = [t for t in add_tasks if t in known]
        if already:
            raise EvolveError(
                f"--add_task {already}: already in the system; run without --add_task to "
                "continue evolving it."
            )
        return [t for _ in range(rounds) for t in add_tasks]
    order = [t for t in known] + [t for t in tasks if t not in known]
    if not order:
        raise EvolveError(
            "No tasks to evolve: the store holds none; bind evolve.tasks (TASKS in the gin "
            "file) or pass --add_task NAME."
        )
    return [t for _ in range(rounds) for t in order]


def _recorded_run(store: store_lib.Store, agent: str) -> tuple[list[str], int, int] | None:
    """The plan recorded by `agent`'s last run on this store: (plan, after, done), or None.

    `done` counts the agent's publications after the run's start: each task iteration
    publishes once, in the transaction that makes its result visible.
    """
    text = store.read_setting(RUN_SETTING.format(agent=agent))
    if text is None:
        return None
    record = json.loads(text)
    plan, after = [str(t) for t in record["plan"]], int(record["after"])
    count, _ = store.publication_count(agent, after)
    return plan, after, min(count, len(plan))


def _record_run(store: store_lib.Store, agent: str, plan: Sequence[str]) -> None:
    """Records a new run's plan and the publication it starts after."""
    _, latest = store.publication_count(agent)
    record = {"plan": list(plan), "after": latest}
    store.write_setting(RUN_SETTING.format(agent=agent), json.dumps(record))


def _check_tasks(names: Sequence[str]) -> None:
    """Refuses names that are not registered image or text tasks, before anything is created."""
    for name in dict.fromkeys(names):
        try:
            task_data.check_task(name)
        except ValueError as error:  # UnknownTaskError, a mixture, another modality
            raise EvolveError(str(error)) from error


def _existing_state(store_dir: str) -> system.SystemState | None:
    """The published state of the store at `store_dir`, or None where there is no store."""
    try:
        with store_lib.open_store(store_dir, read_only=True) as store:
            return store.load_state()
    except store_lib.NoStoreError:
        return None


def introduction_state(store_dir: str, task: str, *, agent: str = "munet") -> str:
    """How far the introduction of `task` (`evolve(add_tasks=[task])`) has come.

    Args:
      store_dir: the store (opened read-only).
      task: the task.
      agent: the evolving agent.

    Returns:
      "absent" (not in the system), "unfinished" (an interrupted introduction that
      `evolve` resumes), or "done" (adding it again is refused).
    """
    try:
        with store_lib.open_store(store_dir, read_only=True) as store:
            if task not in store.load_state().tasks:
                return "absent"
            recorded = _recorded_run(store, agent)
    except store_lib.NoStoreError:
        return "absent"
    if recorded and recorded[0][:1] == [task] and recorded[2] < len(recorded[0]):
        return "unfinished"
    return "done"


def _known_tasks(state: system.SystemState) -> list[str]:
    """The system's tasks, without the root's."""
    root_task = state.paths[state.root_path_id].task if state.root_path_id else None
    return [t for t in state.task_order() if t != root_task]


def test_accuracies(
    store: store_lib.Store, state: system.SystemState, *, split: str = "test"
) -> dict[str, float]:
    """Accuracy of every task's best path on its seqio task's `split`.

    Tasks whose stored metadata names no seqio task (e.g. tests' synthetic tasks) are
    skipped.

    Args:
      store: the store.
      state: its state.
      split: the split to score.

    Returns:
      task -> accuracy.
    """
    out = {}
    for name, record in state.tasks.items():
        seqio_task = (record.metadata or {}).get("seqio_task")
        if not seqio_task or state.best_path(name) is None:
            continue
        images, labels = task_data.load_task_arrays(seqio_task, split)
        predicted = inference.predict_classes(store, name, images)
        out[name] = float(np.mean(predicted == labels))
    return out


def test_predictions(store: store_lib.Store, names: Sequence[str]) -> dict[str, np.ndarray]:
    """Each task's logits on its seqio task's test split, from the published system.

    Args:
      store: the store.
      names: tasks of the system (their stored metadata names the seqio task; default:
        the task's own name).

    Returns:
      task -> logits [N, classes].
    """
    state = store.load_state()
    out = {}
    for name in names:
        seqio_task = (state.tasks[name].metadata or {}).get("seqio_task", name)
        images, _ = task_data.load_task_arrays(seqio_task, "test")
        out[name] = inference.predict(store, name, images)
    return out


def write_report(
    store: store_lib.Store,
    output_dir: str,
    *,
    step: int,
    extra_points: Sequence[tuple[str, str, float, float]] = (),
) -> tuple[dict[str, float], str, dict[str, str]]:
    """Scores every task on its test split and writes the table, picture, plot and scalars.

    Args:
      store: the store.
      output_dir: where to write.
      step: the TensorBoard step (e.g. the number of task iterations so far).
      extra_points: more (task, method, accuracy, params) points for the plot
        (baselines).

    Returns:
      (test accuracy per task, the Markdown table, name -> file written).
    """
    os.makedirs(output_dir, exist_ok=True)
    state = store.load_state()
    accuracy = test_accuracies(store, state)
    table = summaries.system_table(state, test_accuracy=accuracy)
    metrics = {task: {"test acc": acc} for task, acc in accuracy.items()}
    svg, png = system_picture.render_system_files(state, output_dir, task_metrics=metrics)
    points = [
        (task, "evolved", acc, state.accounted_params(state.best_path(task)))  # type: ignore[arg-type]
        for task, acc in accuracy.items()
    ]
    plot = summaries.plot_accuracy_vs_params(
        [*points, *extra_points], os.path.join(output_dir, "accuracy_vs_params.png")
    )
    tb_dir = os.path.join(output_dir, "tensorboard")
    summaries.write_tensorboard(tb_dir, state, step=step, test_accuracy=accuracy)
    with open(os.path.join(output_dir, "system.md"), "w") as f:
        f.write(table + "\n")
    files = {"picture_svg": svg, "picture_png": png, "plot": plot, "tensorboard": tb_dir}
    files["table"] = os.path.join(output_dir, "system.md")
    return accuracy, table, files


def evolve(
    *,
    store_dir: str,
    root_dir: str,
    search_config: search.SearchConfig,
    tasks: Sequence[str] = (),
    add_tasks: Sequence[str] = (),
    rounds: int = 1,
    eval_batch_size: int = 256,
    max_train_examples: int | None = None,
    max_eval_examples: int | None = None,
    output_dir: str | None = None,
    agent: str = "munet",
    immunity_check: bool = True,
) -> EvolveOutcome:
    """Runs task iterations on a stored system, then reports on the whole system.

    Args:
      store_dir: the store (created when missing).
      root_dir: a pretrained root (`evolution.roots.root.pretrain_root`), used when the store
        has no root yet.
      search_config: each task iteration's settings.
      tasks: seqio task names of the system (`import tasks` registers them); the
        store's tasks come first, these join when new.
      add_tasks: tasks to introduce now (`--add_task`); only they are iterated.
      rounds: rounds over the run's tasks (iterations per new task with `add_tasks`).
      eval_batch_size: validation batch size.
      max_train_examples: cap on each task's training examples (None: all).
      max_eval_examples: cap on each task's validation examples (None: all).
      output_dir: where the report goes (default `<store_dir>_report`); the run's
        progress is in the store.
      agent: the publishing agent's name.
      immunity_check: with `add_tasks`, score the earlier tasks' test splits before and
        after and report whether their predictions stayed bit-identical.

    Returns:
      The outcome.

    Raises:
      EvolveError: nothing to evolve, an unknown task, a task added twice, or a bad
        `rounds` (nothing is created then).
      RootNotFoundError: the store has no root and `root_dir` holds none.
    """
    if rounds < 1:
        raise EvolveError(f"evolve.rounds={rounds} must be >= 1.")
    _check_tasks([*tasks, *add_tasks])
    existing = _existing_state(store_dir)
    if existing is None or existing.root_path_id is None:
        if existing is None and not add_tasks:
            _plan([], list(tasks), [], rounds)  # no store and no tasks: refuse now
        root.load_root(root_dir)  # RootNotFoundError before the store is created
    # Beside the store, not in it: the store owns its folder.
    output_dir = output_dir or f"{os.path.normpath(store_dir)}_report"
    store = store_lib.open_store(store_dir)
    try:
        state = store.load_state()
        if state.root_path_id is None:
            root.seed_store(store, root_dir)
            state = store.load_state()
        known = _known_tasks(state)
        recorded = _recorded_run(store, agent)
        done = 0
        if (
            recorded
            and add_tasks
            and recorded[2] < len(recorded[0])
            and (recorded[0][: len(add_tasks)] == list(add_tasks))
        ):
            plan, _, done = recorded  # an interrupted introduction of these tasks: finish it
        else:
            plan = _plan(known, list(tasks), list(add_tasks), rounds)
            if recorded and recorded[0] == plan:
                done = recorded[2]
        if done:
            logger.info("evolve: resuming; %d of %d iterations were done", done, len(plan))
        else:
            _record_run(store, agent, plan)
        # Earlier tasks with a seqio task to score: the immunity check's subjects.
        earlier = [t for t in known if (state.tasks[t].metadata or {}).get("seqio_task")]
        before = test_predictions(store, earlier) if add_tasks and immunity_check else None
        data: dict[str, search.TaskData] = {}
        results: list[search.TaskResult] = []
        start = time.perf_counter()
        for index in range(done, len(plan)):
            task = plan[index]
            if task not in data:
                data[task] = task_data.search_task_data(
                    task,
                    eval_batch_size=eval_batch_size,
                    max_train_examples=max_train_examples,
                    max_eval_examples=max_eval_examples,
                    cache_dir=store_lib.local_folder_of(store_dir),
                )
            item = data[task]
            result = search.evolve_task(
                store,
                task,
                search_config,
                train_batches_fn=item.train_batches_fn,
                validation_batches=item.validation_batches,
                agent=agent,
                num_classes=item.num_classes,
                metadata=item.metadata,
            )
            results.append(result)
            elapsed = time.perf_counter() - start
            finished = index + 1 - done
            eta = elapsed / finished * (len(plan) - index - 1)
            logger.info(
                "evolve: iteration %d/%d (%s) done: quality %.4f, %.2f x root params; "
                "%.1f min elapsed, ETA %.1f min",
                index + 1,
                len(plan),
                task,
                result.quality,
                result.accounted_params / result.root_params,
                elapsed / 60.0,
                eta / 60.0,
            )
        accuracy, table, files = write_report(store, output_dir, step=len(plan))
        wall = sum(r.wall_seconds for r in results)
        overhead = sum(r.overhead_seconds for r in results)
        share = overhead / wall if wall else 0.0
        summary = {
            "plan": plan,
            "test_accuracy": accuracy,
            "overhead_share": share,
            "iterations": [_result_summary(r) for r in results],
        }
        files["summary"] = os.path.join(output_dir, SUMMARY_FILE)
        with open(files["summary"], "w") as f:
            json.dump(summary, f, indent=1)
        print(table)
        for name in ("picture_png", "picture_svg", "plot", "table", "tensorboard"):
            print(f"{name}: {files[name]}")
        if results:
            print(
                f"evolution overhead: {100 * share:.1f}% of {wall:.0f} s of task iterations "
                "(everything but training, validation and compilation)"
            )
        immune = None
        if before is not None:
            after = test_predictions(store, earlier)
            immune = all(np.array_equal(before[t], after[t]) for t in earlier)
            print(
                f"immunity: the {len(earlier)} earlier tasks' test predictions are "
                f"{'bit-identical' if immune else 'CHANGED'} after adding {', '.join(add_tasks)}"
            )
        return EvolveOutcome(tuple(results), accuracy, table, files, share, immune)
    finally:
        store.close()


def _result_summary(result: search.TaskResult) -> dict[str, Any]:
    """The JSON-safe facts of one task iteration."""
    return {
        "task": result.task,
        "best_path": result.best_path.id,
        "quality": result.quality,
        "score": result.score,
        "accounted_params": result.accounted_params,
        "candidates": len(result.candidates),
        "accepted": sum(c.accepted for c in result.candidates),
        "train_seconds": result.train_seconds,
        "eval_seconds": result.eval_seconds,
        "compile_seconds": result.compile_seconds,
        "overhead_seconds": result.overhead_seconds,
        "wall_seconds": result.wall_seconds,
        "candidates_per_hour": result.candidates_per_hour,
    }
