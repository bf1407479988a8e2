"""The architecture stored with a path: a ViT config as JSON and back.

Paths store their model config in `system.Path.architecture` so that a store alone
suffices to rebuild and run any task's model.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

from evolution import system
from models import vit

ROOT_TASK = "root"
MODEL_FAMILY = "vit"


def architecture_of(config: vit.ViTConfig) -> dict[str, Any]:
    """The JSON-safe architecture stored with a path (`system.Path.architecture`).

    Args:
      config: the path's ViT config.

    Returns:
      {"model": "vit", "config": fields except num_layers / num_classes,
      "num_layers": L, "num_classes": C}; `mutations.plan_child` updates "num_layers".
    """
    fields = {}
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if field.name in ("num_layers", "num_classes"):
            continue
        if field.name in ("dtype", "param_dtype"):
            value = jnp.dtype(value).name
        elif isinstance(value, tuple):
            value = list(value)
        fields[field.name] = value
    return {
        "model": MODEL_FAMILY,
        "config": fields,
        "num_layers": int(config.num_layers),
        "num_classes": int(config.num_classes),
    }


def config_of(path: system.Path) -> vit.ViTConfig:
    """Rebuilds a path's ViT config from its stored architecture.

    Args:
      path: a path written by this module (its architecture from `architecture_of`).

    Returns:
      The config.

    Raises:
      ValueError: the architecture is not a ViT's as written by `architecture_of`.
    """
    architecture = dict(path.architecture)
    if architecture.get("model") != MODEL_FAMILY or "config" not in architecture:
        raise ValueError(f"Path {path.id!r} has no ViT architecture: {architecture}.")
    fields = dict(architecture["config"])
    for name in ("dtype", "param_dtype"):
        if name in fields:
            fields[name] = getattr(jnp, str(fields[name]))
    if "image_shape" in fields:
        fields["image_shape"] = tuple(int(v) for v in fields["image_shape"])
    return vit.ViTConfig(
        **fields,
        num_layers=int(architecture["num_layers"]),
        num_classes=int(architecture["num_classes"]),
    )
