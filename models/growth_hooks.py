"""Growth hooks: read a t5x-contract model's architecture config and rebuild it at new sizes.

Every evogrow model keeps its Linen module in `model.module` and the module keeps its
frozen architecture dataclass in `module.config` (`ViTConfig`, `DecoderConfig`,
`EncoderConfig`). Growth (growth/) maps a config to a grown config; these hooks turn the
grown config back into a model with everything else (optimizer, loss options, routing)
unchanged. Wrappers that hold an evogrow model in `.model` (models/t5x_adapter.py) are
handled by recursing into it.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any


def _inner(model: Any) -> Any:
    """Returns the object holding `.module` (the model itself, or a wrapped model)."""
    if hasattr(model, "module"):
        return model
    wrapped = getattr(model, "model", None)
    if wrapped is not None and wrapped is not model:
        return _inner(wrapped)
    raise TypeError(
        f"{type(model).__name__} has no `module` (nor a wrapped `.model` with one); "
        "growth needs a model whose Linen module carries a `config` dataclass."
    )


def model_config(model: Any) -> Any:
    """Returns the architecture config dataclass of a model.

    Args:
      model: an evogrow t5x-contract model (or a wrapper with `.model`).

    Returns:
      `model.module.config`.

    Raises:
      TypeError: the model's module has no config dataclass.
    """
    config = getattr(_inner(model).module, "config", None)
    if not (dataclasses.is_dataclass(config) and not isinstance(config, type)):
        raise TypeError(
            f"{type(_inner(model).module).__name__} has no `config` dataclass; growth and "
            "architecture checkpoints need one."
        )
    return config


def with_config(model: Any, config: Any) -> Any:
    """Returns a shallow copy of `model` whose module is built with `config`.

    The optimizer, loss options and any wrapper are kept; only the module (and so the
    parameter shapes) changes. The original model is not modified.

    Args:
      model: an evogrow t5x-contract model (or a wrapper with `.model`).
      config: the new architecture, of the same class as `model_config(model)`.

    Returns:
      the model for `config`.

    Raises:
      TypeError: `config` is not of the model's config class.
    """
    old = model_config(model)
    if type(config) is not type(old):
        raise TypeError(f"cannot build a {type(old).__name__} model from a {type(config).__name__}")
    if hasattr(model, "module"):
        grown = copy.copy(model)
        grown.module = model.module.clone(config=config)
        return grown
    grown = copy.copy(model)
    grown.model = with_config(model.model, config)
    return grown
