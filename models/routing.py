"""A multitask model that routes each example through its own task's path.

The parameters are the pool itself ({component_id: parameters}); a component shared by
several paths exists once. Every path runs on the whole batch and each example keeps the
output of the path its `task_id` names, so one jitted step serves a whole seqio mixture.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from models import paths as paths_lib
from models import vit
from models.paths import Path

# Logit of the classes a task's head lacks: far below any real logit, still finite.
ABSENT_CLASS_LOGIT = -1e9


def select_by_task(logits_per_task: Sequence[jax.Array], task_id_B: jax.Array) -> jax.Array:
    """Keeps, for each example, the logits of the path its task id names.

    Args:
      logits_per_task: one [B, K_t] array per task id (every task ran on the whole batch).
      task_id_B: int task ids indexing `logits_per_task`.

    Returns:
      Logits [B, max K_t] in float32; classes beyond a task's head are ABSENT_CLASS_LOGIT.
    """
    width = max(logits.shape[-1] for logits in logits_per_task)
    routed_BxK = jnp.full((task_id_B.shape[0], width), ABSENT_CLASS_LOGIT, jnp.float32)
    for task_id, logits_BxKt in enumerate(logits_per_task):
        padded_BxK = jnp.pad(
            logits_BxKt.astype(jnp.float32),
            ((0, 0), (0, width - logits_BxKt.shape[-1])),
            constant_values=ABSENT_CLASS_LOGIT,
        )
        routed_BxK = jnp.where((task_id_B == task_id)[:, None], padded_BxK, routed_BxK)
    return routed_BxK


def apply_routed(
    paths: Sequence[Path],
    pool: Mapping[str, paths_lib.Params],
    image_BxHxWxC: jax.Array,
    task_id_B: jax.Array,
) -> jax.Array:
    """Functional twin of RoutedClassifier: runs every path and routes by task id.

    Args:
      paths: one path per task id, in task-id order.
      pool: {component_id: parameters} covering every path.
      image_BxHxWxC: images.
      task_id_B: int task ids indexing `paths`.

    Returns:
      Logits [B, max num_classes] (see `select_by_task`).
    """
    outputs = [paths_lib.apply_path(path, pool, image_BxHxWxC) for path in paths]
    return select_by_task(outputs, task_id_B)


class RoutedClassifier(nn.Module):
    """Runs paths[task_id] for each example; logits padded to the widest head.

    Attributes:
      paths: one path per task id, in task-id order (a mixture's task order).
    """

    paths: Sequence[Path]

    @nn.compact
    def __call__(
        self, image_BxHxWxC: jax.Array, task_id_B: jax.Array, deterministic: bool = True
    ) -> jax.Array:
        """Classifies each image with its task's path.

        Args:
          image_BxHxWxC: images (one shape for the whole mixture).
          task_id_B: int task ids indexing `paths`.
          deterministic: disables dropout.

        Returns:
          Logits [B, max num_classes]; classes beyond a task's head are ABSENT_CLASS_LOGIT.
        """
        if not self.paths:
            raise ValueError("RoutedClassifier needs at least one path.")
        modules: dict[str, nn.Module] = {}
        outputs = []
        for path in self.paths:
            x = image_BxHxWxC
            for slot, component_id in path.components:
                if component_id not in modules:
                    modules[component_id] = vit.make_component(path.config, slot, name=component_id)
                module = modules[component_id]
                if slot.startswith("block_"):
                    x = module(x, None, deterministic)
                else:
                    x = module(x)
            outputs.append(x)
        return select_by_task(outputs, task_id_B)
