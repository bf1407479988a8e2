"""Optimizer-state growth: the same map as the parameters, with moment rules."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import growth


@dataclasses.dataclass(frozen=True)
class _Config:
    hidden: int = 8
    mlp_dim: int = 12
    num_heads: int = 2
    qk_dim: int = 4
    v_dim: int = 3
    num_layers: int = 2
    norm: str = "rmsnorm"
    norm_eps: float = 1e-6
    norm_placement: str = "pre"
    attention_scaling: str = "runtime"


def _params(cfg: _Config, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    r = lambda *shape: rng.normal(size=shape).astype(np.float32)
    h, e, k, v, p = cfg.hidden, cfg.num_heads, cfg.qk_dim, cfg.v_dim, cfg.mlp_dim
    params = {"embed": {"embedding": r(5, h)}, "final_norm": {"scale": r(h)}}
    for i in range(cfg.num_layers):
        params[f"block_{i}"] = {
            "norm_attn": {"scale": r(h)},
            "norm_mlp": {"scale": r(h)},
            "attn": {
                "query": {"kernel": r(h, e, k)},
                "key": {"kernel": r(h, e, k), "bias": r(e, k)},
                "value": {"kernel": r(h, e, v)},
                "out": {"kernel": r(e, v, h)},
            },
            "mlp": {"wi": {"kernel": r(h, p), "bias": r(p)}, "wo": {"kernel": r(p, h)}},
        }
    params["logits"] = {"kernel": r(h, 5)}
    return jax.tree.map(jnp.asarray, params)


def _state(optimizer, params):
    """An optimizer state after two updates with random gradients (non-zero moments)."""
    state = optimizer.init(params)
    update = jax.jit(optimizer.update)
    for seed in (1, 2):
        grads = _params(_Config(**_sizes(params)), seed)
        _, state = update(grads, state, params)
    return state


def _sizes(params) -> dict:
    b = params["block_0"]
    h, e, k = b["attn"]["query"]["kernel"].shape
    return dict(
        hidden=h,
        num_heads=e,
        qk_dim=k,
        v_dim=b["attn"]["value"]["kernel"].shape[2],
        mlp_dim=b["mlp"]["wi"]["kernel"].shape[1],
        num_layers=sum(name.startswith("block_") for name in params),
    )


def _adam(state):
    return next(
        s for s in jax.tree.leaves(state, is_leaf=lambda x: hasattr(x, "nu")) if hasattr(s, "nu")
    )


def _grow(cfg, requests, optimizer=None):
    optimizer = optimizer or optax.adam(1e-2)
    params = _params(cfg)
    state = _state(optimizer, params)
    new_cfg, new_params, new_state = growth.expand(
        cfg, params, requests, rng=jax.random.key(3), opt_state=state, fill=42.0
    )
    # The grown state must fit the grown parameters.
    grads = jax.tree.map(jnp.ones_like, new_params)
    jax.eval_shape(optimizer.update, grads, new_state, new_params)
    return params, state, new_params, new_state


def test_adam_new_entries_start_at_zero_and_count_carries_on():
    _, state, new_params, new_state = _grow(_Config(), ["mlp_dim=16", "num_heads=3", "v_dim=5"])
    old, new = _adam(state), _adam(new_state)
    assert int(new.count) == int(old.count) == 2
    for moment in ("mu", "nu"):
        o = getattr(old, moment)["block_1"]
        n = getattr(new, moment)["block_1"]
        np.testing.assert_array_equal(n["mlp"]["wi"]["kernel"][:, :12], o["mlp"]["wi"]["kernel"])
        np.testing.assert_array_equal(n["mlp"]["wi"]["kernel"][:, 12:], 0.0)
        np.testing.assert_array_equal(n["mlp"]["wo"]["kernel"][12:], 0.0)
        np.testing.assert_array_equal(n["attn"]["key"]["bias"][2:], 0.0)
        np.testing.assert_array_equal(
            n["attn"]["value"]["kernel"][:, :2, :3], o["attn"]["value"]["kernel"]
        )
        np.testing.assert_array_equal(n["attn"]["value"]["kernel"][:, :, 3:], 0.0)
        np.testing.assert_array_equal(n["attn"]["out"]["kernel"][:, 3:], 0.0)
    # Free parameter entries got the fill, their moments did not.
    np.testing.assert_array_equal(new_params["block_1"]["mlp"]["wi"]["kernel"][:, 12:], 42.0)


@pytest.mark.parametrize("scaling", ["runtime", "folded"])
def test_rescaled_key_scales_first_moment_by_c_and_second_by_c_squared(scaling):
    params, state, new_params, new_state = _grow(_Config(attention_scaling=scaling), ["qk_dim=9"])
    c = math.sqrt(9 / 4) if scaling == "runtime" else 1.0
    old, new = _adam(state), _adam(new_state)
    for name in ("kernel", "bias"):
        path = lambda t, name=name: t["block_0"]["attn"]["key"][name][..., :4]
        np.testing.assert_array_equal(
            path(new_params), params["block_0"]["attn"]["key"][name] * np.float32(c)
        )
        np.testing.assert_array_equal(path(new.mu), path(old.mu) * np.float32(c))
        np.testing.assert_array_equal(path(new.nu), path(old.nu) * np.float32(c * c))
        np.testing.assert_array_equal(new.mu["block_0"]["attn"]["key"][name][..., 4:], 0.0)


def test_momentum_trace_scales_by_c():
    opt = optax.sgd(0.1, momentum=0.9)
    _, state, _, new_state = _grow(_Config(), ["qk_dim=16"], opt)
    trace = lambda s: s[0].trace["block_1"]["attn"]["key"]["kernel"]
    np.testing.assert_array_equal(trace(new_state)[..., :4], trace(state) * np.float32(2.0))
    np.testing.assert_array_equal(trace(new_state)[..., 4:], 0.0)


def test_hidden_pad_scales_norm_gain_moments():
    _, state, _, new_state = _grow(_Config(), ["hidden=32:pad"])
    old, new = _adam(state), _adam(new_state)
    c = math.sqrt(8 / 32)
    for moment, factor in (("mu", c), ("nu", c * c)):
        o = getattr(old, moment)["block_0"]["norm_mlp"]["scale"]
        n = getattr(new, moment)["block_0"]["norm_mlp"]["scale"]
        np.testing.assert_array_equal(n[:8], o * np.float32(factor))
        np.testing.assert_array_equal(n[8:], 0.0)
    np.testing.assert_array_equal(new.mu["embed"]["embedding"][:, 8:], 0.0)


def test_hidden_replicate_moments_follow_the_split():
    params, state, new_params, new_state = _grow(_Config(), ["hidden=24:replicate"])
    old, new = _adam(state), _adam(new_state)
    # Output side: plain copies.
    for moment in ("mu", "nu"):
        n = getattr(new, moment)["embed"]["embedding"]
        o = getattr(old, moment)["embed"]["embedding"]
        for j in range(3):
            np.testing.assert_array_equal(n[:, 8 * j : 8 * (j + 1)], o)
    # Input side: copy j of each row is scaled by split[j], its moments by split and split^2.
    kernel = lambda t: t["block_1"]["attn"]["query"]["kernel"]
    split = np.stack([kernel(new_params)[8 * j : 8 * (j + 1)] for j in range(3)]) / kernel(params)
    np.testing.assert_allclose(split.sum(0), 1.0, rtol=1e-5)
    assert np.ptp(split) > 0.01  # the copies are not equal shares
    for j in range(3):
        rows = slice(8 * j, 8 * (j + 1))
        np.testing.assert_allclose(kernel(new.mu)[rows], kernel(old.mu) * split[j], rtol=1e-5)
        np.testing.assert_allclose(kernel(new.nu)[rows], kernel(old.nu) * split[j] ** 2, rtol=1e-5)


@pytest.mark.parametrize("position", [0, 1, 2])
def test_depth_new_block_moments_are_zero_and_blocks_renumber(position):
    _, state, _, new_state = _grow(_Config(), [f"add_layer@{position}"])
    old, new = _adam(state), _adam(new_state)
    for moment in ("mu", "nu"):
        n, o = getattr(new, moment), getattr(old, moment)
        for leaf in jax.tree.leaves(n[f"block_{position}"]):
            np.testing.assert_array_equal(leaf, 0.0)
        for i in range(2):
            j = i if i < position else i + 1
            jax.tree.map(np.testing.assert_array_equal, n[f"block_{j}"], o[f"block_{i}"])


def test_chains_masks_and_injected_hyperparams():
    mask = lambda p: jax.tree.map(lambda x: x.ndim > 1, p)
    opt = optax.chain(
        optax.clip_by_global_norm(1.0),
        optax.masked(optax.add_decayed_weights(1e-4), mask),
        optax.inject_hyperparams(optax.adamw)(learning_rate=1e-3),
    )
    _, state, _, new_state = _grow(_Config(), ["hidden=16", "add_layer@1", "mlp_dim=20"], opt)
    hyper = lambda s: s[2].hyperparams["learning_rate"]
    np.testing.assert_array_equal(hyper(new_state), hyper(state))
    assert int(new_state[2].count) == int(state[2].count)


def test_factored_state_is_refused():
    with pytest.raises(NotImplementedError, match="factored"):
        _grow(_Config(), ["mlp_dim=16"], optax.adafactor(1e-2))
