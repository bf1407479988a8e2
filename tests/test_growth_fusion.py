"""Fused width steps and the thread pool give the same bits as one step after the other."""

import jax
import numpy as np
import optax
import pytest
from test_growth_preservation import make_config, random_params

import growth
from growth import api, depth, draws, ops, transfer
from growth.optimizer_state import grow_opt_state
from growth.requests import parse_requests

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


def _one_by_one(config, params, requests, *, rng, opt_state, fill):
    """``growth.expand`` as it was: every request planned and applied on its own."""
    for index, request in enumerate(parse_requests(requests)):
        step = api.plan(config, params, request, key=jax.random.fold_in(rng, index), fill=fill)
        opt_state = grow_opt_state(opt_state, params, step)
        params, config = step.grow(params, ops.PARAM), step.config
    return config, params, opt_state


def _assert_same_bits(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert type(x) is type(y)
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype and x.shape == y.shape
        assert x.tobytes() == y.tobytes()


@pytest.mark.parametrize("fill", [None, 42.0])
@pytest.mark.parametrize("family", sorted(_REQUESTS))
def test_fused_steps_match_one_step_after_the_other(family, fill):
    config = make_config(family, attention_scaling="runtime", qkv_bias=True)
    params = random_params(config)
    state = optax.adam(1e-3).init(params)
    state = jax.tree.map(lambda x: x + 0.5 if x.ndim else x, state)  # non-zero moments
    rng = jax.random.key(4)
    fused = growth.expand(config, params, _REQUESTS[family], rng=rng, opt_state=state, fill=fill)
    one_by_one = _one_by_one(config, params, _REQUESTS[family], rng=rng, opt_state=state, fill=fill)
    assert fused[0] == one_by_one[0]
    _assert_same_bits(fused[1:], one_by_one[1:])


def test_thread_pool_does_not_change_the_draws(monkeypatch):
    config = make_config("decoder", hidden=16, mlp_dim=32, num_heads=4)
    params = random_params(config)
    requests = ["mlp_dim=80", "hidden=40:pad", "num_heads=6", "add_layer@1"]
    monkeypatch.setattr(ops, "_PARALLEL_WORK", 1 << 60)  # every leaf on this thread
    serial = growth.expand(config, params, requests, rng=jax.random.key(0))
    monkeypatch.setattr(ops, "_LARGE_TASK", 1)  # every pass on this thread and the pool
    monkeypatch.setattr(ops, "_PARALLEL_WORK", 1)
    monkeypatch.setattr(draws, "_DRAW_BLOCK", 7)  # draws in many small blocks
    executor = ops._executor()
    if executor is None:
        pytest.skip("a single core: growth has no thread pool")
    pool, _ = executor
    submitted = []
    submit = pool.submit
    monkeypatch.setattr(pool, "submit", lambda *a: submitted.append(a) or submit(*a))
    parallel = growth.expand(config, params, requests, rng=jax.random.key(0))
    assert submitted  # the pool took part
    assert serial[0] == parallel[0]
    _assert_same_bits(serial[1], parallel[1])


def test_abstract_planning_matches_the_grown_shapes():
    config = make_config("encoder")
    params = random_params(config)
    shapes = ops.abstract(params)
    for index, request in enumerate(parse_requests(["hidden=12", "num_heads=3", "v_dim=5"])):
        key = jax.random.fold_in(jax.random.key(0), index)
        step = api.plan(config, params, request, key=key, fill=None)
        shapes, params = ops.grow_abstract(shapes, step), step.grow(params, ops.PARAM)
        config = step.config
    assert jax.tree.map(lambda x: (x.shape, x.dtype), shapes) == jax.tree.map(
        lambda x: (x.shape, x.dtype), params
    )
    with pytest.raises(ValueError, match="width steps"):
        ops.fuse_steps([ops.Step(config, lambda tree, role: dict(tree))])  # like depth steps


@pytest.mark.parametrize("mean", [0.0, 1.5])
@pytest.mark.parametrize("block", [7, 1 << 15])
@pytest.mark.parametrize("chunk_pairs", [4, 1 << 14])
def test_draws_do_not_depend_on_the_target_layout(monkeypatch, mean, block, chunk_pairs):
    """New free entries drawn into a strided block (new columns of a wider leaf) and into
    a contiguous one, in blocks of any size, are the generator's normal stream in C order
    (one chunk of the stream or several)."""
    monkeypatch.setattr(draws, "_DRAW_BLOCK", block)
    monkeypatch.setattr(draws, "_CHUNK_PAIRS", chunk_pairs)
    value = draws.Free(mean, 0.5)
    noise = draws.standard_normal(draws.host_generator(1, 2), (6, 5))
    expected = noise * np.float32(0.5)
    if mean:
        expected += np.float32(mean)
    wide = np.zeros((6, 9), np.float32)
    draws._fill_free(wide[:, 2:7], value, lambda: draws.host_generator(1, 2))
    contiguous = np.zeros((6, 5), np.float32)
    draws._fill_free(contiguous, value, lambda: draws.host_generator(1, 2))
    assert wide[:, 2:7].tobytes() == expected.tobytes() == contiguous.tobytes()
    assert not wide[:, :2].any() and not wide[:, 7:].any()


@pytest.mark.parametrize("chunk_pairs", [3, 1 << 14])
def test_normal_stream_does_not_depend_on_how_it_is_split(monkeypatch, chunk_pairs):
    """Fills of any sizes (ending inside a chunk, or past several) give one stream's values."""
    monkeypatch.setattr(draws, "_CHUNK_PAIRS", chunk_pairs)
    whole = draws.standard_normal(draws.host_generator(3), (1001,))
    stream = draws.NormalStream(draws.host_generator(3), 1001)
    parts = []
    for size in (1, 1, 0, 7, 2, 64, 3, 500, 423):  # 1001 in all
        part = np.empty(size, np.float32)
        stream.fill(part)
        parts.append(part)
    assert np.concatenate(parts).tobytes() == whole.tobytes()
    with pytest.raises(ValueError, match="0 values left"):
        stream.fill(np.empty(1, np.float32))


def test_normal_stream_is_box_muller_of_the_generators_uniforms(monkeypatch):
    """A chunk of c pairs: r cos t of its pairs, then r sin t, from 2c float32 uniforms."""
    monkeypatch.setattr(draws, "_CHUNK_PAIRS", 4)
    x = draws.standard_normal(draws.host_generator(9), (11,))  # chunks of 4, 2 pairs
    u = draws.host_generator(9).random(12, dtype=np.float32).astype(np.float64)
    expected = []
    for u1, u2 in ((u[0:4], u[4:8]), (u[8:10], u[10:12])):
        r, t = np.sqrt(-2 * np.log(1 - u1)), 2 * np.pi * u2
        expected += [r * np.cos(t), r * np.sin(t)]
    np.testing.assert_allclose(x, np.concatenate(expected)[:11], rtol=2e-6, atol=2e-6)


def test_normal_stream_is_standard_normal():
    """Mean, variance, tails and the pairs' independence of 2**20 draws (Box-Muller)."""
    x = draws.standard_normal(draws.host_generator(5), (1 << 20,)).astype(np.float64)
    assert np.all(np.isfinite(x))
    assert abs(x.mean()) < 5e-3 and abs(x.std() - 1.0) < 5e-3
    for k, p in ((1.0, 0.3173), (2.0, 0.0455), (3.0, 0.0027)):  # P(|x| > k)
        assert abs(np.mean(np.abs(x) > k) - p) < 6 * np.sqrt(p / x.size) + 1e-4
    # Each chunk holds r cos t of its pairs, then r sin t of the same pairs.
    chunks = x.reshape(-1, 2, draws._CHUNK_PAIRS)
    cosines, sines = chunks[:, 0].ravel(), chunks[:, 1].ravel()
    assert abs(np.corrcoef(cosines, sines)[0, 1]) < 5e-3
    assert abs(np.corrcoef(cosines**2, sines**2)[0, 1]) < 5e-3
    assert abs(np.corrcoef(x[:-1], x[1:])[0, 1]) < 5e-3  # neighbours
    # A uniform u1 of 0 (1 - u1 = 1) and the largest one (1 - u1 = 2**-24) stay finite.
    assert np.abs(x).max() <= np.sqrt(-2 * np.log(2.0**-24)) + 1e-5


@pytest.mark.parametrize("fill", [None, 42.0])
@pytest.mark.parametrize("family", sorted(_REQUESTS))
def test_every_entry_of_a_grown_leaf_is_written(monkeypatch, family, fill):
    """Grown leaves are written once into uninitialised buffers: none of their entries may
    keep what the buffer held (here NaN), for parameters (biases too) and moments."""
    config = make_config(family, attention_scaling="runtime", qkv_bias=True)
    params = random_params(config)
    state = optax.adam(1e-3).init(params)
    state = jax.tree.map(lambda x: x + 0.5 if x.ndim else x, state)
    rng = jax.random.key(4)
    clean = growth.expand(config, params, _REQUESTS[family], rng=rng, opt_state=state, fill=fill)
    empty = transfer.aligned_empty

    def dirty(shape, dtype):
        out = empty(shape, dtype)
        out[...] = np.nan
        return out

    monkeypatch.setattr(ops, "aligned_empty", dirty)
    monkeypatch.setattr(depth, "aligned_empty", dirty)
    grown = growth.expand(config, params, _REQUESTS[family], rng=rng, opt_state=state, fill=fill)
    assert not any(np.isnan(np.asarray(x)).any() for x in jax.tree.leaves(grown[1:]))
    _assert_same_bits(grown[1:], clean[1:])
