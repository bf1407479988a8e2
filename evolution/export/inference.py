"""Inference from the store: a task's published best path run on its inputs.

The path's family (`evolution.system.families`) decides what the inputs are: images for a ViT
path, token ids for a text-encoder path.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from evolution import store as store_lib
from evolution.search import candidate
from evolution.system import families
from evolution.system.architecture import model_config_of


@functools.lru_cache(maxsize=32)
def _jitted_forward(config: families.ModelConfig, slots: tuple[str, ...]) -> Any:
    return jax.jit(functools.partial(candidate.forward, config, slots))


def predict(store: store_lib.Store, task: str, images: Any) -> np.ndarray:
    """Logits of a task's published best path, read from the store.

    Args:
      store: the store.
      task: the task.
      images: the path's input feature: [N, H, W, C] float images for a ViT path,
        [N, L] int token ids (0 = padding) for a text-encoder path.

    Returns:
      Logits [N, num_classes] (numpy, float32).

    Raises:
      ValueError: the task has no active path.
    """
    state = store.load_state()
    path = state.best_path(task)
    if path is None:
        raise ValueError(f"Task {task!r} has no active path in the store.")
    config = model_config_of(path)
    slots = tuple(slot for slot, _ in path.components)
    params = {slot: store.load_params(cid) for slot, cid in path.components}
    inputs = jnp.asarray(images, families.family_of(config).input_dtype)
    logits = _jitted_forward(config, slots)(params, inputs)
    return np.asarray(jax.device_get(logits), np.float32)


def predict_classes(store: store_lib.Store, task: str, images: Any) -> np.ndarray:
    """Predicted classes (argmax of `predict`) of a task's published best path.

    Args:
      store: the store.
      task: the task.
      images: the path's input feature (see `predict`).

    Returns:
      int32 classes [N].
    """
    return np.argmax(predict(store, task, images), axis=-1).astype(np.int32)
