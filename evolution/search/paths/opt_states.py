"""Optimizer state per component: what a published component stores, what a clone reads.

mu2Net+ keeps the optimizer state (the momentum) with each component: a component is
published with its slice of the state of the training that produced it, and a later
clone of it (in another task iteration, or by another agent) starts from that slice.

A candidate's optimizer state is an optax state whose parameter-shaped dicts are keyed
by component id (`candidate.CandidateResult.opt_state`). A component's slice is the
subtree under its id in each of those dicts, in flatten order: {"0": ..., "1": ...}
(one entry for SGD with momentum). Only these parameter-shaped subtrees are stored, so
a slice is plain nested dicts of arrays, as `Store.load_opt_state` reads it back; the
optax containers around them (step counts, schedules) are rebuilt from the child's
own optimizer (`parent_state`), and `candidate.inherit_opt_state` takes each slice
only where its shapes and dtypes agree with the child's fresh state.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from typing import Any, cast

import jax

from evolution.search.paths import candidate


def _is_keyed_by(keys: frozenset[str]) -> Callable[[Any], bool]:
    return lambda node: isinstance(node, Mapping) and frozenset(node) == keys and bool(keys)


def component_slice(opt_state: Any, trainable_ids: Collection[str], component_id: str) -> Any:
    """One component's slice of a candidate's optimizer state, as the store keeps it.

    Args:
      opt_state: the candidate's final optimizer state (keyed by component id).
      trainable_ids: the candidate's trainable ids (the keys of its parameter dicts).
      component_id: the component.

    Returns:
      {"0": subtree, "1": ...} over the state's parameter-shaped dicts in flatten
      order, or None when the component was not trained or the state holds no
      parameter-shaped dict (plain SGD).
    """
    if opt_state is None or component_id not in trainable_ids:
        return None
    is_param_tree = _is_keyed_by(frozenset(trainable_ids))
    nodes = jax.tree_util.tree_leaves(opt_state, is_leaf=is_param_tree)
    subtrees = [node[component_id] for node in nodes if is_param_tree(node)]
    if not subtrees:
        return None
    return {str(index): jax.device_get(subtree) for index, subtree in enumerate(subtrees)}


def parent_state(
    slices: Mapping[str, Any],
    params_of: Callable[[str], Any],
    hparam_values: Mapping[str, Any],
    *,
    total_steps: int,
    cycle_steps: int,
) -> tuple[Any, tuple[str, ...]]:
    """A parent optimizer state assembled from stored component slices.

    The containers are those of the child's own optimizer (`candidate.make_optimizer`
    with the child's hyperparameters), initialised over the parent's components; each
    parameter-shaped dict then holds, per component, its stored slice (a slice that
    does not fit keeps the fresh value, which the child's merge then leaves as it is).

    Args:
      slices: parent component id -> its stored slice (`component_slice`).
      params_of: component id -> parameters (the shapes of the fresh state).
      hparam_values: the child's resolved hyperparameter values.
      total_steps: the child's training steps (V x B).
      cycle_steps: its validation interval B.

    Returns:
      (the state to pass as `train_candidate`'s `parent_opt_state`, the parent ids it
      is keyed by); (None, ()) without slices.
    """
    ids = tuple(sorted(slices))
    if not ids:
        return None, ()
    optimizer = candidate.make_optimizer(dict(hparam_values), total_steps, cycle_steps=cycle_steps)
    fresh = optimizer.init({cid: params_of(cid) for cid in ids})
    is_param_tree = _is_keyed_by(frozenset(ids))
    nodes, treedef = jax.tree_util.tree_flatten(fresh, is_leaf=is_param_tree)
    filled = []
    index = 0
    for node in nodes:
        if not is_param_tree(node):
            filled.append(node)
            continue
        merged = dict(node)
        for cid in ids:
            stored = slices[cid].get(str(index)) if isinstance(slices[cid], Mapping) else None
            if stored is not None and _fits(stored, node[cid]):
                merged[cid] = stored
        filled.append(merged)
        index += 1
    return jax.tree_util.tree_unflatten(treedef, filled), ids


def _fits(stored: Any, fresh: Any) -> bool:
    """Whether a stored subtree has the fresh one's structure, shapes and dtypes."""
    stored_leaves, stored_def = jax.tree_util.tree_flatten(stored)
    fresh_leaves, fresh_def = jax.tree_util.tree_flatten(fresh)
    if cast(Any, stored_def) != fresh_def:  # the stubs type PyTreeDef loosely
        return False
    return all(
        a.shape == b.shape and a.dtype == b.dtype
        for a, b in zip(stored_leaves, fresh_leaves, strict=True)
    )
