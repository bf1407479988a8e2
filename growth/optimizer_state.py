"""Growing an optax optimizer state with the same map as the parameters.

Any optax state (a chain, ``inject_hyperparams``, ``multi_transform``, ``masked``...) is a
nest of tuples, named tuples and dicts. Every sub-tree that mirrors the parameters (same
paths, same shapes) is grown with the step's map; the role is chosen by the field that
holds it: second moments (``nu``, ``nu_max``, ``sum_of_squares``...) scale by c^2, every
other mirror (``mu``, ``trace``, accumulated gradients...) by c. New entries start at 0.
Everything else (``count``, hyperparameters, schedules' state) carries on unchanged.
The same holds for states whose named tuples became dicts keyed by field name (a
checkpoint restored without a target).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from growth.ops import FIRST_MOMENT, SECOND_MOMENT, Step, flatten, leaf_shape

# Named-tuple fields of optax states holding squared-gradient statistics.
SECOND_MOMENT_FIELDS = frozenset(
    {"nu", "nu_max", "sum_of_squares", "grad_sqr", "v", "exp_avg_sq", "grad_rms", "ema_sq"}
)
# Fields whose trees match the parameters' structure but not their shapes (factored
# statistics): growing them needs a rule of its own.
_FACTORED_FIELDS = frozenset({"v_row", "v_col"})


def _mirror_paths(params: Mapping) -> dict:
    return {path: leaf_shape(leaf) for path, leaf in flatten(params).items()}


def _mirrors(node: Any, shapes: dict) -> bool:
    if not isinstance(node, Mapping):
        return False
    flat = flatten(node)
    if set(flat) != set(shapes):
        return False
    for path, leaf in flat.items():
        shape = leaf_shape(leaf) if hasattr(leaf, "shape") or hasattr(leaf, "unbox") else None
        if shape is not None and shape != shapes[path]:
            raise NotImplementedError(
                f"Optimizer state mirrors the parameters' paths but {'/'.join(path)} has "
                f"shape {shape}, not {shapes[path]} (factored statistics?); growth "
                "has no rule for it."
            )
    return True


def _is_namedtuple(node: Any) -> bool:
    return isinstance(node, tuple) and hasattr(node, "_fields")


def grow_opt_state(opt_state: Any, params: Mapping, step: Step) -> Any:
    """Grows an optimizer state together with its parameters.

    Args:
      opt_state: the optax state for ``params`` (before the step).
      params: the parameters *before* the step (to recognise mirrored sub-trees).
      step: the planned step (``growth.ops.Step``).

    Returns:
      The optimizer state for the grown parameters: moments of new entries 0, moments of
      rescaled entries scaled by c (first) or c^2 (second), counters unchanged.

    Raises:
      NotImplementedError: for state that mirrors the parameters' paths with other
        shapes (e.g. Adafactor's factored moments).
    """
    shapes = _mirror_paths(params)

    def walk(node: Any, role: str) -> Any:
        if _mirrors(node, shapes):
            return step.grow(node, role)
        if _is_namedtuple(node):
            values = []
            for name in node._fields:
                if name in _FACTORED_FIELDS:
                    raise NotImplementedError(
                        f"Optimizer state field {name!r} holds factored statistics; growth "
                        "has no rule for it (use an Adam- or momentum-style optimizer)."
                    )
                field_role = SECOND_MOMENT if name in SECOND_MOMENT_FIELDS else role
                values.append(walk(getattr(node, name), field_role))
            return type(node)(*values)
        if isinstance(node, tuple | list):
            return type(node)(walk(child, role) for child in node)
        if isinstance(node, Mapping):
            # A named tuple restored without its class (e.g. by orbax, with no target)
            # is a dict keyed by field name: the same names pick the role.
            return {
                name: walk(child, SECOND_MOMENT if name in SECOND_MOMENT_FIELDS else role)
                for name, child in node.items()
            }
        return node

    return walk(opt_state, FIRST_MOMENT)
