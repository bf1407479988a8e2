"""Orbax checkpoints of the train state, with the architecture recorded as JSON metadata.

A checkpoint step holds three items: `params`, `opt_state` (both sharded arrays) and
`meta` (JSON: the step, the model's architecture config, free-form extras). Recording
the architecture lets a run that grew mid-training rebuild the grown model before it
restores. Restoring checks every parameter's shape against the model first and names
each mismatch.
"""

from __future__ import annotations

import dataclasses
import enum
import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

from models import decoder, encoder, vit
from training import settings

logger = logging.getLogger("evogrow")


def _class_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


# The architecture config classes a checkpoint may name. Rebuilding a config calls its
# class with the checkpoint's values, so the class comes from this table, never from an
# import of the name a file holds (a name like `subprocess.Popen` would run a command).
# Keys are the names `architecture_metadata` writes.
_ARCHITECTURE_CONFIGS: dict[str, type] = {
    _class_name(cls): cls for cls in (vit.ViTConfig, decoder.DecoderConfig, encoder.EncoderConfig)
}


def register_architecture_config(cls: type) -> type:
    """Allows checkpoints to name `cls` as their architecture config (usable as a decorator).

    Args:
      cls: a frozen dataclass of architecture sizes, defined in code (not named by data).

    Returns:
      `cls`.

    Raises:
      TypeError: `cls` is not a dataclass.
    """
    if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
        raise TypeError(f"{cls!r} is not a dataclass; only config dataclasses can be registered")
    _ARCHITECTURE_CONFIGS[_class_name(cls)] = cls
    return cls


@dataclasses.dataclass(frozen=True)
class SaveCheckpointConfig:
    """When and how to save (t5x's `SaveCheckpointConfig` surface).

    Attributes:
      period: save every `period` steps (and at the last step); 0 saves only at the end.
      keep: how many checkpoints to keep (None keeps all).
      async_save: write in a background thread while training goes on.
    """

    period: int = 1000
    keep: int | None = None
    async_save: bool = True

    def __post_init__(self):
        settings.whole_number(self.period, "CHECKPOINT_PERIOD", 0, "SaveCheckpointConfig.period")
        settings.optional_whole_number(self.keep, "CHECKPOINTS_TO_KEEP", 1, "None keeps all")


@dataclasses.dataclass(frozen=True)
class RestoreCheckpointConfig:
    """Where to initialise from (t5x's `RestoreCheckpointConfig` surface).

    Attributes:
      path: a model directory holding orbax checkpoints (None: nothing to restore).
      step: the step to restore; None takes the latest.
      restore_optimizer: also restore the optimizer state (else only params).
    """

    path: str | None = None
    step: int | None = None
    restore_optimizer: bool = False


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    """Saving and restoring together (t5x's `CheckpointConfig` surface).

    Attributes:
      save: saving policy; None never saves.
      restore: initialisation of a fresh run; a run always resumes from its own
        model directory first.
    """

    save: SaveCheckpointConfig | None = SaveCheckpointConfig()
    restore: RestoreCheckpointConfig | None = None


class CheckpointShapeError(ValueError):
    """A checkpoint's parameters do not match the model's shapes or structure."""


class CheckpointMetadataError(ValueError):
    """A checkpoint's metadata names something evogrow does not build (a foreign class)."""


class CheckpointNotFoundError(FileNotFoundError):
    """No checkpoint directory, or no checkpoint at the requested step."""


def _json_safe(value: Any) -> Any:
    if isinstance(value, enum.Enum):
        return value.value
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _json_safe(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    if value is None or isinstance(value, bool | int | float | str):
        return value
    try:
        return str(np.dtype(value))
    except TypeError:
        return getattr(value, "__name__", repr(value))


def architecture_metadata(model: Any) -> dict[str, Any]:
    """Describes the model's architecture as JSON-safe data.

    Looks for a dataclass config on `model.module.config` (the models' frozen config
    dataclasses, e.g. `ViTConfig`).

    Args:
      model: a t5x-contract model.

    Returns:
      {"model", "module", "config_class", "config"}; config is {} when none is found.
    """
    module = getattr(model, "module", None)
    config = getattr(module, "config", None)
    is_config = dataclasses.is_dataclass(config) and not isinstance(config, type)
    return {
        "model": f"{type(model).__module__}.{type(model).__qualname__}",
        "module": f"{type(module).__module__}.{type(module).__qualname__}" if module else None,
        "config_class": (
            f"{type(config).__module__}.{type(config).__qualname__}" if is_config else None
        ),
        "config": _json_safe(config) if is_config else {},
    }


def architecture_metadata_of_config(config: Any) -> dict[str, Any]:
    """Returns a config dataclass as the JSON-safe "config" entry of the architecture."""
    return _json_safe(config)


def resolve_directory(path: str) -> str:
    """Accepts a model directory (with `checkpoints/`) or the checkpoints folder itself."""
    nested = os.path.join(path, "checkpoints")
    return nested if os.path.isdir(nested) else path


def architecture_config(metadata: Mapping[str, Any]) -> Any:
    """Rebuilds the config dataclass recorded by `architecture_metadata`.

    A run resumed after growth builds its model from this (the grown sizes), not from
    the gin file it started with. The recorded class must be one of the project's
    architecture configs (`register_architecture_config`); the name is looked up, never
    imported.

    Args:
      metadata: the "architecture" entry of a checkpoint's metadata.

    Returns:
      an instance of the recorded config class (JSON lists become tuples).

    Raises:
      ValueError: the checkpoint recorded no config dataclass.
      CheckpointMetadataError: the recorded class is not an allowed architecture config,
        or its values are not that config's fields.
    """
    name = metadata.get("config_class")
    if not name:
        raise ValueError("the checkpoint recorded no architecture config dataclass")
    config_cls = _ARCHITECTURE_CONFIGS.get(str(name))
    if config_cls is None:
        raise CheckpointMetadataError(
            f"the checkpoint names config_class {name!r}, which is not an evogrow "
            f"architecture config (known: {', '.join(sorted(_ARCHITECTURE_CONFIGS))}); "
            "refusing to build it: only checkpoints written by evogrow can be loaded"
        )
    return _build_config(config_cls, metadata.get("config", {}))


def _build_config(config_cls: type, recorded: Any) -> Any:
    """Calls `config_cls` with a checkpoint's recorded values (dtypes by name)."""
    fields = {f.name for f in dataclasses.fields(config_cls)}
    if not isinstance(recorded, Mapping) or not set(recorded) <= fields:
        unknown = sorted(set(recorded) - fields) if isinstance(recorded, Mapping) else recorded
        raise CheckpointMetadataError(
            f"the checkpoint's architecture config holds {unknown!r}, which are not fields "
            f"of {config_cls.__name__}"
        )
    values = {}
    for key, value in recorded.items():
        if isinstance(value, list):
            value = tuple(value)
        elif key.endswith("dtype") and isinstance(value, str):
            value = np.dtype(value) if value != "bfloat16" else jax.numpy.bfloat16
        values[key] = value
    try:
        return config_cls(**values)
    except (TypeError, ValueError) as error:
        raise CheckpointMetadataError(
            f"the checkpoint's {config_cls.__name__} values are invalid: {error}"
        ) from error


def model_for_checkpoint(model: Any, metadata: Mapping[str, Any]) -> Any:
    """Returns `model` rebuilt with the architecture a checkpoint recorded, if it differs.

    A run that grew (mid-run or with `./run.sh grow`) saves the grown architecture; the
    model built from the gin file has the original one. When both configs are of the
    same class, the recorded one wins, so the checkpoint restores into matching shapes.

    Args:
      model: the t5x-contract model built from the config.
      metadata: a checkpoint's metadata (`Checkpointer.read_metadata`).

    Returns:
      `model` itself, or a copy built with the recorded config.
    """
    from models import growth_hooks

    recorded = metadata.get("architecture", {})
    try:
        current = growth_hooks.model_config(model)
    except TypeError:
        return model
    if recorded.get("config_class") != _class_name(type(current)):
        return model
    # The class is the gin-built model's own, not one named by the file.
    config = _build_config(type(current), recorded.get("config", {}))
    if config == current:
        return model
    changed = {
        f.name: (getattr(current, f.name), getattr(config, f.name))
        for f in dataclasses.fields(config)
        if getattr(current, f.name) != getattr(config, f.name)
    }
    logger.info("using the checkpoint's architecture: %s", changed)
    return growth_hooks.with_config(model, config)


def _path_str(path: Sequence[Any]) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def _shapes_by_path(tree: Any) -> dict[str, tuple[int, ...]]:
    leaves = jax.tree_util.tree_flatten_with_path(
        tree, is_leaf=lambda x: hasattr(x, "shape") and not isinstance(x, Mapping)
    )[0]
    return {_path_str(path): tuple(leaf.shape) for path, leaf in leaves}


def check_shapes(stored: Any, expected: Any, item: str = "params") -> None:
    """Raises if a stored tree's shapes or structure differ from the expected one.

    Args:
      stored: the checkpoint's tree metadata (leaves with `.shape`).
      expected: the model's abstract tree (leaves with `.shape`).
      item: name of the item, for the message.

    Raises:
      CheckpointShapeError: naming every mismatched parameter with both shapes, and
        parameters present on one side only.
    """
    have, want = _shapes_by_path(stored), _shapes_by_path(expected)
    problems = [
        f"  {path}: checkpoint {have[path]} vs model {want[path]}"
        for path in sorted(have.keys() & want.keys())
        if have[path] != want[path]
    ]
    problems += [
        f"  {path}: in the model, not in the checkpoint" for path in sorted(want - have.keys())
    ]
    problems += [
        f"  {path}: in the checkpoint, not in the model" for path in sorted(have - want.keys())
    ]
    if problems:
        raise CheckpointShapeError(
            f"checkpoint {item} do not match the model ({len(problems)} problems); "
            "was the checkpoint written by a different (e.g. grown) architecture? "
            "Build the model from the checkpoint's recorded architecture "
            "(`Checkpointer.read_metadata`).\n" + "\n".join(problems)
        )


class Checkpointer:
    """Saves and restores train states in one directory with an orbax CheckpointManager.

    Args:
      directory: where the step folders live (created unless `read_only`).
      save_cfg: keep / async settings for saving; None when only reading.
      read_only: never write (eval, infer).

    Raises:
      CheckpointNotFoundError: `read_only` and no such directory.
    """

    def __init__(
        self,
        directory: str,
        save_cfg: SaveCheckpointConfig | None = None,
        read_only: bool = False,
    ):
        # orbax's tensorstore writer refuses relative paths (MODEL_DIR='runs/x' is common).
        self.directory = epath.Path(
            os.path.abspath(directory) if "://" not in directory else directory
        )
        if read_only and not self.directory.is_dir():
            raise CheckpointNotFoundError(f"no checkpoint directory at {directory}")
        options = ocp.CheckpointManagerOptions(
            max_to_keep=save_cfg.keep if save_cfg else None,
            enable_async_checkpointing=bool(save_cfg and save_cfg.async_save),
            create=not read_only,
            read_only=read_only,
            save_interval_steps=0 if read_only else 1,
        )
        handlers = {
            "params": ocp.StandardCheckpointHandler(),
            "opt_state": ocp.StandardCheckpointHandler(),
            "meta": ocp.JsonCheckpointHandler(),
        }
        # orbax warns that the directory "is read only" on every read-only manager, which
        # is what was asked for: the warning would be the only output of a clean eval.
        absl_logger = logging.getLogger("absl")
        level = absl_logger.level
        if read_only:
            absl_logger.setLevel(logging.ERROR)
        try:
            self._manager = ocp.CheckpointManager(
                self.directory, options=options, item_handlers=handlers
            )
        finally:
            absl_logger.setLevel(level)

    def latest_step(self) -> int | None:
        """Returns the latest saved step, or None when there is none."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        """Returns every saved step, ascending."""
        return sorted(self._manager.all_steps())

    def save(self, step: int, state: Any, metadata: Mapping[str, Any]) -> None:
        """Saves `state` (a `TrainState`) at `step` (asynchronously when configured).

        Args:
          step: the step number (the state's step).
          state: the train state; only `params` and `opt_state` are stored as arrays.
          metadata: JSON-safe extras, e.g. {"architecture": architecture_metadata(model)}.
        """
        meta = {"step": int(step), **_json_safe(dict(metadata))}
        self._manager.save(
            step,
            args=ocp.args.Composite(
                params=ocp.args.StandardSave(state.params),
                opt_state=ocp.args.StandardSave(state.opt_state),
                meta=ocp.args.JsonSave(meta),
            ),
            force=True,
        )

    def read_metadata(self, step: int | None = None) -> dict[str, Any]:
        """Returns the JSON metadata of `step` (default: latest), e.g. the architecture."""
        step = self._resolve(step)
        restored = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return dict(restored["meta"])

    def restore(
        self, targets: Mapping[str, Any], step: int | None = None
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """Restores the named items into the shapes and shardings of their targets.

        Args:
          targets: item name ("params", "opt_state") -> tree of ShapeDtypeStructs
            carrying shardings; only the named items are read.
          step: which step; None takes the latest.

        Returns:
          (items, metadata): item name -> restored tree, and the step's JSON metadata.

        Raises:
          CheckpointShapeError: a stored tree does not fit its target.
          CheckpointNotFoundError: no such checkpoint in the directory.
        """
        step = self._resolve(step)
        stored = self._manager.item_metadata(step)
        for name, target in targets.items():
            tree = stored[name]
            check_shapes(getattr(tree, "tree", tree), target, item=name)
        args = {name: ocp.args.StandardRestore(target) for name, target in targets.items()}
        restored = self._manager.restore(
            step, args=ocp.args.Composite(meta=ocp.args.JsonRestore(), **args)
        )
        return {name: restored[name] for name in targets}, dict(restored["meta"])

    def restore_on_host(self, names: Sequence[str], step: int | None = None) -> dict[str, Any]:
        """Restores items as numpy arrays in their stored structure, without a model.

        Named tuples of optax states come back as dicts keyed by field name, which
        `save` writes back in the same on-disk layout.

        Args:
          names: item names ("params", "opt_state").
          step: which step; None takes the latest.

        Returns:
          item name -> tree of numpy arrays.
        """
        step = self._resolve(step)
        stored = self._manager.item_metadata(step)
        cpu = jax.sharding.SingleDeviceSharding(jax.local_devices(backend="cpu")[0])

        def target(leaf: Any) -> Any:
            return jax.ShapeDtypeStruct(tuple(leaf.shape), leaf.dtype, sharding=cpu)

        args = {}
        for name in names:
            tree = getattr(stored[name], "tree", stored[name])
            args[name] = ocp.args.StandardRestore(
                jax.tree.map(target, tree, is_leaf=lambda x: hasattr(x, "shape"))
            )
        restored = self._manager.restore(step, args=ocp.args.Composite(**args))
        return {name: jax.tree.map(np.asarray, restored[name]) for name in names}

    def _resolve(self, step: int | None) -> int:
        steps = self.all_steps()
        if step is None and steps:
            return steps[-1]
        if step is None or step not in steps:
            at = "" if step is None else f" at step {step}"
            have = f"its steps: {', '.join(map(str, steps))}" if steps else "it holds none"
            raise CheckpointNotFoundError(f"no checkpoint{at} in {self.directory} ({have})")
        return int(step)

    def wait_until_finished(self) -> None:
        """Blocks until pending asynchronous saves are written."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Finishes pending saves and releases the manager."""
        self._manager.close()


def check_resumable(model_dir: str, total_steps: int) -> int | None:
    """Checks that a training run can continue the checkpoints already in `model_dir`.

    A run resumes from the latest checkpoint of `model_dir/checkpoints`. Checkpoints
    that evogrow's trainer did not write (an exported system, another program's) have
    no seed to resume with, and a checkpoint beyond `total_steps` would make the run
    train nothing (or, below a later one, never save); both are refused.

    Args:
      model_dir: the run's directory (MODEL_DIR).
      total_steps: the step the run stops at (TRAIN_STEPS), already checked.

    Returns:
      the latest checkpoint's step, or None when there is none.

    Raises:
      settings.SettingError: naming the directory and what it holds.
    """
    directory = os.path.join(model_dir, "checkpoints")
    exists = os.path.isdir(directory)
    if jax.process_count() > 1:
        # The first process's answer for all: another process may create the directory
        # in between, and the read-only manager below syncs every process, so a process
        # that took the other branch would meet a different barrier.
        exists = bool(multihost_utils.broadcast_one_to_all(np.int32(exists)))
    if not exists:
        return None
    reader = Checkpointer(directory, read_only=True)
    try:
        latest = reader.latest_step()
        if latest is None:
            return None
        try:
            meta = reader.read_metadata(latest)
        except (KeyError, ValueError, OSError) as error:
            meta = {"unreadable": str(error)}
    finally:
        reader.close()
    if "seed" not in meta:
        what = "an exported system" if "system" in meta else "no training run's metadata"
        raise settings.SettingError(
            f"MODEL_DIR={model_dir!r} holds checkpoints not written by evogrow's trainer "
            f"(step {latest} records {what}); train into a new MODEL_DIR."
        )
    if latest > total_steps:
        raise settings.SettingError(
            f"TRAIN_STEPS={total_steps} is below the latest checkpoint (step {latest}) in "
            f"MODEL_DIR={model_dir!r}, which the run would resume from (valid: "
            f"TRAIN_STEPS >= {latest}, or a new MODEL_DIR)."
        )
    return int(latest)
