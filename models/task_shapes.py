"""A model's task-dependent sizes (input shape, classes) taken from the task it trains on.

An architecture config may leave `image_shape` or `num_classes` as None: the task's. One
experiment file then serves any image task; the trainer fills the sizes in from the
task's data before it builds the model. A size the config pins is checked against the
task instead, so a file written for another task fails in one clear line.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from models import growth_hooks


class TaskShapeError(ValueError):
    """A size pinned in the model's config disagrees with the task; says what to change."""


def fit_to_task(
    model: Any,
    *,
    task_name: str,
    input_shape: Sequence[int] | None,
    num_classes: int | None,
) -> Any:
    """Returns `model` with the sizes its config leaves open set to the task's.

    Args:
      model: an evogrow t5x-contract model (or a wrapper with `.model`); models without
        an architecture config are returned as they are.
      task_name: the task or mixture (for messages).
      input_shape: one example's input shape, e.g. (H, W, C) of the `image` feature
        (None: unknown, nothing is filled in or checked).
      num_classes: the task's classes (None: unknown).

    Returns:
      `model`, or a copy built with the task's sizes.

    Raises:
      TaskShapeError: a pinned `image_shape` differs from the task's, or a pinned
        `num_classes` is smaller than the task's.
    """
    try:
        config = growth_hooks.model_config(model)
    except TypeError:
        return model
    changes: dict[str, Any] = {}
    fields = {f.name for f in dataclasses.fields(config)}
    if "image_shape" in fields and input_shape is not None:
        shape = tuple(int(v) for v in input_shape)
        if config.image_shape is None:
            changes["image_shape"] = shape
        elif tuple(config.image_shape) != shape:
            raise TaskShapeError(
                f"the model's image_shape {tuple(config.image_shape)} (pinned in the gin file) "
                f"!= task {task_name!r}'s images {shape}: drop the binding of "
                f"{type(config).__name__}.image_shape to take the task's, or set it to {shape}."
            )
    if "num_classes" in fields and num_classes is not None:
        if config.num_classes is None:
            changes["num_classes"] = int(num_classes)
        elif config.num_classes < num_classes:
            raise TaskShapeError(
                f"the model's num_classes={config.num_classes} (pinned in the gin file) < task "
                f"{task_name!r}'s {num_classes} classes: drop the binding of "
                f"{type(config).__name__}.num_classes to take the task's, or set it to "
                f"{num_classes}."
            )
    if not changes:
        return model
    try:
        fitted = dataclasses.replace(config, **changes)
    except ValueError as error:  # e.g. a patch size that does not divide the images
        raise TaskShapeError(f"task {task_name!r}: {error}") from error
    return growth_hooks.with_config(model, fitted)
