"""The public entry points of growth: ``plan_expansion`` and ``expand``.

Growth runs in two phases:

1. *Plan*, on the host, from shapes only: the requests are parsed and validated, each is
   planned on the config and the parameter shapes the previous one produced
   (``jax.ShapeDtypeStruct``; no value is read), and the result is an ``Expansion``: the
   grown config and every step as hashable data.
2. *Apply*, on the devices: one jitted function of the old parameters and optimizer
   state (and a PRNG key) computes the grown ones where the old ones live, with
   ``out_shardings`` that the caller derives from the grown abstract state (the trainer:
   its partitioner and the logical axis rules). Nothing is gathered to one host or one
   device: XLA partitions the pads, concatenations, scalings and draws like the arrays.

Randomness: new free entries are normal draws and LEMON's split proportions uniform
draws, both from the threefry2x32 PRNG (JAX's default key), keyed by the step, the leaf's
path and the op (``growth.ops``). Threefry is a counter-based hash: with
``jax_threefry_partitionable`` (JAX's default since 0.5) an entry's value is a function
of the key and the entry's index only, so each device computes just its own shard's
entries, nothing is gathered, and the grown state is bit-identical on one device, on a
mesh and across processes. (Other key implementations, e.g. ``rbg`` whose XLA
RngBitGenerator bits are not guaranteed to be the same across shardings, are accepted and
drawn through ``jax.random``.)
For threefry keys the free entries are drawn by ``growth.ops.normal``, bit for bit
``jax.random.normal``, but with the hash written out as elementwise arithmetic: JAX
lowers threefry on CPU to a loop over whole uint32 arrays that XLA cannot fuse, which
held every draw's bits in buffers of their own (about a tenth more peak memory for a
composition); written out, each draw is fused into the loop that writes its leaf.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np

from growth.attention import grow_num_heads, grow_qk_dim, grow_v_dim
from growth.depth import grow_depth
from growth.hidden import grow_hidden
from growth.mlp import grow_mlp_dim
from growth.ops import PARAM, Fill, Step, abstract, flatten, fold_in, unflatten
from growth.optimizer_state import MomentTrees
from growth.requests import Request, parse_requests
from growth.rules import traits_of

_WIDTH_PLANNERS = {
    "mlp_dim": grow_mlp_dim,
    "num_heads": grow_num_heads,
    "qk_dim": grow_qk_dim,
    "v_dim": grow_v_dim,
}


def plan(config: Any, params: Mapping, request: Request) -> Step:
    """Plans one request (without applying it).

    Args:
      config: the model config.
      params: the model parameters (their shapes suffice, e.g. ``ops.abstract``).
      request: a parsed request.

    Returns:
      The step: the new config and the growth as data.

    Raises:
      growth.rules.GrowthError: if the request is not exact for the model.
    """
    traits_of(config)  # validates norm, placement and scaling for every request
    if request.kind == "add_layer":
        return grow_depth(config, params, request.position)
    assert request.size is not None  # Request validates sizes of width requests
    if request.kind == "hidden":
        return grow_hidden(config, params, request.size, method=request.method)
    return _WIDTH_PLANNERS[request.kind](config, params, request.size)


@dataclasses.dataclass(frozen=True)
class _Program:
    """What the jitted expansion is compiled for (a static, hashable argument)."""

    steps: tuple[Any, ...]
    fill: Fill
    key_impl: str | None  # None: a raw uint32 key (``jax.random.PRNGKey``)


def _grow_state(program: _Program, params: Any, opt_state: Any, key_data: Any) -> tuple:
    """The traced expansion: every step on the parameters and their optimizer moments."""
    if program.key_impl is None:
        key = key_data
    else:
        key = jax.random.wrap_key_data(key_data, impl=program.key_impl)
    trees: list[tuple[Any, str]] = [(params, PARAM)]
    moments = None
    if opt_state is not None:
        moments = MomentTrees(opt_state, params)
        trees.extend(moments.trees)
    flats = [flatten(tree) for tree, _ in trees]
    roles = [role for _, role in trees]
    for index, growth in enumerate(program.steps):
        flats = growth.apply(flats, roles, fold_in(key, index), program.fill)
    grown = [unflatten(flat) for flat in flats]
    return grown[0], None if moments is None else moments.rebuild(grown[1:])


def _key_parts(rng: Any) -> tuple[np.ndarray, str | None]:
    """A key as host data (the same value on every process) and its implementation."""
    if jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key):
        return np.asarray(jax.random.key_data(rng)), str(jax.random.key_impl(rng))
    return np.asarray(rng), None


@dataclasses.dataclass(frozen=True)
class Expansion:
    """A planned expansion: the grown config and the steps that grow the state.

    Attributes:
      config: the model config after every request.
      steps: one growth per request, as data (``WidthGrowth``, ``DepthGrowth``).
      fill: None (default initializers), a constant, or a traceable callable
        ``(key, shape, dtype) -> array`` for every new free entry.
    """

    config: Any
    steps: tuple[Any, ...]
    fill: Fill = None

    def _program(self, key_impl: str | None) -> _Program:
        return _Program(self.steps, self.fill, key_impl)

    def abstract_state(self, params: Any, opt_state: Any = None) -> tuple[Any, Any]:
        """The grown parameters and optimizer state as ``jax.ShapeDtypeStruct`` trees.

        Args:
          params: the parameters (arrays or their abstract values).
          opt_state: their optax state, or None.

        Returns:
          ``(params, opt_state)`` of the grown model, without computing any value.
        """
        fn = functools.partial(_grow_state, self._program("threefry2x32"))
        key = jax.ShapeDtypeStruct((2,), np.uint32)
        return jax.eval_shape(fn, abstract(params), abstract(opt_state), key)

    def lower(
        self,
        params: Any,
        opt_state: Any = None,
        *,
        rng: jax.Array,
        out_shardings: Any = None,
        donate: bool = False,
    ) -> jax.stages.Lowered:
        """The jitted expansion lowered for these arguments (``.compile()`` it to inspect).

        Args: see ``apply``.

        Returns:
          The lowered program (its compiled form gives ``memory_analysis()``).
        """
        key_data, key_impl = _key_parts(rng)
        jitted = self._jitted(key_impl, out_shardings, donate)
        return jitted.lower(self._program(key_impl), params, opt_state, key_data)

    def apply(
        self,
        params: Any,
        opt_state: Any = None,
        *,
        rng: jax.Array,
        out_shardings: Any = None,
        donate: bool = False,
    ) -> tuple[dict, Any]:
        """Grows the parameters and the optimizer state in one compiled program.

        Args:
          params: the parameters the expansion was planned for: numpy arrays, or JAX
            arrays on any devices and shardings (also across processes); boxed leaves
            (``nn.Partitioned``) keep their axis names.
          opt_state: their optax state, or None.
          rng: PRNG key of the new free entries and the split proportions (threefry2x32,
            JAX's default, for bits that do not depend on the sharding; see above).
          out_shardings: shardings of ``(new_params, new_opt_state)`` (a pytree prefix,
            e.g. derived from the grown abstract state by the trainer's partitioner);
            None lets XLA propagate them from the inputs.
          donate: whether the old state's buffers may be reused (the caller must not use
            ``params`` and ``opt_state`` afterwards).

        Returns:
          ``(new_params, new_opt_state)`` as JAX arrays (``new_opt_state`` is None when
          ``opt_state`` is).
        """
        key_data, key_impl = _key_parts(rng)
        jitted = self._jitted(key_impl, out_shardings, donate)
        return jitted(self._program(key_impl), params, opt_state, key_data)

    def _jitted(self, key_impl: str | None, out_shardings: Any, donate: bool) -> Any:
        jitted = jax.jit(
            _grow_state,
            static_argnums=0,
            out_shardings=out_shardings,
            donate_argnums=(1, 2) if donate else (),
        )
        # A new jit wrapper per call: JAX caches the trace and the executable by the
        # function, the static program and the shardings, so an equal expansion of
        # equally shaped arrays compiles once.
        return jitted


def plan_expansion(
    config: Any,
    params: Mapping,
    requests: str | Request | Sequence[str | Request],
    *,
    opt_state: Any = None,
    fill: Fill = None,
) -> Expansion:
    """Plans requests in order from shapes only (nothing is read or moved).

    Args:
      config: the model config (see ``expand``).
      params: the parameters, or their abstract values (``jax.ShapeDtypeStruct``).
      requests: see ``expand``.
      opt_state: the optax state (or its abstract value), checked to be growable.
      fill: see ``expand``.

    Returns:
      The ``Expansion``.

    Raises:
      growth.rules.GrowthError: see ``expand``.
      NotImplementedError: for optimizer state growth has no rule for (factored).
    """
    parsed = parse_requests(requests)
    shapes = abstract(params)
    if opt_state is not None:
        MomentTrees(abstract(opt_state), shapes)  # refuses factored statistics up front
    steps = []
    for request in parsed:
        step = plan(config, shapes, request)
        shapes = _grown_shapes(shapes, step.growth, fill)
        steps.append(step.growth)
        config = step.config
    return Expansion(config, tuple(steps), fill)


def _grown_shapes(shapes: Mapping, growth: Any, fill: Fill) -> dict:
    """The parameter shapes after one step (traced abstractly: no value is computed)."""

    def grow(tree: Mapping) -> dict:
        flat = growth.apply([flatten(tree)], [PARAM], jax.random.key(0), fill)[0]
        return unflatten(flat)

    return jax.eval_shape(grow, shapes)


def expand(
    config: Any,
    params: Mapping,
    requests: str | Request | Sequence[str | Request],
    *,
    rng: jax.Array,
    opt_state: Any = None,
    fill: Fill = None,
    out_shardings: Any = None,
    donate: bool = False,
) -> tuple[Any, dict, Any]:
    """Grows a transformer without changing the function it computes.

    Requests are applied in order; each sees the config and parameters the previous one
    produced. Depth growth is bit-exact; width growth is exact up to float rounding. Call
    it outside ``jit`` (shapes change): it plans from shapes (``plan_expansion``) and
    grows the whole state in one jitted program on the devices where it lives
    (``Expansion.apply``).

    Args:
      config: frozen model config (``models.vit.ViTConfig``, ``models.decoder.
        DecoderConfig``, ``models.encoder.EncoderConfig``) with ``hidden``, ``mlp_dim``,
        ``num_heads``, ``qk_dim``, ``v_dim``, ``num_layers``, ``norm``, ``norm_eps``,
        ``norm_placement`` and ``attention_scaling``.
      params: the model's parameter tree (the ``params`` collection; boxed
        ``nn.Partitioned`` leaves keep their axis names), numpy or JAX arrays.
      requests: e.g. ``["mlp_dim=512", "num_heads=8", "qk_dim=64", "v_dim=64",
        "hidden=256", "add_layer@2"]``, a comma-separated string of them, or
        ``growth.requests.Request`` objects. ``hidden=INT:pad|replicate`` picks the method.
      rng: PRNG key for new free entries and LEMON split proportions (threefry2x32, JAX's
        default, gives the same bits on any device count; see the module docstring).
      opt_state: optional optax state for ``params``; grown with the same map (moments of
        new entries 0, rescaled entries' first moment * c, second * c^2, counts carry on).
      fill: None (default initializers), a constant for every free entry (e.g. 42.0, to
        show they are free), or a traceable callable ``(key, shape, dtype) -> array``.
      out_shardings: shardings of ``(new_params, new_opt_state)``, or a callable of the
        new config that returns them; None lets XLA propagate them from the inputs.
      donate: whether the old state's buffers may be reused (see ``Expansion.apply``).

    Returns:
      ``(new_config, new_params, new_opt_state)``; ``new_opt_state`` is None when no
      ``opt_state`` was given.

    Raises:
      growth.rules.GrowthError: for malformed requests, shrinking, and expansions that
        are not exact for the model (LayerNorm zero-padding or a non-integer factor,
        post-norm depth growth), each with the reason.
    """
    expansion = plan_expansion(config, params, requests, opt_state=opt_state, fill=fill)
    if callable(out_shardings):
        out_shardings = out_shardings(expansion.config)
    new_params, new_opt_state = expansion.apply(
        params, opt_state, rng=rng, out_shardings=out_shardings, donate=donate
    )
    return expansion.config, new_params, new_opt_state
