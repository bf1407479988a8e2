"""The root model the muNet system grows from: a small ViT pretrained on Fashion-MNIST.

The papers start from an ImageNet-21k ViT; no pretrained ViT ships in a package here
(only data sets do), so `pretrain_root` trains one on `fashion_mnist_rgb32_v1`
(32x32x3, the data set the evolved tasks leave out, `tasks.offline_image`) with a plain
jitted AdamW loop (linear warmup, cosine decay), and writes it to a root directory:

    root_dir/root.npz         parameters keyed "slot/.../leaf" (`vit.component_slots`)
    root_dir/root.json        architecture (`architecture_of`), settings, accuracies, times
    root_dir/checkpoint.npz   the latest training checkpoint (params, optimizer state,
                              step, settings), for resuming a killed run

Every file is written atomically (a temporary name, fsync, then rename), root.json
last: a root directory with a root.json holds a finished root. Batches are a pure
function of (seed, step), so a resumed run ends with the same parameters, bit for bit,
as one that was never interrupted. `ensure_root` reuses a finished root with the same
settings; `seed_store` puts it into a store as the system's root path.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import time
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import tasks
from evolution import store as store_lib
from evolution.roots import root_files, seeding
from evolution.search import batches
from evolution.search.task_data import load_task_arrays
from evolution.system import state as system
from evolution.system.architecture import ROOT_TASK, architecture_of, config_of
from models import vit

logger = logging.getLogger("evogrow")

DEFAULT_TASK = "fashion_mnist_rgb32_v1"
FORMAT_VERSION = 1
_EVAL_BATCH = 250  # One shape for every split: one compiled forward.


class RootNotFoundError(FileNotFoundError):
    """The root directory holds no finished root (no root.json / root.npz)."""


@dataclasses.dataclass(frozen=True)
class RootResult:
    """A finished root model.

    Attributes:
      config: the root's ViT config.
      params: its parameters keyed by slot (`vit.component_slots`), numpy arrays.
      test_accuracy: accuracy on the task's test split.
      validation_accuracy: accuracy on the task's validation split.
      task: the seqio task it was pretrained on.
      steps: training steps.
      num_params: its parameter count (P of the muNet score).
      wall_seconds: wall time of the call that finished it (reused: of the original).
      train_seconds: training-loop time summed over every (resumed) run.
      root_dir: where it is stored.
      start_step: the step this call resumed from (0: from scratch).
      reused: `ensure_root` found it finished instead of training it.
    """

    config: vit.ViTConfig
    params: Mapping[str, Any]
    test_accuracy: float
    validation_accuracy: float
    task: str
    steps: int
    num_params: int
    wall_seconds: float
    train_seconds: float
    root_dir: str
    start_step: int = 0
    reused: bool = False


def default_root_config(num_classes: int = 10) -> vit.ViTConfig:
    """The root ViT for 32x32x3 images: 8x8 patches (16 tokens + cls), width 64, 4 blocks.

    Pre-LayerNorm blocks (models/layers.py), 4 heads of 16, MLP 256, GELU, class-token
    pooling, no dropout: 213,194 parameters. With gin/runs/pretrain_root.gin's
    settings (2,000 steps of 128, 4.7 epochs) it reaches 86.6% Fashion-MNIST test
    accuracy; a step takes ~0.1 s on 2 idle CPU cores (~3.5 minutes in all), and the
    measured run took 6.4 minutes with other jobs sharing the cores. 4x4 patches (64
    tokens) cost ~6x more per step, which every candidate of the later search would pay.

    Args:
      num_classes: classes of the head.

    Returns:
      The config.
    """
    return vit.ViTConfig(
        image_shape=(32, 32, 3),
        patch_size=8,
        hidden=64,
        mlp_dim=256,
        num_heads=4,
        qk_dim=16,
        v_dim=16,
        num_layers=4,
        num_classes=num_classes,
        pooling="cls",
        dropout_rate=0.0,
    )


# -- files ------------------------------------------------------------------------------


def load_root(root_dir: str) -> tuple[vit.ViTConfig, dict[str, Any]]:
    """Reads a finished root written by `pretrain_root`.

    Args:
      root_dir: the root directory.

    Returns:
      (config, params keyed by slot as `vit.ViT(config)` parameters, numpy arrays).

    Raises:
      RootNotFoundError: no finished root in `root_dir`.
      ValueError: the stored parameters do not fit the stored architecture.
    """
    info = root_files.read_info(root_dir)
    if info is None:
        raise RootNotFoundError(
            f"No finished root model in {root_dir!r} (no {root_files.ROOT_INFO_FILE} and "
            f"{root_files.ROOT_PARAMS_FILE}): run ./run.sh pretrain_root first, with the same "
            "ROOT_DIR."
        )
    # config_of reads a path's stored architecture; the root's is stored the same way.
    holder = system.Path(
        f"{ROOT_TASK}:path",
        ROOT_TASK,
        (("embed", f"{ROOT_TASK}:embed"),),
        "root",
        architecture=info["architecture"],
    )
    config = config_of(holder)
    params_path = os.path.join(root_dir, root_files.ROOT_PARAMS_FILE)
    with np.load(params_path, allow_pickle=False) as data:
        params = root_files.unflatten({name: data[name] for name in data.files})
    sample = jnp.zeros((1, *config.image_shape))
    expected = jax.eval_shape(vit.ViT(config).init, jax.random.PRNGKey(0), sample)["params"]
    want = root_files.flatten(nn.unbox(expected), np.shape)
    have = {k: v.shape for k, v in root_files.flatten(params).items()}
    if want != have:
        differ = sorted(k for k in set(want) | set(have) if want.get(k) != have.get(k))
        raise ValueError(
            f"{params_path} does not fit its architecture: {len(differ)} parameters are "
            f"missing, extra or of another shape, e.g. {differ[:5]}."
        )
    return config, params


# -- training -----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Settings:
    """Everything that determines the trained parameters (`pretrain_root`'s arguments).

    Validated on construction; a None config becomes `default_root_config` with the
    task's class count.
    """

    steps: int
    batch_size: int
    learning_rate: float
    warmup_steps: int
    weight_decay: float
    task: str = DEFAULT_TASK
    config: vit.ViTConfig | None = None
    seed: int = 0
    max_train_examples: int | None = None

    def __post_init__(self):
        if min(self.steps, self.batch_size) < 1 or not 0 <= self.warmup_steps < self.steps:
            raise ValueError(
                f"pretrain_root: steps ({self.steps}) and batch_size ({self.batch_size}) must "
                f"be >= 1, warmup_steps={self.warmup_steps} in [0, steps)."
            )
        if self.task not in tasks.registered_names():  # Fails when read, naming close ones.
            object.__setattr__(self, "config", self.config or default_root_config())
            return
        info = tasks.info(self.task)
        config = self.config or default_root_config(num_classes=info.num_classes)
        if (tuple(config.image_shape), config.num_classes) != (
            tuple(info.image_shape or config.image_shape),
            info.num_classes,
        ):
            raise ValueError(
                f"The root config (image_shape {config.image_shape}, {config.num_classes} "
                f"classes) does not fit task {self.task!r} ({info.image_shape}, "
                f"{info.num_classes} classes)."
            )
        object.__setattr__(self, "config", config)

    @property
    def vit_config(self) -> vit.ViTConfig:
        """The config, never None after `__post_init__`."""
        assert self.config is not None
        return self.config

    def to_json(self) -> dict[str, Any]:
        """The settings as JSON-safe values (the config as `architecture_of`)."""
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        fields["architecture"] = architecture_of(fields.pop("config"))
        return json.loads(json.dumps(fields))

    def optimizer(self) -> optax.GradientTransformation:
        """Clip by global norm 1, then AdamW: linear warmup from 0, cosine decay to 0.

        Weight decay applies to matrices only (not to biases or norm scales).
        """
        if self.warmup_steps > 0:
            schedule = optax.warmup_cosine_decay_schedule(
                0.0, self.learning_rate, self.warmup_steps, self.steps, end_value=0.0
            )
        else:
            schedule = optax.cosine_decay_schedule(self.learning_rate, self.steps)
        decay_mask = lambda params: jax.tree_util.tree_map(lambda x: np.ndim(x) >= 2, params)
        return optax.chain(
            optax.clip_by_global_norm(1.0),
            optax.adamw(schedule, weight_decay=self.weight_decay, mask=decay_mask),
        )

    def batch_indices(self, step: int, num_examples: int) -> np.ndarray:
        """Batch `step`'s example indices: epoch e is a permutation seeded by (seed, e)."""
        per_epoch = num_examples // self.batch_size
        epoch, position = divmod(step, per_epoch)
        order = _epoch_order(num_examples, self.seed, epoch)
        return order[position * self.batch_size : (position + 1) * self.batch_size]


@functools.lru_cache(maxsize=2)
def _epoch_order(num_examples: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(num_examples)


@functools.lru_cache(maxsize=4)
def _init_fn(config: vit.ViTConfig) -> Any:
    return jax.jit(vit.ViT(config).init)


@functools.lru_cache(maxsize=4)
def _train_step_fn(run: _Settings) -> Any:
    """The jitted step (params, opt_state, images, labels, step) -> (params, opt_state, loss).

    Cached per settings, so a run resumed in the same process reuses the executable.
    """
    model, tx, seed = vit.ViT(run.vit_config), run.optimizer(), run.seed
    train = run.vit_config.dropout_rate > 0

    def loss_fn(params, images, labels, step):
        rngs = {"dropout": jax.random.fold_in(jax.random.PRNGKey(seed), step)} if train else None
        logits = model.apply({"params": params}, images, not train, rngs=rngs)
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    def step_fn(params, opt_state, images, labels, step):
        loss, grads = jax.value_and_grad(loss_fn)(params, images, labels, step)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return jax.jit(step_fn, donate_argnums=(0, 1))


def _train(
    run: _Settings, root_dir: str, checkpoint_every: int, log_every: int
) -> tuple[Any, int, float]:
    """Runs (or resumes) the training loop; returns (params, start step, train seconds)."""
    images, labels = load_task_arrays(run.task, "train", max_examples=run.max_train_examples)
    if len(labels) < run.batch_size:
        raise ValueError(f"{len(labels)} train examples < batch_size {run.batch_size}.")
    sample = jnp.zeros((1, *run.vit_config.image_shape), jnp.float32)
    params = nn.unbox(_init_fn(run.vit_config)(jax.random.PRNGKey(run.seed), sample)["params"])
    opt_state = run.optimizer().init(params)
    fingerprint = json.dumps(run.to_json(), sort_keys=True)
    start_step, train_seconds = 0, 0.0
    restored = root_files.restore_checkpoint(root_dir, fingerprint, (params, opt_state))
    if restored is not None:
        start_step, (params, opt_state), train_seconds = restored
        logger.info("root: resuming %s at step %d/%d", root_dir, start_step, run.steps)
    logger.info(
        "root: pretraining a %d-parameter ViT on %s (%d examples), %d steps of %d",
        system.num_params_of(jax.device_get(params)),
        run.task,
        len(labels),
        run.steps,
        run.batch_size,
    )
    step_fn = _train_step_fn(run)
    params, opt_state = jax.device_put((params, opt_state))
    loop_start = window_start = time.perf_counter()
    window_step = start_step
    for step in range(start_step, run.steps):
        take = run.batch_indices(step, len(labels))
        params, opt_state, loss = step_fn(
            params, opt_state, images[take], labels[take], np.int32(step)
        )
        done = step + 1
        if done % log_every == 0 or done == run.steps:
            loss_value = float(loss)  # Waits for the step, so the rate is real.
            now = time.perf_counter()
            rate = (done - window_step) / max(now - window_start, 1e-9)
            logger.info(
                "root: step %d/%d loss %.4f, %.2f steps/s, ETA %.0f s",
                *(done, run.steps, loss_value, rate, (run.steps - done) / rate),
            )
            window_start, window_step = now, done
        if done % checkpoint_every == 0 or done == run.steps:
            seconds = train_seconds + time.perf_counter() - loop_start
            root_files.save_checkpoint(root_dir, done, (params, opt_state), seconds, fingerprint)
    train_seconds += time.perf_counter() - loop_start
    return jax.device_get(params), start_step, train_seconds


@functools.lru_cache(maxsize=8)
def _forward(config: vit.ViTConfig) -> Any:
    return jax.jit(lambda params, images: vit.ViT(config).apply({"params": params}, images))


def evaluate_accuracy(
    config: vit.ViTConfig, params: Any, images: np.ndarray, labels: np.ndarray
) -> float:
    """Top-1 accuracy of a ViT on arrays (fixed-shape, masked batches).

    Args:
      config: the ViT's config.
      params: its parameters.
      images: [N, H, W, C] float images.
      labels: [N] int labels.

    Returns:
      The accuracy in [0, 1].
    """
    correct = total = 0
    for batch in batches.array_eval_batches(images, labels, _EVAL_BATCH):
        predicted = np.argmax(np.asarray(_forward(config)(params, batch["image"])), axis=-1)
        mask = batch["_mask"].astype(bool)
        correct += int(np.sum((predicted == batch["label"]) & mask))
        total += int(mask.sum())
    return correct / max(total, 1)


def _result(
    config: vit.ViTConfig, params: Any, info: Mapping[str, Any], root_dir: str, reused: bool
) -> RootResult:
    return RootResult(
        config=config,
        params=params,
        test_accuracy=float(info["test_accuracy"]),
        validation_accuracy=float(info["validation_accuracy"]),
        task=str(info["task"]),
        steps=int(info["steps"]),
        num_params=int(info["num_params"]),
        wall_seconds=float(info["wall_seconds"]),
        train_seconds=float(info["train_seconds"]),
        root_dir=root_dir,
        start_step=int(info["steps"]) if reused else int(info["resumed_from_step"]),
        reused=reused,
    )


def pretrain_root(
    *,
    root_dir: str,
    task: str = DEFAULT_TASK,
    config: vit.ViTConfig | None = None,
    steps: int,
    batch_size: int,
    learning_rate: float,
    warmup_steps: int,
    weight_decay: float,
    seed: int = 0,
    checkpoint_every: int = 500,
    log_every: int = 100,
    max_train_examples: int | None = None,
) -> RootResult:
    """Pretrains the root ViT on a seqio image task and writes it to `root_dir`.

    Resumes from `root_dir/checkpoint.npz` when it holds a checkpoint of the same
    settings (a killed run continues; its final parameters equal an
    uninterrupted run's). Logs loss, steps/s and ETA every `log_every` steps to the
    "evogrow" logger; at the end evaluates validation and test accuracy and writes
    root.npz and root.json (see the module docstring). The launcher's entry point
    (gin/runs/pretrain_root.gin binds every argument).

    Args:
      root_dir: the root directory (created if missing).
      task: the registered image task to pretrain on.
      config: the ViT; None: `default_root_config` with the task's class count.
      steps: training steps.
      batch_size: examples per step.
      learning_rate: peak AdamW learning rate.
      warmup_steps: linear warmup steps (< steps).
      weight_decay: AdamW weight decay (on matrices).
      seed: initialisation and batch-order (and dropout) seed.
      checkpoint_every: steps between checkpoints (the last step is always saved).
      log_every: steps between progress lines.
      max_train_examples: train on the first this many examples only (None: all).

    Returns:
      The finished root.

    Raises:
      ValueError: invalid settings, or a config that does not fit the task.
      training.data.UnknownTaskError, tasks.MissingDataError: as `load_task_arrays`.
    """
    start = time.perf_counter()
    if min(checkpoint_every, log_every) < 1:
        raise ValueError(f"checkpoint_every={checkpoint_every}, log_every={log_every}: >= 1.")
    run = _Settings(
        steps=steps,
        batch_size=batch_size,
        learning_rate=learning_rate,
        warmup_steps=warmup_steps,
        weight_decay=weight_decay,
        task=task,
        config=config,
        seed=seed,
        max_train_examples=max_train_examples,
    )
    os.makedirs(root_dir, exist_ok=True)
    params, start_step, train_seconds = _train(run, root_dir, checkpoint_every, log_every)
    accuracy = {
        split: evaluate_accuracy(run.vit_config, params, *load_task_arrays(task, split))
        for split in ("validation", "test")
    }
    info = {
        **run.to_json(),
        "format": FORMAT_VERSION,
        "num_params": system.num_params_of(params),
        "validation_accuracy": accuracy["validation"],
        "test_accuracy": accuracy["test"],
        "wall_seconds": time.perf_counter() - start,
        "train_seconds": train_seconds,
        "resumed_from_step": start_step,
    }
    info_path = os.path.join(root_dir, root_files.ROOT_INFO_FILE)
    if os.path.exists(info_path):  # An older root's info must never describe new params.
        os.remove(info_path)
    root_files.atomic_write(
        os.path.join(root_dir, root_files.ROOT_PARAMS_FILE),
        lambda handle: np.savez(handle, **root_files.flatten(params)),  # type: ignore[arg-type]
    )
    text = json.dumps(info, indent=2, sort_keys=True) + "\n"  # Last: marks the root finished.
    root_files.atomic_write(info_path, lambda h: h.write(text.encode()))
    logger.info(
        "root: %s: test accuracy %.4f (validation %.4f), %d params, %.0f s (%.0f s training)",
        *(root_dir, info["test_accuracy"], info["validation_accuracy"], info["num_params"]),
        *(info["wall_seconds"], train_seconds),
    )
    return _result(run.vit_config, params, info, root_dir, reused=False)


def ensure_root(*, root_dir: str, **pretrain_kwargs: Any) -> RootResult:
    """Reuses the finished root in `root_dir` when its settings match, else pretrains it.

    The settings compared are everything that determines the parameters: task,
    architecture, steps, batch size, learning rate, warmup, weight decay, seed and the
    train-example limit (not `checkpoint_every` / `log_every`).

    Args:
      root_dir: the root directory.
      **pretrain_kwargs: `pretrain_root`'s other arguments.

    Returns:
      The root (`reused` tells whether it was found finished).
    """
    settings = {
        k: v for k, v in pretrain_kwargs.items() if k not in ("checkpoint_every", "log_every")
    }
    wanted = _Settings(**settings).to_json()
    info = root_files.read_info(root_dir)
    if info is not None and {key: info.get(key) for key in wanted} == wanted:
        config, params = load_root(root_dir)
        logger.info("root: reusing %s (test accuracy %.4f)", root_dir, info["test_accuracy"])
        return _result(config, params, info, root_dir, reused=True)
    if info is not None:
        logger.info("root: %s holds a root of other settings; pretraining anew.", root_dir)
    return pretrain_root(root_dir=root_dir, **pretrain_kwargs)


def seed_store(store: store_lib.Store, root_dir: str, *, agent: str = "root") -> system.Path:
    """Puts the finished root of `root_dir` into a store as the system's root path.

    Args:
      store: the store (empty, or already seeded with this same root).
      root_dir: a root directory written by `pretrain_root`.
      agent: the agent publishing the root.

    Returns:
      The root path (`seeding.seed_root`).

    Raises:
      RootNotFoundError: `root_dir` holds no finished root.
      ValueError: the store has another root.
    """
    config, params = load_root(root_dir)
    return seeding.seed_root(store, config, params, agent=agent)
