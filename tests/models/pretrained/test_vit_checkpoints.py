"""big_vision / AugReg ViT checkpoints loaded into models.vit; position-embedding resampling.

The checkpoints are built here in big_vision's `.npz` layout from random arrays (nothing
is downloaded) and the loaded model is compared with a direct jnp implementation of
big_vision's ViT forward pass.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from vit_checkpoint_testlib import (
    CHANNELS,
    CLASSES,
    GRID,
    HEAD_DIM,
    HEADS,
    HIDDEN,
    LAYERS,
    MLP,
    PATCH,
    big_vision_arrays,
)

from models import vit
from models.pretrained import vit_checkpoints


def layer_norm(x, prefix, a):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / jnp.sqrt(var + 1e-6) * a[f"{prefix}/scale"] + a[f"{prefix}/bias"]


def reference_logits(a, images, *, pooling="tok", old_layout=False):
    """big_vision's ViT forward pass (no dropout), written directly in jnp."""
    hp = jax.lax.Precision.HIGHEST
    x = jax.lax.conv_general_dilated(
        images,
        a["embedding/kernel"],
        (PATCH, PATCH),
        "VALID",
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        precision=hp,
    )
    x = x + a["embedding/bias"]
    n = x.shape[0]
    x = x.reshape(n, -1, HIDDEN)
    if old_layout:  # the original ViT: class token first, then one embedding per token
        if pooling == "tok":
            x = jnp.concatenate([jnp.tile(a["cls"], (n, 1, 1)), x], axis=1)
        x = x + a["Transformer/posembed_input/pos_embedding"]
    else:  # big_vision: embeddings on the patches, then the class token
        x = x + a["pos_embedding"]
        if pooling == "tok":
            x = jnp.concatenate([jnp.tile(a["cls"], (n, 1, 1)), x], axis=1)
    names = (
        ("LayerNorm_0", "MultiHeadDotProductAttention_1", "LayerNorm_2", "MlpBlock_3")
        if old_layout
        else ("LayerNorm_0", "MultiHeadDotProductAttention_0", "LayerNorm_1", "MlpBlock_0")
    )
    for i in range(LAYERS):
        b = f"Transformer/encoderblock_{i}"
        ln0, attn, ln1, mlp = (f"{b}/{m}" for m in names)
        y = layer_norm(x, ln0, a)
        q, k, v = (
            jnp.einsum("nld,dhk->nlhk", y, a[f"{attn}/{w}/kernel"], precision=hp)
            + a[f"{attn}/{w}/bias"]
            for w in ("query", "key", "value")
        )
        w = jax.nn.softmax(
            jnp.einsum("nqhk,nthk->nhqt", q / np.sqrt(HEAD_DIM), k, precision=hp), axis=-1
        )
        y = jnp.einsum("nhqt,nthk->nqhk", w, v, precision=hp)
        x = x + jnp.einsum("nqhk,hkd->nqd", y, a[f"{attn}/out/kernel"], precision=hp)
        x = x + a[f"{attn}/out/bias"]
        y = layer_norm(x, ln1, a)
        y = jnp.dot(y, a[f"{mlp}/Dense_0/kernel"], precision=hp) + a[f"{mlp}/Dense_0/bias"]
        y = jax.nn.gelu(y)  # flax.linen.gelu: the tanh approximation
        x = x + jnp.dot(y, a[f"{mlp}/Dense_1/kernel"], precision=hp) + a[f"{mlp}/Dense_1/bias"]
    x = layer_norm(x, "Transformer/encoder_norm", a)
    pooled = x[:, 0] if pooling == "tok" else x.mean(1)
    return jnp.dot(pooled, a["head/kernel"], precision=hp) + a["head/bias"]


def images(n=3, side=GRID * PATCH, seed=1):
    return jnp.asarray(
        np.random.default_rng(seed).uniform(-1, 1, (n, side, side, CHANNELS)), jnp.float32
    )


@pytest.mark.parametrize(
    "pooling,old_layout", [("tok", False), ("gap", False), ("tok", True), ("gap", True)]
)
def test_loaded_vit_matches_big_vision_forward(pooling, old_layout, tmp_path):
    arrays = big_vision_arrays(pooling=pooling, old_layout=old_layout)
    path = tmp_path / "vit.npz"
    np.savez(path, **arrays)
    config, params = vit_checkpoints.load_npz(str(path), keep_head=True)
    assert (config.hidden, config.num_heads, config.qk_dim, config.mlp_dim) == (
        HIDDEN,
        HEADS,
        HEAD_DIM,
        MLP,
    )
    assert config.num_layers == LAYERS and config.patch_size == PATCH
    assert config.image_shape == (GRID * PATCH, GRID * PATCH, CHANNELS)
    assert config.num_classes == CLASSES and config.norm_eps == 1e-6
    assert config.pooling == ("cls" if pooling == "tok" else "gap")
    # The tree is exactly the one our ViT declares (names and shapes).
    x = images()
    declared = nn.unbox(vit.ViT(config).init(jax.random.key(0), x[:1])["params"])
    assert jax.tree.structure(declared) == jax.tree.structure(params)
    assert jax.tree.map(jnp.shape, declared) == jax.tree.map(jnp.shape, params)
    with jax.default_matmul_precision("highest"):
        ours = vit.ViT(config).apply({"params": params}, x)
    want = reference_logits(
        {k: jnp.asarray(v) for k, v in arrays.items()}, x, pooling=pooling, old_layout=old_layout
    )
    assert ours.shape == (3, CLASSES)
    np.testing.assert_allclose(ours, want, rtol=1e-5, atol=1e-6)


def test_fresh_head_is_zero_and_the_body_unchanged():
    arrays = big_vision_arrays(pre_logits=True)
    kept_config, kept = vit_checkpoints.from_big_vision(big_vision_arrays(), keep_head=True)
    config, params = vit_checkpoints.from_big_vision(arrays, num_classes=7)
    assert config.num_classes == 7 and params["head"]["dense"]["kernel"].shape == (HIDDEN, 7)
    assert not np.any(params["head"]["dense"]["kernel"]) and not np.any(
        params["head"]["dense"]["bias"]
    )
    for slot in set(kept) - {"head"}:
        jax.tree.map(np.testing.assert_array_equal, kept[slot], params[slot])
    x = images(2)
    prelogits = vit.ViT(config).apply({"params": params}, x, return_prelogits=True)
    want = vit.ViT(kept_config).apply({"params": kept}, x, return_prelogits=True)
    np.testing.assert_array_equal(prelogits, want)
    np.testing.assert_array_equal(vit.ViT(config).apply({"params": params}, x), 0)


def test_position_embeddings_resampled_to_the_task_grid():
    arrays = big_vision_arrays()
    config, params = vit_checkpoints.from_big_vision(
        arrays, image_shape=(48, 40, CHANNELS), num_classes=3
    )
    assert config.image_shape == (48, 40, CHANNELS) and config.num_patches == 12 * 10
    table = np.asarray(params["pos"]["embedding"])
    assert table.shape == (1 + 12 * 10, HIDDEN)
    np.testing.assert_array_equal(table[0], 0)  # the class token's row (big_vision has none)
    want = vit_checkpoints.resample_posemb(arrays["pos_embedding"], (12, 10))
    np.testing.assert_array_equal(table[1:], np.asarray(want)[0])
    logits = vit.ViT(config).apply({"params": params}, images(2, side=48)[:, :, :40])
    assert logits.shape == (2, 3) and np.all(np.isfinite(logits))


def test_resample_posemb_identity_on_the_same_grid():
    posemb = np.random.default_rng(0).standard_normal((1, 1 + 36, 4)).astype(np.float32)
    same = vit_checkpoints.resample_posemb(posemb, 6, num_prefix_tokens=1)
    np.testing.assert_array_equal(same, posemb)


@pytest.mark.parametrize("new_grid", [(9, 9), (3, 3), (7, 5)])
def test_resample_posemb_keeps_a_linear_ramp_linear(new_grid):
    side, width = 5, 3
    rows, cols = np.meshgrid(np.arange(side), np.arange(side), indexing="ij")
    slopes = np.array([[1.0, -2.0, 0.5], [3.0, 0.25, -1.0]])
    grid = rows[..., None] * slopes[0] + cols[..., None] * slopes[1] + 7.0
    cls_row = np.full((1, width), 42.0)
    posemb = np.concatenate([cls_row, grid.reshape(-1, width)])[None].astype(np.float32)
    out = np.asarray(vit_checkpoints.resample_posemb(posemb, new_grid, num_prefix_tokens=1))
    r, c = new_grid
    assert out.shape == (1, 1 + r * c, width) and out.dtype == np.float32
    np.testing.assert_array_equal(out[0, 0], cls_row[0])
    # Corners aligned: new index i sits at old coordinate i * (side - 1) / (new - 1).
    new_rows, new_cols = np.meshgrid(
        np.arange(r) * (side - 1) / (r - 1), np.arange(c) * (side - 1) / (c - 1), indexing="ij"
    )
    want = new_rows[..., None] * slopes[0] + new_cols[..., None] * slopes[1] + 7.0
    np.testing.assert_allclose(out[0, 1:], want.reshape(-1, width), rtol=1e-5, atol=1e-5)


def test_resample_posemb_rejects_a_non_square_grid():
    with pytest.raises(vit_checkpoints.CheckpointError, match="not a square grid"):
        vit_checkpoints.resample_posemb(np.zeros((10, 4)), 4)


def test_missing_key_and_wrong_shape_are_one_clear_error(tmp_path):
    arrays = big_vision_arrays()
    del arrays["Transformer/encoderblock_1/LayerNorm_1/bias"]
    arrays["Transformer/encoderblock_0/MlpBlock_0/Dense_1/kernel"] = np.zeros((MLP, 3))
    path = tmp_path / "broken.npz"
    np.savez(path, **arrays)
    with pytest.raises(vit_checkpoints.CheckpointError) as err:
        vit_checkpoints.load_npz(str(path), num_classes=3)
    message = str(err.value)
    assert "\n" not in message and str(path) in message
    assert "missing Transformer/encoderblock_1/LayerNorm_1/bias [16]" in message
    assert "Transformer/encoderblock_0/MlpBlock_0/Dense_1/kernel has shape [32, 3]" in message


@pytest.mark.parametrize(
    "change,match",
    [
        (lambda a: a.pop("pos_embedding"), "no position embeddings"),
        (lambda a: a.pop("Transformer/encoderblock_0/MlpBlock_0/Dense_1/bias"), "missing"),
        (lambda a: a.update(probe=np.zeros((1, 1, HIDDEN))), "MAP head"),
    ],
)
def test_bad_checkpoints_raise_checkpoint_error(change, match):
    arrays = big_vision_arrays()
    change(arrays)
    with pytest.raises(vit_checkpoints.CheckpointError, match=match):
        vit_checkpoints.from_big_vision(arrays, num_classes=3)


def test_head_options_are_checked(tmp_path):
    with pytest.raises(vit_checkpoints.CheckpointError, match="pre_logits"):
        vit_checkpoints.from_big_vision(big_vision_arrays(pre_logits=True), keep_head=True)
    with pytest.raises(vit_checkpoints.CheckpointError, match="num_classes"):
        vit_checkpoints.from_big_vision(big_vision_arrays())
    with pytest.raises(vit_checkpoints.CheckpointError, match="cannot read"):
        vit_checkpoints.load_npz(str(tmp_path / "absent.npz"), num_classes=3)
