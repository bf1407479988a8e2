"""Paths: a task's model as an ordered list of references into a pool of shared components.

A component is one named piece of a model (`embed`, `cls`, `pos`, `block_3`,
`final_norm`, `head`) with its own parameters. A pool maps component ids to parameters;
many paths may reference the same id, which is how tasks share knowledge. Evolution
(evolution/) mutates paths; growth (growth/) changes the config of a path's components.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax

from models import vit

Params = Any


@dataclasses.dataclass(frozen=True)
class Path:
    """One task's model: its architecture and the components it runs, in order.

    Attributes:
      task: the task (seqio name) the path solves.
      config: the architecture of the path's components.
      components: ordered (slot, component_id) pairs; slots follow
        `vit.component_slots(config)`.
    """

    task: str
    config: vit.ViTConfig
    components: tuple[tuple[str, str], ...]

    def __post_init__(self):
        slots = tuple(slot for slot, _ in self.components)
        expected = tuple(vit.component_slots(self.config))
        if slots != expected:
            raise ValueError(
                f"Path for {self.task!r} has slots {slots}; its config needs {expected}."
            )
        for _, component_id in self.components:
            if "/" in component_id:
                raise ValueError(f"Component id {component_id!r} may not contain '/'.")

    @property
    def component_ids(self) -> tuple[str, ...]:
        """The referenced component ids, in order."""
        return tuple(component_id for _, component_id in self.components)


def path_for_model(task: str, config: vit.ViTConfig, prefix: str) -> Path:
    """A path whose components are named `<prefix>:<slot>` (e.g. a freshly built model).

    Args:
      task: the task the path solves.
      config: the model's architecture.
      prefix: the component id prefix, e.g. the task name or "root".

    Returns:
      The path.
    """
    return Path(task, config, tuple((s, f"{prefix}:{s}") for s in vit.component_slots(config)))


def split_into_components(path: Path, params: Mapping[str, Params]) -> dict[str, Params]:
    """Turns a model's parameter tree (keyed by slot) into pool entries (keyed by id).

    Args:
      path: the path whose component ids name the entries.
      params: the model's parameters, top-level keys = slots.

    Returns:
      {component_id: parameters}.
    """
    missing = [slot for slot, _ in path.components if slot not in params]
    if missing:
        raise KeyError(f"Parameters lack components {missing} of the path for {path.task!r}.")
    return {component_id: params[slot] for slot, component_id in path.components}


def assemble_params(path: Path, pool: Mapping[str, Params]) -> dict[str, Params]:
    """Gathers a path's parameters from the pool into a tree keyed by slot (a plain ViT's).

    Args:
      path: the path.
      pool: {component_id: parameters}.

    Returns:
      {slot: parameters}, runnable with `vit.ViT(path.config)`.
    """
    missing = [cid for cid in path.component_ids if cid not in pool]
    if missing:
        raise KeyError(f"The pool lacks components {missing} of the path for {path.task!r}.")
    return {slot: pool[component_id] for slot, component_id in path.components}


def apply_path(
    path: Path,
    pool: Mapping[str, Params],
    image_BxHxWxC: jax.Array,
    *,
    deterministic: bool = True,
    return_prelogits: bool = False,
) -> jax.Array:
    """Runs a path on a batch of images, component by component.

    Args:
      path: the path to run.
      pool: {component_id: parameters}.
      image_BxHxWxC: input images.
      deterministic: disables dropout.
      return_prelogits: stop before the head's projection (pooled features).

    Returns:
      Logits [B, num_classes] (or pre-logits [B, D]).
    """
    x = image_BxHxWxC
    for slot, component_id in path.components:
        module = vit.make_component(path.config, slot)
        x = vit.apply_component(
            module,
            slot,
            pool[component_id],
            x,
            deterministic=deterministic,
            return_prelogits=return_prelogits,
        )
    return x
