"""The expansion as one program: planned from shapes, compiled once, numpy or JAX inputs."""

import jax
import numpy as np
import optax
import pytest
from test_preservation import abstract_params, make_config, random_params

import growth
from growth import api, ops

_REQUESTS = {
    "decoder": [
        "mlp_dim=9",
        "num_heads=3",
        "qk_dim=5",
        "v_dim=4",
        "hidden=10:pad",
        "add_layer@1",
        "mlp_dim=11",
        "hidden=20:replicate",
    ],
    "vit": ["hidden=12:replicate", "mlp_dim=8", "add_layer@0", "num_heads=3", "qk_dim=4"],
}


def _state(params):
    state = optax.adam(1e-3).init(params)
    return jax.tree.map(lambda x: x + 0.5 if x.ndim else x, state)  # non-zero moments


def _assert_same_bits(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype and x.shape == y.shape
        assert x.tobytes() == y.tobytes()


@pytest.mark.parametrize("family", sorted(_REQUESTS))
def test_plan_from_shapes_matches_the_grown_state_and_a_fresh_model(family):
    config = make_config(family, attention_scaling="runtime", qkv_bias=True)
    params = random_params(config)
    state = _state(params)
    from_shapes = growth.plan_expansion(
        config, ops.abstract(params), _REQUESTS[family], opt_state=ops.abstract(state)
    )
    from_arrays = growth.plan_expansion(config, params, _REQUESTS[family], opt_state=state)
    assert from_shapes == from_arrays  # the plan reads shapes only
    grown = from_shapes.apply(params, state, rng=jax.random.key(0))
    shapes = lambda tree: jax.tree.map(lambda x: (tuple(x.shape), x.dtype), tree)
    assert shapes(from_shapes.abstract_state(params, state)) == shapes(grown)
    expected = shapes(ops.abstract(abstract_params(from_shapes.config)))
    assert shapes(grown[0]) == expected


def test_an_expansion_compiles_once_and_draws_from_its_key(monkeypatch):
    config = make_config("decoder")
    params = random_params(config)
    traces = []
    grow_state = api._grow_state

    def counted(*args):
        traces.append(1)
        return grow_state(*args)

    monkeypatch.setattr(api, "_grow_state", counted)
    expansion = growth.plan_expansion(config, params, ["mlp_dim=9", "add_layer@1"])
    first, _ = expansion.apply(params, rng=jax.random.key(0))
    again, _ = expansion.apply(params, rng=jax.random.key(0))
    other, _ = expansion.apply(params, rng=jax.random.key(1))
    replanned = growth.plan_expansion(config, params, ["mlp_dim=9", "add_layer@1"])
    replanned.apply(params, rng=jax.random.key(2))
    assert len(traces) == 1  # one trace and one executable for every call
    _assert_same_bits(first, again)
    new_block = lambda p: np.asarray(p["block_1"]["attn"]["query"]["kernel"])
    assert not np.array_equal(new_block(first), new_block(other))


@pytest.mark.parametrize("fill", [None, 42.0])
def test_numpy_and_jax_inputs_and_donation_give_the_same_state(fill):
    config = make_config("vit", attention_scaling="runtime", qkv_bias=True)
    params = random_params(config)
    state = _state(params)
    requests, rng = _REQUESTS["vit"], jax.random.key(4)
    on_device = growth.expand(config, params, requests, rng=rng, opt_state=state, fill=fill)
    on_host = growth.expand(
        config,
        jax.tree.map(np.asarray, params),
        requests,
        rng=rng,
        opt_state=jax.tree.map(np.asarray, state),
        fill=fill,
    )
    _assert_same_bits(on_device[1:], on_host[1:])
    copies = jax.tree.map(lambda x: x.copy(), (params, state))
    donated = growth.expand(
        config, copies[0], requests, rng=rng, opt_state=copies[1], fill=fill, donate=True
    )
    _assert_same_bits(on_device[1:], donated[1:])
    assert any(leaf.is_deleted() for leaf in jax.tree.leaves(copies))
    assert not any(leaf.is_deleted() for leaf in jax.tree.leaves((params, state)))


def test_raw_uint32_keys_are_accepted():
    config = make_config("encoder")
    params = random_params(config)
    new_config, new_params, _ = growth.expand(
        config, params, ["num_heads=3"], rng=jax.random.PRNGKey(0)
    )
    assert new_config.num_heads == 3
    assert new_params["block_0"]["attn"]["query"]["kernel"].shape[1] == 3


def test_a_composition_needs_little_memory_beyond_the_old_and_the_grown_state():
    """Draws are fused into the loops that write the grown leaves: no buffers of bits."""
    config = make_config("decoder", hidden=32, mlp_dim=48, num_heads=2, qk_dim=8, v_dim=8)
    concrete = random_params(config)
    params, state = ops.abstract(concrete), ops.abstract(_state(concrete))
    requests = ["mlp_dim=72", "num_heads=3", "qk_dim=12", "v_dim=12", "hidden=48:pad", "add_layer"]
    expansion = growth.plan_expansion(config, params, requests, opt_state=state)
    memory = expansion.lower(params, state, rng=jax.random.key(0)).compile().memory_analysis()
    peak = memory.argument_size_in_bytes + memory.output_size_in_bytes + memory.temp_size_in_bytes
    nbytes = lambda tree: sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))
    assert peak <= 1.1 * (
        nbytes(state) + nbytes(params) + nbytes(expansion.abstract_state(params, state))
    )
