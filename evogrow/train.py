"""`train`: the training entry point, with t5x/train.py's keyword-only surface.

Bound by gin only in the launcher (`evogrow.main`). The loop dispatches train steps
asynchronously; it waits on the device only to evaluate, and hands train metrics to a
background reporter. A run resumes from the latest checkpoint in `model_dir` and skips
the data stream to that step, so a stopped-and-resumed run ends where an uninterrupted
one does.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax
import numpy as np
from clu import metric_writers
from jax.experimental import multihost_utils

from models import growth_hooks, task_shapes
from tasks import registry
from training import checkpoints as checkpoints_lib
from training import curves, loop, partitioning, reporting, settings, state_growth
from training import data as data_lib
from training import evaluation as evaluation_lib
from training import growth_schedule as growth_schedule_lib
from training import trainer as trainer_lib
from training.partitioning import Partitioner

logger = logging.getLogger("evogrow")

SummarizeConfigFn = Callable[[str, metric_writers.MetricWriter, int], None]


def resolve_seed(random_seed: int | None) -> int:
    """Returns `random_seed`, or a time-based seed agreed on by all processes."""
    if random_seed is not None:
        return int(random_seed)
    seed = np.int32(time.time_ns() % (2**31 - 1))
    return int(multihost_utils.broadcast_one_to_all(seed))


def initial_state(
    trainer: trainer_lib.Trainer,
    checkpointer: checkpoints_lib.Checkpointer,
    restore_cfg: checkpoints_lib.RestoreCheckpointConfig | None,
    init_rng: jax.Array,
) -> tuple[trainer_lib.TrainState, int]:
    """Resumes from `checkpointer`, else initialises (from `restore_cfg.path` or scratch).

    Args:
      trainer: the run's trainer (abstract state and shardings).
      checkpointer: the run's own checkpoints (resumed first).
      restore_cfg: where to initialise a fresh run from; None or no path: from scratch.
      init_rng: parameter initialisation key.

    Returns:
      (state, start step).
    """
    target = partitioning.with_shardings(trainer.abstract_state, trainer.state_shardings)
    latest = checkpointer.latest_step()
    if latest is not None:
        items, _ = checkpointer.restore(
            {"params": target.params, "opt_state": target.opt_state}, latest
        )
        logger.info("resumed from %s at step %d", checkpointer.directory, latest)
        return trainer_lib.TrainState(
            step=jax.device_put(np.int32(latest), trainer.state_shardings.step), **items
        ), latest
    state = trainer.init_state(init_rng)
    if restore_cfg is not None and restore_cfg.path:
        source = checkpoints_lib.Checkpointer(restore_cfg.path, read_only=True)
        names = ("params", "opt_state") if restore_cfg.restore_optimizer else ("params",)
        items, meta = source.restore({n: getattr(target, n) for n in names}, restore_cfg.step)
        logger.info("initialised from %s step %d", restore_cfg.path, meta["step"])
        state = dataclasses.replace(state, **items)
    return state, 0


def train(
    *,
    model: Any,
    train_dataset_cfg: data_lib.DatasetConfig,
    train_eval_dataset_cfg: data_lib.DatasetConfig | None,
    infer_eval_dataset_cfg: data_lib.DatasetConfig | None,
    checkpoint_cfg: checkpoints_lib.CheckpointConfig,
    partitioner: Partitioner,
    model_dir: str,
    total_steps: int,
    eval_steps: int,
    eval_period: int,
    stats_period: int | None = None,
    random_seed: int | None,
    summarize_config_fn: SummarizeConfigFn | None = None,
    run_eval_before_training: bool = False,
    write_predictions: bool = True,
    growth_schedule: growth_schedule_lib.GrowthSchedule | None = None,
    steps_per_execution: int | None = None,
) -> tuple[int, trainer_lib.TrainState]:
    """Trains `model` on a seqio task or mixture, evaluating and checkpointing as it goes.

    Args:
      model: a t5x-contract model (`loss_fn`, `predict_batch`, `get_initial_variables`,
        `optimizer_def` (optax), `FEATURE_CONVERTER_CLS`).
      train_dataset_cfg: the training data.
      train_eval_dataset_cfg: data for loss_fn metrics without dropout (None: skip).
      infer_eval_dataset_cfg: data for prediction metrics (accuracy) (None: skip).
      checkpoint_cfg: saving and initial restoring.
      partitioner: mesh, axis rules and partitioned compilation.
      model_dir: checkpoints, summaries, `metrics.jsonl` and predictions go here.
      total_steps: the step to stop at (a resumed run trains the remaining steps).
      eval_steps: batches of train-eval per evaluation.
      eval_period: evaluate every this many steps (and at the end); 0 only at the end.
      stats_period: report train metrics every this many steps (None: eval_period).
      random_seed: seed of initialisation, dropout and (unseeded) shuffling; None draws
        one from the clock.
      summarize_config_fn: (model_dir, writer, step) -> None; records the config.
      run_eval_before_training: also evaluate before the first step.
      write_predictions: write inference-eval predictions as JSON lines.
      growth_schedule: growth events; at each event's step the whole train state grows
        function-preservingly and training goes on with the grown model. A run resumed
        from a checkpoint rebuilds the architecture recorded there.
      steps_per_execution: train steps per dispatch (`Trainer.train_steps`), as Keras'
        `steps_per_execution`: blocks of this many steps run in one jitted call, the
        host paying one dispatch for all. Blocks start at multiples of it and never
        span a report, checkpoint, evaluation or growth step (those steps are reached
        one at a time); the steps, batches and results are those of one step per
        dispatch. None (default) chooses `default_steps_per_execution`.

    Returns:
      (last step, final train state).
    """
    # Every setting is checked before anything is created in model_dir.
    total_steps = settings.whole_number(total_steps, "TRAIN_STEPS", 1, "train.total_steps")
    eval_steps = settings.whole_number(eval_steps, "train.eval_steps", 1)
    eval_period = settings.whole_number(eval_period, "EVAL_PERIOD", 0, "train.eval_period")
    stats_period = settings.optional_whole_number(stats_period, "train.stats_period", 1)
    steps_per_execution = settings.optional_whole_number(
        steps_per_execution, "train.steps_per_execution", 1, "None: chosen by platform"
    )
    if checkpoints_lib.check_resumable(model_dir, total_steps) == total_steps:
        logger.info("%s is at step %d already; nothing to train", model_dir, total_steps)
    os.makedirs(model_dir, exist_ok=True)
    save_cfg = checkpoint_cfg.save
    schedule = growth_schedule or growth_schedule_lib.GrowthSchedule()
    unreached = schedule.beyond(total_steps)
    if unreached:
        logger.warning(
            "growth events after TRAIN_STEPS=%d are not reached in this run: %s",
            total_steps,
            [e.to_json() for e in unreached],
        )
    with contextlib.ExitStack() as cleanup:
        checkpointer = checkpoints_lib.Checkpointer(
            os.path.join(model_dir, "checkpoints"), save_cfg
        )
        cleanup.callback(checkpointer.close)
        # A resumed run reuses the seed it started with (even a clock-drawn one), so its
        # dropout keys and data order continue where they stopped.
        grown_events: list[dict] = []
        if checkpointer.latest_step() is not None:
            resumed_meta = checkpointer.read_metadata()
            seed = int(resumed_meta["seed"])
            # A run that grew before its latest checkpoint continues with the grown model.
            model = checkpoints_lib.model_for_checkpoint(model, resumed_meta)
            grown_events = list(resumed_meta.get("growth_events", []))
        else:
            seed = resolve_seed(random_seed)
        init_rng, dropout_rng = jax.random.split(jax.random.key(seed))
        layout = partitioner.get_data_layout(train_dataset_cfg.batch_size)

        def train_stream(start_step: int) -> Any:
            return data_lib.get_train_dataset(
                train_dataset_cfg,
                shard_id=layout.shard_id,
                num_shards=layout.num_shards,
                per_host_batch_size=layout.per_host_batch_size,
                feature_converter_cls=model.FEATURE_CONVERTER_CLS,
                default_seed=seed,
                start_step=start_step,
            )

        spec = train_stream(0).element_spec
        model = _fit_to_task(model, train_dataset_cfg, spec)
        input_shapes = {k: (layout.batch_size, *v.shape[1:]) for k, v in spec.items()}
        input_types = {k: v.dtype.as_numpy_dtype for k, v in spec.items()}
        trainer = trainer_lib.Trainer(model, partitioner, input_shapes, input_types, dropout_rng)
        state, step = initial_state(trainer, checkpointer, checkpoint_cfg.restore, init_rng)
        metadata: dict[str, Any] = {
            "architecture": checkpoints_lib.architecture_metadata(model),
            "seed": seed,
            "growth_events": grown_events,
        }
        _check_applied_growth(schedule, grown_events, step)

        evaluator = _Evaluations(
            trainer, model_dir, train_eval_dataset_cfg, infer_eval_dataset_cfg, eval_steps
        )
        writer = reporting.create_writer(os.path.join(model_dir, "train"))
        reporter = reporting.MetricsReporter(model_dir, total_steps, step, writer)
        cleanup.callback(reporter.close)
        if summarize_config_fn is not None:
            summarize_config_fn(model_dir, writer, step)
        if run_eval_before_training:
            evaluator.run(state, step, write_predictions)

        platforms = [device.platform for device in partitioner.mesh.local_devices]
        stats_period = stats_period or eval_period or total_steps
        actions = _LauncherActions(
            total_steps=total_steps,
            stats_period=stats_period,
            eval_period=eval_period,
            save_period=None if save_cfg is None else save_cfg.period,
            schedule=schedule,
            reporter=reporter,
            checkpointer=checkpointer,
            metadata=metadata,
            evaluator=evaluator,
            new_evaluator=lambda t: _Evaluations(
                t, model_dir, train_eval_dataset_cfg, infer_eval_dataset_cfg, eval_steps
            ),
            grow=lambda t, st, event, probe: _grow(t, st, event, seed, probe, model_dir, writer),
            write_predictions=write_predictions,
        )
        cleanup.callback(lambda: actions.evaluator.close())  # the latest growth's evaluator

        per_execution = steps_per_execution or default_steps_per_execution(platforms)
        host_batches = data_lib.numpy_steps(
            train_stream(step),
            loop.dispatch_sizes(step, total_steps, per_execution, actions.stops_at),
            chunk=per_execution if per_execution > 1 else 16,
        )
        batches = data_lib.DevicePrefetcher(
            host_batches,
            lambda item: (
                item[0],
                partitioner.shard_batch(item[1], layout.batch_size, stacked=item[0] > 1),
            ),
        )
        cleanup.callback(batches.close)
        logger.info(
            "training steps %d..%d of %s (%d steps per dispatch)",
            step,
            total_steps,
            model_dir,
            per_execution,
        )
        # Only dispatches: metrics stay on device until the reporter's thread reads them.
        progress = loop.Progress(trainer, state, trainer.empty_metrics(), step)
        progress = loop.run(progress, actions.watch(batches), total_steps, actions.actions())
        step, state = progress.step, progress.state
    if jax.process_index() == 0:
        logger.info("training curves: %s", curves.plot_training_curves(model_dir))
    return step, state


# On a host whose devices are its CPU cores, each dispatch of a small step costs host
# work that competes with the step for the same cores; a scan of several steps per
# dispatch pays it once (docs/benchmarks.md has the A/B).
CPU_STEPS_PER_EXECUTION = 10


def _fit_to_task(model: Any, cfg: data_lib.DatasetConfig, spec: Any) -> Any:
    """`model` with the sizes its config leaves open (None) set to the train task's.

    The image shape comes from the train stream itself, the classes from the task's
    metadata (`tasks.registry.info`: registered, or derived once from its data).
    """
    try:
        config = growth_hooks.model_config(model)
    except TypeError:
        return model
    num_classes = None
    if any(f.name == "num_classes" for f in dataclasses.fields(config)):
        info = registry.info(cfg.mixture_or_task_name, count_examples=False)
        num_classes = info.num_classes
    image = spec.get("image")
    return task_shapes.fit_to_task(
        model,
        task_name=cfg.mixture_or_task_name,
        input_shape=None if image is None else tuple(image.shape[1:]),
        num_classes=num_classes,
    )


def default_steps_per_execution(platforms: list[str]) -> int:
    """Steps per dispatch when `train.steps_per_execution` is None.

    Args:
      platforms: the platform of each device of this process ("cpu", "gpu", "tpu").

    Returns:
      `CPU_STEPS_PER_EXECUTION` when every device is the host's CPU; else 1 (an
      accelerator's host dispatches ahead of the device, and a block keeps that many
      batches on device; set it to try more).
    """
    return CPU_STEPS_PER_EXECUTION if all(p == "cpu" for p in platforms) else 1


def _check_applied_growth(
    schedule: growth_schedule_lib.GrowthSchedule, applied: list[dict], step: int
) -> None:
    """Notes when a resumed run's checkpoint grew differently from the schedule.

    Normal for staged training across runs (`./run.sh grow` between them), so info.
    """
    expected = [e.to_json() for e in schedule.events if e.step <= step]
    if applied != expected:
        logger.info(
            "the checkpoint at step %d records growth events %s but the schedule has %s "
            "up to that step; continuing with the checkpoint's architecture",
            step,
            applied,
            expected,
        )


def _grow(
    trainer: trainer_lib.Trainer,
    state: trainer_lib.TrainState,
    event: growth_schedule_lib.GrowthEvent,
    seed: int,
    probe_batch: Any,
    model_dir: str,
    writer: metric_writers.MetricWriter,
) -> tuple[trainer_lib.Trainer, trainer_lib.TrainState]:
    """Applies one growth event and records the loss right before and right after it.

    The loss (no dropout) of the model before and of the grown model after is measured on
    the batch of the step that reached the event; function-preserving growth keeps them
    equal up to float rounding, which the summaries and `metrics.jsonl` show.
    """
    before = trainer.evaluate(state.params, iter([probe_batch]))
    result = state_growth.grow_train_state(
        trainer, state, event.requests, growth_schedule_lib.growth_rng(seed, event.step)
    )
    after = result.trainer.evaluate(result.state.params, iter([probe_batch]))
    values = {
        "loss_before": before["loss"],
        "loss_after": after["loss"],
        "loss_abs_delta": abs(after["loss"] - before["loss"]),
        "num_params_before": float(result.num_params_before),
        "num_params_after": float(result.num_params_after),
        "seconds": result.seconds,
    }
    writer.write_scalars(event.step, {f"growth/{k}": v for k, v in values.items()})
    reporting.append_history(
        model_dir,
        {"step": event.step, "kind": "growth", "requests": list(event.requests), **values},
    )
    logger.info(
        "grew at step %d with %s: %d -> %d params in %.2f s; loss %.6f -> %.6f",
        event.step,
        ", ".join(event.requests),
        result.num_params_before,
        result.num_params_after,
        result.seconds,
        before["loss"],
        after["loss"],
    )
    return result.trainer, result.state


class _LauncherActions:
    """What the launcher's loop does after a step, in order: report, grow, save, evaluate.

    A growth event swaps the trainer and state (`Progress`) and the evaluator; the
    checkpoint metadata records the grown architecture and the events so far.
    """

    def __init__(
        self,
        *,
        total_steps: int,
        stats_period: int,
        eval_period: int | None,
        save_period: int | None,
        schedule: growth_schedule_lib.GrowthSchedule,
        reporter: reporting.MetricsReporter,
        checkpointer: checkpoints_lib.Checkpointer,
        metadata: dict[str, Any],
        evaluator: _Evaluations,
        new_evaluator: Callable[[trainer_lib.Trainer], _Evaluations],
        grow: Callable[..., tuple[trainer_lib.Trainer, trainer_lib.TrainState]],
        write_predictions: bool,
    ):
        self.total_steps = total_steps
        self.stats_period = stats_period
        self.eval_period = eval_period
        self.save_period = save_period
        self.schedule = schedule
        self.reporter = reporter
        self.checkpointer = checkpointer
        self.metadata = metadata
        self.evaluator = evaluator
        self._new_evaluator = new_evaluator
        self._grow = grow
        self._write_predictions = write_predictions
        self._last: tuple[int, Any] | None = None

    def reports_at(self, s: int) -> bool:
        """Train metrics are reported every stats period, at the end and at growth."""
        return s % self.stats_period == 0 or s == self.total_steps or self.grows_at(s)

    def grows_at(self, s: int) -> bool:
        """A growth event of the schedule is at step `s`."""
        return self.schedule.at(s) is not None

    def saves_at(self, s: int) -> bool:
        """A checkpoint is saved every save period and at the end (when saving)."""
        if self.save_period is None:
            return False
        return bool(self.save_period and s % self.save_period == 0) or s == self.total_steps

    def evaluates_at(self, s: int) -> bool:
        """Evaluations run every eval period and at the end."""
        return bool(self.eval_period and s % self.eval_period == 0) or s == self.total_steps

    def stops_at(self, s: int) -> bool:
        """Whether any action is due after step `s` (a block of steps must end there)."""
        return self.reports_at(s) or self.saves_at(s) or self.evaluates_at(s)

    def watch(self, batches: Iterator[tuple[int, Any]]) -> Iterator[tuple[int, Any]]:
        """Passes `batches` through, remembering the latest (a growth event's probe)."""
        for item in batches:
            self._last = item
            yield item

    def actions(self) -> list[loop.Action]:
        """The loop's actions."""
        return [
            loop.When(self.reports_at, self.report),
            loop.When(self.grows_at, self.grow),
            loop.When(self.saves_at, self.save),
            loop.When(self.evaluates_at, self.evaluate),
        ]

    def report(self, progress: loop.Progress) -> None:
        """Hands the metrics to the reporter's thread and starts a new accumulator."""
        self.reporter.report(progress.step, progress.metrics)
        progress.metrics = progress.trainer.empty_metrics()

    def grow(self, progress: loop.Progress) -> None:
        """Applies the step's growth event; the probe is the batch of that step."""
        event = self.schedule.at(progress.step)
        assert event is not None and self._last is not None
        steps, batch = self._last
        probe = batch if steps == 1 else jax.tree.map(lambda x: x[-1], batch)
        progress.trainer, progress.state = self._grow(
            progress.trainer, progress.state, event, probe
        )
        model = progress.trainer.model
        self.metadata["architecture"] = checkpoints_lib.architecture_metadata(model)
        self.metadata["growth_events"] = [*self.metadata["growth_events"], event.to_json()]
        self.evaluator.close()
        self.evaluator = self._new_evaluator(progress.trainer)

    def save(self, progress: loop.Progress) -> None:
        """Saves a checkpoint of the state."""
        self.checkpointer.save(progress.step, progress.state, self.metadata)

    def evaluate(self, progress: loop.Progress) -> None:
        """Runs the evaluations."""
        self.evaluator.run(progress.state, progress.step, self._write_predictions)


class _Evaluations:
    """Train-eval (loss_fn metrics) and infer-eval (accuracy) of one run, with summaries."""

    def __init__(
        self,
        trainer: trainer_lib.Trainer,
        model_dir: str,
        train_eval_cfg: data_lib.DatasetConfig | None,
        infer_eval_cfg: data_lib.DatasetConfig | None,
        eval_steps: int,
    ):
        self._trainer = trainer
        self._model_dir = model_dir
        self._train_eval_cfg = train_eval_cfg
        self._eval_steps = eval_steps
        self._train_eval_batches: dict[str, list] = {}
        self._infer_split = infer_eval_cfg.split if infer_eval_cfg is not None else ""
        self._infer: evaluation_lib.ClassificationEvaluator | None = None
        if infer_eval_cfg is not None:
            self._infer = evaluation_lib.from_dataset_config(
                infer_eval_cfg, trainer.model.FEATURE_CONVERTER_CLS
            )
            self._inference = evaluation_lib.PartitionedInference(
                trainer.model,
                trainer.partitioner,
                trainer.state_shardings.params,
                infer_eval_cfg.batch_size,
            )
        self._writers: dict[str, metric_writers.MetricWriter] = {}
        if train_eval_cfg is not None:
            data_lib.get_mixture_or_task(train_eval_cfg.mixture_or_task_name, train_eval_cfg.module)

    def _writer(self, kind: str, task: str) -> metric_writers.MetricWriter:
        key = f"{kind}/{task}"
        if key not in self._writers:
            self._writers[key] = reporting.create_writer(os.path.join(self._model_dir, key))
        return self._writers[key]

    def _train_eval(self, state: trainer_lib.TrainState, step: int) -> None:
        cfg = self._train_eval_cfg
        if cfg is None:
            return
        partitioner = self._trainer.partitioner
        layout = partitioner.get_data_layout(cfg.batch_size)
        for task in data_lib.subtask_names(cfg):
            if task not in self._train_eval_batches:
                self._train_eval_batches[task] = data_lib.get_eval_batches(
                    cfg,
                    task,
                    shard_id=layout.shard_id,
                    num_shards=layout.num_shards,
                    per_host_batch_size=layout.per_host_batch_size,
                    feature_converter_cls=self._trainer.model.FEATURE_CONVERTER_CLS,
                    num_batches=self._eval_steps,
                )
            batches = (
                partitioner.shard_batch(b, cfg.batch_size) for b in self._train_eval_batches[task]
            )
            values = self._trainer.evaluate(state.params, batches)
            self._record("training_eval", task, cfg.split, step, values)

    def _record(
        self, kind: str, task: str, split: str, step: int, values: dict[str, float]
    ) -> None:
        if not values:
            return
        self._writer(kind, task).write_scalars(step, values)
        reporting.append_history(
            self._model_dir,
            {"step": step, "kind": kind, "task": task, "split": split, **values},
        )
        logger.info(
            "%s %s (%s) step %d: %s", kind, task, split, step, reporting.format_metrics(values)
        )

    def run(self, state: trainer_lib.TrainState, step: int, write_predictions: bool) -> dict:
        """Runs both evaluations at `step`; returns task -> infer metrics."""
        self._train_eval(state, step)
        if self._infer is None:
            return {}
        future, outputs = self._infer.evaluate(
            compute_metrics=True, step=step, predict_fn=self._inference.predict_fn(state.params)
        )
        metrics = future.result()
        for task, values in metrics.items():
            self._record("inference_eval", task, self._infer_split, step, values)
            if write_predictions:
                records = self._infer.records(task, outputs[task])
                evaluation_lib.write_predictions(
                    os.path.join(self._model_dir, "inference_eval"), task, step, records
                )
        return metrics

    def close(self) -> None:
        """Flushes and closes the eval summary writers."""
        for writer in self._writers.values():
            writer.close()
