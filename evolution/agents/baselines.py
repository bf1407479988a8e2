"""The papers' baselines (full fine-tuning, frozen bottom layers, residual adapters).

Each baseline is one path per task built from the store's root path, which is only read:
nothing is put into or published in the store, so the evolved system never changes.

- "finetune": every root component is cloned and trained; a fresh head.
- "freeze": embed, cls, pos and the bottom k blocks are referenced frozen; the top L - k
  blocks and the final norm are cloned and trained; a fresh head (0 <= k <= L).
- "adapters": every root component is frozen but the final norm, which is cloned and
  trained (as the evolved system always clones it); a residual adapter
  (`models.adapters.ResidualAdapter`, the identity at initialisation) follows every
  block and trains; a fresh head. The adapter after block i is slot "adapter_i" placed
  right after "block_i" (`candidate.forward` runs slots in order), so the last one adapts
  the features the head sees; evolved paths put "adapter_i" before "block_i" instead,
  and baseline paths are never given to `mutations.plan_child`.

The rules read slots, so they apply to any `evolution.system.families` root: a text-encoder
root (embed, block_i, head) has no final norm, so "adapters" trains only its adapters
and head, and "freeze" clones the top L - k blocks.

Fresh heads and adapters are made by `mutations.materialize`, as for evolved paths.
Training is `candidate.train_candidate` (frozen components have no gradients or
optimizer memory), validating every B steps and keeping the best-validation parameters,
whose test accuracy is reported. Hyperparameters default to the search space's
(`iteration.default_search_space`: lr 0.01, cosine, warmup 0.05, momentum 0.9, flip).

Accounted parameters use the evolved system's rule (`SystemState.accounted_params`: a
component's size is split among the tasks whose active paths use it):
`accounted_params_per_task` builds a state of the store's root path (active as stored,
so the root task is one more user of each root component, as in the evolved system) and
one path per task of a method's run. A frozen root component shared by the n tasks of a
run costs each size / (n + 1); a task's own clones, adapters and head cost their size.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
import time
import zlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from evolution import store as store_lib
from evolution.search import batches, candidate, hparams, iteration, mutations
from evolution.search import loop as search
from evolution.search.batches import Batch, TrainBatchesFn
from evolution.system import families
from evolution.system import state as system
from evolution.system.architecture import architecture_of, model_config_of

logger = logging.getLogger("evogrow")

FINETUNE = "finetune"
FREEZE = "freeze"
ADAPTERS = "adapters"
METHODS = (FINETUNE, FREEZE, ADAPTERS)
AGENT_PREFIX = "baseline"
_PREFIX_SLOTS = ("embed", "cls", "pos")


@dataclasses.dataclass(frozen=True)
class BaselineSpec:
    """One baseline method and its parameter.

    Attributes:
      method: "finetune", "freeze" or "adapters".
      freeze_layers: k, the frozen bottom blocks; required by "freeze", else None.
      adapter_size: the adapters' bottleneck width; required by "adapters", else None.
    """

    method: str
    freeze_layers: int | None = None
    adapter_size: int | None = None

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"Unknown baseline method {self.method!r}; expected one of {METHODS}.")
        if (self.method == FREEZE) != (self.freeze_layers is not None):
            raise ValueError(f"freeze_layers is for (and required by) {FREEZE!r} only.")
        if (self.method == ADAPTERS) != (self.adapter_size is not None):
            raise ValueError(f"adapter_size is for (and required by) {ADAPTERS!r} only.")
        if self.freeze_layers is not None and int(self.freeze_layers) < 0:
            raise ValueError(f"freeze_layers={self.freeze_layers} < 0.")
        if self.adapter_size is not None and int(self.adapter_size) < 1:
            raise ValueError(f"adapter_size={self.adapter_size} < 1.")


def _id_prefix(method: str, task: str) -> str:
    # Component ids name folders: keep [A-Za-z0-9_.:-] and a bounded length.
    safe_task = re.sub(r"[^A-Za-z0-9_.-]", "_", task)[:80]
    return f"{AGENT_PREFIX}-{method}-{safe_task}"


def plan_baseline(
    root: system.Path,
    spec: BaselineSpec,
    *,
    task: str,
    num_classes: int,
    init_seed: int,
) -> mutations.MutationPlan:
    """The baseline path of one task as a plan for `mutations.materialize` (pure).

    Args:
      root: the store's root path (embed, cls, pos, block_0..L-1, final_norm, head).
      spec: the method.
      task: the task the path solves.
      num_classes: classes of its fresh head.
      init_seed: seed of the fresh head and adapters.

    Returns:
      The plan: slots "reference" (frozen root components), "clone" (root copies that
      train) and "init" (fresh head, adapters); ids `baseline-<method>-<task>:<slot>`.

    Raises:
      ValueError: k outside 0..L, or adapters asked of a root that has adapters already.
    """
    config = model_config_of(root)
    num_layers = config.num_layers
    k = spec.freeze_layers
    if spec.method == FREEZE and not (k is not None and 0 <= k <= num_layers):
        raise ValueError(
            f"freeze_layers={spec.freeze_layers} is outside 0..{num_layers} "
            f"(the root has {num_layers} blocks)."
        )
    if spec.method == ADAPTERS and any(
        mutations.slot_kind(slot) == "adapter" for slot, _ in root.components
    ):
        raise ValueError(f"Root path {root.id!r} has adapters already.")
    prefix = _id_prefix(spec.method, task)
    slots: list[mutations.SlotPlan] = []

    def new(slot: str, action: str, source: str | None = None, **slot_config: Any) -> None:
        slots.append(mutations.SlotPlan(slot, f"{prefix}:{slot}", action, source, slot_config))

    for slot, component_id in root.components:
        kind = mutations.slot_kind(slot)
        if slot == "head":
            new(slot, mutations.INIT)
            continue
        frozen = {
            FINETUNE: False,
            FREEZE: slot in _PREFIX_SLOTS
            or (kind == "block" and int(slot.split("_")[1]) < (k or 0)),
            ADAPTERS: slot != "final_norm",
        }[spec.method]
        if frozen:
            slots.append(mutations.SlotPlan(slot, component_id, mutations.REFERENCE, component_id))
        else:
            new(slot, mutations.CLONE, component_id)
        if spec.method == ADAPTERS and kind == "block":
            size = int(spec.adapter_size or 0)
            new(f"adapter_{slot.split('_')[1]}", mutations.INIT, size=size)

    architecture = architecture_of(dataclasses.replace(config, num_classes=num_classes))
    adapter_sizes = {s.slot: int(s.config["size"]) for s in slots if s.kind == "adapter"}
    if adapter_sizes:
        architecture["adapters"] = adapter_sizes
    architecture["baseline"] = dataclasses.asdict(spec)
    path = system.Path(
        id=f"{prefix}:path",
        task=task,
        components=tuple((s.slot, s.component_id) for s in slots),
        agent=f"{AGENT_PREFIX}-{spec.method}",
        parent=root.id,
        architecture=architecture,
    )
    return mutations.MutationPlan(
        path=path,
        slots=tuple(slots),
        hparams=hparams.HParams({}),
        applied=(),
        num_layers=num_layers,
        init_seed=int(init_seed),
    )


def accounted_params_per_task(
    state: system.SystemState,
    paths: Sequence[system.Path],
    components: Iterable[system.Component],
) -> dict[str, float]:
    """The parameters each task of one method run pays for, by the evolved system's rule.

    Builds a `SystemState` holding the store's root path (with its status as stored) and
    the run's paths, one per task, and applies `SystemState.accounted_params`: a
    component of size S used by u tasks' active paths costs each of them S / u.

    Args:
      state: the store's state (its root path and root components).
      paths: the run's baseline paths, one per task.
      components: the run's new components (clones, fresh heads, adapters).

    Returns:
      task -> accounted parameters.

    Raises:
      ValueError: no root, or two paths of the same task.
    """
    if state.root_path_id is None:
        raise ValueError("The store has no root path.")
    root = state.paths[state.root_path_id]
    tasks = [path.task for path in paths]
    if len(set(tasks)) != len(tasks) or root.task in tasks:
        raise ValueError(f"Need one path per task, none of the root's: {tasks}.")
    records = {root.task: state.tasks[root.task]}
    for order, path in enumerate(paths, start=1):
        classes = int(path.architecture.get("num_classes", 1))
        records[path.task] = system.TaskRecord(path.task, num_classes=classes, order=order)
    pool = {cid: state.components[cid] for cid in root.component_ids}
    pool.update({c.id: c for c in components})
    run_state = system.SystemState(
        pool, {root.id: root, **{p.id: p for p in paths}}, records, root.id
    )
    run_state.validate()
    return {path.task: run_state.accounted_params(path) for path in paths}


@dataclasses.dataclass(frozen=True)
class BaselineResult:
    """One baseline trained on one task.

    Attributes:
      task: the task.
      method: "finetune", "freeze" or "adapters".
      validation_accuracy: the best validation accuracy.
      test_accuracy: the test accuracy of the best-validation parameters.
      trainable_params: parameters created for the task (clones, fresh head, adapters).
      accounted_params: parameters the task pays for (`accounted_params_per_task`: over
        the method's tasks in `run_baselines`, the task alone in `run_baseline`).
      steps: training steps.
      wall_seconds: wall time of the whole baseline (loading, training, testing).
      train_seconds: wall time of its training steps (compilation excluded).
      spec: the method and its parameter.
      path: the baseline path (never published).
      components: its new components' records (never published).
      training: what `candidate.train_candidate` returned (best-validation `params` by
        new component id, `best_step`, `validations`, `train_losses`, timings);
        `params` and `opt_state` are emptied when not kept.
    """

    task: str
    method: str
    validation_accuracy: float
    test_accuracy: float
    trainable_params: int
    accounted_params: float
    steps: int
    wall_seconds: float
    train_seconds: float
    spec: BaselineSpec
    path: system.Path
    components: tuple[system.Component, ...]
    training: candidate.CandidateResult = dataclasses.field(repr=False)

    def to_json(self) -> dict[str, Any]:
        """The JSON-safe summary written to baselines.json (parameters left out)."""
        fields = dataclasses.fields(self)
        out = {f.name: getattr(self, f.name) for f in fields if f.type in ("str", "int", "float")}
        losses = self.training.train_losses
        out.update(
            spec=dataclasses.asdict(self.spec),
            path={"id": self.path.id, "components": [list(c) for c in self.path.components]},
            trained_components=[c.id for c in self.components],
            best_step=self.training.best_step,
            validations=[list(v) for v in self.training.validations],
            train_losses=[x if math.isfinite(x) else None for x in losses],
            compile_seconds=self.training.compile_seconds,
        )
        return out

    def without_params(self) -> BaselineResult:
        """A copy without the trained parameters and optimizer state (to save memory)."""
        training = dataclasses.replace(self.training, params={}, opt_state=None)
        return dataclasses.replace(self, training=training)


def _seed_of(*parts: int | str) -> int:
    entropy = [p if isinstance(p, int) else zlib.crc32(p.encode()) for p in parts]
    return int(np.random.default_rng(np.random.SeedSequence(entropy)).integers(0, 2**31 - 1))


def _resolve_hparams(space: hparams.HParamSpace, overrides: Mapping[str, Any] | None) -> dict:
    """The space's default values with `overrides` (known names only) on top."""
    values = space.values(space.defaults())
    unknown = set(overrides or {}) - set(values)
    if unknown:
        raise ValueError(f"Unknown hyperparameters {sorted(unknown)}; known: {sorted(values)}.")
    return {**values, **dict(overrides or {})}


def run_baseline(
    *,
    store: store_lib.Store,
    method: str,
    task: str,
    train_batches: Iterator[Batch] | TrainBatchesFn,
    validation_batches: Sequence[Batch],
    test_images: np.ndarray,
    test_labels: np.ndarray,
    num_classes: int,
    steps: int,
    steps_per_validation: int,
    hparam_values: Mapping[str, Any] | None = None,
    seed: int = 0,
    freeze_layers: int | None = None,
    adapter_size: int | None = None,
    batch_size: int = 32,
    cache: candidate.StepCache | None = None,
) -> BaselineResult:
    """Trains one baseline on one task from the store's root (read only).

    Args:
      store: the store holding the root (`seeding.seed_root`); nothing is written to it.
      method: "finetune", "freeze" or "adapters".
      task: the task's name.
      train_batches: an endless iterator of {"image", "label"} batches, or a
        `TrainBatchesFn` (called with the space's data hyperparameters, `batch_size`
        and a seed drawn from `seed` and the task, the same for every method).
      validation_batches: fixed batches ("image", "label", optional "_mask").
      test_images: [N, H, W, C] float test images (for a text-encoder root: [N, L]
        int token ids).
      test_labels: [N] int test labels.
      num_classes: classes of the fresh head.
      steps: training steps (a multiple of `steps_per_validation`).
      steps_per_validation: B, steps between validations.
      hparam_values: overrides of the space's default values ("lr", "schedule",
        "warmup", "momentum", "nesterov", "adapter_size", "flip", ...).
      seed: seeds the fresh head and adapters (with task and method) and the data.
      freeze_layers: k of "freeze" (None: half the root's blocks, rounded down).
      adapter_size: width of "adapters" (None: the hyperparameter "adapter_size").
      batch_size: training batch size (when `train_batches` is a function).
      cache: compiled steps (default: the process-wide cache).

    Returns:
      The result; `accounted_params` as if the task were the method's only one.

    Raises:
      ValueError: unknown method, k out of range, bad step counts, or no root.
    """
    start = time.perf_counter()
    if steps < 1 or steps_per_validation < 1 or steps % min(steps_per_validation, steps):
        raise ValueError(
            f"steps={steps} must be a positive multiple of steps_per_validation="
            f"{steps_per_validation} (or smaller than it)."
        )
    if method not in METHODS:
        raise ValueError(f"Unknown baseline method {method!r}; expected one of {METHODS}.")
    state = store.load_state()
    if state.root_path_id is None:
        raise ValueError("The store has no root path; call seeding.seed_root first.")
    root = state.paths[state.root_path_id]
    root_config = model_config_of(root)
    space = iteration.default_search_space(root_config)
    values = _resolve_hparams(space, hparam_values)
    if freeze_layers is None:
        freeze_layers = root_config.num_layers // 2
    spec = BaselineSpec(
        method,
        freeze_layers=freeze_layers if method == FREEZE else None,
        adapter_size=int(adapter_size or values["adapter_size"]) if method == ADAPTERS else None,
    )
    init_seed = _seed_of(seed, task, method)
    plan = plan_baseline(root, spec, task=task, num_classes=num_classes, init_seed=init_seed)
    pool = {cid: store.load_params(cid) for cid in root.component_ids}
    config, created = mutations.materialize(plan, pool, root_config, num_classes=num_classes)
    pool.update(created)
    if isinstance(train_batches, Iterator):
        stream = train_batches
    else:
        data_values = {name: values[name] for name in space.data_names}
        stream = train_batches(data_values, batch_size=batch_size, seed=_seed_of(seed, task))
    interval = min(steps_per_validation, steps)
    result = candidate.train_candidate(
        config=config,
        components=plan.path.components,
        pool=pool,
        trainable_ids=plan.trainable_ids,
        hparam_values=values,
        train_batches=stream,
        validation_batches=validation_batches,
        num_validations=steps // interval,
        steps_per_validation=interval,
        cache=cache,
    )
    slots = [slot for slot, _ in plan.path.components]
    best = {slot: result.params.get(cid, pool[cid]) for slot, cid in plan.path.components}
    # Test batches of the validation batches' size run the same compiled eval step.
    test_batch_size = len(np.asarray(validation_batches[0]["label"]))
    feature = families.family_of(config).input_key
    test_batches = batches.array_eval_batches(
        test_images, test_labels, test_batch_size, feature=feature
    )
    test_accuracy = candidate.validate(config, slots, best, test_batches, cache=cache)
    records = tuple(mutations.component_records(plan, result.params, agent=plan.path.agent))
    path = dataclasses.replace(plan.path, quality=result.quality, metrics={"hparam_values": values})
    accounted = accounted_params_per_task(state, [path], records)[task]
    outcome = BaselineResult(
        task=task,
        method=method,
        validation_accuracy=float(result.quality),
        test_accuracy=float(test_accuracy),
        trainable_params=sum(c.num_params for c in records),
        accounted_params=accounted,
        steps=steps,
        wall_seconds=time.perf_counter() - start,
        train_seconds=result.train_seconds,
        spec=spec,
        path=path,
        components=records,
        training=result,
    )
    seconds = (outcome.wall_seconds, outcome.train_seconds, result.compile_seconds)
    logger.info(
        "baseline %s on %s: validation %.4f, test %.4f, %d trainable params, %d steps in "
        "%.1fs (train %.1fs, compile %.1fs)",
        *(method, task, outcome.validation_accuracy, outcome.test_accuracy),
        *(outcome.trainable_params, steps, *seconds),
    )
    return outcome


@dataclasses.dataclass(frozen=True)
class BaselineTask:
    """What a baseline needs of one task.

    Attributes:
      data: training stream, validation batches and optionally the number of classes
        (as for the search).
      test_images: [N, H, W, C] float test images (text encoder: [N, L] token ids).
      test_labels: [N] int test labels.
    """

    data: search.TaskData
    test_images: np.ndarray
    test_labels: np.ndarray


def _num_classes(name: str, task: BaselineTask, state: system.SystemState) -> int:
    """The task's classes: given, else the store's record (as evolved), else max label + 1."""
    if task.data.num_classes is not None:
        return int(task.data.num_classes)
    if name in state.tasks:
        return state.tasks[name].num_classes
    labels = [np.asarray(task.test_labels).ravel()]
    for batch in task.data.validation_batches:
        mask = batch.get("_mask")
        label = np.asarray(batch["label"])
        labels.append(label if mask is None else label[np.asarray(mask).astype(bool)])
    return int(np.concatenate(labels).max()) + 1


def check_methods(methods: Sequence[str]) -> None:
    """Raises ValueError naming any method that is not one of `METHODS`."""
    unknown = [method for method in methods if method not in METHODS]
    if unknown:
        raise ValueError(f"Unknown baseline methods {unknown}; expected some of {METHODS}.")


def run_baselines(
    *,
    store: store_lib.Store,
    tasks: Mapping[str, BaselineTask],
    methods: Sequence[str],
    steps_per_task: Mapping[str, int],
    keep_params: bool = False,
    cache: candidate.StepCache | None = None,
    **options: Any,
) -> list[BaselineResult]:
    """Trains every method on every task; accounted parameters over each method's tasks.

    Args:
      store: the store holding the root (read only).
      tasks: task name -> its data.
      methods: the methods, e.g. ("finetune", "freeze", "adapters").
      steps_per_task: task -> training steps (e.g. what the evolution spent on it).
      keep_params: keep the trained parameters in the results (memory).
      cache: compiled steps shared by all runs (default: the process-wide cache).
      **options: `run_baseline`'s other arguments: steps_per_validation (required),
        hparam_values, seed, freeze_layers, adapter_size, batch_size.

    Returns:
      One result per (method, task), methods outer; `accounted_params` shares each frozen
      root component among the method's tasks and the root (`accounted_params_per_task`).

    Raises:
      ValueError: an unknown method or a task without steps.
    """
    check_methods(methods)
    missing = [name for name in tasks if name not in steps_per_task]
    if missing:
        raise ValueError(f"No steps for tasks {missing}.")
    cache = cache or candidate.default_cache()
    state = store.load_state()
    results: list[BaselineResult] = []
    for method in methods:
        run: list[BaselineResult] = []
        for index, (name, task) in enumerate(tasks.items()):
            logger.info("baseline %s: task %d/%d %s", method, index + 1, len(tasks), name)
            result = run_baseline(
                store=store,
                method=method,
                task=name,
                train_batches=task.data.train_batches_fn,
                validation_batches=task.data.validation_batches,
                test_images=task.test_images,
                test_labels=task.test_labels,
                num_classes=_num_classes(name, task, state),
                steps=int(steps_per_task[name]),
                cache=cache,
                **options,
            )
            run.append(result if keep_params else result.without_params())
        accounted = accounted_params_per_task(
            state, [r.path for r in run], [c for r in run for c in r.components]
        )
        results.extend(dataclasses.replace(r, accounted_params=accounted[r.task]) for r in run)
    return results
