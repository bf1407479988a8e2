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
import importlib
import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

logger = logging.getLogger("evogrow")


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
    the gin file it started with.

    Args:
      metadata: the "architecture" entry of a checkpoint's metadata.

    Returns:
      an instance of the recorded config class (JSON lists become tuples).

    Raises:
      ValueError: the checkpoint recorded no config dataclass.
    """
    if not metadata.get("config_class"):
        raise ValueError("the checkpoint recorded no architecture config dataclass")
    module_name, _, class_name = metadata["config_class"].rpartition(".")
    config_cls = getattr(importlib.import_module(module_name), class_name)
    values = {}
    for key, value in metadata["config"].items():
        if isinstance(value, list):
            value = tuple(value)
        elif key.endswith("dtype") and isinstance(value, str):
            value = np.dtype(value) if value != "bfloat16" else jax.numpy.bfloat16
        values[key] = value
    return config_cls(**values)


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
    name = f"{type(current).__module__}.{type(current).__qualname__}"
    if recorded.get("config_class") != name:
        return model
    config = architecture_config(recorded)
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
    """

    def __init__(
        self,
        directory: str,
        save_cfg: SaveCheckpointConfig | None = None,
        read_only: bool = False,
    ):
        self.directory = epath.Path(directory)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=save_cfg.keep if save_cfg else None,
            enable_async_checkpointing=bool(save_cfg and save_cfg.async_save),
            create=not read_only,
            read_only=read_only,
        )
        handlers = {
            "params": ocp.StandardCheckpointHandler(),
            "opt_state": ocp.StandardCheckpointHandler(),
            "meta": ocp.JsonCheckpointHandler(),
        }
        self._manager = ocp.CheckpointManager(
            self.directory, options=options, item_handlers=handlers
        )

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
          FileNotFoundError: no such checkpoint in the directory.
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
        step = self.latest_step() if step is None else step
        if step is None or step not in self._manager.all_steps():
            raise FileNotFoundError(f"no checkpoint at step {step} in {self.directory}")
        return step

    def wait_until_finished(self) -> None:
        """Blocks until pending asynchronous saves are written."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Finishes pending saves and releases the manager."""
        self._manager.close()
