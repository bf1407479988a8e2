"""The roots of a stored system: root models stored as components and their root paths.

`seed_root` stores any family's root model (`evolution.system.families`: the pretrained
ViT of `evolution.roots.root`, the MiniLM encoder of `evolution.roots.text_root`) so that
every task's first candidates start from it (`search.evolve_task`) and the baselines train from it
(`evolution.agents.baselines`).

`seed_random_root` adds, next to it, a randomly initialised model of the same
architecture, published by its own root agent (the multiagent notebook's
"root_model/random_init" beside "root_model/checkpoint"): it is one more seed of every
task (`SystemState.extra_roots`), so paths may start from either root, while the
pretrained root stays the unit of the score's scale control.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from evolution import store as store_lib
from evolution.search.space import mutations
from evolution.system import families
from evolution.system import state as system
from evolution.system.architecture import ROOT_TASK, architecture_of, model_config_of
from models import encoder, vit

# The task and agent of the randomly initialised root.
RANDOM_ROOT_TASK = "root_random"
RANDOM_ROOT_AGENT = "root_random"


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
    root = _publish_root(store, state, config, params, agent=agent, task=task, metadata={})
    store.set_root(root.id)
    return root


def _publish_root(
    store: store_lib.Store,
    state: system.SystemState,
    config: families.ModelConfig,
    params: Mapping[str, Any],
    *,
    agent: str,
    task: str,
    metadata: Mapping[str, Any],
) -> system.Path:
    """Puts a root model's components and publishes its path `<task>:path` (one transaction)."""
    if config.num_classes is None:
        raise ValueError("The root model needs a head: set num_classes in its config.")
    slots = families.family_of(config).component_slots(config)
    missing = [slot for slot in slots if slot not in params]
    if missing:
        raise ValueError(f"Root parameters lack slots {missing}.")
    store.add_task(task, num_classes=config.num_classes, metadata={"root": True, **metadata})
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
        id=f"{task}:path",
        task=task,
        components=tuple(components),
        agent=agent,
        architecture=architecture_of(config),
    )
    store.publish(agent, paths=[root], components=[cid for _, cid in components])
    return root


def random_params(config: families.ModelConfig, key: jax.Array) -> dict[str, Any]:
    """A freshly initialised model of `config`'s family, keyed by slot (numpy arrays).

    Args:
      config: a ViT's or the text encoder's config (with `num_classes`).
      key: the initialisation's PRNG key.

    Returns:
      The parameters, as `seed_root` takes them.
    """
    spec = families.family_of(config).input_spec(config)
    module = vit.ViT(config) if isinstance(config, vit.ViTConfig) else encoder.Encoder(config)
    variables = jax.jit(module.init)(key, jnp.zeros(spec.shape, spec.dtype))
    return _host_tree(variables["params"])


def seed_random_root(
    store: store_lib.Store,
    *,
    agent: str = RANDOM_ROOT_AGENT,
    task: str = RANDOM_ROOT_TASK,
    seed: int = 0,
) -> system.Path:
    """Adds a randomly initialised root of the root's architecture, as one more root.

    Its components `<task>:<slot>` are drawn by the family's own initialisers
    (`random_params`) and published with the path `<task>:path` by `agent`, its root
    agent, whose locks freeze them for every other agent; `Store.add_root` then makes it
    a seed of every task next to the pretrained root. Calling it again on a store that
    has it returns it unchanged.

    Args:
      store: a store with a root (`seed_root`).
      agent: the random root's agent.
      task: its task name (registered with the root's classes).
      seed: the initialisation's seed.

    Returns:
      The random root's path.

    Raises:
      ValueError: the store has no root, or `<task>:path` exists and is not a root of
        the root's architecture.
    """
    store.discard_staged(agent)  # Leftovers of an interrupted call are never published.
    state = store.load_state()
    if state.root_path_id is None:
        raise ValueError(
            "The store has no root: seed the pretrained root first (seed_root); the random "
            "root takes its architecture."
        )
    pretrained = state.paths[state.root_path_id]
    path_id = f"{task}:path"
    existing = state.paths.get(path_id)
    if existing is not None:
        if existing.architecture != pretrained.architecture or existing.agent != agent:
            raise ValueError(
                f"The store holds a path {path_id!r} that is not a random root of the root's "
                "architecture; pass another task name."
            )
        store.add_root(path_id)
        return existing
    config = model_config_of(pretrained)
    params = random_params(config, jax.random.PRNGKey(seed))
    root = _publish_root(
        store, state, config, params, agent=agent, task=task, metadata={"random_init": True}
    )
    store.add_root(root.id)
    return root
