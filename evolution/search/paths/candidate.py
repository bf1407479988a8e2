"""Training one candidate path: its own components train, everything it shares stays frozen.

A candidate (a planned child, evolution/search/space/mutations.py) trains V x B steps on its task,
validating every B steps, and keeps the parameters of its best validation (muNet; the
score's quality is that best accuracy). It trains like every other run: its path is a
`path_model.PathModel`, trained by a `training.trainer.Trainer` in `training.loop.run`
with `loop.KeepBest`. Only the candidate's new components (clones, fresh heads and
adapters, grown blocks) are differentiated and updated: the others are frozen by the
trainer's mask, which returns them bit for bit, so a published path never changes.
The optimiser is the notebooks': clip by global norm 1, then SGD with
(optionally Nesterov) momentum and a constant (at half the learning rate), warmup+cosine
or cosine-with-restarts schedule, warmups starting at lr / 1000 (`make_optimizer`).

Compiled steps are reused across candidates (`StepCache` keeps one trainer per
signature): parameter trees inside the step are keyed by slot, not by component id, and
the learning rate and momentum are values of the optimizer state
(`OptimizerSettings.injected`), so every candidate with the same architecture, the same trainable
slots and the same static optimiser settings (schedule kind, warmup steps, Nesterov,
momentum on/off, step count) runs the same executable. mu2Net+ inheritance of
optimizer state goes through `inherit_opt_state`, keyed by component id.
"""

from __future__ import annotations

import dataclasses
import itertools
import threading
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from typing import Any, cast

import flax.linen as nn
import jax
import numpy as np
import optax

from evolution.search.paths import path_model, timing
from evolution.system import families
from training import loop, partitioning
from training import trainer as trainer_lib

Params = Any
Batch = Mapping[str, Any]

SCHEDULES = ("constant", "cosine", "restarts")
TRAIN_LABEL = "train"
FROZEN_LABEL = "frozen"


# mu3Net's `get_optimizer`: warmups start at lr / 1000 (muNet's and mu2Net's at lr / 100:
# the value "warmup_start" overrides it), and the constant schedule runs at half the
# learning rate, "so that [its] average lr is the same as other types".
WARMUP_START = 1e-3
CONSTANT_FACTOR = 0.5


def _warmup_steps(fraction: float, steps: int) -> int:
    """Warmup steps of a schedule of `steps` steps: int(fraction * steps), never all."""
    return min(int(float(fraction) * steps), max(steps - 1, 0))


def _warmup_cosine(warmup: int, steps: int, start: float) -> optax.Schedule:
    """Linear warmup from `start` to 1 over `warmup` steps, then cosine to 0 at `steps`."""
    if warmup <= 0:
        return optax.cosine_decay_schedule(1.0, steps, alpha=0.0)
    return optax.warmup_cosine_decay_schedule(start, 1.0, warmup, steps, end_value=0.0)


def _shape(
    kind: str, fraction: float, total_steps: int, cycle_steps: int | None, start: float
) -> optax.Schedule:
    """The schedule's shape relative to the learning rate (the learning rate multiplies it)."""
    if kind == "constant":
        return optax.constant_schedule(CONSTANT_FACTOR)
    if kind == "cosine":
        return _warmup_cosine(_warmup_steps(fraction, total_steps), total_steps, start)
    cycle = total_steps if cycle_steps is None else int(cycle_steps)
    if cycle < 1:
        raise ValueError(f"cycle_steps={cycle} < 1.")
    one_cycle = _warmup_cosine(_warmup_steps(fraction, cycle), cycle, start)
    return lambda step: one_cycle(step % cycle)


def make_schedule(
    hparam_values: Mapping[str, Any], total_steps: int, *, cycle_steps: int | None = None
) -> optax.Schedule:
    """The learning-rate schedule of a path's hyperparameters (mu3Net's `get_optimizer`).

    "constant": half the learning rate throughout, no warmup (the notebooks' choice, so
    that its mean matches the decaying schedules'); "cosine": linear warmup from
    lr * warmup_start (mu3Net's lr / 1000 by default) to lr, then cosine decay to 0 at
    `total_steps`; "restarts": the
    warmup+cosine shape repeated every `cycle_steps` steps (the notebooks restart at
    each validation). Warmup lasts int(warmup * steps) steps. The learning rate
    multiplies the shape, so it may be a traced scalar (one compiled step serves every
    learning rate).

    Args:
      hparam_values: `HParamSpace.values(...)`: "lr", "schedule", "warmup" (fraction of
        the steps, of each cycle for "restarts"; unused by "constant"), optionally
        "warmup_start" (the warmup's first learning rate over lr; default
        `WARMUP_START`).
      total_steps: steps the candidate trains (V x B).
      cycle_steps: length of a restart cycle (default `total_steps`: one cycle).

    Returns:
      step -> learning rate.

    Raises:
      ValueError: an unknown schedule or a non-positive step count.
    """
    kind = str(hparam_values.get("schedule", "cosine"))
    if kind not in SCHEDULES:
        raise ValueError(f"Unknown schedule {kind!r}; expected one of {SCHEDULES}.")
    if total_steps < 1:
        raise ValueError(f"total_steps={total_steps} < 1.")
    lr = hparam_values["lr"]
    start = float(hparam_values.get("warmup_start", WARMUP_START))
    if not 0.0 < start <= 1.0:
        raise ValueError(f"warmup_start={start} must be in (0, 1] (a fraction of lr).")
    shape = _shape(kind, float(hparam_values.get("warmup", 0.0)), total_steps, cycle_steps, start)
    return lambda step: lr * shape(step)


def make_optimizer(
    hparam_values: Mapping[str, Any],
    total_steps: int,
    trainable_mask: Any = None,
    *,
    cycle_steps: int | None = None,
) -> optax.GradientTransformation:
    """The notebooks' optimiser: clip by global norm 1, then SGD with momentum and a schedule.

    With a mask, frozen leaves get a zero update and no optimizer memory: the chain runs
    under `optax.multi_transform` on the trainable leaves only (the global norm is the
    trainable gradients'), and frozen leaves go to `optax.set_to_zero()`.

    Args:
      hparam_values: "lr", "schedule", "warmup" (see `make_schedule`), "momentum" (None:
        plain SGD, no momentum state), "nesterov".
      total_steps: steps the candidate trains (the cosine's length).
      trainable_mask: a pytree of bools shaped like the parameters (True = train), or a
        callable of the parameters returning one; None trains every leaf.
      cycle_steps: restart period of the "restarts" schedule.

    Returns:
      The gradient transformation.
    """
    momentum = hparam_values.get("momentum")
    tx = optax.chain(
        optax.clip_by_global_norm(1.0),
        optax.sgd(
            make_schedule(hparam_values, total_steps, cycle_steps=cycle_steps),
            momentum=momentum,
            nesterov=bool(hparam_values.get("nesterov", False)) and momentum is not None,
        ),
    )
    if trainable_mask is None:
        return tx

    def labels(params: Any) -> Any:
        mask = trainable_mask(params) if callable(trainable_mask) else trainable_mask
        return jax.tree_util.tree_map(lambda t: TRAIN_LABEL if t else FROZEN_LABEL, mask)

    return optax.multi_transform({TRAIN_LABEL: tx, FROZEN_LABEL: optax.set_to_zero()}, labels)


def _is_keyed_by(keys: frozenset[str]) -> Callable[[Any], bool]:
    return lambda node: isinstance(node, dict) and frozenset(node) == keys and bool(keys)


def rekey_opt_state(opt_state: Any, keys: Collection[str], mapping: Mapping[str, str]) -> Any:
    """Renames the top-level keys of every parameter-shaped tree inside an optimizer state.

    Args:
      opt_state: an optax state over a dict of parameters keyed by `keys`.
      keys: the parameter dict's keys.
      mapping: old key -> new key (every key of `keys`).

    Returns:
      The state with those dicts keyed by `mapping`'s values (other leaves as they are).
    """
    is_param_tree = _is_keyed_by(frozenset(keys))
    return jax.tree_util.tree_map(
        lambda node: {mapping[k]: v for k, v in node.items()} if is_param_tree(node) else node,
        opt_state,
        is_leaf=is_param_tree,
    )


def inherit_opt_state(
    fresh_state: Any,
    parent_state: Any,
    sources: Mapping[str, str],
    *,
    child_ids: Collection[str],
    parent_ids: Collection[str],
) -> Any:
    """A child's optimizer state whose cloned components start from their parent's (mu2Net+).

    Both states are optax states over dicts keyed by component id (as
    `CandidateResult.opt_state`). Every parameter-shaped dict of the child's state takes,
    for each child id cloned from a parent id, the parent's subtree at the same place,
    when the two optimisers have the same structure there and the shapes agree;
    everything else (step counts, fresh or grown components, a changed optimiser such as
    momentum switched on) keeps the fresh state.

    Args:
      fresh_state: the child's freshly initialised state.
      parent_state: the parent's final state (None: nothing to inherit).
      sources: child component id -> parent component id (`MutationPlan.clones`).
      child_ids: the child's trainable ids (the keys of its parameter dicts).
      parent_ids: the parent's trainable ids.

    Returns:
      The child's initial state.
    """
    if parent_state is None or not sources:
        return fresh_state
    is_child = _is_keyed_by(frozenset(child_ids))
    is_parent = _is_keyed_by(frozenset(parent_ids))
    child_nodes, child_def = jax.tree_util.tree_flatten(fresh_state, is_leaf=is_child)
    parent_nodes, parent_def = jax.tree_util.tree_flatten(parent_state, is_leaf=is_parent)
    if cast(Any, child_def) != parent_def:  # the stubs type PyTreeDef loosely
        return fresh_state
    merged = []
    for child, parent in zip(child_nodes, parent_nodes, strict=True):
        if not (is_child(child) and is_parent(parent)):
            merged.append(child)
            continue
        node = dict(child)
        for child_id, parent_id in sources.items():
            if child_id in node and parent_id in parent:
                if path_model.signature(node[child_id]) == path_model.signature(parent[parent_id]):
                    node[child_id] = parent[parent_id]
        merged.append(node)
    return jax.tree_util.tree_unflatten(child_def, merged)


# Callers name the path's forward pass `candidate.forward`.
forward = path_model.forward


@dataclasses.dataclass(frozen=True)
class OptimizerSettings:
    """The optimiser settings a compiled step depends on (the learning rate does not).

    Attributes:
      schedule: "constant", "cosine" or "restarts".
      warmup: the warmup fraction.
      warmup_start: the warmup's first learning rate over lr.
      momentum: whether SGD uses momentum (its value is a traced argument).
      nesterov: Nesterov momentum.
      total_steps: steps the candidate trains.
      cycle_steps: the restart period (validation interval).
    """

    schedule: str
    warmup: float
    momentum: bool
    nesterov: bool
    total_steps: int
    cycle_steps: int
    warmup_start: float = WARMUP_START

    @classmethod
    def from_values(
        cls, hparam_values: Mapping[str, Any], total_steps: int, cycle_steps: int
    ) -> OptimizerSettings:
        """Reads the static settings from resolved hyperparameter values."""
        return cls(
            schedule=str(hparam_values.get("schedule", "cosine")),
            warmup=float(hparam_values.get("warmup", 0.0)),
            momentum=hparam_values.get("momentum") is not None,
            nesterov=bool(hparam_values.get("nesterov", False)),
            total_steps=int(total_steps),
            cycle_steps=int(cycle_steps),
            warmup_start=float(hparam_values.get("warmup_start", WARMUP_START)),
        )

    def optimizer(self, lr: Any, momentum: Any) -> optax.GradientTransformation:
        """`make_optimizer` with these settings and (possibly traced) lr and momentum."""
        values = {
            "lr": lr,
            "schedule": self.schedule,
            "warmup": self.warmup,
            "momentum": momentum if self.momentum else None,
            "nesterov": self.nesterov,
            "warmup_start": self.warmup_start,
        }
        return make_optimizer(values, self.total_steps, cycle_steps=self.cycle_steps)

    def injected(self) -> optax.GradientTransformation:
        """`optimizer` with the learning rate (and momentum) kept as values of its state.

        `optax.inject_hyperparams` holds them in the state's `hyperparams` (set by
        `with_hyperparams`), so one compiled step serves every value; its `inner_state`
        is `optimizer`'s state.
        """
        if self.momentum:
            return optax.inject_hyperparams(self.optimizer)(lr=1.0, momentum=0.0)
        return optax.inject_hyperparams(lambda lr: self.optimizer(lr, None))(lr=1.0)


def with_hyperparams(
    trainer: trainer_lib.Trainer,
    state: trainer_lib.TrainState,
    hparam_values: Mapping[str, Any],
    inner_state: Any = None,
) -> trainer_lib.TrainState:
    """A train state of an `OptimizerSettings.injected` optimizer with the given values.

    Args:
      trainer: the trainer whose state it is (its shardings place the values).
      state: the state (e.g. `trainer.state_from_params`).
      hparam_values: "lr" and "momentum" (None or missing: 0, unused without momentum).
      inner_state: the optimizer's inner state to start from (None: keep the state's).

    Returns:
      the state with those values in its optimizer state.
    """
    opt_state = state.opt_state
    shardings = trainer.state_shardings.opt_state
    values = {"lr": hparam_values["lr"], "momentum": hparam_values.get("momentum") or 0.0}
    hyperparams = {
        name: jax.device_put(np.float32(values[name]), shardings.hyperparams[name])
        for name in opt_state.hyperparams
    }
    opt_state = opt_state._replace(hyperparams=hyperparams)
    if inner_state is not None:
        opt_state = opt_state._replace(
            inner_state=jax.device_put(inner_state, shardings.inner_state)
        )
    return dataclasses.replace(state, opt_state=opt_state)


def _slots_to_ids(opt_state: Any, slots: Collection[str], id_of: Mapping[str, str]) -> Any:
    """An optimizer state over a path's slots (frozen ones None) as one over trainable ids."""
    is_tree = _is_keyed_by(frozenset(slots))

    def rekey(node: Any) -> Any:
        return {id_of[s]: v for s, v in node.items() if s in id_of} if is_tree(node) else node

    return jax.tree_util.tree_map(rekey, opt_state, is_leaf=is_tree)


def _ids_to_slots(opt_state: Any, slots: Sequence[str], id_of: Mapping[str, str]) -> Any:
    """The inverse of `_slots_to_ids` (frozen slots None again)."""
    is_tree = _is_keyed_by(frozenset(id_of.values()))

    def rekey(node: Any) -> Any:
        return {s: node[id_of[s]] if s in id_of else None for s in slots} if is_tree(node) else node

    return jax.tree_util.tree_map(rekey, opt_state, is_leaf=is_tree)


def _device_key(device: jax.Device) -> tuple[int, ...]:
    return (device.id,)


class StepCache:
    """Trainers of candidate paths, shared by candidates with the same signature.

    A `training.trainer.Trainer` compiles each of its steps once, on first use, so the
    candidates that share a trainer share its executables. A train trainer is keyed by the
    config, the slots, the trainable slots, the `OptimizerSettings`, the shapes and dtypes
    of the parameters and of the batch, and the device (the learning rate and momentum are
    values of the train state, not of the program); an eval trainer by the config, the
    slots, the shapes and the device, so the candidates of one architecture share the
    validation's executable whatever they train. Candidates of a generation train in
    threads (one per device); building a trainer is serialised.

    Attributes:
      train_signatures: train trainers built so far.
      eval_signatures: eval trainers built so far.
    """

    def __init__(self) -> None:
        """Starts empty."""
        self._train: dict[Any, trainer_lib.Trainer] = {}
        self._eval: dict[Any, trainer_lib.Trainer] = {}
        self.train_signatures = 0
        self.eval_signatures = 0
        self._lock = threading.Lock()

    def clear(self) -> None:
        """Drops every trainer and its compiled steps (counters are kept)."""
        with self._lock:
            self._train.clear()
            self._eval.clear()

    def train_trainer(
        self,
        config: families.ModelConfig,
        slots: tuple[str, ...],
        trainable_slots: Collection[str],
        settings: OptimizerSettings,
        params: Mapping[str, Params],
        batch: Batch,
        device: jax.Device,
    ) -> trainer_lib.Trainer:
        """The trainer of a path whose `trainable_slots` train (built on first use).

        Args:
          config: the path's config.
          slots: its slots in order.
          trainable_slots: the slots that train (the others are frozen).
          settings: the optimizer's static settings (`OptimizerSettings.injected`).
          params: slot -> parameters (only shapes and dtypes are read).
          batch: a train batch (only shapes and dtypes are read).
          device: the device it trains on.

        Returns:
          the trainer.
        """
        trainable = tuple(slot for slot in slots if slot in trainable_slots)
        key: tuple[Any, ...] = (config, slots, trainable, settings, path_model.signature(params))
        key += (path_model.signature(batch), _device_key(device))

        def build() -> trainer_lib.Trainer:
            self.train_signatures += 1
            mask = {slot: slot in trainable for slot in slots}
            return _trainer(config, slots, params, batch, device, settings.injected(), mask)

        return self._get(self._train, key, build)

    def eval_trainer(
        self,
        config: families.ModelConfig,
        slots: tuple[str, ...],
        params: Mapping[str, Params],
        batch: Batch,
        device: jax.Device,
    ) -> trainer_lib.Trainer:
        """The trainer whose `evaluate` validates a path (built on first use).

        Args:
          config: the path's config.
          slots: its slots in order.
          params: slot -> parameters (only shapes and dtypes are read).
          batch: an eval batch (only shapes and dtypes are read).
          device: the device it runs on.

        Returns:
          the trainer (its optimizer is never used).
        """
        key: tuple[Any, ...] = (config, slots, path_model.signature(params))
        key += (path_model.signature(batch), _device_key(device))

        def build() -> trainer_lib.Trainer:
            self.eval_signatures += 1
            return _trainer(config, slots, params, batch, device, optax.identity(), None)

        return self._get(self._eval, key, build)

    def _get(
        self, table: dict[Any, trainer_lib.Trainer], key: Any, build: Any
    ) -> trainer_lib.Trainer:
        with self._lock:
            if key not in table:
                table[key] = build()
            return table[key]


def _trainer(
    config: families.ModelConfig,
    slots: tuple[str, ...],
    params: Mapping[str, Params],
    batch: Batch,
    device: jax.Device,
    optimizer: optax.GradientTransformation,
    mask: Any,
) -> trainer_lib.Trainer:
    """A trainer of the path on one device (no dropout: its key is never used)."""
    model = path_model.PathModel(config, slots, path_model.abstract_tree(params), optimizer)
    return trainer_lib.Trainer(
        model,
        partitioning.Partitioner(devices=[device]),
        {key: np.shape(value) for key, value in batch.items()},
        {key: np.asarray(value).dtype for key, value in batch.items()},
        jax.random.key(0),
        trainable_mask=mask,
    )


_DEFAULT_CACHE = StepCache()


def default_cache() -> StepCache:
    """The process-wide step cache used when a caller passes none."""
    return _DEFAULT_CACHE


@dataclasses.dataclass(frozen=True)
class CandidateResult:
    """What training one candidate produced.

    Attributes:
      params: trainable component id -> its parameters at the best validation (numpy).
      quality: the best validation accuracy.
      best_step: the training step at which it was reached (a multiple of B).
      opt_state: the final optimizer state, its parameter trees keyed by component id
        (what the candidate's children inherit, `inherit_opt_state`).
      validations: (step, accuracy) for every validation, in order.
      train_losses: mean training loss of each interval of B steps.
      seconds: wall time by phase (`timing.Timer`): "train" (the training steps),
        "eval" (the validations), "compile" (JAX tracing and compiling for this
        candidate); train and eval exclude the compilation inside them.
    """

    params: dict[str, Params]
    quality: float
    best_step: int
    opt_state: Any
    validations: tuple[tuple[int, float], ...]
    train_losses: tuple[float, ...]
    seconds: Mapping[str, float]

    @property
    def train_seconds(self) -> float:
        """Wall time of the training steps (compilation excluded)."""
        return self.seconds.get("train", 0.0)

    @property
    def eval_seconds(self) -> float:
        """Wall time of the validations (compilation excluded)."""
        return self.seconds.get("eval", 0.0)

    @property
    def compile_seconds(self) -> float:
        """Wall time spent tracing and compiling for this candidate."""
        return self.seconds.get(timing.COMPILE, 0.0)


def _train_batch(batch: Batch) -> dict[str, np.ndarray]:
    """The label and the input features a family reads (images float32, token ids int32)."""
    out = {"label": np.asarray(batch["label"])}
    for key, dtype in families.input_keys().items():
        if key in batch:
            out[key] = np.asarray(batch[key], dtype)
    return out


def _eval_batch(batch: Batch) -> dict[str, np.ndarray]:
    out = _train_batch(batch)
    mask = batch.get(path_model.MASK_KEY)
    rows = len(out["label"])
    out[path_model.MASK_KEY] = np.ones(rows, np.int32) if mask is None else np.asarray(mask)
    return out


def _default_device(device: jax.Device | None) -> jax.Device:
    return device if device is not None else jax.local_devices()[0]


def _accuracy_of(
    cache: StepCache,
    config: families.ModelConfig,
    slots: tuple[str, ...],
    params: Mapping[str, Params],
    batches: Sequence[Batch],
    device: jax.Device,
) -> Callable[[Any], float]:
    """The accuracy on `batches` (placed on the device once) of params, by an eval trainer."""
    if not batches:
        return lambda params: 0.0
    eval_batches = [_eval_batch(batch) for batch in batches]
    trainer = cache.eval_trainer(config, slots, params, eval_batches[0], device)
    placed = jax.device_put(eval_batches, trainer.partitioner.batch_sharding)
    return lambda params: trainer.evaluate(params, iter(placed)).get("accuracy", 0.0)


def validate(
    config: families.ModelConfig,
    slots: Sequence[str],
    params_by_slot: Mapping[str, Params],
    batches: Sequence[Batch],
    *,
    cache: StepCache | None = None,
    device: jax.Device | None = None,
) -> float:
    """Accuracy of a path's parameters on validation batches (rows with `_mask` 0 skipped).

    Args:
      config: the path's config.
      slots: the path's slots in order.
      params_by_slot: slot -> parameters.
      batches: batches with the family's input ("image" or "inputs"), "label" and
        optionally "_mask".
      cache: the step cache (default: the process-wide one).
      device: where to run (None: the default device).

    Returns:
      The fraction of correctly classified examples (0 when there are none).
    """
    slots = tuple(slots)
    params = nn.unbox({slot: params_by_slot[slot] for slot in slots})
    device = _default_device(device)
    accuracy = _accuracy_of(cache or _DEFAULT_CACHE, config, slots, params, batches, device)
    return accuracy(jax.device_put(params, device))


def train_candidate(
    *,
    config: families.ModelConfig,
    components: Sequence[tuple[str, str]],
    pool: Mapping[str, Params],
    trainable_ids: Collection[str],
    hparam_values: Mapping[str, Any],
    train_batches: Iterator[Batch],
    validation_batches: Sequence[Batch],
    num_validations: int,
    steps_per_validation: int,
    parent_opt_state: Any = None,
    parent_trainable_ids: Collection[str] = (),
    clone_sources: Mapping[str, str] | None = None,
    cache: StepCache | None = None,
    device: jax.Device | None = None,
) -> CandidateResult:
    """Trains a candidate path for V x B steps and keeps its best-validation parameters.

    The path trains as a `path_model.PathModel` through `training.loop.run`, validated
    every B steps by `loop.KeepBest`. Only the components in `trainable_ids` are
    differentiated and updated (the trainer's mask); the others are read from `pool` and
    never written. The trainer, and so its compiled steps, is taken from `cache`.

    Args:
      config: the path's config (adapters are sized from their parameters).
      components: the path's (slot, component_id) pairs in order (`system.Path.components`).
      pool: component id -> parameters, for every referenced id (frozen ones and the
        candidate's new ones, e.g. from `mutations.materialize`).
      trainable_ids: the ids the candidate trains (`MutationPlan.trainable_ids`).
      hparam_values: `HParamSpace.values(...)` of the candidate ("lr", "schedule",
        "warmup", "momentum", "nesterov").
      train_batches: batches (the family's input, "image" [B, H, W, C] float or
        "inputs" [B, L] int32, and "label" [B] int) of one shape.
      validation_batches: batches (optionally with "_mask"), evaluated every B steps.
      num_validations: V.
      steps_per_validation: B.
      parent_opt_state: the parent's `CandidateResult.opt_state` (mu2Net+), or None.
      parent_trainable_ids: the parent's trainable ids (the keys of its state).
      clone_sources: new id -> parent id of cloned components (`MutationPlan.clones`).
      cache: the step cache (default: the process-wide one).
      device: where to train (None: the default device); candidates of a generation
        train on different devices at once.

    Returns:
      The result (best-validation parameters of the trainable components only).

    Raises:
      ValueError: bad V or B, a trainable id not in the path or in two slots, or the
        train iterator ran out.
    """
    if num_validations < 1 or steps_per_validation < 1:
        raise ValueError(f"V={num_validations} and B={steps_per_validation} must be >= 1.")
    cache = cache or _DEFAULT_CACHE
    device = _default_device(device)
    timer = timing.Timer()
    slots = tuple(slot for slot, _ in components)
    trainable_set = set(trainable_ids)
    slot_of: dict[str, str] = {}
    for slot, component_id in components:
        if component_id in trainable_set:
            if component_id in slot_of:
                raise ValueError(f"Trainable component {component_id!r} fills two slots.")
            slot_of[component_id] = slot
    missing = trainable_set - set(slot_of)
    if missing:
        raise ValueError(f"Trainable ids {sorted(missing)} are not in the path.")
    id_of = {slot: component_id for component_id, slot in slot_of.items()}
    params = nn.unbox({slot: pool[cid] for slot, cid in components})
    batches = (_train_batch(batch) for batch in train_batches)
    first = next(batches, None)
    if first is None:
        raise ValueError("The train batches ran out.")

    total_steps = num_validations * steps_per_validation
    settings = OptimizerSettings.from_values(hparam_values, total_steps, steps_per_validation)
    with timer.phase("train"):
        trainer = cache.train_trainer(config, slots, id_of.keys(), settings, params, first, device)
        accuracy = _accuracy_of(cache, config, slots, params, validation_batches, device)
        state = trainer.state_from_params(params)
        inner_state = None
        if parent_opt_state is not None and clone_sources and id_of:
            fresh = _slots_to_ids(jax.device_get(state.opt_state.inner_state), slots, id_of)
            inherited = inherit_opt_state(
                fresh,
                parent_opt_state,
                clone_sources,
                child_ids=slot_of.keys(),
                parent_ids=parent_trainable_ids,
            )
            inner_state = _ids_to_slots(inherited, slots, id_of)
        state = with_hyperparams(trainer, state, hparam_values, inner_state)

        def validate_params(params: Any) -> float:
            with timer.phase("eval"):
                return accuracy(params)

        keep = loop.KeepBest(steps_per_validation, validate_params)
        progress = loop.run(
            loop.Progress.start(trainer, state),
            loop.single_steps(itertools.chain([first], batches)),
            total_steps,
            [keep],
        )
        best = jax.device_get(keep.best_params)
        opt_state = jax.device_get(progress.state.opt_state.inner_state)

    return CandidateResult(
        params={id_of[slot]: best[slot] for slot in id_of},
        quality=keep.best_quality,
        best_step=keep.best_step,
        opt_state=_slots_to_ids(opt_state, slots, id_of),
        validations=tuple(keep.validations),
        train_losses=tuple(keep.train_losses),
        seconds=dict(timer.seconds),
    )
