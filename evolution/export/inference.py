"""Inference from the store: a task's served path run on its inputs.

The served path is `SystemState.best_path`: the task's best single path, or its router
path (`evolution.search.paths.router_path`) where that beats it. The path's family
(`evolution.system.families`; a router path's members') decides what the inputs are:
images for a ViT path, token ids for a text-encoder path.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from evolution import store as store_lib
from evolution.search.paths import candidate, router_path
from evolution.system import families
from evolution.system import state as system
from evolution.system.architecture import model_config_of


@functools.lru_cache(maxsize=32)
def _jitted_forward(config: families.ModelConfig, slots: tuple[str, ...]) -> Any:
    return jax.jit(functools.partial(candidate.forward, config, slots))


@functools.lru_cache(maxsize=32)
def _jitted_router_forward(layout: router_path.RouterLayout) -> Any:
    return jax.jit(functools.partial(router_path.forward, layout))


def predict(store: store_lib.Store, task: str, images: Any) -> np.ndarray:
    """Logits of a task's served path (`SystemState.best_path`), read from the store.

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
    params = {slot: store.load_params(cid) for slot, cid in path.components}
    if system.is_router_path(path):
        layout = router_path.layout_of(path)
        inputs = jnp.asarray(images, families.family_of(layout.members[0].config).input_dtype)
        logits = _jitted_router_forward(layout)(params, inputs)
    else:
        config = model_config_of(path)
        slots = tuple(slot for slot, _ in path.components)
        inputs = jnp.asarray(images, families.family_of(config).input_dtype)
        logits = _jitted_forward(config, slots)(params, inputs)
    return np.asarray(jax.device_get(logits), np.float32)


def predict_classes(store: store_lib.Store, task: str, images: Any) -> np.ndarray:
    """Predicted classes (argmax of `predict`) of a task's served path.

    Args:
      store: the store.
      task: the task.
      images: the path's input feature (see `predict`).

    Returns:
      int32 classes [N].
    """
    return np.argmax(predict(store, task, images), axis=-1).astype(np.int32)
