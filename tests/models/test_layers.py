"""Shared transformer layers: norms, attention scaling and masks, block layout, dtypes."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models import layers


def config(**kw):
    base = dict(hidden=16, mlp_dim=24, num_heads=2, qk_dim=8, v_dim=4, num_layers=1)
    return layers.TransformerConfig(**{**base, **kw})


def x_input(shape=(2, 5, 16), seed=0):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


def init(module, *args):
    return nn.unbox(module.init(jax.random.key(0), *args)["params"])


@pytest.mark.parametrize("kind", ["layernorm", "rmsnorm"])
def test_norm_matches_its_formula(kind):
    x = x_input()
    norm = layers.Norm(kind=kind, eps=1e-3)
    params = init(norm, x)
    params = jax.tree.map(lambda p: p + 0.5, params)  # non-trivial scale (and bias)
    y = norm.apply({"params": params}, x)
    xs = np.asarray(x, np.float64)
    if kind == "rmsnorm":
        assert set(params) == {"scale"}
        expected = xs / np.sqrt(np.mean(xs**2, -1, keepdims=True) + 1e-3) * 1.5
    else:
        assert set(params) == {"scale", "bias"}
        centred = xs - xs.mean(-1, keepdims=True)
        expected = centred / np.sqrt(np.mean(centred**2, -1, keepdims=True) + 1e-3) * 1.5 + 0.5
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)


def test_folded_scaling_is_runtime_scaling_moved_into_the_query():
    x = x_input()
    runtime = layers.MultiHeadAttention(config(attention_scaling="runtime"))
    folded = layers.MultiHeadAttention(config(attention_scaling="folded"))
    params = init(runtime, x)
    folded_params = jax.tree_util.tree_map(lambda p: p, params)
    folded_params["query"] = {"kernel": params["query"]["kernel"] * 8**-0.5}
    with jax.default_matmul_precision("highest"):
        np.testing.assert_allclose(
            runtime.apply({"params": params}, x),
            folded.apply({"params": folded_params}, x),
            rtol=1e-5,
            atol=1e-6,
        )
        # Without the fold the folded module is a different (unscaled) function.
        assert not np.allclose(
            runtime.apply({"params": params}, x), folded.apply({"params": params}, x), atol=1e-4
        )


def test_attention_shapes_and_optional_biases():
    x = x_input()
    params = init(layers.MultiHeadAttention(config(qkv_bias=True, out_bias=True)), x)
    assert params["query"]["kernel"].shape == (16, 2, 8)
    assert params["key"]["bias"].shape == (2, 8)
    assert params["value"]["kernel"].shape == (16, 2, 4)
    assert params["out"]["kernel"].shape == (2, 4, 16)
    assert params["out"]["bias"].shape == (16,)
    plain = init(layers.MultiHeadAttention(config()), x)
    assert all(set(p) == {"kernel"} for p in plain.values())


def test_padding_mask_hides_padded_keys():
    block = layers.TransformerBlock(config(norm_placement="post"))
    x = x_input((2, 6, 16))
    valid = jnp.array([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
    mask = layers.padding_mask(valid)
    assert mask.shape == (2, 1, 6, 6)
    params = init(block, x, mask)
    y = block.apply({"params": params}, x, mask)
    y_changed = block.apply({"params": params}, x.at[0, 4:].set(7.0), mask)
    np.testing.assert_allclose(y[0, :4], y_changed[0, :4], rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(y[1], y_changed[1])


def test_causal_mask_is_lower_triangular():
    mask = np.asarray(layers.causal_mask(4))[0, 0]
    np.testing.assert_array_equal(mask, np.tril(np.ones((4, 4), bool)))


@pytest.mark.parametrize("gated", [False, True])
def test_mlp_layout(gated):
    x = x_input()
    params = init(layers.Mlp(config(gated_mlp=gated, mlp_bias=not gated)), x)
    names = {"wi_0", "wi_1", "wo"} if gated else {"wi", "wo"}
    assert set(params) == names
    assert params["wo"]["kernel"].shape == (24, 16)
    assert ("bias" in params["wo"]) == (not gated)


@pytest.mark.parametrize("norm", ["layernorm", "rmsnorm"])
def test_pre_norm_block_with_zero_outputs_is_the_identity(norm):
    """Growth rule 6 (a new block is the identity) relies on this layout."""
    block = layers.TransformerBlock(config(norm=norm, out_bias=True))
    x = x_input()
    params = init(block, x)
    assert set(params) == {"norm_attn", "attn", "norm_mlp", "mlp"}
    params["attn"]["out"] = jax.tree.map(jnp.zeros_like, params["attn"]["out"])
    params["mlp"]["wo"] = jax.tree.map(jnp.zeros_like, params["mlp"]["wo"])
    np.testing.assert_array_equal(block.apply({"params": params}, x), x)


def test_block_jit_matches_eager_and_dropout_needs_rng():
    block = layers.TransformerBlock(config(dropout_rate=0.5, mlp_activation="gelu_tanh"))
    x = x_input()
    params = init(block, x)
    eager = block.apply({"params": params}, x)
    np.testing.assert_allclose(
        eager, jax.jit(block.apply)({"params": params}, x), rtol=1e-5, atol=1e-6
    )
    dropped = block.apply({"params": params}, x, None, False, rngs={"dropout": jax.random.key(1)})
    assert not np.allclose(eager, dropped)


def test_bfloat16_compute_keeps_float32_params():
    block = layers.TransformerBlock(config(dtype=jnp.bfloat16, norm="rmsnorm"))
    x = x_input().astype(jnp.bfloat16)
    params = init(block, x)
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
    y = block.apply({"params": params}, x)
    assert y.dtype == jnp.bfloat16 and np.all(np.isfinite(np.asarray(y, np.float32)))


def test_config_validation():
    with pytest.raises(ValueError, match="attention_scaling"):
        config(attention_scaling="none")
    with pytest.raises(ValueError, match="mlp_activation"):
        config(mlp_activation="swish")
    with pytest.raises(ValueError, match="qk_dim"):
        config(qk_dim=0)
