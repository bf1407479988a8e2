"""A multitask model that routes each example through its own task's path.

The parameters are the pool itself ({component_id: parameters}); a component shared by
several paths exists once. Every path runs on the whole batch and each example keeps the
output of the path its `task_id` names, so one jitted step serves a whole seqio mixture.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from models import vit
from models.paths import Path


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
          Logits [B, max num_classes]; classes beyond a task's head are -1e9.
        """
        if not self.paths:
            raise ValueError("RoutedClassifier needs at least one path.")
        modules: dict[str, nn.Module] = {}
        width = max(path.config.num_classes for path in self.paths)
        routed_BxK = jnp.zeros((image_BxHxWxC.shape[0], width), jnp.float32)
        for task_id, path in enumerate(self.paths):
            x = image_BxHxWxC
            for slot, component_id in path.components:
                if component_id not in modules:
                    modules[component_id] = vit.make_component(path.config, slot, name=component_id)
                module = modules[component_id]
                if slot.startswith("block_"):
                    x = module(x, None, deterministic)
                else:
                    x = module(x)
            logits_BxK = jnp.pad(
                x.astype(jnp.float32), ((0, 0), (0, width - x.shape[-1])), constant_values=-1e9
            )
            routed_BxK = jnp.where((task_id_B == task_id)[:, None], logits_BxK, routed_BxK)
        return routed_BxK
