"""The public entry point of growth: ``expand``.

``expand`` applies growth requests in order to a model config, its parameters and
(optionally) its optax optimizer state, preserving the function the model computes
(``growth.rules`` says which expansions are exact for which model and refuses the rest).
It is a pure function: no module instances, no I/O, randomness from ``rng`` only.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax

from growth.attention import grow_num_heads, grow_qk_dim, grow_v_dim
from growth.depth import grow_depth
from growth.draws import Fill, fold_in_range
from growth.hidden import grow_hidden
from growth.mlp import grow_mlp_dim
from growth.ops import PARAM, Step, abstract, fuse_steps, grow_abstract
from growth.optimizer_state import MomentTrees
from growth.requests import Request, parse_requests
from growth.rules import traits_of
from growth.transfer import deferred_transfer

_WIDTH_PLANNERS = {
    "mlp_dim": grow_mlp_dim,
    "num_heads": grow_num_heads,
    "qk_dim": grow_qk_dim,
    "v_dim": grow_v_dim,
}


def plan(config: Any, params: Mapping, request: Request, *, key: jax.Array, fill: Fill) -> Step:
    """Plans one request (without applying it).

    Args:
      config: the model config.
      params: the model parameters (for width requests their ``abstract`` shapes suffice).
      request: a parsed request.
      key: PRNG key for this request.
      fill: constant, callable or None for the default initializers of free entries.

    Returns:
      The step: new config and ``grow(tree, role)``.
    """
    traits_of(config)  # validates norm, placement and scaling for every request
    if request.kind == "add_layer":
        return grow_depth(config, params, request.position, key=key, fill=fill)
    assert request.size is not None  # Request validates sizes of width requests
    if request.kind == "hidden":
        return grow_hidden(config, params, request.size, key=key, fill=fill, method=request.method)
    return _WIDTH_PLANNERS[request.kind](config, params, request.size, key=key, fill=fill)


def expand(
    config: Any,
    params: Mapping,
    requests: str | Request | Sequence[str | Request],
    *,
    rng: jax.Array,
    opt_state: Any = None,
    fill: Fill = None,
) -> tuple[Any, dict, Any]:
    """Grows a transformer without changing the function it computes.

    Requests are applied in order; each sees the config and parameters the previous one
    produced. Depth growth is bit-exact; width growth is exact up to float rounding.
    Call it outside ``jit`` (shapes change); the surgery runs on the host in numpy and
    returns JAX arrays for JAX inputs, so shardings are re-derived by the caller from the
    new abstract state.

    Args:
      config: frozen model config (``models.vit.ViTConfig``, ``models.decoder.
        DecoderConfig``, ``models.encoder.EncoderConfig``) with ``hidden``, ``mlp_dim``,
        ``num_heads``, ``qk_dim``, ``v_dim``, ``num_layers``, ``norm``, ``norm_eps``,
        ``norm_placement`` and ``attention_scaling``.
      params: the model's parameter tree (the ``params`` collection; boxed
        ``nn.Partitioned`` leaves keep their axis names).
      requests: e.g. ``["mlp_dim=512", "num_heads=8", "qk_dim=64", "v_dim=64",
        "hidden=256", "add_layer@2"]``, a comma-separated string of them, or
        ``growth.requests.Request`` objects. ``hidden=INT:pad|replicate`` picks the method.
      rng: PRNG key for new free entries and LEMON split proportions.
      opt_state: optional optax state for ``params``; grown with the same map (moments of
        new entries 0, rescaled entries' first moment * c, second * c^2, counts carry on).
      fill: None (default initializers), a constant for every free entry (e.g. 42.0, to
        show they are free), or a callable ``(key, shape, dtype) -> array``.

    Returns:
      ``(new_config, new_params, new_opt_state)``; ``new_opt_state`` is None when no
      ``opt_state`` was given.

    Raises:
      growth.rules.GrowthError: for malformed requests, shrinking, and expansions that
        are not exact for the model (LayerNorm zero-padding or a non-integer factor,
        post-norm depth growth), each with the reason.
    """
    parsed = parse_requests(requests)
    # Consecutive width steps are planned on shapes only and applied together, so that a
    # leaf grown by several of them is written once (bit-identical to one after the other).
    # Every grown leaf goes to JAX at the end, in one transfer.
    pending: list[Step] = []
    shapes: Mapping | None = None
    with deferred_transfer() as transfer:
        for request, key in zip(parsed, fold_in_range(rng, len(parsed)), strict=True):
            if request.kind == "add_layer":
                params, opt_state = _apply(pending, params, opt_state)
                pending, shapes = [], None
                step = plan(config, params, request, key=key, fill=fill)
                params, opt_state = _apply([step], params, opt_state)
            else:
                shapes = abstract(params) if shapes is None else shapes
                step = plan(config, shapes, request, key=key, fill=fill)
                shapes = grow_abstract(shapes, step)
                pending.append(step)
            config = step.config
        params, opt_state = transfer.place(_apply(pending, params, opt_state))
    return config, dict(params), opt_state


def _apply(steps: Sequence[Step], params: Mapping, opt_state: Any) -> tuple[Mapping, Any]:
    """Applies planned steps (several only if they are width steps) to params and state."""
    if not steps:
        return params, opt_state
    step = steps[0] if len(steps) == 1 else fuse_steps(steps)
    if opt_state is None:
        return step.grow(params, PARAM), None
    moments = MomentTrees(opt_state, params)  # grown with the parameters, in one pass
    new_params, *new_moments = step.grow_trees([(params, PARAM), *moments.trees])
    return new_params, moments.rebuild(new_moments)
