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

from collections.abc import Mapping, Sequence
from typing import Any

from growth.ops import FIRST_MOMENT, SECOND_MOMENT, flatten, is_array, leaf_shape

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
        shape = leaf_shape(leaf) if is_array(leaf) else None
        if shape is not None and shape != shapes[path]:
            raise NotImplementedError(
                f"Optimizer state mirrors the parameters' paths but {'/'.join(path)} has "
                f"shape {shape}, not {shapes[path]} (factored statistics?); growth "
                "has no rule for it."
            )
    return True


def _is_namedtuple(node: Any) -> bool:
    return isinstance(node, tuple) and hasattr(node, "_fields")


class _Slot:
    """Where the ``index``-th moment tree sits in an optimizer state's skeleton."""

    def __init__(self, index: int):
        self.index = index


class MomentTrees:
    """The sub-trees of an optimizer state that mirror the parameters, with their roles.

    ``trees`` lists ``(tree, role)`` pairs (grown together with the parameters, by the
    same steps); ``rebuild`` puts grown trees back into the state. Only structure and
    shapes are read: the state may be abstract or traced.

    Raises:
      NotImplementedError: for state that mirrors the parameters' paths with other
        shapes (e.g. Adafactor's factored moments).
    """

    def __init__(self, opt_state: Any, params: Mapping):
        shapes = _mirror_paths(params)
        self.trees: list[tuple[Mapping, str]] = []

        def walk(node: Any, role: str) -> Any:
            if _mirrors(node, shapes):
                self.trees.append((node, role))
                return _Slot(len(self.trees) - 1)
            if _is_namedtuple(node):
                values = []
                for name in node._fields:
                    if name in _FACTORED_FIELDS:
                        raise NotImplementedError(
                            f"Optimizer state field {name!r} holds factored statistics; "
                            "growth has no rule for it (use an Adam- or momentum-style "
                            "optimizer)."
                        )
                    field_role = SECOND_MOMENT if name in SECOND_MOMENT_FIELDS else role
                    values.append(walk(getattr(node, name), field_role))
                return type(node)(*values)
            if isinstance(node, tuple | list):
                return type(node)(walk(child, role) for child in node)
            if isinstance(node, Mapping):
                # A named tuple restored without its class (e.g. by orbax, with no
                # target) is a dict keyed by field name: the same names pick the role.
                return {
                    name: walk(child, SECOND_MOMENT if name in SECOND_MOMENT_FIELDS else role)
                    for name, child in node.items()
                }
            return node

        self._skeleton = walk(opt_state, FIRST_MOMENT)

    def rebuild(self, grown: Sequence[Any]) -> Any:
        """The optimizer state with ``grown[i]`` in place of ``trees[i]``.

        Args:
          grown: one tree per entry of ``trees``, in order.

        Returns:
          The state, every other node unchanged.
        """
        if len(grown) != len(self.trees):
            raise ValueError(f"Expected {len(self.trees)} grown trees, got {len(grown)}.")

        def fill(node: Any) -> Any:
            if isinstance(node, _Slot):
                return grown[node.index]
            if _is_namedtuple(node):
                return type(node)(*(fill(child) for child in node))
            if isinstance(node, tuple | list):
                return type(node)(fill(child) for child in node)
            if isinstance(node, dict):
                return {name: fill(child) for name, child in node.items()}
            return node

        return fill(self._skeleton)
