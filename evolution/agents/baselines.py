"""muNet's baselines (muNet.ipynb: "Finetune all", "Freeze bottom layers:k", "Adapters:X").

Each baseline is one path per task built from the store's root path, which is only read:
nothing is put into or published in the store, so the evolved system never changes.

- "finetune" (Finetune all): every root component is cloned and trained; a fresh head.
- "freeze" (Freeze bottom layers:k): embed, cls, pos and the bottom k blocks are
  referenced frozen; the top L - k blocks and the final norm are cloned and trained;
  a fresh head (0 <= k <= L).
- "adapters" (Adapters:X): every root component is frozen but the final norm, which
  is cloned and trained (the notebook's `force_finetune_components`); a residual
  adapter of width X (`models.adapters.ResidualAdapter`, the identity at
  initialisation) comes before every block and trains; a fresh head. As in the
  notebook's Encoder, slot "adapter_i" comes right before "block_i" (`candidate.forward`
  runs slots in order), where evolved paths put their adapters too. The notebook's
  widths are `NOTEBOOK_ADAPTER_SIZES`, its default 32 (the space's "adapter_size").

The rules read slots, so they apply to any `evolution.system.families` root: a text-encoder
root (embed, block_i, head) has no final norm, so "adapters" trains only its adapters
and head, and "freeze" clones the top L - k blocks.

The protocol is `exp_config_set_baseline_common`'s (`run_baseline`): D replicas per
task, all from the root with the default hyperparameters, each trained for as many
validation intervals as one evolutionary chain, in parallel on the devices a
generation's candidates use; the replica with the best validation accuracy is kept.
The total compute equals the evolution's, and no baseline run is longer than the chain.

Fresh heads and adapters are made by `mutations.materialize`, as for evolved paths.
Training is `candidate.train_candidate` (frozen components have no gradients or
optimizer memory), validating every B steps and keeping the best-validation parameters,
whose test accuracy is reported. Hyperparameters default to the search space's
(`iteration.default_search_space`: lr 0.01, cosine, warmup 0.05, momentum 0.9, flip).

Accounted parameters use the evolved system's rule (`SystemState.accounted_params`: a
component's size is split among the tasks whose active paths use it), in two
accountings (`accounted_params_per_task`): mu2Net+'s keeps the store's root path active,
so the root is one more user of each root component and a frozen root component shared
by the n tasks of a run costs each size / (n + 1); with muNet's the root's lock is not a
user, so the n tasks share it alone, size / n. A task's own clones, adapters and head
cost their size in both.
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
from evolution.search import iteration
from evolution.search import loop as search
from evolution.search.data import batches
from evolution.search.data.batches import Batch, TrainBatchesFn
from evolution.search.execution import executors, placement
from evolution.search.paths import candidate, flops
from evolution.search.space import hparams, mutations
from evolution.system import families
from evolution.system import state as system
from evolution.system.architecture import architecture_of, model_config_of

logger = logging.getLogger("evogrow")

FINETUNE = "finetune"
FREEZE = "freeze"
ADAPTERS = "adapters"
METHODS = (FINETUNE, FREEZE, ADAPTERS)
# muNet.ipynb's adapter baselines ("Adapters:X") and its default `adapter_dim`.
NOTEBOOK_ADAPTER_SIZES = (8, 16, 32, 64, 128, 256, 512)
NOTEBOOK_ADAPTER_SIZE = 32
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

    @property
    def name(self) -> str:
        """The variant as muNet.ipynb's CONFIGURATION names it, e.g. "Adapters:32"."""
        if self.method == FREEZE:
            return f"Freeze bottom layers:{self.freeze_layers}"
        if self.method == ADAPTERS:
            return f"Adapters:{self.adapter_size}"
        return "Finetune all"


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
    image_size: int | None = None,
) -> mutations.MutationPlan:
    """The baseline path of one task as a plan for `mutations.materialize` (pure).

    Args:
      root: the store's root path (embed, cls, pos, block_0..L-1, final_norm, head).
      spec: the method.
      task: the task the path solves.
      num_classes: classes of its fresh head.
      init_seed: seed of the fresh head and adapters.
      image_size: the image side the path sees (the hyperparameter "image_size"; None:
        the images' own).

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
        if spec.method == ADAPTERS and kind == "block":
            # The notebook's Encoder applies residual_adapter_i to the input of block i.
            new(f"adapter_{slot.split('_')[1]}", mutations.INIT, size=int(spec.adapter_size or 0))
        if frozen:
            slots.append(mutations.SlotPlan(slot, component_id, mutations.REFERENCE, component_id))
        else:
            new(slot, mutations.CLONE, component_id)

    architecture = architecture_of(dataclasses.replace(config, num_classes=num_classes))
    architecture = mutations.with_image_size(architecture, image_size)
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
    *,
    root_counts: bool = True,
) -> dict[str, float]:
    """The parameters each task of one method run pays for, by the evolved system's rule.

    Builds a `SystemState` holding the store's root path (active as stored when
    `root_counts`) and the run's paths, one per task, and applies
    `SystemState.accounted_params`: a component of size S used by u tasks' active paths
    costs each of them S / u (with muNet's accounting the root's lock is not a user).

    Args:
      state: the store's state (its root path and root components).
      paths: the run's baseline paths, one per task.
      components: the run's new components (clones, fresh heads, adapters).
      root_counts: mu2Net+'s accounting (the root is one more user of its components);
        False: muNet's (it is not).

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
    accounting = system.MU2NET_PLUS if root_counts else system.MUNET
    return {path.task: run_state.accounted_params(path, accounting) for path in paths}


@dataclasses.dataclass(frozen=True)
class BaselineResult:
    """One baseline trained on one task.

    Attributes:
      task: the task.
      method: "finetune", "freeze" or "adapters".
      validation_accuracy: the best validation accuracy.
      test_accuracy: the test accuracy of the best-validation parameters.
      trainable_params: parameters created for the task (clones, fresh head, adapters).
      accounted_params: parameters the task pays for by mu2Net+'s accounting (the root
        is one more user of its components; `accounted_params_per_task`: over the
        method's tasks in `run_baselines`, the task alone in `run_baseline`).
      accounted_params_munet: the same by muNet's accounting (the root is not a user).
      steps: training steps of each replica (one evolutionary chain's).
      replicas: D, the replicas trained from the root.
      kept_replica: the index of the replica kept (best validation accuracy).
      replica_validation_accuracies: every replica's best validation accuracy.
      flops: FLOPs of one example through the path (`flops.path_flops`).
      wall_seconds: wall time of the whole baseline (loading, training, testing).
      train_seconds: training-step time summed over the replicas (compilation excluded).
      spec: the method and its parameter.
      path: the kept replica's path (never published).
      components: its new components' records (never published).
      training: what `candidate.train_candidate` returned for the kept replica
        (best-validation `params` by new component id, `best_step`, `validations`,
        `train_losses`, timings); `params` and `opt_state` are emptied when not kept.
    """

    task: str
    method: str
    validation_accuracy: float
    test_accuracy: float
    trainable_params: int
    accounted_params: float
    accounted_params_munet: float
    steps: int
    replicas: int
    kept_replica: int
    replica_validation_accuracies: tuple[float, ...]
    flops: float
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
            variant=self.spec.name,
            replica_validation_accuracies=list(self.replica_validation_accuracies),
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
    replicas: int = 1,
    devices: Sequence[Any] | None = None,
    hparam_values: Mapping[str, Any] | None = None,
    seed: int = 0,
    freeze_layers: int | None = None,
    adapter_size: int | None = None,
    batch_size: int = 32,
    cache: candidate.StepCache | None = None,
) -> BaselineResult:
    """Trains one baseline on one task from the store's root (read only), as muNet does.

    muNet.ipynb's `exp_config_set_baseline_common`: D replicas, all from the root with
    the default hyperparameters, each trained for `steps` (as many validation intervals
    as one evolutionary chain), in parallel on `devices` as a generation's candidates
    are (`executors.train_generation`); the replica with the best validation accuracy
    is kept and its best-validation parameters are tested. The replicas differ in the
    seeds of their fresh head and adapters and of their training stream.

    Args:
      store: the store holding the root (`seeding.seed_root`); nothing is written to it.
      method: "finetune", "freeze" or "adapters".
      task: the task's name.
      train_batches: a `TrainBatchesFn` (called with the space's data hyperparameters,
        `batch_size` and a seed drawn from `seed`, the task and the replica, the same for
        every method), or an endless iterator of {"image", "label"} batches (one replica).
      validation_batches: fixed batches ("image", "label", optional "_mask").
      test_images: [N, H, W, C] float test images (for a text-encoder root: [N, L]
        int token ids).
      test_labels: [N] int test labels.
      num_classes: classes of the fresh head.
      steps: training steps of each replica (a multiple of `steps_per_validation`).
      steps_per_validation: B, steps between validations.
      replicas: D, the replicas trained (the evolution's candidates per generation).
      devices: where the replicas train, one per device at a time (None: every local
        device, `placement.search_devices`).
      hparam_values: overrides of the space's default values ("lr", "schedule",
        "warmup", "momentum", "nesterov", "adapter_size", "flip", ...).
      seed: seeds the fresh heads and adapters (with task, method and replica) and the data.
      freeze_layers: k of "freeze" (None: half the root's blocks, rounded down).
      adapter_size: width of "adapters" (None: the hyperparameter "adapter_size",
        muNet's default 32).
      batch_size: training batch size (when `train_batches` is a function).
      cache: compiled steps (default: the process-wide cache).

    Returns:
      The kept replica's result; `accounted_params` as if the task were the method's only one.

    Raises:
      ValueError: unknown method, k out of range, bad step or replica counts, an
        iterator for several replicas, or no root.
    """
    start = time.perf_counter()
    if steps < 1 or steps_per_validation < 1 or steps % min(steps_per_validation, steps):
        raise ValueError(
            f"steps={steps} must be a positive multiple of steps_per_validation="
            f"{steps_per_validation} (or smaller than it)."
        )
    if method not in METHODS:
        raise ValueError(f"Unknown baseline method {method!r}; expected one of {METHODS}.")
    if replicas < 1:
        raise ValueError(f"replicas={replicas} < 1.")
    if replicas > 1 and isinstance(train_batches, Iterator):
        raise ValueError(f"{replicas} replicas need a TrainBatchesFn, not one iterator.")
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
    root_pool = {cid: store.load_params(cid) for cid in root.component_ids}
    data_values = {name: values[name] for name in space.data_names}
    plans, pools, jobs = [], [], []
    config = root_config
    for replica in range(replicas):
        init_seed = _seed_of(seed, task, method, replica)
        plan = plan_baseline(
            root,
            spec,
            task=task,
            num_classes=num_classes,
            init_seed=init_seed,
            image_size=values.get("image_size"),
        )
        config, created = mutations.materialize(
            plan, root_pool, root_config, num_classes=num_classes
        )
        pool = {**root_pool, **created}
        plans.append(plan)
        pools.append(pool)
        jobs.append(
            placement.CandidateJob(
                config=config,
                components=plan.path.components,
                pool=pool,
                trainable_ids=plan.trainable_ids,
                hparam_values=values,
                data_values=data_values,
                data_seed=_seed_of(seed, task, replica),
            )
        )
    if isinstance(train_batches, Iterator):
        stream = train_batches

        def batches_fn(data_values: Mapping[str, Any], *, batch_size: int, seed: int):
            del data_values, batch_size, seed  # The one replica reads the stream given.
            return stream

        train_batches_fn: TrainBatchesFn = batches_fn
    else:
        train_batches_fn = train_batches
    interval = min(steps_per_validation, steps)
    trained = executors.train_generation(
        jobs,
        train_batches_fn=train_batches_fn,
        validation_batches=validation_batches,
        settings=placement.StepSettings(batch_size, steps // interval, interval),
        executor="threads",
        ray_address=None,
        cache=cache or candidate.default_cache(),
        devices=placement.search_devices(None) if devices is None else devices,
    )
    # The notebook keeps the best-scoring path; a baseline's score is its quality.
    kept = max(range(replicas), key=lambda r: (trained[r].quality, -r))
    plan, pool, result = plans[kept], pools[kept], trained[kept]
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
    munet = accounted_params_per_task(state, [path], records, root_counts=False)[task]
    outcome = BaselineResult(
        task=task,
        method=method,
        validation_accuracy=float(result.quality),
        test_accuracy=float(test_accuracy),
        trainable_params=sum(c.num_params for c in records),
        accounted_params=accounted,
        accounted_params_munet=munet,
        steps=steps,
        replicas=replicas,
        kept_replica=kept,
        replica_validation_accuracies=tuple(float(r.quality) for r in trained),
        flops=flops.path_flops(config, plan.path.components, pool.__getitem__),
        wall_seconds=time.perf_counter() - start,
        train_seconds=sum(r.train_seconds for r in trained),
        spec=spec,
        path=path,
        components=records,
        training=result,
    )
    seconds = (outcome.wall_seconds, outcome.train_seconds, result.compile_seconds)
    logger.info(
        "baseline %s on %s: replica %d/%d kept, validation %.4f, test %.4f, %d trainable "
        "params, %d x %d steps in %.1fs (train %.1fs, compile %.1fs)",
        *(spec.name, task, kept + 1, replicas, outcome.validation_accuracy),
        *(outcome.test_accuracy, outcome.trainable_params, replicas, steps, *seconds),
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
      steps_per_task: task -> training steps of each replica (muNet: one evolutionary
        chain's, task iterations x generations x V x B).
      keep_params: keep the trained parameters in the results (memory).
      cache: compiled steps shared by all runs (default: the process-wide cache).
      **options: `run_baseline`'s other arguments: steps_per_validation (required),
        replicas, devices, hparam_values, seed, freeze_layers, adapter_size, batch_size.

    Returns:
      One result per (method, task), methods outer; `accounted_params` shares each frozen
      root component among the method's tasks and the root, `accounted_params_munet`
      among the method's tasks only (`accounted_params_per_task`).

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
        paths, components = [r.path for r in run], [c for r in run for c in r.components]
        accounted = accounted_params_per_task(state, paths, components)
        munet = accounted_params_per_task(state, paths, components, root_counts=False)
        results.extend(
            dataclasses.replace(
                r, accounted_params=accounted[r.task], accounted_params_munet=munet[r.task]
            )
            for r in run
        )
    return results
