"""The architecture stored with a path: a model config as JSON and back.

Paths store their model config in `system.Path.architecture` so that a store alone
suffices to rebuild and run any task's model. The "model" field names the family
(`evolution.system.families`: "vit", the default, or "encoder" for the text encoder).
"""

from __future__ import annotations

from typing import Any

from evolution.system import families
from evolution.system import state as system
from models import vit

ROOT_TASK = "root"
MODEL_FAMILY = families.DEFAULT_FAMILY


def architecture_of(config: families.ModelConfig) -> dict[str, Any]:
    """The JSON-safe architecture stored with a path (`system.Path.architecture`).

    Args:
      config: the path's config (a ViT's or the text encoder's).

    Returns:
      {"model": "vit" (or the family's name), "config": fields except num_layers /
      num_classes, "num_layers": L, "num_classes": C}; `mutations.plan_child` updates
      "num_layers".
    """
    return families.architecture_of(config)


def model_config_of(path: system.Path) -> families.ModelConfig:
    """Rebuilds a path's config, of whichever family, from its stored architecture.

    Args:
      path: a path written by this module (its architecture from `architecture_of`).

    Returns:
      The config (`vit.ViTConfig`, `encoder.EncoderConfig`).

    Raises:
      ValueError: the path has no architecture of a known family.
    """
    try:
        return families.config_from_architecture(path.architecture)
    except ValueError as error:
        raise ValueError(f"Path {path.id!r}: {error}") from error


def config_of(path: system.Path) -> vit.ViTConfig:
    """Rebuilds a ViT path's config from its stored architecture.

    Args:
      path: a path written by this module (its architecture from `architecture_of`).

    Returns:
      The config.

    Raises:
      ValueError: the architecture is not a ViT's as written by `architecture_of` (use
        `model_config_of` for any family).
    """
    architecture = dict(path.architecture)
    if architecture.get("model") != MODEL_FAMILY or "config" not in architecture:
        raise ValueError(f"Path {path.id!r} has no ViT architecture: {architecture}.")
    config = families.config_from_architecture(architecture)
    assert isinstance(config, vit.ViTConfig)
    return config
