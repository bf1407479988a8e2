"""Multipath agents: a router over P frozen paths, only the router and connectors train.

For a task, P in {2, 3} published paths run side by side, all frozen: path_0 is one of
the task's own paths, with its head (its logits z_0); every other path is another
task's published path run without its head, its pooled pre-logit features (the head's
own pooling of the last representation) mapped to the task's classes by a connector
Dense(num_classes) that starts at zero (z_p). A per-sample router reads path_0's logits:

    r = softmax(Dense_P(LayerNorm(z_0)))        kernel 0, bias log([w0, (1-w0)/(P-1), ...])
    r <- m * r + (1 - m) * sg(r)                 m = 0.05: the router learns m times slower
    y = sum_p r_p * sg(z_p) + sum_p z_p - sg(sum_p z_p)

The value of y is the mixture sum_p r_p z_p; each connector receives dL/dy unweighted
(the second and third terms), the router only through r. With zero connectors, y starts
at w0 * z_0: the same classes as path_0 (its quality), on a smaller logit scale.

Only the router and the connectors are trained (SGD with the candidates' optimiser,
`candidate.make_optimizer`). The model trains like every other run: a
`training.trainer.Trainer` whose mask freezes the paths' parameters (no gradient, no
optimizer state, returned bit for bit), in `training.loop.run` with `loop.KeepBest`.
Validation runs at step 0 too and the best-validation parameters are kept, so the
result's quality is never below path_0's on the same batches.

`publish_result` stores a model that beats path_0 on validation as its task's router
path (`evolution.search.paths.router_path`): a path like any other, whose components are the
members' (referenced, so locked) plus the new connectors and router. Inference, the
exported system model and the immunity check serve it as the task's model while it
beats the task's best single path (`SystemState.best_path`); searches never take it as
a parent, seed or member (`SystemState.best_single_path`). `MultipathResult.report`
records a run as JSON.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from evolution import store as store_lib
from evolution.search.paths import candidate, path_model, router_path
from evolution.search.paths.router_path import connector_logits as connector_logits
from evolution.search.paths.router_path import init_connector as init_connector
from evolution.search.paths.router_path import init_router as init_router
from evolution.search.paths.router_path import multipath_logits as multipath_logits
from evolution.search.paths.router_path import router_bias as router_bias
from evolution.search.paths.router_path import router_weights as router_weights
from evolution.system import families
from evolution.system import state as system
from evolution.system.architecture import model_config_of
from training import loop, partitioning
from training import trainer as trainer_lib

Params = Any
Batch = Mapping[str, Any]

MAIN_WEIGHT = router_path.MAIN_WEIGHT  # w0: the router's initial weight on path_0.
GRADIENT_SCALE = router_path.GRADIENT_SCALE  # m: the router's gradient multiplier.
NUM_PATHS = router_path.NUM_PATHS
DEFAULT_HPARAMS: Mapping[str, Any] = {"lr": 0.1, "schedule": "cosine", "momentum": 0.9}


# -- frozen paths (the arithmetic is router_path's, re-exported above) ------------------


def path_features(
    config: families.ModelConfig,
    slots: Sequence[str],
    params_by_slot: Mapping[str, Params],
    inputs: jax.Array,
) -> jax.Array:
    """A path's pooled pre-logit features: every component but the head, then its pooling.

    Args:
      config: the path's config.
      slots: its slots, the last being "head".
      params_by_slot: slot -> parameters (the head's are not read).
      inputs: the family's input feature.

    Returns:
      [B, D] (`router_path.pooled_features`).

    Raises:
      ValueError: the last slot is not "head".
    """
    if not slots or slots[-1] != "head":
        raise ValueError(f"A path's last slot must be 'head'; got {list(slots)}.")
    return router_path.pooled_features(config, slots[:-1], params_by_slot, inputs)


def _member(path: system.Path, index: int) -> router_path.Member:
    """A path as member `index` of a multipath model: member 0 with its head, others without."""
    slots = tuple(slot for slot, _ in path.components if index == 0 or slot != "head")
    return router_path.Member(model_config_of(path), slots)


class _MultipathModel:
    """The multipath model in the trainer's contract: params {"router", "connectors", "paths"}.

    "paths" holds every frozen path's parameters by slot (the trainer's mask freezes
    them); the metrics are the loss, the accuracy and each path's mean router weight
    ("weight_p"), over the rows of `_mask` where a batch has one.
    """

    def __init__(
        self,
        frozen: tuple[router_path.Member, ...],
        abstract_params: Params,
        optimizer: optax.GradientTransformation,
        gradient_scale: float,
    ):
        self.frozen = frozen
        self.optimizer_def = optimizer
        self._abstract_params = abstract_params
        self._gradient_scale = gradient_scale
        self._input_key = families.family_of(frozen[0].config).input_key

    def get_initial_variables(
        self, rng: jax.Array, input_shapes: Mapping, input_types: Mapping
    ) -> dict[str, Any]:
        """Zero parameters of the model's shapes (training starts from given ones)."""
        del rng, input_shapes, input_types
        zeros = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), self._abstract_params)
        return {"params": zeros}

    def loss_fn(self, params: Params, batch: Batch, dropout_rng: Any) -> tuple[jax.Array, Any]:
        """Cross-entropy of y, and the loss, accuracy and mean router weight metrics."""
        del dropout_rng
        logits_0, features = router_path.member_outputs(
            self.frozen, params["paths"], batch[self._input_key]
        )
        y, r_BxP = multipath_logits(
            params["router"],
            params["connectors"],
            logits_0,
            features,
            gradient_scale=self._gradient_scale,
        )
        loss, metrics = path_model.classification_loss(y, batch)
        mask = batch.get(path_model.MASK_KEY)
        rows = None if mask is None else mask > 0
        for p in range(r_BxP.shape[-1]):
            metrics[f"weight_{p}"] = path_model.MaskedMean.from_model_output(r_BxP[:, p], mask=rows)
        return loss, metrics


_TRAINABLE = {"router": True, "connectors": True, "paths": False}


_TRAINERS: dict[Any, trainer_lib.Trainer] = {}
_MAX_TRAINERS = 16  # layouts whose compiled steps are kept (an agent trains one per cycle)


def _trainer(
    frozen: tuple[router_path.Member, ...],
    settings: candidate.OptimizerSettings,
    gradient_scale: float,
    params: Params,
    batch: Batch,
) -> trainer_lib.Trainer:
    """The trainer of one multipath layout on the default device (its steps compile once).

    Args:
      frozen: the paths' configs and slots.
      settings: the optimizer's static settings.
      gradient_scale: m.
      params: the model's parameters (only shapes and dtypes are read).
      batch: a batch with `_mask` (only shapes and dtypes are read).

    Returns:
      the trainer, shared by every run of the same layout.
    """
    key: tuple[Any, ...] = (frozen, settings, gradient_scale)
    key += (path_model.signature(params), path_model.signature(batch))
    if key not in _TRAINERS:
        if len(_TRAINERS) >= _MAX_TRAINERS:
            _TRAINERS.pop(next(iter(_TRAINERS)))
        abstract = path_model.abstract_tree(params)
        model = _MultipathModel(frozen, abstract, settings.injected(), gradient_scale)
        _TRAINERS[key] = trainer_lib.Trainer(
            model,
            partitioning.Partitioner(devices=jax.local_devices()[:1]),
            {name: np.shape(value) for name, value in batch.items()},
            {name: np.asarray(value).dtype for name, value in batch.items()},
            jax.random.key(0),
            trainable_mask=_TRAINABLE,
        )
    return _TRAINERS[key]


# -- companions and training -------------------------------------------------------------


def _input_signature(path: system.Path) -> tuple[str, tuple[int, ...], str]:
    config = model_config_of(path)
    family = families.family_of(config)
    spec = family.input_spec(config)
    return family.name, tuple(spec.shape), str(spec.dtype)


def _body(path: system.Path) -> tuple[tuple[str, str], ...]:
    return tuple(pair for pair in path.components if pair[0] != "head")


def choose_companions(
    state: system.SystemState,
    task: str,
    num_paths: int,
    *,
    main_path: system.Path | None = None,
) -> list[system.Path]:
    """Other tasks' published best paths to combine with a task's own path.

    Candidates are the best single path of every other task (the root task included;
    router paths are never members),
    ranked by their own score (`system.rank_by_score`: unscored, e.g. the root, last;
    ties by generation and id). A candidate is skipped when its input differs from
    path_0's (family, input shape and dtype) or when its headless body (its components
    without the head) equals path_0's or an already chosen one's: it would add no new
    features. Scores of different tasks are not strictly comparable; the ranking is a
    cheap proxy for "well-trained features".

    Args:
      state: the published system.
      task: the task the multipath model is for.
      num_paths: P in {2, 3}.
      main_path: path_0 (default: the task's best single path).

    Returns:
      Up to P - 1 companion paths, best first (fewer when there are not enough).

    Raises:
      ValueError: P not in {2, 3}, or no path_0.
    """
    if num_paths not in NUM_PATHS:
        raise ValueError(f"P={num_paths} not in {NUM_PATHS}.")
    main = main_path or state.best_single_path(task)
    if main is None:
        raise ValueError(f"Task {task!r} has no active path to be path_0.")
    signature = _input_signature(main)
    bodies = {_body(main)}
    others = [state.best_single_path(name) for name in state.task_order() if name != task]
    chosen: list[system.Path] = []
    for path in system.rank_by_score(p for p in others if p is not None):
        if len(chosen) == num_paths - 1:
            break
        if _input_signature(path) != signature or _body(path) in bodies:
            continue
        bodies.add(_body(path))
        chosen.append(path)
    return chosen


@dataclasses.dataclass(frozen=True)
class MultipathResult:
    """What training one multipath model produced.

    Attributes:
      task: the task.
      path_ids: path_0's id, then the companions' ids (P in all).
      router_params: the router's best-validation parameters (numpy).
      connector_params: each companion's connector at the best validation (numpy).
      quality: the best validation accuracy (the score).
      single_path_quality: path_0 alone on the same validation batches.
      best_step: the step of the best validation (0: the initial model).
      validations: (step, accuracy) for every validation, step 0 first.
      router_mean_weights: the mean of r over the validation rows at the best step.
      train_losses: mean training loss of each interval.
      trainable_params: router plus connectors.
      activated_params: every frozen path's parameters (each component once) plus the
        trainable ones: what one prediction runs.
      train_seconds: wall time of training and validation (compilation included).
    """

    task: str
    path_ids: tuple[str, ...]
    router_params: Params
    connector_params: tuple[Params, ...]
    quality: float
    single_path_quality: float
    best_step: int
    validations: tuple[tuple[int, float], ...]
    router_mean_weights: tuple[float, ...]
    train_losses: tuple[float, ...]
    trainable_params: int
    activated_params: int
    train_seconds: float

    def report(self) -> dict[str, Any]:
        """The JSON-safe record of the run (everything but the parameters)."""
        skip = ("router_params", "connector_params")
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out = {name: value for name, value in out.items() if name not in skip}
        out.update(num_paths=len(self.path_ids), gain=self.quality - self.single_path_quality)
        return json.loads(json.dumps(out))


def _batch(batch: Batch, family: families.Family) -> dict[str, np.ndarray]:
    """The input, the labels and `_mask` (all ones where the batch has none)."""
    out = {family.input_key: np.asarray(batch[family.input_key], family.input_dtype)}
    out["label"] = np.asarray(batch["label"], np.int32)
    mask = batch.get(path_model.MASK_KEY)
    rows = len(out["label"])
    out[path_model.MASK_KEY] = np.ones(rows, np.int32) if mask is None else np.asarray(mask)
    return out


def train_multipath(
    *,
    store: store_lib.Store,
    task: str,
    main_path: system.Path,
    other_paths: Sequence[system.Path],
    train_batches: Iterator[Batch],
    validation_batches: Sequence[Batch],
    steps: int,
    steps_per_validation: int,
    hparam_values: Mapping[str, Any] | None = None,
    main_weight: float = MAIN_WEIGHT,
    gradient_scale: float = GRADIENT_SCALE,
) -> MultipathResult:
    """Trains the router and connectors over frozen paths; keeps the best validation.

    Validates at step 0 (the initial model: path_0's classes) and every
    `steps_per_validation` steps; a later validation replaces the best only when
    strictly better. Nothing is written to the store. Deterministic: the parameters
    start at fixed values, so the only randomness is the order of `train_batches`.

    Args:
      store: where the paths' components are read from.
      task: the task (its number of classes is path_0's).
      main_path: path_0, a path of `task` with its head.
      other_paths: 1 or 2 companion paths (`choose_companions`), used without heads.
      train_batches: batches (the family's input and "label") of one shape.
      validation_batches: batches, optionally with "_mask".
      steps: training steps (a multiple of `steps_per_validation`).
      steps_per_validation: B.
      hparam_values: optimiser values ("lr", "schedule", "warmup", "momentum",
        "nesterov"; `DEFAULT_HPARAMS` fills what is missing).
      main_weight: w0.
      gradient_scale: m.

    Returns:
      The result.

    Raises:
      ValueError: P not in {2, 3}, path_0 not of `task`, paths with different inputs,
        bad step counts, or the train batches ran out.
    """
    paths = [main_path, *other_paths]
    if len(paths) not in NUM_PATHS:
        raise ValueError(f"P={len(paths)} paths; expected one of {NUM_PATHS}.")
    if main_path.task != task:
        raise ValueError(f"path_0 {main_path.id!r} is of task {main_path.task!r}, not {task!r}.")
    if len({_input_signature(p) for p in paths}) != 1:
        raise ValueError("The paths read different inputs (family, shape or dtype).")
    if steps_per_validation < 1 or steps < 1 or steps % steps_per_validation:
        raise ValueError(f"steps={steps} must be a positive multiple of B={steps_per_validation}.")
    values = {**DEFAULT_HPARAMS, **(hparam_values or {})}
    frozen = tuple(_member(p, i) for i, p in enumerate(paths))
    config = frozen[0].config
    family = families.family_of(config)
    # What runs: member 0 whole, the companions without their heads.
    used = [
        [(s, dict(p.components)[s]) for s in m.slots] for p, m in zip(paths, frozen, strict=True)
    ]
    pool = {cid: store.load_params(cid) for pairs in used for _, cid in pairs}
    path_params = [{slot: pool[cid] for slot, cid in pairs} for pairs in used]
    num_classes = int(config.num_classes or 0)
    eval_batches = [_batch(b, family) for b in validation_batches]
    _, features = jax.eval_shape(
        functools.partial(router_path.member_outputs, frozen),
        path_model.abstract_tree(path_params),
        path_model.abstract_tree(eval_batches[0][family.input_key]),
    )
    params = {
        "router": router_path.init_router(num_classes, len(paths), main_weight),
        "connectors": [router_path.init_connector(int(f.shape[-1]), num_classes) for f in features],
        "paths": path_params,
    }
    settings = candidate.OptimizerSettings.from_values(values, steps, steps_per_validation)
    train = (_batch(b, family) for b in train_batches)
    first = next(train, None)
    if first is None:
        raise ValueError("The train batches ran out.")

    start = time.perf_counter()
    trainer = _trainer(frozen, settings, float(gradient_scale), params, first)
    placed = jax.device_put(eval_batches, trainer.partitioner.batch_sharding)
    single = candidate.validate(config, frozen[0].slots, path_params[0], validation_batches)
    weights: list[tuple[float, ...]] = []  # each validation's mean router weights

    def evaluate(params: Params) -> float:
        metrics = trainer.evaluate(params, iter(placed))
        weights.append(tuple(metrics.get(f"weight_{p}", 0.0) for p in range(len(paths))))
        return metrics.get("accuracy", 0.0)

    state = candidate.with_hyperparams(trainer, trainer.state_from_params(params), values)
    keep = loop.KeepBest(steps_per_validation, evaluate)
    keep.consider(0, trainer, state.params)  # step 0: path_0's classes; ties keep it
    loop.run(
        loop.Progress.start(trainer, state),
        loop.single_steps(itertools.chain([first], train)),
        steps,
        [keep],
    )
    best = jax.device_get(keep.best_params)
    best_weights = weights[[step for step, _ in keep.validations].index(keep.best_step)]
    trained = {"router": best["router"], "connectors": best["connectors"]}
    trainable_count = system.num_params_of(trained)
    frozen_count = sum(system.num_params_of(tree) for tree in pool.values())
    return MultipathResult(
        task=task,
        path_ids=tuple(p.id for p in paths),
        router_params=best["router"],
        connector_params=tuple(best["connectors"]),
        quality=keep.best_quality,
        single_path_quality=single,
        best_step=keep.best_step,
        validations=tuple(keep.validations),
        router_mean_weights=best_weights,
        train_losses=tuple(keep.train_losses),
        trainable_params=trainable_count,
        activated_params=frozen_count + trainable_count,
        train_seconds=time.perf_counter() - start,
    )


# -- publishing ----------------------------------------------------------------------------


def beats_single_path(result: MultipathResult) -> bool:
    """Whether a multipath model beats its path_0 alone on the same validation batches."""
    return result.quality > result.single_path_quality


def publish_result(
    store: store_lib.Store,
    state: system.SystemState,
    *,
    agent: str,
    result: MultipathResult,
    rng: np.random.Generator,
    gradient_scale: float = GRADIENT_SCALE,
) -> system.Path | None:
    """Publishes a multipath model as its task's router path when it beats path_0.

    The connectors and the router become new components of `agent`; the router path
    references them and the members' components (`router_path.router_components`), so
    it locks the members like any path of its task. The agent's earlier active router
    paths of the task are retired in the same publication (its staged components, left
    by a crash between put and publish, are discarded first). `SystemState.best_path`
    serves the router path while its quality is above the task's best single path's.

    Args:
      store: the store to publish into.
      state: the published state the result was trained on (its members are read here).
      agent: the publishing agent.
      result: `train_multipath`'s result.
      rng: draws the new ids (seed it per agent and cycle).
      gradient_scale: the m the result was trained with.

    Returns:
      The published router path, or None when the result does not beat path_0 (nothing
      is written then).

    Raises:
      ValueError: the result's paths are not active paths of `state`.
    """
    if not beats_single_path(result):
        return None
    members = [state.paths.get(path_id) for path_id in result.path_ids]
    if any(p is None or p.status != system.ACTIVE for p in members):
        raise ValueError(f"The result's paths {list(result.path_ids)} are not all active.")
    paths = [p for p in members if p is not None]
    store.discard_staged(agent)  # what a crash between put and publish left
    generation = 1 + max(
        (p.generation for p in state.paths.values() if p.task == result.task), default=0
    )
    trees = [("connector", c) for c in result.connector_params] + [("router", result.router_params)]
    components = []
    for kind, tree in trees:
        component = system.Component(
            id=system.new_id(rng, agent),
            kind=kind,
            num_params=system.num_params_of(tree),
            agent=agent,
            task=result.task,
            config=router_path.component_config(kind, tree),
            generation=generation,
        )
        store.put_component(component, jax.tree_util.tree_map(np.asarray, tree))
        components.append(component.id)
    path = system.Path(
        id=system.new_id(rng, agent),
        task=result.task,
        components=router_path.router_components(paths, components[:-1], components[-1]),
        agent=agent,
        parent=paths[0].id,
        score=result.quality,
        quality=result.quality,
        metrics={
            "single_path_quality": result.single_path_quality,
            "best_step": result.best_step,
            "router_mean_weights": list(result.router_mean_weights),
            "trainable_params": result.trainable_params,
            "activated_params": result.activated_params,
        },
        generation=generation,
        architecture=router_path.router_architecture(paths, gradient_scale),
    )
    earlier = [
        p.id
        for p in state.active_paths(result.task)
        if p.agent == agent and system.is_router_path(p)
    ]
    store.publish(agent, paths=[path], components=components, retire=earlier)
    return path
