"""A router path: a multipath model stored and served like any path.

A router path combines P in {2, 3} frozen member paths (`evolution.agents.multipath`
trains it). It is an ordinary `system.Path` of its task whose components are

    ("m0/<slot>", id) ...   member 0's components, its head included (its logits z_0)
    ("m<p>/<slot>", id) ... member p's components without its head (p >= 1: features)
    ("connector_<p>", id)   Dense(num_classes) over member p's pooled features (p >= 1)
    ("router", id)          LayerNorm then Dense_P over z_0

and whose architecture is {"model": "router", "num_classes": C, "gradient_scale": m,
"members": [{"path": id, "task": t, "architecture": the member's architecture}, ...]}.
The members' components are referenced, not copied: the router path is an active path
of its task, so it locks them like any path (no other task trains them in place) and a
store, an export or an inference reads them like any component. Only the connectors
and the router are new components.

The output (`forward`) is the mixture of `multipath_logits`:

    r = softmax(Dense_P(LayerNorm(z_0)))        kernel 0, bias log([w0, (1-w0)/(P-1), ...])
    r <- m * r + (1 - m) * sg(r)                 m: the router learns m times slower
    y = sum_p r_p * sg(z_p) + sum_p z_p - sg(sum_p z_p)

whose value is sum_p r_p z_p. This module holds the arithmetic, so that training (the
multipath agent) and serving (inference, the exported system model) run one function.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from evolution.search.paths import path_model
from evolution.search.space import mutations
from evolution.system import families
from evolution.system import state as system
from models import encoder, vit

Params = Any

ROUTER_MODEL = system.ROUTER_MODEL
ROUTER_SLOT = "router"
CONNECTOR_SLOT_PATTERN = re.compile(r"connector_\d+")
MAIN_WEIGHT = 0.8  # w0: the router's initial weight on member 0.
GRADIENT_SCALE = 0.05  # m: the router's gradient multiplier.
NUM_PATHS = (2, 3)
LAYER_NORM_EPS = 1e-6


def member_prefix(index: int) -> str:
    """The slot prefix of member `index`'s components in a router path ("m0/", "m1/", ...)."""
    return f"m{index}/"


def member_slot(slot: str) -> str:
    """The slot a router path's slot names in its member ("m1/block_0" -> "block_0").

    Connector, router and single-path slots are returned as they are.
    """
    return slot.split("/", 1)[1] if "/" in slot else slot


def connector_slot(index: int) -> str:
    """The slot of member `index`'s connector (index >= 1)."""
    return f"connector_{index}"


# -- the arithmetic ----------------------------------------------------------------------


def router_bias(num_paths: int, main_weight: float = MAIN_WEIGHT) -> np.ndarray:
    """The router's initial bias: softmax of it is [w0, (1-w0)/(P-1), ...].

    Args:
      num_paths: P (>= 2).
      main_weight: w0, in (0, 1).

    Returns:
      float32 [P].

    Raises:
      ValueError: P < 2 or w0 outside (0, 1).
    """
    if num_paths < 2 or not 0.0 < main_weight < 1.0:
        raise ValueError(f"Need P >= 2 and 0 < w0 < 1; got P={num_paths}, w0={main_weight}.")
    rest = (1.0 - main_weight) / (num_paths - 1)
    return np.log(np.array([main_weight] + [rest] * (num_paths - 1), np.float64)).astype(np.float32)


def init_router(num_classes: int, num_paths: int, main_weight: float = MAIN_WEIGHT) -> Params:
    """The router's initial parameters: LayerNorm (scale 1, bias 0) then Dense_P (kernel 0).

    Args:
      num_classes: C, the width of z_0.
      num_paths: P.
      main_weight: w0.

    Returns:
      {"norm": {"scale": [C], "bias": [C]}, "dense": {"kernel": [C, P], "bias": [P]}}.
    """
    norm = {"scale": np.ones(num_classes, np.float32), "bias": np.zeros(num_classes, np.float32)}
    kernel = np.zeros((num_classes, num_paths), np.float32)
    return {"norm": norm, "dense": {"kernel": kernel, "bias": router_bias(num_paths, main_weight)}}


def init_connector(feature_dim: int, num_classes: int) -> Params:
    """A connector Dense(num_classes) with zero kernel [D, C] and zero bias [C]."""
    kernel = np.zeros((feature_dim, num_classes), np.float32)
    return {"kernel": kernel, "bias": np.zeros(num_classes, np.float32)}


# Logical axis names of the connectors' and the router's parameters (models/partitioning.py).
CONNECTOR_AXES = {"kernel": ("embed", "classes"), "bias": ("classes",)}
ROUTER_AXES = {
    "norm": {"scale": ("classes",), "bias": ("classes",)},
    "dense": {"kernel": ("classes", "paths"), "bias": ("paths",)},
}


def _layer_norm(x_BxC: jax.Array, params: Params) -> jax.Array:
    mean = jnp.mean(x_BxC, axis=-1, keepdims=True)
    variance = jnp.mean(jnp.square(x_BxC - mean), axis=-1, keepdims=True)
    normed = (x_BxC - mean) * jax.lax.rsqrt(variance + LAYER_NORM_EPS)
    return normed * params["scale"] + params["bias"]


def router_weights(
    router_params: Params, logits_0: jax.Array, *, gradient_scale: float = GRADIENT_SCALE
) -> jax.Array:
    """Per-sample path weights r = softmax(Dense_P(LayerNorm(z_0))), gradient scaled by m.

    Args:
      router_params: `init_router`'s layout.
      logits_0: z_0 [B, C] (treated as a constant).
      gradient_scale: m: r <- m * r + (1 - m) * sg(r) (same value, m times the gradient).

    Returns:
      r [B, P] (rows sum to 1).
    """
    normed_BxC = _layer_norm(
        jax.lax.stop_gradient(logits_0).astype(jnp.float32), router_params["norm"]
    )
    dense = router_params["dense"]
    r_BxP = jax.nn.softmax(normed_BxC @ dense["kernel"] + dense["bias"], axis=-1)
    return gradient_scale * r_BxP + (1.0 - gradient_scale) * jax.lax.stop_gradient(r_BxP)


def connector_logits(connector_params: Params, features_BxD: jax.Array) -> jax.Array:
    """z_p = Dense(num_classes)(features) of a headless path (features are constants)."""
    features_BxD = jax.lax.stop_gradient(features_BxD).astype(jnp.float32)
    return features_BxD @ connector_params["kernel"] + connector_params["bias"]


def multipath_logits(
    router_params: Params,
    connector_params: Sequence[Params],
    logits_0: jax.Array,
    features: Sequence[jax.Array],
    *,
    gradient_scale: float = GRADIENT_SCALE,
) -> tuple[jax.Array, jax.Array]:
    """The multipath output y = sum_p r_p sg(z_p) + sum_p z_p - sg(sum_p z_p).

    Args:
      router_params: `init_router`'s layout (P = 1 + len(features)).
      connector_params: one `init_connector` per companion path.
      logits_0: path_0's logits [B, C] (frozen).
      features: each companion's pooled pre-logit features [B, D_p] (frozen).
      gradient_scale: m (see `router_weights`).

    Returns:
      (y [B, C], r [B, P]).

    Raises:
      ValueError: as many connectors as feature arrays are needed.
    """
    if len(connector_params) != len(features):
        raise ValueError(f"{len(connector_params)} connectors for {len(features)} feature arrays.")
    z_0 = jax.lax.stop_gradient(logits_0).astype(jnp.float32)
    zs = [z_0] + [connector_logits(c, f) for c, f in zip(connector_params, features, strict=True)]
    r_BxP = router_weights(router_params, z_0, gradient_scale=gradient_scale)
    mixture = functools.reduce(
        jnp.add, [r_BxP[:, p, None] * jax.lax.stop_gradient(z) for p, z in enumerate(zs)]
    )
    total = functools.reduce(jnp.add, zs)
    return mixture + total - jax.lax.stop_gradient(total), r_BxP


def pooled_features(
    config: families.ModelConfig,
    body_slots: Sequence[str],
    params_by_slot: Mapping[str, Params],
    inputs: jax.Array,
) -> jax.Array:
    """A path's pooled pre-logit features: its components but the head, then its pooling.

    The ViT pools as `vit.ClassifierHead` (class token or token mean after final_norm);
    the text encoder as its head (class token, or the mean of non-padding tokens).

    Args:
      config: the path's config.
      body_slots: its slots without "head".
      params_by_slot: slot -> parameters.
      inputs: the family's input feature.

    Returns:
      [B, D].
    """
    tokens_BxLxD = path_model.forward(config, body_slots, params_by_slot, inputs)
    if isinstance(config, vit.ViTConfig):
        pooled = vit.ClassifierHead(config).apply({"params": {}}, tokens_BxLxD, True)
        return jnp.asarray(pooled)
    if config.pooling == "cls":
        return tokens_BxLxD[:, 0]
    return encoder.mean_pool(tokens_BxLxD, inputs > 0)


# -- the layout of a router path ---------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Member:
    """One frozen member of a router path.

    Attributes:
      config: the member path's config.
      slots: its slots as the member path names them: all of them for member 0 (the
        last being "head"), the body without "head" for the others.
    """

    config: families.ModelConfig
    slots: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class RouterLayout:
    """What a router path runs (hashable: a key of compiled functions).

    Attributes:
      members: member 0 (with its head), then the companions (without theirs).
      gradient_scale: m (it changes gradients, never the value).
    """

    members: tuple[Member, ...]
    gradient_scale: float

    @property
    def num_classes(self) -> int:
        """C: the classes of member 0's head, the router path's classes."""
        return int(self.members[0].config.num_classes or 0)


def router_architecture(members: Sequence[system.Path], gradient_scale: float) -> dict[str, Any]:
    """The architecture a router path stores (`system.Path.architecture`).

    Args:
      members: member 0 (a path of the router path's task), then the companions.
      gradient_scale: m.

    Returns:
      {"model": "router", "num_classes": C, "gradient_scale": m, "members": [{"path",
      "task", "architecture"}, ...]}.
    """
    config = families.config_from_architecture(members[0].architecture)
    return {
        "model": ROUTER_MODEL,
        "num_classes": int(config.num_classes or 0),
        "gradient_scale": float(gradient_scale),
        "members": [
            {"path": p.id, "task": p.task, "architecture": dict(p.architecture)} for p in members
        ],
    }


def router_components(
    members: Sequence[system.Path], connector_ids: Sequence[str], router_id: str
) -> tuple[tuple[str, str], ...]:
    """The (slot, component id) pairs of a router path (see the module docstring).

    Args:
      members: member 0, then the companions (P in all).
      connector_ids: one connector component per companion (P - 1).
      router_id: the router component.

    Returns:
      The pairs, in the order `forward` runs them.

    Raises:
      ValueError: P not in {2, 3}, or not one connector per companion.
    """
    if len(members) not in NUM_PATHS or len(connector_ids) != len(members) - 1:
        raise ValueError(
            f"A router path has P in {NUM_PATHS} members and P - 1 connectors; got "
            f"{len(members)} members and {len(connector_ids)} connectors."
        )
    pairs: list[tuple[str, str]] = []
    for index, member in enumerate(members):
        for slot, component_id in member.components:
            if index == 0 or slot != "head":
                pairs.append((member_prefix(index) + slot, component_id))
    pairs += [(connector_slot(i + 1), cid) for i, cid in enumerate(connector_ids)]
    return (*pairs, (ROUTER_SLOT, router_id))


def layout_of(path: system.Path) -> RouterLayout:
    """What a router path runs, read from its architecture and slots.

    Args:
      path: a router path (`system.is_router_path`).

    Returns:
      Its layout.

    Raises:
      ValueError: the path is not a well-formed router path (named, with what is wrong).
    """
    try:
        return _layout_of(path)
    except (KeyError, TypeError, ValueError) as error:
        raise ValueError(f"Router path {path.id!r} is malformed: {error}") from error


def _layout_of(path: system.Path) -> RouterLayout:
    architecture = dict(path.architecture)
    if architecture.get("model") != ROUTER_MODEL:
        raise ValueError(f"its architecture's model is {architecture.get('model')!r}, not 'router'")
    entries = architecture["members"]
    if len(entries) not in NUM_PATHS:
        raise ValueError(f"it has {len(entries)} members; a router path has P in {NUM_PATHS}")
    slots = [slot for slot, _ in path.components]
    members = []
    for index, entry in enumerate(entries):
        prefix = member_prefix(index)
        own = tuple(slot[len(prefix) :] for slot in slots if slot.startswith(prefix))
        has_head = bool(own) and own[-1] == "head"
        if not own or has_head != (index == 0) or "head" in own[:-1]:
            raise ValueError(
                f"member {index}'s slots {list(own)} are not a path's "
                f"{'with' if index == 0 else 'without'} its head"
            )
        config = families.config_from_architecture(entry["architecture"])
        members.append(Member(config, own))
    expected = [member_prefix(i) + s for i, m in enumerate(members) for s in m.slots]
    expected += [connector_slot(i) for i in range(1, len(members))] + [ROUTER_SLOT]
    if slots != expected:
        raise ValueError(f"its slots {slots} are not the router layout {expected}")
    layout = RouterLayout(tuple(members), float(architecture["gradient_scale"]))
    if int(architecture["num_classes"]) != layout.num_classes:
        raise ValueError(
            f"it has {architecture['num_classes']} classes; member 0's head has "
            f"{layout.num_classes}"
        )
    families_used = {families.family_of(m.config).name for m in members}
    if len(families_used) != 1:
        raise ValueError(f"its members are of different model families {sorted(families_used)}")
    return layout


def member_params(
    layout: RouterLayout, params_by_slot: Mapping[str, Params]
) -> list[dict[str, Params]]:
    """Each member's parameters by its own slot names, from the router path's slots."""
    return [
        {slot: params_by_slot[member_prefix(i) + slot] for slot in member.slots}
        for i, member in enumerate(layout.members)
    ]


def member_outputs(
    members: Sequence[Member], params: Sequence[Mapping[str, Params]], inputs: jax.Array
) -> tuple[jax.Array, list[jax.Array]]:
    """(z_0, the companions' pooled features), as constants (stop-gradient).

    Args:
      members: member 0 (with its head), then the companions.
      params: each member's parameters by its own slot names.
      inputs: the family's input feature.

    Returns:
      (logits_0 [B, C], [features [B, D_p] for each companion]).
    """
    params = jax.lax.stop_gradient(params)
    logits_0 = path_model.forward(members[0].config, members[0].slots, params[0], inputs)
    features = [
        pooled_features(m.config, m.slots, tree, inputs)
        for m, tree in zip(members[1:], params[1:], strict=True)
    ]
    return logits_0, features


def forward_with_weights(
    layout: RouterLayout, params_by_slot: Mapping[str, Params], inputs: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """A router path's logits, its router's weights and member 0's logits.

    Args:
      layout: `layout_of(path)`.
      params_by_slot: the router path's slot -> parameters.
      inputs: the family's input feature.

    Returns:
      (y [B, C], r [B, P], z_0 [B, C]).
    """
    logits_0, features = member_outputs(
        layout.members, member_params(layout, params_by_slot), inputs
    )
    connectors = [params_by_slot[connector_slot(i)] for i in range(1, len(layout.members))]
    y, r_BxP = multipath_logits(
        params_by_slot[ROUTER_SLOT],
        connectors,
        logits_0,
        features,
        gradient_scale=layout.gradient_scale,
    )
    return y, r_BxP, logits_0


def forward(
    layout: RouterLayout, params_by_slot: Mapping[str, Params], inputs: jax.Array
) -> jax.Array:
    """A router path's logits [B, C] (see the module docstring)."""
    return forward_with_weights(layout, params_by_slot, inputs)[0]


def component_config(kind: str, params: Params) -> dict[str, Any]:
    """The JSON-safe config recorded with a connector or router component (its shapes)."""
    if kind == "router":
        kernel = np.shape(params["dense"]["kernel"])
        return {"num_classes": int(kernel[0]), "num_paths": int(kernel[1])}
    kernel = np.shape(params["kernel"])
    return {"features": int(kernel[0]), "num_classes": int(kernel[1])}


def slot_kind(slot: str) -> str:
    """The component kind a slot holds, of a router path's slots or a single path's.

    "m1/block_0" -> "block", "connector_1" -> "connector", "router" -> "router"; a single
    path's slot as `mutations.slot_kind` ("block_3" -> "block").
    """
    if "/" in slot:
        return mutations.slot_kind(member_slot(slot))
    if CONNECTOR_SLOT_PATTERN.fullmatch(slot):
        return "connector"
    return mutations.slot_kind(slot)
