"""Function preservation of the six expansions on the real model families.

Depth growth must keep the logits bit-identical; width growth must keep
max |delta logits| <= 1e-5 * max |logits| (float32, highest matmul precision).
"""

import dataclasses
import math

import flax.linen as nn
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings

import growth
from growth import rules
from models import decoder, encoder, vit
from models.lm import DecoderOnlyLMModel

TOLERANCE = 1e-5
_IMAGES = np.random.default_rng(0).uniform(size=(2, 8, 8, 3)).astype(np.float32)
_TOKENS = np.array([[3, 7, 1, 12, 5, 2], [4, 4, 9, 11, 0, 0]], np.int32)


def make_config(family: str, **fields):
    """A tiny config of a family; `fields` override TransformerConfig fields."""
    fields = {
        "num_layers": 2,
        "hidden": 6,
        "mlp_dim": 5,
        "num_heads": 2,
        "qk_dim": 3,
        "v_dim": 2,
        **fields,
    }
    if family == "vit":
        return vit.ViTConfig(image_shape=(8, 8, 3), patch_size=4, num_classes=5, **fields)
    if family == "decoder":
        return decoder.DecoderConfig(vocab_size=13, max_len=8, **fields)
    assert family == "encoder"
    return encoder.EncoderConfig(vocab_size=13, max_len=8, num_classes=3, **fields)


def _module(config):
    if isinstance(config, vit.ViTConfig):
        return vit.ViT(config), _IMAGES
    if isinstance(config, decoder.DecoderConfig):
        return decoder.Decoder(config), _TOKENS
    return encoder.Encoder(config), _TOKENS


def abstract_params(config):
    """The boxed parameter shapes a fresh model of `config` would have."""
    module, x = _module(config)
    return jax.eval_shape(module.init, jax.random.key(0), x)["params"]


def random_params(config, seed: int = 0, boxed: bool = False):
    """Random parameters (non-zero biases and heads too, so that nothing hides)."""
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name = jax.tree_util.keystr(path)
        noise = rng.normal(size=leaf.shape).astype(np.float32)
        if "scale" in name:
            return jnp.asarray(1.0 + 0.3 * noise)
        if leaf.ndim >= 2 and "embedding" not in name and "word" not in name:
            return jnp.asarray(noise / math.sqrt(leaf.shape[0]))
        return jnp.asarray(0.5 * noise)

    params = jax.tree_util.tree_map_with_path(draw, nn.unbox(abstract_params(config)))
    if boxed:
        boxes = abstract_params(config)
        return jax.tree.map(
            lambda box, value: box.replace_boxed(value),
            boxes,
            params,
            is_leaf=lambda x: isinstance(x, nn.Partitioned),
        )
    return params


def forward(config, params, jit: bool = False):
    module, x = _module(config)
    apply = jax.jit(module.apply) if jit else module.apply
    with jax.default_matmul_precision("highest"):
        return np.asarray(apply({"params": params}, x))


def assert_preserved(before, after, depth_only: bool):
    if depth_only:
        np.testing.assert_array_equal(after, before)
        return
    delta = float(np.max(np.abs(after - before)))
    assert delta <= TOLERANCE * float(np.max(np.abs(before))), (delta, np.max(np.abs(before)))


def assert_matches_fresh_model(config, params):
    """The grown tree has exactly the paths and shapes of a model built from `config`."""
    expected = jax.tree.map(lambda a: (a.shape, a.dtype), nn.unbox(abstract_params(config)))
    actual = jax.tree.map(lambda a: (a.shape, a.dtype), nn.unbox(params))
    assert actual == expected


def grow_and_check(config, requests, *, fill=None, seed=0, jit=False):
    params = random_params(config, seed)
    before = forward(config, params, jit)
    new_config, new_params, _ = growth.expand(
        config, params, requests, rng=jax.random.key(seed), fill=fill
    )
    assert_matches_fresh_model(new_config, new_params)
    after = forward(new_config, new_params, jit)
    depth_only = all(growth.parse_requests([r])[0].kind == "add_layer" for r in requests)
    assert_preserved(before, after, depth_only)
    return new_config, new_params


# One representative model per (norm, placement), each with other variants switched on.
PAIR_MODELS = {
    ("rmsnorm", "pre"): ("decoder", dict(gated_mlp=True, attention_scaling="folded")),
    ("rmsnorm", "post"): (
        "decoder",
        dict(
            tie_embeddings=True,
            qkv_bias=True,
            mlp_bias=True,
            gated_mlp=False,
            attention_scaling="runtime",
        ),
    ),
    ("layernorm", "pre"): ("vit", dict(qkv_bias=True, out_bias=True)),
    ("layernorm", "post"): ("encoder", {}),  # BERT: biases everywhere, runtime scaling
}
PAIR_REQUESTS = {
    "mlp_dim": "mlp_dim=9",
    "num_heads": "num_heads=3",
    "qk_dim": "qk_dim=5",
    "v_dim": "v_dim=4",
    "hidden:pad": "hidden=10:pad",
    "hidden:replicate": "hidden=12:replicate",
    "add_layer": "add_layer@1",
}


@pytest.mark.parametrize("transformation", sorted(PAIR_REQUESTS))
@pytest.mark.parametrize("norm_placement", sorted(PAIR_MODELS), ids="-".join)
def test_every_norm_and_transformation_pair(norm_placement, transformation):
    family, fields = PAIR_MODELS[norm_placement]
    norm, placement = norm_placement
    config = make_config(family, norm=norm, norm_placement=placement, **fields)
    kind, _, method = transformation.partition(":")
    allowed = [r.method for r in rules.RULES.get((kind, norm, placement), ())]
    if kind == "hidden" and method not in allowed or kind == "add_layer" and not allowed:
        with pytest.raises(growth.GrowthError, match="Refusing"):
            growth.expand(
                config,
                random_params(config),
                [PAIR_REQUESTS[transformation]],
                rng=jax.random.key(0),
            )
        return
    grow_and_check(config, [PAIR_REQUESTS[transformation]], fill=42.0)


@pytest.mark.parametrize("scaling", ["runtime", "folded"])
@pytest.mark.parametrize("qkv_bias", [False, True])
def test_key_query_growth_with_scaling_and_key_bias(scaling, qkv_bias):
    config = make_config("decoder", attention_scaling=scaling, qkv_bias=qkv_bias)
    grow_and_check(config, ["qk_dim=7"], fill=42.0)


@pytest.mark.parametrize("method", ["pad", "replicate"])
@pytest.mark.parametrize("tie", [False, True])
def test_hidden_growth_with_tied_logits(method, tie):
    config = make_config("decoder", tie_embeddings=tie)
    grow_and_check(config, [f"hidden=12:{method}"], fill=42.0)


@pytest.mark.parametrize("gated", [False, True])
def test_gated_and_plain_mlp(gated):
    config = make_config("vit", gated_mlp=gated, mlp_bias=not gated, norm="rmsnorm")
    grow_and_check(config, ["mlp_dim=8", "hidden=7"], fill=42.0)


@pytest.mark.parametrize(
    "family, position", [("vit", 0), ("vit", 2), ("decoder", 1), ("decoder", 2)]
)
def test_depth_growth_is_bit_identical_in_and_out_of_jit(family, position):
    config = make_config(family, norm="rmsnorm" if family == "vit" else "layernorm")
    params = random_params(config)
    new_config, new_params, _ = growth.expand(
        config, params, [f"add_layer@{position}"], rng=jax.random.key(1), fill=42.0
    )
    for jit in (False, True):
        np.testing.assert_array_equal(
            forward(new_config, new_params, jit), forward(config, params, jit)
        )


def test_width_growth_under_jit():
    config = make_config("decoder", gated_mlp=False, mlp_bias=True)
    grow_and_check(config, ["hidden=8", "num_heads=3", "v_dim=3"], jit=True)


def test_loss_right_after_growth_equals_loss_before():
    config = make_config("decoder")
    params = random_params(config)
    batch = {
        "decoder_input_tokens": _TOKENS,
        "decoder_target_tokens": np.roll(_TOKENS, -1, axis=1),
        "decoder_loss_weights": (_TOKENS > 0).astype(np.float32),
    }
    before, _ = DecoderOnlyLMModel(decoder.Decoder(config)).loss_fn(params, batch, None)
    new_config, new_params, _ = growth.expand(
        config, params, ["add_layer@0", "hidden=9", "mlp_dim=7"], rng=jax.random.key(2)
    )
    after, _ = DecoderOnlyLMModel(decoder.Decoder(new_config)).loss_fn(new_params, batch, None)
    assert abs(float(after) - float(before)) <= TOLERANCE * abs(float(before))


def test_boxed_params_keep_their_logical_axes():
    config = make_config("vit")
    params = random_params(config, boxed=True)
    new_config, new_params, _ = growth.expand(
        config, params, ["hidden=12", "add_layer@0", "num_heads=3"], rng=jax.random.key(0)
    )
    fresh = abstract_params(new_config)
    assert nn.get_partition_spec(new_params) == nn.get_partition_spec(fresh)
    assert_matches_fresh_model(new_config, new_params)


def test_fixed_and_free_entries():
    config = make_config("decoder", gated_mlp=False, mlp_bias=True)
    params = random_params(config)
    _, p, _ = growth.expand(
        config, params, ["mlp_dim=8", "hidden=9", "add_layer@2"], rng=jax.random.key(0), fill=42.0
    )
    np.testing.assert_array_equal(p["block_0"]["mlp"]["wi"]["kernel"][:6, 5:], 42.0)
    np.testing.assert_array_equal(p["block_0"]["mlp"]["wo"]["kernel"][5:], 0.0)
    np.testing.assert_array_equal(p["block_0"]["attn"]["query"]["kernel"][6:], 42.0)
    np.testing.assert_array_equal(p["embed"]["embedding"][:, 6:], 0.0)
    np.testing.assert_array_equal(p["block_2"]["attn"]["out"]["kernel"], 0.0)
    np.testing.assert_array_equal(p["block_2"]["mlp"]["wo"]["kernel"], 0.0)
    np.testing.assert_array_equal(p["block_2"]["mlp"]["wo"]["bias"], 0.0)
    np.testing.assert_array_equal(p["block_2"]["attn"]["key"]["kernel"], 42.0)
    # Default initializers: random kernels, unit gains (times sqrt(h/h') after padding).
    _, q, _ = growth.expand(config, params, ["hidden=9", "add_layer"], rng=jax.random.key(0))
    assert np.std(q["block_2"]["attn"]["key"]["kernel"]) > 0.1
    np.testing.assert_array_equal(q["block_2"]["norm_mlp"]["scale"], 1.0)
    np.testing.assert_allclose(q["block_0"]["norm_mlp"]["scale"][6:], math.sqrt(6 / 9))
    # A callable fill receives a key, the shape and the dtype of each block of new entries.
    seven = lambda key, shape, dtype: jnp.full(shape, 7.0, dtype)
    _, r, _ = growth.expand(config, params, ["v_dim=4"], rng=jax.random.key(0), fill=seven)
    np.testing.assert_array_equal(r["block_1"]["attn"]["value"]["kernel"][..., 2:], 7.0)
    np.testing.assert_array_equal(r["block_1"]["attn"]["out"]["kernel"][:, 2:], 0.0)


def test_expand_is_pure_and_deterministic():
    config = make_config("encoder")
    params = random_params(config)
    copy = jax.tree.map(np.array, params)
    first = growth.expand(config, params, ["hidden=18", "num_heads=4"], rng=jax.random.key(5))
    second = growth.expand(config, params, ["hidden=18", "num_heads=4"], rng=jax.random.key(5))
    other = growth.expand(config, params, ["hidden=18", "num_heads=4"], rng=jax.random.key(6))
    jax.tree.map(np.testing.assert_array_equal, params, copy)
    jax.tree.map(np.testing.assert_array_equal, first[1], second[1])
    q = lambda out: out[1]["block_0"]["attn"]["query"]["kernel"]
    assert not np.array_equal(q(first), q(other))
    assert first[0] == dataclasses.replace(config, hidden=18, num_heads=4)


@st.composite
def growth_cases(draw):
    family = draw(st.sampled_from(["vit", "decoder", "encoder"]))
    norm = draw(st.sampled_from(rules.NORMS))
    placement = draw(st.sampled_from(rules.PLACEMENTS))
    fields = dict(
        hidden=draw(st.integers(2, 4)),
        mlp_dim=draw(st.integers(1, 4)),
        num_heads=draw(st.integers(1, 2)),
        qk_dim=draw(st.integers(1, 3)),
        v_dim=draw(st.integers(1, 3)),
        num_layers=draw(st.integers(1, 2)),
        norm=norm,
        norm_placement=placement,
        attention_scaling=draw(st.sampled_from(rules.SCALINGS)),
        qkv_bias=draw(st.booleans()),
        out_bias=draw(st.booleans()),
        mlp_bias=draw(st.booleans()),
        gated_mlp=draw(st.booleans()),
    )
    if family == "decoder":
        fields["tie_embeddings"] = draw(st.booleans())
    config = make_config(family, **fields)
    kinds = ["mlp_dim", "num_heads", "qk_dim", "v_dim", "hidden"]
    if placement == "pre":
        kinds.append("add_layer")
    # All six (five for post-norm models, which refuse depth growth) in a random order;
    # single expansions are covered by test_every_norm_and_transformation_pair.
    kinds = draw(st.permutations(kinds))
    sizes = dict(fields)
    requests = []
    for kind in kinds:
        if kind == "add_layer":
            requests.append(f"add_layer@{draw(st.integers(0, sizes['num_layers']))}")
            sizes["num_layers"] += 1
        elif kind == "hidden":
            replicate = norm == "layernorm" or draw(st.booleans())
            if replicate:
                sizes["hidden"] *= draw(st.integers(1, 3))
                requests.append(f"hidden={sizes['hidden']}:replicate")
            else:
                sizes["hidden"] += draw(st.integers(0, 3))
                requests.append(f"hidden={sizes['hidden']}:pad")
        else:
            sizes[kind] += draw(st.integers(0, 2))
            requests.append(f"{kind}={sizes[kind]}")
    fill = draw(st.sampled_from([None, 42.0, -3.5, 1e3]))
    return config, requests, fill, draw(st.integers(0, 2**16))


@settings(derandomize=True, max_examples=10, deadline=None)
@given(growth_cases())
def test_random_compositions_preserve_the_function(case):
    config, requests, fill, seed = case
    new_config, _ = grow_and_check(config, requests, fill=fill, seed=seed)
    assert new_config.num_layers == config.num_layers + sum("add_layer" in r for r in requests)
