"""The root model the muNet system grows from: a small ViT, or a public pretrained one.

The papers start from an ImageNet-21k ViT. Offline (the default) no pretrained ViT ships
in a package here (only data sets do), so `pretrain_root` trains one from scratch on
`fashion_mnist_rgb32_v1` (32x32x3, the data set the evolved tasks leave out,
`tasks.offline_image`). Given `init_checkpoint` (a big_vision `.npz`, e.g. ViT-Ti/16 or
ViT-B/16 of ImageNet-21k), the root starts from those weights instead
(`models.pretrained.vit_checkpoints`: position embeddings resampled to the task's patch grid, a
fresh zero head for its classes) and is fine-tuned for `steps` (0: used as is).

Training runs through the trainer's loop (`training.loop.run` with a `Trainer`): AdamW,
linear warmup, cosine decay; its actions log progress and save orbax checkpoints. A
root directory holds:

    root_dir/root.npz         parameters keyed "slot/.../leaf" (`vit.component_slots`)
    root_dir/root.json        architecture (`architecture_of`), settings, accuracies, times
    root_dir/checkpoints/     the latest training checkpoint (orbax: params, optimizer
                              state, and the settings it belongs to), for resuming

root.npz and root.json are written atomically (a temporary name, fsync, then rename),
root.json last: a root directory with a root.json holds a finished root. Batches are a
pure function of (seed, step), so a resumed run ends with the same parameters, bit for
bit, as one that was never interrupted. `ensure_root` reuses a finished root with the
same settings; `seed_store` puts it into a store as the system's root path.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import itertools
import json
import logging
import os
import shutil
import time
from collections.abc import Iterator, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import tasks
from evolution import store as store_lib
from evolution.roots import root_files, seeding
from evolution.search.data import batches
from evolution.search.data.task_data import load_task_arrays
from evolution.system import state as system
from evolution.system.architecture import ROOT_TASK, architecture_of, config_of
from models import classifier, vit
from models.pretrained import vit_checkpoints
from training import checkpoints as checkpoints_lib
from training import loop, partitioning
from training import trainer as trainer_lib

logger = logging.getLogger("evogrow")

DEFAULT_TASK = "fashion_mnist_rgb32_v1"
FORMAT_VERSION = 1
CHECKPOINT_DIR = "checkpoints"
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
      init_checkpoint: the ViT checkpoint it started from (None: from scratch).
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
    init_checkpoint: str | None = None


def default_root_config(num_classes: int = 10) -> vit.ViTConfig:
    """The root ViT for 32x32x3 images: 8x8 patches (16 tokens + cls), width 64, 4 blocks.

    Pre-LayerNorm blocks (models/layers.py), 4 heads of 16, MLP 256, GELU, class-token
    pooling, no dropout: 213,194 parameters. With gin/runs/pretrain_root.gin's
    settings (2,000 steps of 128, 4.7 epochs) it reaches about 86% Fashion-MNIST test
    accuracy. 4x4 patches (64 tokens) cost several times more per step, which every
    candidate of the later search would pay.

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


def _file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclasses.dataclass(frozen=True)
class _Settings:
    """Everything that determines the trained parameters (`pretrain_root`'s arguments).

    Validated on construction; a None config becomes `default_root_config` with the
    task's class count, or with `init_checkpoint` the checkpoint's architecture fitted
    to the task (its content's SHA-256 is recorded, so a changed file is a new root).
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
    init_checkpoint: str | None = None
    init_checkpoint_sha256: str | None = dataclasses.field(default=None, init=False)

    def __post_init__(self):
        fewest = 0 if self.init_checkpoint else 1
        if (
            self.steps < fewest
            or self.batch_size < 1
            or not (0 <= self.warmup_steps < self.steps or self.steps == 0 <= self.warmup_steps)
        ):
            raise ValueError(
                f"pretrain_root: steps ({self.steps}) must be >= {fewest} (0 only with an "
                f"init_checkpoint), batch_size ({self.batch_size}) >= 1, "
                f"warmup_steps={self.warmup_steps} in [0, steps)."
            )
        if self.init_checkpoint and self.config is not None:
            raise ValueError(
                "pretrain_root: give either config or init_checkpoint (the checkpoint's "
                "architecture is the root's), not both."
            )
        if self.task not in tasks.registered_names():  # Fails when read, naming close ones.
            object.__setattr__(self, "config", self.config or default_root_config())
            return
        info = tasks.info(self.task)
        if self.init_checkpoint:
            if info.image_shape is None:
                raise ValueError(
                    f"init_checkpoint is a ViT of images; task {self.task!r} has no images."
                )
            config, _ = vit_checkpoints.load_npz(
                self.init_checkpoint, image_shape=info.image_shape, num_classes=info.num_classes
            )
            object.__setattr__(self, "init_checkpoint_sha256", _file_sha256(self.init_checkpoint))
        else:
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
            schedule = optax.cosine_decay_schedule(self.learning_rate, max(self.steps, 1))
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


def _initial_params(run: _Settings) -> dict[str, Any] | None:
    """The init checkpoint's parameters fitted to the task (None: start from scratch)."""
    if not run.init_checkpoint:
        return None
    config, params = vit_checkpoints.load_npz(
        run.init_checkpoint,
        image_shape=run.vit_config.image_shape,
        num_classes=run.vit_config.num_classes,
    )
    if config != run.vit_config or _file_sha256(run.init_checkpoint) != run.init_checkpoint_sha256:
        raise ValueError(f"{run.init_checkpoint} changed while the root was being made.")
    return params


def _trainer(run: _Settings) -> trainer_lib.Trainer:
    """The root's trainer: one device (the root is small), dropout keys from the seed."""
    model = classifier.ImageClassifierModel(vit.ViT(run.vit_config), optimizer_def=run.optimizer())
    return trainer_lib.Trainer(
        model,
        partitioning.Partitioner(devices=jax.local_devices()[:1]),
        {"image": (run.batch_size, *run.vit_config.image_shape), "label": (run.batch_size,)},
        {"image": jnp.float32, "label": jnp.int32},
        jax.random.key(run.seed),
    )


def _train_batches(
    run: _Settings, images: np.ndarray, labels: np.ndarray, start: int
) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
    """The loop's input from step `start` on: one batch per step, a function of (seed, step)."""
    for step in itertools.count(start):
        take = run.batch_indices(step, len(labels))
        yield 1, {"image": images[take], "label": labels[take]}


def _open_checkpointer(root_dir: str, run: _Settings) -> checkpoints_lib.Checkpointer:
    """The root's checkpoints; those of other settings are deleted (they cannot resume)."""
    directory = os.path.join(root_dir, CHECKPOINT_DIR)
    save_cfg = checkpoints_lib.SaveCheckpointConfig(period=0, keep=1, async_save=True)
    checkpointer = checkpoints_lib.Checkpointer(directory, save_cfg)
    latest = checkpointer.latest_step()
    if latest is None or checkpointer.read_metadata(latest).get("settings") == run.to_json():
        return checkpointer
    logger.warning("root: %s holds a checkpoint of other settings; starting afresh.", directory)
    checkpointer.close()
    shutil.rmtree(directory)
    return checkpoints_lib.Checkpointer(directory, save_cfg)


def _start(
    run: _Settings, trainer: trainer_lib.Trainer, checkpointer: checkpoints_lib.Checkpointer
) -> tuple[trainer_lib.TrainState, int, float]:
    """(state, start step, train seconds so far): the latest checkpoint's, else step 0."""
    latest = checkpointer.latest_step()
    if latest is None:
        params = _initial_params(run)
        if params is None:
            return trainer.init_state(jax.random.key(run.seed)), 0, 0.0
        return trainer.state_from_params(params), 0, 0.0
    target = partitioning.with_shardings(trainer.abstract_state, trainer.state_shardings)
    items, meta = checkpointer.restore(
        {"params": target.params, "opt_state": target.opt_state}, latest
    )
    step = jax.device_put(np.int32(latest), trainer.state_shardings.step)
    return trainer_lib.TrainState(step=step, **items), latest, float(meta["train_seconds"])


class _Log:
    """The loop's progress action: mean loss and accuracy of the window, steps/s, ETA."""

    def __init__(self, every: int, total: int, start: int):
        self.every, self.total = every, total
        self._time, self._step = time.perf_counter(), start

    def due(self, step: int) -> bool:
        """Every `every` steps and at the last."""
        return step % self.every == 0 or step == self.total

    def __call__(self, progress: loop.Progress) -> None:
        """Logs the window's metrics (waits for its steps, so the rate is real)."""
        values = trainer_lib.compute_metrics(progress.metrics)
        progress.metrics = progress.trainer.empty_metrics()
        now = time.perf_counter()
        rate = (progress.step - self._step) / max(now - self._time, 1e-9)
        logger.info(
            "root: step %d/%d loss %.4f, train accuracy %.4f, %.2f steps/s, ETA %.0f s",
            *(progress.step, self.total, values["loss"], values["accuracy"], rate),
            (self.total - progress.step) / rate,
        )
        self._time, self._step = now, progress.step


def _train(
    run: _Settings, root_dir: str, checkpoint_every: int, log_every: int
) -> tuple[Any, int, float]:
    """Runs (or resumes) the training loop; returns (params, start step, train seconds)."""
    if run.steps == 0:  # The init checkpoint as it is (the settings demand one).
        params = _initial_params(run)
        assert params is not None
        return jax.device_get(params), 0, 0.0
    images, labels = load_task_arrays(run.task, "train", max_examples=run.max_train_examples)
    if len(labels) < run.batch_size:
        raise ValueError(f"{len(labels)} train examples < batch_size {run.batch_size}.")
    trainer = _trainer(run)
    checkpointer = _open_checkpointer(root_dir, run)
    try:
        state, start_step, train_seconds = _start(run, trainer, checkpointer)
        if start_step:
            logger.info("root: resuming %s at step %d/%d", root_dir, start_step, run.steps)
        logger.info(
            "root: training a %d-parameter ViT (%s) on %s (%d examples), %d steps of %d",
            system.num_params_of(trainer.abstract_state.params),
            f"from {run.init_checkpoint}" if run.init_checkpoint else "from scratch",
            *(run.task, len(labels), run.steps, run.batch_size),
        )
        metadata = {
            "settings": run.to_json(),
            "architecture": checkpoints_lib.architecture_metadata(trainer.model),
        }
        loop_start = time.perf_counter()

        def save(progress: loop.Progress) -> None:
            seconds = train_seconds + time.perf_counter() - loop_start
            checkpointer.save(progress.step, progress.state, {**metadata, "train_seconds": seconds})

        actions: list[loop.Action] = [
            _Log(log_every, run.steps, start_step),
            loop.When(lambda s: s % checkpoint_every == 0 or s == run.steps, save),
        ]
        progress = loop.Progress(trainer, state, trainer.empty_metrics(), start_step)
        batch_stream = _train_batches(run, images, labels, start_step)
        progress = loop.run(progress, batch_stream, run.steps, actions)
        params = jax.device_get(progress.state.params)
        train_seconds += time.perf_counter() - loop_start
    finally:
        checkpointer.close()  # Waits for the last save.
    return params, start_step, train_seconds


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
        init_checkpoint=info.get("init_checkpoint"),
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
    init_checkpoint: str | None = None,
) -> RootResult:
    """Pretrains the root ViT on a seqio image task and writes it to `root_dir`.

    Starts from scratch, or from the weights of `init_checkpoint`. Resumes from the
    orbax checkpoint in `root_dir/checkpoints` when it holds one of the same settings (a
    killed run continues; its final parameters equal an uninterrupted run's). Logs
    loss, steps/s and ETA every `log_every` steps to the "evogrow" logger; at the end
    evaluates validation and test accuracy and writes root.npz and root.json (see the
    module docstring). The launcher's entry point (gin/runs/pretrain_root.gin binds
    every argument).

    Args:
      root_dir: the root directory (created if missing).
      task: the registered image task to pretrain on.
      config: the ViT; None: `default_root_config` with the task's class count (or,
        with `init_checkpoint`, the checkpoint's architecture: give only one of both).
      steps: training steps (0 only with `init_checkpoint`: its weights as they are).
      batch_size: examples per step.
      learning_rate: peak AdamW learning rate.
      warmup_steps: linear warmup steps (< steps; ignored when steps is 0).
      weight_decay: AdamW weight decay (on matrices).
      seed: initialisation and batch-order (and dropout) seed.
      checkpoint_every: steps between checkpoints (the last step is always saved).
      log_every: steps between progress lines.
      max_train_examples: train on the first this many examples only (None: all).
      init_checkpoint: a big_vision / AugReg ViT `.npz` to start from (position
        embeddings resampled to the task's patch grid, a fresh zero head for its
        classes; `models.pretrained.vit_checkpoints`); None: from scratch.

    Returns:
      The finished root.

    Raises:
      ValueError: invalid settings, or a config that does not fit the task.
      models.pretrained.vit_checkpoints.CheckpointError: `init_checkpoint` is unreadable or not a
        ViT in big_vision's layout (a ValueError).
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
        init_checkpoint=init_checkpoint,
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
    architecture, steps, batch size, learning rate, warmup, weight decay, seed, the
    train-example limit and the init checkpoint (its path and content), not
    `checkpoint_every` / `log_every`.

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
