"""The root of a stored system: a root model stored as components and its root path.

`seed_root` stores any family's root model (`evolution.system.families`: the pretrained
ViT of `evolution.roots.root`, the MiniLM encoder of `evolution.roots.text_root`) so that
every task's first candidates start from it (`search.evolve_task`) and the baselines train from it
(`evolution.agents.baselines`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import numpy as np

from evolution import store as store_lib
from evolution.search import mutations
from evolution.system import families
from evolution.system import state as system
from evolution.system.architecture import ROOT_TASK, architecture_of


def _host_tree(tree: Any) -> Any:
    return jax.tree_util.tree_map(lambda x: np.array(x, copy=True), nn.unbox(tree))


def seed_root(
    store: store_lib.Store,
    config: families.ModelConfig,
    params: Mapping[str, Any],
    *,
    agent: str,
    task: str = ROOT_TASK,
) -> system.Path:
    """Stores a root model as components and marks its path as the system's root.

    Components `<task>:<slot>` (the family's slots, `Family.component_slots`: for a ViT
    embed, cls, pos, block_i, final_norm, head; for the text encoder embed, block_i,
    head) are put and published with the root path `<task>:path` in one transaction,
    then `set_root`.
    Calling it again on a store whose root is this same path returns it unchanged.

    Args:
      store: the store.
      config: the root model's config (`vit.ViTConfig`, `encoder.EncoderConfig` with
        `num_classes` set).
      params: the root model's parameters keyed by slot (`vit.ViT(config)` or
        `encoder.Encoder(config)` params, boxed or not).
      agent: the root agent publishing it.
      task: the root's task name (registered with `config.num_classes` classes).

    Returns:
      The root path.

    Raises:
      ValueError: the store has another root already, or `params` lacks a slot.
    """
    store.discard_staged(agent)  # Leftovers of an interrupted call are never published.
    state = store.load_state()
    path_id = f"{task}:path"
    if state.root_path_id is not None:
        existing = state.paths[state.root_path_id]
        wanted = json.loads(json.dumps(architecture_of(config)))
        if existing.id == path_id and existing.architecture == wanted:
            return existing
        raise ValueError(f"The store has another root already: {state.root_path_id!r}.")
    if config.num_classes is None:
        raise ValueError("The root model needs a head: set num_classes in its config.")
    slots = families.family_of(config).component_slots(config)
    missing = [slot for slot in slots if slot not in params]
    if missing:
        raise ValueError(f"Root parameters lack slots {missing}.")
    store.add_task(task, num_classes=config.num_classes, metadata={"root": True})
    components = []
    for slot in slots:
        component_id = f"{task}:{slot}"
        tree = _host_tree(params[slot])
        record = system.Component(
            id=component_id,
            kind=mutations.slot_kind(slot),
            num_params=system.num_params_of(tree),
            agent=agent,
            task=task,
        )
        if component_id not in state.components:
            store.put_component(record, tree)
        components.append((slot, component_id))
    root = system.Path(
        id=path_id,
        task=task,
        components=tuple(components),
        agent=agent,
        architecture=architecture_of(config),
    )
    store.publish(agent, paths=[root], components=[cid for _, cid in components])
    store.set_root(path_id)
    return root
