"""The evolved system as ONE t5x-contract multitask model that routes by `task_id`.

A `SystemModel` holds one route per task: the task's seqio name, its `task_id` (the
feature the mixture's examples carry), and the task's served path as it was published in
the store (slots, component ids, architecture; `SystemState.best_path`: the best single
path, or a router path over frozen member paths where that beats it). Its parameters
are the pool itself, {component_id: parameters}: a component shared by several paths
exists once. Every path runs on the whole batch (`evolution.search.paths.candidate.forward`,
or `evolution.search.paths.router_path.forward` for a router path: the functions
`evolution.export.inference.predict` runs, so a task's logits are those of its path alone) and
each example keeps the logits of the route its `task_id` names; heads narrower than the
widest are padded with `ABSENT_CLASS_LOGIT`, which changes neither the
argmax nor the log-softmax of the real classes.

Unknown tasks. A route exists only for a task with a published path. Declared tasks are
checked when the model is built: `export_system` and `load_system_model(
mixture_or_task_name=...)` (system_checkpoint.py) raise a ValueError naming every task of the
mixture without a path. An example whose `task_id` has no route anyway (a raw batch) is
*unrouted*: its prediction is `UNROUTED_PREDICTION` (-1, never a label, so accuracy counts
it wrong), its score is -inf, its logits are all ABSENT_CLASS_LOGIT, and `loss_fn`
leaves it out of the loss and the metrics; `predict_batch_with_aux` returns the mask
under "routed".

A system is written as an evogrow checkpoint by `system_checkpoint.export_system`; the
routes travel in the checkpoint's metadata, so `system_checkpoint.load_system_model`
(bound in gin/evolution/eval_system.gin) rebuilds the model from the checkpoint directory alone.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Iterable, Mapping
from typing import Any

import clu.metrics as clu_metrics
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from evolution import store as store_lib
from evolution.search.paths import candidate, router_path
from evolution.search.space import mutations
from evolution.system import architecture as architecture_lib
from evolution.system import state as system
from models import adapters, base, feature_converters, vit

Batch = Mapping[str, jax.Array]

UNROUTED_PREDICTION = -1
# Logit of the classes a task's head lacks: far below any real logit, still finite.
ABSENT_CLASS_LOGIT = -1e9


class MissingTaskError(ValueError):
    """A task to route is unknown to the store or has no active path there."""


@dataclasses.dataclass(frozen=True)
class Route:
    """One task of the system: where its examples go.

    Attributes:
      task_id: the `task_id` feature value of the task's examples.
      task: the task's name (a seqio task name, as in the store).
      path_id: the store path the route was taken from (the task's served path).
      components: the path's ordered (slot, component_id) pairs.
      architecture: the path's stored architecture (`system.Path.architecture`) as
        canonical JSON text (sorted keys), which keeps the route hashable.
    """

    task_id: int
    task: str
    path_id: str
    components: tuple[tuple[str, str], ...]
    architecture: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "task_id", int(self.task_id))
        if self.task_id < 0:
            raise ValueError(f"Route of {self.task!r} has task_id {self.task_id} < 0.")
        pairs = tuple((str(slot), str(cid)) for slot, cid in self.components)
        object.__setattr__(self, "components", pairs)
        text = self.architecture
        value = json.loads(text) if isinstance(text, str) else text
        object.__setattr__(self, "architecture", json.dumps(value, sort_keys=True))
        for member in self.members:
            member.config  # noqa: B018 - fails early on an architecture that is not a ViT's

    @property
    def path(self) -> system.Path:
        """The route as a `system.Path` (only what the architecture helpers read)."""
        return system.Path(
            id=self.path_id,
            task=self.task,
            components=self.components,
            agent="system",
            architecture=json.loads(self.architecture),
        )

    @property
    def is_router(self) -> bool:
        """Whether the route's path is a router path (`system.is_router_path`)."""
        return system.is_router_path(self.path)

    @functools.cached_property
    def layout(self) -> router_path.RouterLayout:
        """A router route's layout (`router_path.layout_of`)."""
        return router_path.layout_of(self.path)

    @functools.cached_property
    def members(self) -> tuple[Route, ...]:
        """The single paths the route runs: itself, or a router path's members.

        A member is a route of its own (the route's task and task_id, the member path's
        id, slots and architecture; the companions without their heads).
        """
        if not self.is_router:
            return (self,)
        entries = json.loads(self.architecture)["members"]
        by_slot = dict(self.components)
        return tuple(
            Route(
                self.task_id,
                self.task,
                entry["path"],
                tuple(
                    (slot, by_slot[router_path.member_prefix(index) + slot])
                    for slot in member.slots
                ),
                json.dumps(entry["architecture"]),
            )
            for index, (entry, member) in enumerate(zip(entries, self.layout.members, strict=True))
        )

    @functools.cached_property
    def config(self) -> vit.ViTConfig:
        """The path's ViT config (a router path's: its member 0's, whose head it has)."""
        if self.is_router:
            return self.members[0].config
        return architecture_lib.config_of(self.path)

    @property
    def slots(self) -> tuple[str, ...]:
        """The path's slots, in order."""
        return tuple(slot for slot, _ in self.components)

    @property
    def num_classes(self) -> int:
        """Classes of the path's head."""
        return int(self.config.num_classes)

    def adapter_size(self, slot: str) -> int:
        """Bottleneck width of an adapter slot, as `mutations.plan_child` recorded it."""
        sizes = json.loads(self.architecture).get("adapters", {})
        if slot not in sizes:
            raise ValueError(f"Route of {self.task!r}: no recorded size of adapter {slot!r}.")
        return int(sizes[slot])


@dataclasses.dataclass(frozen=True)
class SystemConfig:
    """The routes of a system (plain, hashable data; JSON via `to_json` / `from_json`).

    Attributes:
      routes: one route per task, in increasing task_id order.
    """

    routes: tuple[Route, ...]

    def __post_init__(self) -> None:
        routes = tuple(sorted(self.routes, key=lambda r: r.task_id))
        if not routes:
            raise ValueError("A system needs at least one route.")
        for what, values in (
            ("task_id", [str(r.task_id) for r in routes]),
            ("task", [r.task for r in routes]),
        ):
            repeated = sorted({v for v in values if values.count(v) > 1})
            if repeated:
                raise ValueError(f"Routes repeat {what} {', '.join(repeated)}.")
        kinds: dict[str, str] = {}
        for route in routes:
            for slot, component_id in route.components:
                kind = kinds.setdefault(component_id, router_path.slot_kind(slot))
                if kind != router_path.slot_kind(slot):
                    raise ValueError(
                        f"Component {component_id!r} is a {kind} in one route and a "
                        f"{router_path.slot_kind(slot)} ({slot}) in {route.task!r}'s."
                    )
        object.__setattr__(self, "routes", routes)

    @property
    def tasks(self) -> tuple[str, ...]:
        """Task names, in task_id order."""
        return tuple(route.task for route in self.routes)

    def component_ids(self) -> tuple[str, ...]:
        """Every referenced component once, in order of first use."""
        return tuple(dict.fromkeys(cid for r in self.routes for _, cid in r.components))

    def check_covers(self, task_names: Iterable[str]) -> None:
        """Raises unless every named task has a route.

        Args:
          task_names: e.g. a mixture's tasks.

        Raises:
          ValueError: naming the tasks without a route, and the routed ones.
        """
        missing = [t for t in task_names if t not in self.tasks]
        if missing:
            raise ValueError(
                f"Tasks {missing} have no path in the system (it routes {list(self.tasks)}); "
                "evolve them first, or evaluate a mixture of routed tasks."
            )

    def to_json(self) -> dict[str, Any]:
        """The routes as JSON-safe data (the checkpoint's metadata)."""
        return {
            "routes": [
                {
                    "task_id": r.task_id,
                    "task": r.task,
                    "path_id": r.path_id,
                    "components": [list(pair) for pair in r.components],
                    "architecture": json.loads(r.architecture),
                }
                for r in self.routes
            ]
        }

    @classmethod
    def from_json(cls, value: Mapping[str, Any]) -> SystemConfig:
        """Reads what `to_json` wrote."""
        return cls(
            tuple(
                Route(
                    task_id=r["task_id"],
                    task=r["task"],
                    path_id=r["path_id"],
                    components=tuple(tuple(pair) for pair in r["components"]),
                    architecture=json.dumps(r["architecture"]),
                )
                for r in value["routes"]
            )
        )


def system_config_from_state(
    state: system.SystemState, task_ids: Mapping[str, int]
) -> SystemConfig:
    """Routes of the named tasks' served paths (`SystemState.best_path`).

    Args:
      state: the store's snapshot.
      task_ids: task name -> its `task_id` (e.g. a mixture's tasks).

    Returns:
      The config.

    Raises:
      MissingTaskError: a named task is unknown to the store or has no active path.
    """
    routes, missing = [], []
    for task, task_id in task_ids.items():
        path = state.best_path(task) if task in state.tasks else None
        if path is None:
            missing.append(task)
            continue
        routes.append(Route(task_id, task, path.id, path.components, json.dumps(path.architecture)))
    if missing:
        known = [t for t in state.task_order() if state.best_path(t) is not None]
        raise MissingTaskError(
            f"Tasks {missing} have no active path in the store (tasks with one: {known})."
        )
    return SystemConfig(tuple(routes))


def load_pool(store: store_lib.Store, config: SystemConfig) -> dict[str, Any]:
    """The system's parameters from the store: {component_id: parameters}, each id once.

    Args:
      store: the store the routes were read from.
      config: the routes.

    Returns:
      The pool (nested dicts of numpy arrays).
    """
    return {cid: store.load_params(cid) for cid in config.component_ids()}


def _component_module(route: Route, slot: str) -> nn.Module:
    if mutations.slot_kind(slot) == "adapter":
        return adapters.ResidualAdapter(route.config, route.adapter_size(slot))
    return vit.make_component(route.config, slot)


def _init_component(module: nn.Module, slot: str, rng: jax.Array, x: jax.Array) -> Any:
    if mutations.slot_kind(slot) == "block":
        return module.init({"params": rng, "dropout": rng}, x, None, True)["params"]
    return module.init(rng, x)["params"]


def _init_chain(route: Route, params: dict[str, Any], rng: jax.Array, image: jax.Array) -> None:
    """Initialises a single path's components that `params` lacks, in order."""
    x = image
    for slot, component_id in route.components:
        module = _component_module(route, slot)
        if component_id not in params:
            key = jax.random.fold_in(rng, len(params))
            params[component_id] = _init_component(module, slot, key, x)
        out = jax.eval_shape(
            lambda p, x, route=route, slot=slot: candidate.forward(
                route.config, (slot,), {slot: p}, x
            ),
            nn.unbox(params[component_id]),
            x,
        )
        x = jnp.zeros(out.shape, out.dtype)


def _init_router_parts(route: Route, params: dict[str, Any], image: jax.Array) -> None:
    """Initialises a router route's connectors (sized by its members' features) and router."""
    members = [
        nn.unbox({slot: params[cid] for slot, cid in member.components}) for member in route.members
    ]
    _, features = jax.eval_shape(
        lambda p, x: router_path.member_outputs(route.layout.members, p, x), members, image
    )
    by_slot = dict(route.components)
    classes = route.num_classes
    for index, shape in enumerate(features, start=1):
        connector = router_path.init_connector(int(shape.shape[-1]), classes)
        params.setdefault(
            by_slot[router_path.connector_slot(index)],
            _boxed(connector, router_path.CONNECTOR_AXES),
        )
    router = router_path.init_router(classes, len(route.members))
    params.setdefault(by_slot[router_path.ROUTER_SLOT], _boxed(router, router_path.ROUTER_AXES))


def _boxed(tree: Any, names: Any) -> Any:
    """`tree`'s arrays boxed with their logical axis names (`names`: the same nesting)."""
    return jax.tree_util.tree_map(
        lambda axes, value: nn.LogicallyPartitioned(jnp.asarray(value), axes),
        names,
        tree,
        is_leaf=lambda node: isinstance(node, tuple),
    )


class SystemModel(base.BaseModel):
    """The whole system as one image classifier routed by the `task_id` feature.

    Params are {component_id: parameters}. Batches: `image` float32 [B, H, W, C] (one
    shape for the whole mixture), `task_id` int32 [B], and `label` int32 [B] for the
    loss and scores.

    Args:
      config: the routes.
      optimizer_def: unused by evaluation (the system is trained by the search).
    """

    FEATURE_CONVERTER_CLS = feature_converters.ImageClassificationFeatureConverter
    INPUT_FEATURE = "image"
    ROUTE_FEATURE = "task_id"

    def __init__(self, config: SystemConfig, optimizer_def: Any = None):
        super().__init__(optimizer_def=optimizer_def)
        self.config = config

    @classmethod
    def from_store(
        cls, store: store_lib.Store, task_ids: Mapping[str, int]
    ) -> tuple[SystemModel, dict[str, Any]]:
        """The model of the named tasks' best paths and its parameters, from a store.

        Args:
          store: the store.
          task_ids: task name -> its `task_id`.

        Returns:
          (model, params).

        Raises:
          MissingTaskError: a named task has no active path.
        """
        config = system_config_from_state(store.load_state(), task_ids)
        return cls(config), load_pool(store, config)

    def routed_logits(
        self, params: Any, image: jax.Array, task_id: jax.Array
    ) -> tuple[jax.Array, jax.Array]:
        """Each example's logits from its task's path.

        Args:
          params: {component_id: parameters}.
          image: [B, H, W, C] images.
          task_id: int [B].

        Returns:
          (logits float32 [B, widest head], routed bool [B]); a task's classes come
          first, padded with ABSENT_CLASS_LOGIT; unrouted rows are all ABSENT_CLASS_LOGIT.
        """
        image = jnp.asarray(image, jnp.float32)
        task_id = jnp.asarray(task_id).astype(jnp.int32)
        width = max(route.num_classes for route in self.config.routes)
        logits_BxK = jnp.full((image.shape[0], width), ABSENT_CLASS_LOGIT, jnp.float32)
        routed_B = jnp.zeros(image.shape[0], bool)
        for route in self.config.routes:
            by_slot = {slot: params[cid] for slot, cid in route.components}
            if route.is_router:
                own_BxKt = router_path.forward(route.layout, by_slot, image)
            else:
                own_BxKt = candidate.forward(route.config, route.slots, by_slot, image)
            own_BxK = jnp.pad(
                own_BxKt.astype(jnp.float32),
                ((0, 0), (0, width - own_BxKt.shape[-1])),
                constant_values=ABSENT_CLASS_LOGIT,
            )
            mine_B = task_id == route.task_id
            logits_BxK = jnp.where(mine_B[:, None], own_BxK, logits_BxK)
            routed_B = routed_B | mine_B
        return logits_BxK, routed_B

    def _logits(self, params: Any, batch: Batch) -> tuple[jax.Array, jax.Array]:
        if self.ROUTE_FEATURE not in batch:
            raise KeyError(
                f"The system routes by the '{self.ROUTE_FEATURE}' feature, which the batch "
                f"lacks (it has {sorted(batch)}); use a mixture's `_rgb32_v1` tasks."
            )
        return self.routed_logits(params, batch[self.INPUT_FEATURE], batch[self.ROUTE_FEATURE])

    def loss_fn(self, params, batch: Batch, dropout_rng) -> tuple[jax.Array, dict[str, Any]]:
        """Mean cross-entropy of the routed logits over the routed examples, and metrics.

        Args:
          params: {component_id: parameters}.
          batch: features incl. `task_id` and `label`.
          dropout_rng: unused (the paths run deterministically).

        Returns:
          (scalar loss, {'loss': Average, 'accuracy': Accuracy}), unrouted rows left out.
        """
        del dropout_rng
        logits, routed = self._logits(params, batch)
        labels = batch["label"].astype(jnp.int32)
        per_example = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
        weights = routed.astype(jnp.float32)
        loss = jnp.sum(per_example * weights) / jnp.maximum(jnp.sum(weights), 1.0)
        metrics = {
            "loss": clu_metrics.Average.from_model_output(per_example, mask=routed),
            "accuracy": clu_metrics.Accuracy.from_model_output(
                logits=logits, labels=labels, mask=routed
            ),
        }
        return loss, metrics

    def predict_batch_with_aux(self, params, batch: Batch, rng=None):
        """Predicts a class per example with its task's path.

        Args:
          params: {component_id: parameters}.
          batch: features incl. `image` and `task_id`.
          rng: unused (classification is deterministic).

        Returns:
          (class ids int32 [B], UNROUTED_PREDICTION for unrouted rows; {'logits',
          'scores': log-prob of the prediction (-inf unrouted), 'routed': bool [B]}).
        """
        del rng
        logits, routed = self._logits(params, batch)
        log_probs = jax.nn.log_softmax(logits)
        predictions = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        scores = jnp.take_along_axis(log_probs, predictions[:, None], axis=-1)[:, 0]
        predictions = jnp.where(routed, predictions, UNROUTED_PREDICTION)
        scores = jnp.where(routed, scores, -jnp.inf)
        return predictions, {"logits": logits, "scores": scores, "routed": routed}

    def score_batch(self, params, batch: Batch, return_intermediates: bool = False):
        """Log-probability of each example's label under its task's path (-inf unrouted).

        Args:
          params: {component_id: parameters}.
          batch: features incl. `image`, `task_id` and `label`.
          return_intermediates: unsupported (raises NotImplementedError).

        Returns:
          float32 [B].
        """
        if return_intermediates:
            raise NotImplementedError("The system model has no intermediates to return.")
        logits, routed = self._logits(params, batch)
        log_probs = jax.nn.log_softmax(logits)
        labels = batch["label"].astype(jnp.int32)
        scores = jnp.take_along_axis(log_probs, labels[:, None], axis=-1)[:, 0]
        return jnp.where(routed, scores, -jnp.inf)

    def get_initial_variables(
        self,
        rng: jax.Array,
        input_shapes: Mapping[str, Any],
        input_types: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Freshly initialised variables {'params': {component_id: boxed parameters}}.

        Used (under `jax.eval_shape`) for the shapes and logical axis names that a
        checkpoint restores into; each shared component is initialised once.

        Args:
          rng: PRNG key (folded with each component's position).
          input_shapes: feature -> shape, batch first; needs `image`.
          input_types: feature -> dtype, optional.

        Returns:
          {'params': ...} with `nn.LogicallyPartitioned` leaves.
        """
        if self.INPUT_FEATURE not in input_shapes:
            raise KeyError(
                f"input_shapes lacks '{self.INPUT_FEATURE}': got {sorted(input_shapes)}."
            )
        dtype = (input_types or {}).get(self.INPUT_FEATURE, jnp.float32)
        image = jnp.zeros(tuple(input_shapes[self.INPUT_FEATURE]), dtype)
        params: dict[str, Any] = {}
        for route in self.config.routes:
            for member in route.members:
                _init_chain(member, params, rng, image)
            if route.is_router:
                _init_router_parts(route, params, image)
        return {"params": params}
