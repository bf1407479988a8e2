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
`candidate.make_optimizer`); the frozen paths run inside the step as inputs that nothing
differentiates. Validation runs at step 0 too and the best-validation parameters are
kept, so the result's quality is never below path_0's on the same batches.

Nothing is published: `system.Path` refuses repeated slots, `agent_view.check_state`
refuses foreign slots (every agent would stop), and best_path / inference / plan_child /
export assume one chain per path. `MultipathResult.report` records a run as JSON.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from evolution import store as store_lib
from evolution.search import candidate
from evolution.system import families
from evolution.system import state as system
from evolution.system.architecture import model_config_of
from models import encoder, vit

Params = Any
Batch = Mapping[str, Any]

MAIN_WEIGHT = 0.8  # w0: the router's initial weight on path_0.
GRADIENT_SCALE = 0.05  # m: the router's gradient multiplier.
NUM_PATHS = (2, 3)
LAYER_NORM_EPS = 1e-6
DEFAULT_HPARAMS: Mapping[str, Any] = {"lr": 0.1, "schedule": "cosine", "momentum": 0.9}


# -- the mixture -------------------------------------------------------------------------


def router_bias(num_paths: int, main_weight: float = MAIN_WEIGHT) -> np.ndarray:
    """The router's initial bias: softmax of it is [w0, (1-w0)/(P-1), ...].

    Args:
      num_paths: P (>= 2).
      main_weight: w0, in (0, 1).

    Returns:
      float32 [P].

    Raises:
      ValueError: P < 2 or w0 outside (0, 1).
    """
    if num_paths < 2 or not 0.0 < main_weight < 1.0:
        raise ValueError(f"Need P >= 2 and 0 < w0 < 1; got P={num_paths}, w0={main_weight}.")
    rest = (1.0 - main_weight) / (num_paths - 1)
    return np.log(np.array([main_weight] + [rest] * (num_paths - 1), np.float64)).astype(np.float32)


def init_router(num_classes: int, num_paths: int, main_weight: float = MAIN_WEIGHT) -> Params:
    """The router's initial parameters: LayerNorm (scale 1, bias 0) then Dense_P (kernel 0).

    Args:
      num_classes: C, the width of z_0.
      num_paths: P.
      main_weight: w0.

    Returns:
      {"norm": {"scale": [C], "bias": [C]}, "dense": {"kernel": [C, P], "bias": [P]}}.
    """
    norm = {"scale": np.ones(num_classes, np.float32), "bias": np.zeros(num_classes, np.float32)}
    kernel = np.zeros((num_classes, num_paths), np.float32)
    return {"norm": norm, "dense": {"kernel": kernel, "bias": router_bias(num_paths, main_weight)}}


def init_connector(feature_dim: int, num_classes: int) -> Params:
    """A connector Dense(num_classes) with zero kernel [D, C] and zero bias [C]."""
    kernel = np.zeros((feature_dim, num_classes), np.float32)
    return {"kernel": kernel, "bias": np.zeros(num_classes, np.float32)}


def _layer_norm(x_BxC: jax.Array, params: Params) -> jax.Array:
    mean = jnp.mean(x_BxC, axis=-1, keepdims=True)
    variance = jnp.mean(jnp.square(x_BxC - mean), axis=-1, keepdims=True)
    normed = (x_BxC - mean) * jax.lax.rsqrt(variance + LAYER_NORM_EPS)
    return normed * params["scale"] + params["bias"]


def router_weights(
    router_params: Params, logits_0: jax.Array, *, gradient_scale: float = GRADIENT_SCALE
) -> jax.Array:
    """Per-sample path weights r = softmax(Dense_P(LayerNorm(z_0))), gradient scaled by m.

    Args:
      router_params: `init_router`'s layout.
      logits_0: z_0 [B, C] (treated as a constant).
      gradient_scale: m: r <- m * r + (1 - m) * sg(r) (same value, m times the gradient).

    Returns:
      r [B, P] (rows sum to 1).
    """
    normed_BxC = _layer_norm(
        jax.lax.stop_gradient(logits_0).astype(jnp.float32), router_params["norm"]
    )
    dense = router_params["dense"]
    r_BxP = jax.nn.softmax(normed_BxC @ dense["kernel"] + dense["bias"], axis=-1)
    return gradient_scale * r_BxP + (1.0 - gradient_scale) * jax.lax.stop_gradient(r_BxP)


def connector_logits(connector_params: Params, features_BxD: jax.Array) -> jax.Array:
    """z_p = Dense(num_classes)(features) of a headless path (features are constants)."""
    features_BxD = jax.lax.stop_gradient(features_BxD).astype(jnp.float32)
    return features_BxD @ connector_params["kernel"] + connector_params["bias"]


def multipath_logits(
    router_params: Params,
    connector_params: Sequence[Params],
    logits_0: jax.Array,
    features: Sequence[jax.Array],
    *,
    gradient_scale: float = GRADIENT_SCALE,
) -> tuple[jax.Array, jax.Array]:
    """The multipath output y = sum_p r_p sg(z_p) + sum_p z_p - sg(sum_p z_p).

    Args:
      router_params: `init_router`'s layout (P = 1 + len(features)).
      connector_params: one `init_connector` per companion path.
      logits_0: path_0's logits [B, C] (frozen).
      features: each companion's pooled pre-logit features [B, D_p] (frozen).
      gradient_scale: m (see `router_weights`).

    Returns:
      (y [B, C], r [B, P]).

    Raises:
      ValueError: as many connectors as feature arrays are needed.
    """
    if len(connector_params) != len(features):
        raise ValueError(f"{len(connector_params)} connectors for {len(features)} feature arrays.")
    z_0 = jax.lax.stop_gradient(logits_0).astype(jnp.float32)
    zs = [z_0] + [connector_logits(c, f) for c, f in zip(connector_params, features, strict=True)]
    r_BxP = router_weights(router_params, z_0, gradient_scale=gradient_scale)
    mixture = functools.reduce(
        jnp.add, [r_BxP[:, p, None] * jax.lax.stop_gradient(z) for p, z in enumerate(zs)]
    )
    total = functools.reduce(jnp.add, zs)
    return mixture + total - jax.lax.stop_gradient(total), r_BxP


# -- frozen paths ------------------------------------------------------------------------


def path_features(
    config: families.ModelConfig,
    slots: Sequence[str],
    params_by_slot: Mapping[str, Params],
    inputs: jax.Array,
) -> jax.Array:
    """A path's pooled pre-logit features: every component but the head, then its pooling.

    The ViT pools as `vit.ClassifierHead` (class token or token mean after final_norm);
    the text encoder as its head (class token, or the mean of non-padding tokens).

    Args:
      config: the path's config.
      slots: its slots, the last being "head".
      params_by_slot: slot -> parameters (the head's are not read).
      inputs: the family's input feature.

    Returns:
      [B, D].

    Raises:
      ValueError: the last slot is not "head".
    """
    if not slots or slots[-1] != "head":
        raise ValueError(f"A path's last slot must be 'head'; got {list(slots)}.")
    tokens_BxLxD = candidate.forward(config, slots[:-1], params_by_slot, inputs)
    if isinstance(config, vit.ViTConfig):
        pooled = vit.ClassifierHead(config).apply({"params": {}}, tokens_BxLxD, True)
        return jnp.asarray(pooled)
    if config.pooling == "cls":
        return tokens_BxLxD[:, 0]
    return encoder.mean_pool(tokens_BxLxD, inputs > 0)


@dataclasses.dataclass(frozen=True)
class _FrozenPath:
    config: families.ModelConfig
    slots: tuple[str, ...]


def _frozen_outputs(
    frozen: Sequence[_FrozenPath], params: Sequence[Params], inputs: jax.Array
) -> tuple[jax.Array, list[jax.Array]]:
    """(z_0, companions' features), as constants of the step."""
    params = jax.lax.stop_gradient(params)
    logits_0 = candidate.forward(frozen[0].config, frozen[0].slots, params[0], inputs)
    features = [
        path_features(p.config, p.slots, tree, inputs)
        for p, tree in zip(frozen[1:], params[1:], strict=True)
    ]
    return logits_0, features


@functools.lru_cache(maxsize=16)
def _steps(
    frozen: tuple[_FrozenPath, ...],
    settings: candidate.OptimizerSettings,
    gradient_scale: float,
    input_key: str,
) -> tuple[Any, Any]:
    """The jitted (train step, eval step) of one multipath layout."""

    def apply(trainable: Params, frozen_params: Sequence[Params], inputs: jax.Array) -> Any:
        logits_0, features = _frozen_outputs(frozen, frozen_params, inputs)
        router, connectors = trainable["router"], trainable["connectors"]
        return multipath_logits(
            router, connectors, logits_0, features, gradient_scale=gradient_scale
        )

    def loss_fn(trainable: Params, frozen_params: Sequence[Params], batch: Batch) -> jax.Array:
        y, _ = apply(trainable, frozen_params, batch[input_key])
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(y, batch["label"]))

    def train_step(trainable, frozen_params, opt_state, batch, lr, momentum, loss_sum):
        loss, grads = jax.value_and_grad(loss_fn)(trainable, frozen_params, batch)
        updates, opt_state = settings.optimizer(lr, momentum).update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, loss_sum + loss

    def eval_step(trainable, frozen_params, batch, correct, count, weight_sum):
        y, r_BxP = apply(trainable, frozen_params, batch[input_key])
        mask = batch["_mask"].astype(jnp.float32)
        hits = (jnp.argmax(y, axis=-1) == batch["label"]).astype(jnp.float32)
        weights = weight_sum + jnp.sum(r_BxP * mask[:, None], axis=0)
        return correct + jnp.sum(hits * mask), count + jnp.sum(mask), weights

    return jax.jit(train_step), jax.jit(eval_step)


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

    Candidates are the best active path of every other task (the root task included),
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
      main_path: path_0 (default: the task's best path).

    Returns:
      Up to P - 1 companion paths, best first (fewer when there are not enough).

    Raises:
      ValueError: P not in {2, 3}, or no path_0.
    """
    if num_paths not in NUM_PATHS:
        raise ValueError(f"P={num_paths} not in {NUM_PATHS}.")
    main = main_path or state.best_path(task)
    if main is None:
        raise ValueError(f"Task {task!r} has no active path to be path_0.")
    signature = _input_signature(main)
    bodies = {_body(main)}
    others = [state.best_path(name) for name in state.task_order() if name != task]
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


def _batch(batch: Batch, family: families.Family, evaluation: bool) -> dict[str, Any]:
    out = {family.input_key: jnp.asarray(batch[family.input_key], family.input_dtype)}
    out["label"] = jnp.asarray(batch["label"], jnp.int32)
    if evaluation:
        mask = batch.get("_mask", np.ones(len(out["label"]), np.int32))
        out["_mask"] = jnp.asarray(mask)
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
    frozen = tuple(
        _FrozenPath(model_config_of(p), tuple(slot for slot, _ in p.components)) for p in paths
    )
    config = frozen[0].config
    family = families.family_of(config)
    pool = {cid: store.load_params(cid) for p in paths for cid in dict.fromkeys(p.component_ids)}
    frozen_params = [
        jax.tree_util.tree_map(jnp.asarray, {slot: pool[cid] for slot, cid in p.components})
        for p in paths
    ]
    num_classes = int(config.num_classes or 0)
    eval_batches = [_batch(b, family, True) for b in validation_batches]
    probe = eval_batches[0]
    _, features = jax.eval_shape(
        functools.partial(_frozen_outputs, frozen), frozen_params, probe[family.input_key]
    )
    trainable = jax.tree_util.tree_map(
        jnp.asarray,
        {
            "router": init_router(num_classes, len(paths), main_weight),
            "connectors": [init_connector(int(f.shape[-1]), num_classes) for f in features],
        },
    )
    settings = candidate.OptimizerSettings.from_values(values, steps, steps_per_validation)
    train_step, eval_step = _steps(frozen, settings, float(gradient_scale), family.input_key)
    opt_state = settings.optimizer(float(values["lr"]), 0.0).init(trainable)
    lr = np.float32(values["lr"])
    momentum = np.float32(values.get("momentum") or 0.0)

    def evaluate(params: Params) -> tuple[float, tuple[float, ...]]:
        correct, count = jnp.zeros(()), jnp.zeros(())
        weights = jnp.zeros(len(paths))
        for batch in eval_batches:
            correct, count, weights = eval_step(
                params, frozen_params, batch, correct, count, weights
            )
        total = float(count)
        mean = tuple(float(w) / total if total else 0.0 for w in np.asarray(weights))
        return (float(correct) / total if total else 0.0), mean

    start = time.perf_counter()
    main_params = {slot: pool[cid] for slot, cid in main_path.components}
    single = candidate.validate(config, frozen[0].slots, main_params, validation_batches)
    best_quality, best_weights = evaluate(trainable)
    best_params, best_step = trainable, 0
    validations = [(0, best_quality)]
    losses: list[float] = []
    for interval in range(steps // steps_per_validation):
        loss_sum = jnp.zeros((), jnp.float32)
        for _ in range(steps_per_validation):
            try:
                batch = _batch(next(train_batches), family, False)
            except StopIteration as error:
                raise ValueError("The train batches ran out.") from error
            trainable, opt_state, loss_sum = train_step(
                trainable, frozen_params, opt_state, batch, lr, momentum, loss_sum
            )
        losses.append(float(loss_sum) / steps_per_validation)
        quality, weights = evaluate(trainable)
        step_number = (interval + 1) * steps_per_validation
        validations.append((step_number, quality))
        if quality > best_quality:  # Ties keep the earlier (step 0: path_0's classes).
            best_params, best_quality, best_step, best_weights = (
                trainable,
                quality,
                step_number,
                weights,
            )

    best = jax.device_get(best_params)
    trainable_count = system.num_params_of(best)
    frozen_count = sum(system.num_params_of(tree) for tree in pool.values())
    return MultipathResult(
        task=task,
        path_ids=tuple(p.id for p in paths),
        router_params=best["router"],
        connector_params=tuple(best["connectors"]),
        quality=best_quality,
        single_path_quality=single,
        best_step=best_step,
        validations=tuple(validations),
        router_mean_weights=best_weights,
        train_losses=tuple(losses),
        trainable_params=trainable_count,
        activated_params=frozen_count + trainable_count,
        train_seconds=time.perf_counter() - start,
    )
