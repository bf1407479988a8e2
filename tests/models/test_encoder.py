"""The BERT-style text encoder: layout, logical axes, masking invariants, jit == eager.

Parameters come from an abstract init filled with numpy noise: a real Flax init on CPU
compiles one random program per parameter shape and costs seconds.
"""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models import encoder

CONFIG = encoder.tiny(num_classes=3)


def ids(length=10, pad_from=(10, 6, 3), vocab=128, seed=0):
    """Random token ids [3, length]; row r is padding (0) from position pad_from[r] on."""
    rng = np.random.default_rng(seed)
    x = rng.integers(1, vocab, (len(pad_from), length)).astype(np.int32)
    for row, start in enumerate(pad_from):
        x[row, start:] = 0
    return jnp.asarray(x)


def abstract_variables(config):
    model = encoder.Encoder(config)
    return jax.eval_shape(model.init, jax.random.key(0), jnp.ones((1, 8), jnp.int32))


@functools.cache
def params(config, seed=0):
    """Random parameters of the right shapes (norm scales near 1)."""
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        noise = rng.normal(size=leaf.shape).astype(np.float32)
        if path[-1].key == "scale":
            return jnp.asarray(1.0 + 0.1 * noise)
        return jnp.asarray(0.2 * noise)

    return jax.tree_util.tree_map_with_path(fill, nn.unbox(abstract_variables(config)["params"]))


@functools.cache
def _compiled(config, deterministic):
    def all_outputs(module, x):
        if not deterministic:
            return {"out": module(x, False)}
        return {
            "out": module(x),
            "tokens": module.encode(x),
            "embedding": module.sentence_embedding(x),
        }

    model = encoder.Encoder(config)
    return jax.jit(lambda v, x, rngs: model.apply(v, x, method=all_outputs, rngs=rngs))


def run(config, x, deterministic=True, rngs=None):
    """`__call__`, `encode` and `sentence_embedding` from one jitted program (one compile);
    only `__call__` when not deterministic."""
    return _compiled(config, deterministic)({"params": params(config)}, x, rngs)


def test_parameter_layout_matches_contract():
    config = encoder.tiny(num_classes=5)
    shapes = jax.tree_util.tree_map(lambda x: x.shape, params(config))
    assert set(shapes) == set(encoder.component_slots(config))
    assert encoder.component_slots(config)[0] == "embed"
    assert encoder.component_slots(config)[-1] == "head"
    assert shapes["embed"] == {
        "word": (128, 32),
        "position": (32, 32),
        "token_type": (2, 32),
        "norm": {"scale": (32,), "bias": (32,)},
    }
    block = shapes["block_1"]
    assert set(block) == {"attn", "mlp", "norm_attn", "norm_mlp"}
    assert block["attn"]["query"] == {"kernel": (32, 2, 16), "bias": (2, 16)}
    assert block["attn"]["out"] == {"kernel": (2, 16, 32), "bias": (32,)}
    assert block["mlp"]["wi"] == {"kernel": (32, 64), "bias": (64,)}
    assert block["mlp"]["wo"] == {"kernel": (64, 32), "bias": (32,)}
    assert shapes["head"] == {"kernel": (32, 5), "bias": (5,)}
    no_head = params(encoder.tiny())
    assert set(no_head) == set(encoder.component_slots(encoder.tiny())) and "head" not in no_head


def test_every_param_has_logical_axes():
    variables = abstract_variables(CONFIG)
    leaves = jax.tree_util.tree_leaves(
        variables["params"], is_leaf=lambda x: isinstance(x, nn.Partitioned)
    )
    assert len(leaves) == len(jax.tree_util.tree_leaves(params(CONFIG)))
    for leaf in leaves:
        assert isinstance(leaf, nn.Partitioned) and len(leaf.names) == leaf.value.ndim
    specs = nn.get_partition_spec(variables)["params"]
    assert tuple(specs["embed"]["word"]) == ("vocab", "embed")
    assert tuple(specs["embed"]["position"]) == ("length", "embed")
    assert tuple(specs["head"]["kernel"]) == ("embed", "classes")
    assert tuple(specs["block_0"]["attn"]["query"]["kernel"]) == ("embed", "heads", "kv")
    assert tuple(specs["block_0"]["attn"]["out"]["kernel"]) == ("heads", "kv", "embed")
    assert tuple(specs["block_0"]["mlp"]["wi"]["kernel"]) == ("embed", "mlp")


def test_minilm_l6_size():
    shapes = nn.unbox(abstract_variables(encoder.minilm_l6()))
    count = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(shapes))
    # The 22,713,216 parameters of all-MiniLM-L6-v2 less its unused 384 x 384 pooler.
    assert count == 22_713_216 - 384 * 384 - 384


def test_jit_matches_eager_and_output_shapes():
    model = encoder.Encoder(CONFIG)
    variables = {"params": params(CONFIG)}
    x = ids()
    jitted = run(CONFIG, x)
    assert jitted["out"].shape == (3, 3) and bool(jnp.all(jnp.isfinite(jitted["out"])))
    assert jitted["tokens"].shape == (3, 10, 32) and jitted["embedding"].shape == (3, 32)
    eager = {
        "out": model.apply(variables, x),
        "embedding": model.apply(variables, x, method="sentence_embedding"),
    }
    for key, value in eager.items():
        np.testing.assert_allclose(value, jitted[key], rtol=1e-5, atol=1e-5, err_msg=key)
    np.testing.assert_allclose(jnp.linalg.norm(jitted["embedding"], axis=-1), 1.0, rtol=1e-5)


def test_pooling_and_sentence_embedding():
    x = ids()
    outputs = run(encoder.tiny(), x)
    tokens = np.asarray(outputs["tokens"])
    valid = np.asarray(x > 0, np.float32)[..., None]
    mean = (tokens * valid).sum(1) / valid.sum(1)
    np.testing.assert_allclose(outputs["out"], mean, rtol=1e-5, atol=1e-5)
    unit = mean / np.linalg.norm(mean, axis=-1, keepdims=True)
    np.testing.assert_allclose(outputs["embedding"], unit, rtol=1e-5, atol=1e-5)
    head = params(CONFIG)["head"]
    with_head = run(CONFIG, x)
    np.testing.assert_allclose(
        with_head["out"], mean @ head["kernel"] + head["bias"], rtol=1e-4, atol=1e-4
    )
    cls_config = dataclasses.replace(CONFIG, pooling="cls")
    cls_logits = jax.jit(encoder.Encoder(cls_config).apply)({"params": params(CONFIG)}, x)
    expected = with_head["tokens"][:, 0] @ head["kernel"] + head["bias"]
    np.testing.assert_allclose(cls_logits, expected, rtol=1e-4, atol=1e-4)


def test_extra_padding_changes_nothing():
    x = ids()
    short, long = run(CONFIG, x), run(CONFIG, jnp.pad(x, ((0, 0), (0, 14))))
    for key in ("out", "embedding"):
        np.testing.assert_allclose(short[key], long[key], rtol=1e-5, atol=1e-5, err_msg=key)
    # Real tokens' states do not depend on how much padding follows (so neither does
    # "cls" pooling, which reads token 0).
    valid = np.asarray(x > 0)
    np.testing.assert_allclose(
        np.asarray(short["tokens"])[valid],
        np.asarray(long["tokens"])[:, :10][valid],
        rtol=1e-5,
        atol=1e-5,
    )


def test_rows_are_independent_and_tokens_mix():
    x = ids()
    changed = x.at[2, 1].set(77 if int(x[2, 1]) != 77 else 78)
    before, after = run(CONFIG, x)["tokens"], run(CONFIG, changed)["tokens"]
    # Changing a real token of row 2 reaches row 2's other tokens and no other row.
    assert float(jnp.max(jnp.abs(before[2, 0] - after[2, 0]))) > 1e-4
    np.testing.assert_array_equal(before[:2], after[:2])


def test_dropout_only_when_not_deterministic():
    # One block and "rbg" keys keep the compile short: threefry programs compile slowly.
    config = dataclasses.replace(CONFIG, dropout_rate=0.3, num_layers=1)
    x = ids()
    eval_out = jax.jit(encoder.Encoder(config).apply)({"params": params(config)}, x)
    train_a = run(config, x, False, {"dropout": jax.random.key(1, impl="rbg")})["out"]
    train_b = run(config, x, False, {"dropout": jax.random.key(2, impl="rbg")})["out"]
    assert not np.allclose(train_a, eval_out) and not np.allclose(train_a, train_b)
    again = run(config, x, False, {"dropout": jax.random.key(1, impl="rbg")})["out"]
    np.testing.assert_array_equal(train_a, again)


def test_config_validation():
    with pytest.raises(ValueError, match="pooling"):
        encoder.tiny(pooling="max")
    with pytest.raises(ValueError, match="num_classes"):
        encoder.tiny(num_classes=0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        encoder.tiny().hidden = 8  # type: ignore[misc]
    config = encoder.minilm_l6()
    assert (config.norm_placement, config.norm_eps, config.mlp_activation) == (
        "post",
        1e-12,
        "gelu",
    )
    assert (config.qkv_bias, config.out_bias, config.mlp_bias) == (True, True, True)
    with pytest.raises(ValueError, match="max_len"):
        jax.eval_shape(
            encoder.Encoder(CONFIG).init, jax.random.key(0), jnp.ones((1, 40), jnp.int32)
        )
