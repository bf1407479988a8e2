"""Training one candidate path: its own components train, everything it shares stays frozen.

A candidate (a planned child, evolution/search/mutations.py) trains V x B steps on its task,
validating every B steps, and keeps the parameters of its best validation (muNet; the
score's quality is that best accuracy). Only the candidate's new components (clones,
fresh heads and adapters, grown blocks) are differentiated and updated; the components
it references are an input of the step that nothing writes back, so a published path
never changes. The optimiser is the notebooks': clip by global norm 1, then SGD with
(optionally Nesterov) momentum and a constant, warmup+cosine or cosine-with-restarts
schedule (`make_optimizer`).

Compiled steps are reused across candidates (`StepCache`): parameter trees inside the
step are keyed by slot, not by component id, and the learning rate and momentum are
traced arguments, so every candidate with the same architecture, the same trainable
slots and the same static optimiser settings (schedule kind, warmup steps, Nesterov,
momentum on/off, step count) runs the same executable. mu2Net+ inheritance of
optimizer state goes through `inherit_opt_state`, keyed by component id.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from typing import Any, cast

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from evolution.search import mutations, timing
from evolution.system import families
from models import adapters

Params = Any
Batch = Mapping[str, Any]

SCHEDULES = ("constant", "cosine", "restarts")
TRAIN_LABEL = "train"
FROZEN_LABEL = "frozen"


def _warmup_steps(fraction: float, steps: int) -> int:
    """Warmup steps of a schedule of `steps` steps (never all of them)."""
    return min(int(round(float(fraction) * steps)), max(steps - 1, 0))


def _warmup_cosine(warmup: int, steps: int) -> optax.Schedule:
    """Linear warmup from 0 to 1 over `warmup` steps, then cosine decay to 0 at `steps`."""
    if warmup <= 0:
        return optax.cosine_decay_schedule(1.0, steps, alpha=0.0)
    return optax.warmup_cosine_decay_schedule(0.0, 1.0, warmup, steps, end_value=0.0)


def _shape(kind: str, fraction: float, total_steps: int, cycle_steps: int | None) -> optax.Schedule:
    """The schedule's shape with a peak of 1 (the learning rate multiplies it)."""
    if kind == "constant":
        warmup = _warmup_steps(fraction, total_steps)
        if warmup == 0:
            return optax.constant_schedule(1.0)
        return optax.join_schedules(
            [optax.linear_schedule(0.0, 1.0, warmup), optax.constant_schedule(1.0)], [warmup]
        )
    if kind == "cosine":
        return _warmup_cosine(_warmup_steps(fraction, total_steps), total_steps)
    cycle = total_steps if cycle_steps is None else int(cycle_steps)
    if cycle < 1:
        raise ValueError(f"cycle_steps={cycle} < 1.")
    one_cycle = _warmup_cosine(_warmup_steps(fraction, cycle), cycle)
    return lambda step: one_cycle(step % cycle)


def make_schedule(
    hparam_values: Mapping[str, Any], total_steps: int, *, cycle_steps: int | None = None
) -> optax.Schedule:
    """The learning-rate schedule of a path's hyperparameters.

    "constant": linear warmup to the learning rate, then constant; "cosine": linear
    warmup, then cosine decay to 0 at `total_steps`; "restarts": the warmup+cosine
    shape repeated every `cycle_steps` steps (the notebooks restart at each validation).
    The learning rate multiplies a peak-1 shape, so it may be a traced scalar (one
    compiled step serves every learning rate).

    Args:
      hparam_values: `HParamSpace.values(...)`: "lr", "schedule", "warmup" (fraction of
        the steps, of each cycle for "restarts").
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
    shape = _shape(kind, float(hparam_values.get("warmup", 0.0)), total_steps, cycle_steps)
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


def _signature(tree: Any) -> tuple[Any, ...]:
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    return (treedef, tuple((tuple(np.shape(x)), str(jnp.result_type(x))) for x in leaves))


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
                if _signature(node[child_id]) == _signature(parent[parent_id]):
                    node[child_id] = parent[parent_id]
        merged.append(node)
    return jax.tree_util.tree_unflatten(child_def, merged)


def forward(
    config: families.ModelConfig,
    slots: Sequence[str],
    params_by_slot: Mapping[str, Params],
    inputs: Any,
) -> jax.Array:
    """Runs a path's components (including residual adapters) on a batch of inputs.

    The components are applied by the config's family (`evolution.system.families`); a
    residual adapter (slot "adapter_i") maps the running activation to itself plus its
    bottleneck branch, whatever the family.

    Args:
      config: the path's config (`vit.ViTConfig`, `encoder.EncoderConfig`).
      slots: the path's slots in order ("embed", ..., "adapter_0", "block_0", ..., "head").
      params_by_slot: slot -> the component's (unboxed) parameters.
      inputs: the family's input feature: [B, H, W, C] float images (ViT) or [B, L]
        int32 token ids, 0 = padding (encoder).

    Returns:
      Logits [B, classes].
    """
    family = families.family_of(config)
    context = family.context(config, inputs)
    x = inputs
    for slot in slots:
        params = params_by_slot[slot]
        if mutations.slot_kind(slot) == "adapter":
            size = int(np.shape(params["down"]["kernel"])[-1])
            x = adapters.ResidualAdapter(config, size).apply({"params": params}, x)
        else:
            x = family.apply_component(config, slot, params, x, context)
    return x


@dataclasses.dataclass(frozen=True)
class OptimizerSettings:
    """The optimiser settings a compiled step depends on (the learning rate does not).

    Attributes:
      schedule: "constant", "cosine" or "restarts".
      warmup: the warmup fraction.
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
        )

    def optimizer(self, lr: Any, momentum: Any) -> optax.GradientTransformation:
        """`make_optimizer` with these settings and (possibly traced) lr and momentum."""
        values = {
            "lr": lr,
            "schedule": self.schedule,
            "warmup": self.warmup,
            "momentum": momentum if self.momentum else None,
            "nesterov": self.nesterov,
        }
        return make_optimizer(values, self.total_steps, cycle_steps=self.cycle_steps)


class StepCache:
    """Compiled train and eval steps, shared by candidates with the same signature.

    A train step is keyed by the config, the slots, the trainable slots, the shapes and
    dtypes of the trainable and frozen trees and of the batch, and the
    `OptimizerSettings`; an eval step by the config, the slots and the shapes of the
    merged parameters and of the batch. Each key is lowered and compiled once (ahead of
    time, so the counters are exact, and timed as the "compile" phase of the calling
    thread's `timing.Timer`); `clear` drops them.

    Attributes:
      train_compilations: train steps compiled so far.
      eval_compilations: eval steps compiled so far.
    """

    def __init__(self) -> None:
        """Starts empty."""
        self._train: dict[Any, Any] = {}
        self._eval: dict[Any, Any] = {}
        self.train_compilations = 0
        self.eval_compilations = 0
        # Candidates of a generation train in threads (one per device): compilation is
        # serialised.
        self._lock = threading.RLock()

    def clear(self) -> None:
        """Drops every compiled step (counters are kept)."""
        self._train.clear()
        self._eval.clear()

    def train_step(
        self,
        config: families.ModelConfig,
        slots: tuple[str, ...],
        settings: OptimizerSettings,
        args: tuple[Any, ...],
    ) -> Any:
        """The compiled train step for these arguments (compiled on first use).

        The step maps (trainable, frozen, opt_state, batch, lr, momentum, loss_sum) to
        (trainable, opt_state, loss_sum + this batch's mean loss).
        """
        trainable, frozen, _, batch = args[:4]
        key: tuple[Any, ...] = (config, slots, settings, _signature(trainable))
        key += (_signature(frozen), _signature(batch), _device_of(trainable, frozen))
        with self._lock:
            if key in self._train:
                return self._train[key]

            def loss_fn(trainable: Params, frozen: Params, batch: Batch) -> jax.Array:
                inputs = batch[families.family_of(config).input_key]
                logits = forward(config, slots, {**frozen, **trainable}, inputs)
                losses = optax.softmax_cross_entropy_with_integer_labels(
                    logits.astype(jnp.float32), batch["label"]
                )
                return jnp.mean(losses)

            def step(trainable, frozen, opt_state, batch, lr, momentum, loss_sum):
                loss, grads = jax.value_and_grad(loss_fn)(trainable, frozen, batch)
                tx = settings.optimizer(lr, momentum)
                updates, opt_state = tx.update(grads, opt_state, trainable)
                return optax.apply_updates(trainable, updates), opt_state, loss_sum + loss

            self._train[key] = self._compile(step, args)
            self.train_compilations += 1
            return self._train[key]

    def eval_step(
        self, config: families.ModelConfig, slots: tuple[str, ...], args: tuple[Any, ...]
    ) -> Any:
        """The compiled eval step: (params_by_slot, batch, correct, count) -> sums so far."""
        key = (config, slots, _signature(args[0]), _signature(args[1]), _device_of(args[0]))
        with self._lock:
            if key in self._eval:
                return self._eval[key]

            def step(params, batch, correct, count):
                logits = forward(config, slots, params, batch[families.family_of(config).input_key])
                hits = (jnp.argmax(logits, axis=-1) == batch["label"]).astype(jnp.float32)
                mask = batch["_mask"].astype(jnp.float32)
                return correct + jnp.sum(hits * mask), count + jnp.sum(mask)

            self._eval[key] = self._compile(step, args)
            self.eval_compilations += 1
            return self._eval[key]

    def _compile(self, fn: Callable[..., Any], args: tuple[Any, ...]) -> Any:
        with timing.phase("compile"):
            return jax.jit(fn).lower(*args).compile()


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
        "eval" (the validations), "compile" (new steps compiled for this candidate);
        train and eval exclude the compilation inside them.
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
        """Wall time spent compiling new steps for this candidate."""
        return self.seconds.get("compile", 0.0)


def _train_batch(batch: Batch) -> dict[str, np.ndarray]:
    """The label and the input features a family reads (images float32, token ids int32)."""
    out = {"label": np.asarray(batch["label"])}
    for key, dtype in families.input_keys().items():
        if key in batch:
            out[key] = np.asarray(batch[key], dtype)
    return out


def _eval_batch(batch: Batch) -> dict[str, np.ndarray]:
    out = _train_batch(batch)
    mask = batch.get("_mask")
    out["_mask"] = np.ones(len(out["label"]), np.int32) if mask is None else np.asarray(mask)
    return out


def _to_device(tree: Any, device: jax.Device | None = None) -> Any:
    """The (unboxed) tree as arrays on `device` (None: the default device)."""
    if device is None:
        return jax.tree_util.tree_map(jnp.asarray, nn.unbox(tree))
    return jax.device_put(nn.unbox(tree), device)


def _device_of(*trees: Any) -> Any:
    """The device a step's arguments live on (part of a compiled step's key)."""
    for leaf in jax.tree_util.tree_leaves(trees):
        if isinstance(leaf, jax.Array):
            return tuple(sorted(d.id for d in leaf.devices()))
    return None


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
    cache = cache or _DEFAULT_CACHE
    params = _to_device({slot: params_by_slot[slot] for slot in slots}, device)
    correct = _to_device(np.zeros((), np.float32), device)
    count = _to_device(np.zeros((), np.float32), device)
    for batch in batches:
        args = (params, _to_device(_eval_batch(batch), device), correct, count)
        correct, count = cache.eval_step(config, tuple(slots), args)(*args)
    total = float(count)
    return float(correct) / total if total else 0.0


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

    Only the components in `trainable_ids` are differentiated and updated; the others are
    read from `pool` and never written. The compiled step is taken from `cache`.

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
    trainable = _to_device({slot: pool[cid] for cid, slot in slot_of.items()}, device)
    frozen = _to_device({s: pool[cid] for s, cid in components if cid not in trainable_set}, device)

    total_steps = num_validations * steps_per_validation
    settings = OptimizerSettings.from_values(hparam_values, total_steps, steps_per_validation)
    opt_state = settings.optimizer(float(hparam_values["lr"]), 0.0).init(trainable)
    if parent_opt_state is not None and clone_sources and trainable:
        by_id = rekey_opt_state(opt_state, id_of.keys(), id_of)
        by_id = inherit_opt_state(
            by_id,
            parent_opt_state,
            clone_sources,
            child_ids=slot_of.keys(),
            parent_ids=parent_trainable_ids,
        )
        opt_state = rekey_opt_state(by_id, slot_of.keys(), slot_of)
    opt_state = _to_device(opt_state, device)
    lr = np.float32(hparam_values["lr"])
    momentum = np.float32(hparam_values.get("momentum") or 0.0)

    best_params, best_quality, best_step = trainable, -1.0, 0
    validations: list[tuple[int, float]] = []
    losses: list[float] = []
    for validation in range(num_validations):
        loss_sum = _to_device(np.zeros((), np.float32), device)
        with timer.phase("train"):
            for _ in range(steps_per_validation):
                try:
                    batch = _to_device(_train_batch(next(train_batches)), device)
                except StopIteration as error:
                    raise ValueError("The train batches ran out.") from error
                args = (trainable, frozen, opt_state, batch, lr, momentum, loss_sum)
                step = cache.train_step(config, slots, settings, args)
                trainable, opt_state, loss_sum = step(*args)
            losses.append(float(loss_sum) / steps_per_validation)

        with timer.phase("eval"):
            quality = validate(
                config,
                slots,
                {**frozen, **trainable},
                validation_batches,
                cache=cache,
                device=device,
            )
        step_number = (validation + 1) * steps_per_validation
        validations.append((step_number, quality))
        if quality > best_quality:
            best_params, best_quality, best_step = trainable, quality, step_number

    return CandidateResult(
        params={id_of[slot]: p for slot, p in jax.device_get(best_params).items()},
        quality=best_quality,
        best_step=best_step,
        opt_state=jax.device_get(rekey_opt_state(opt_state, slot_of.values(), id_of)),
        validations=tuple(validations),
        train_losses=tuple(losses),
        seconds=dict(timer.seconds),
    )
