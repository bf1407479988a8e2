"""A tiny ViT checkpoint in big_vision's `.npz` layout, built from random arrays (nothing is
downloaded), for the checkpoint loader's and the roots' tests."""

import numpy as np

HIDDEN, HEADS, HEAD_DIM, MLP, LAYERS, PATCH, GRID, CHANNELS, CLASSES = 16, 2, 8, 32, 2, 4, 8, 3, 5


def big_vision_arrays(seed=0, *, pooling="tok", old_layout=False, pre_logits=False):
    """A tiny ViT checkpoint with big_vision's key names and shapes.

    old_layout: the original ViT files' spelling: pre-Linen module numbering and one
    position embedding per token, the class token's first, under posembed_input.
    """
    rng = np.random.default_rng(seed)

    def rand(*shape, scale=0.3):
        return (scale * rng.standard_normal(shape)).astype(np.float32)

    arrays = {
        "embedding/kernel": rand(PATCH, PATCH, CHANNELS, HIDDEN),
        "embedding/bias": rand(HIDDEN),
        "Transformer/encoder_norm/scale": 1 + rand(HIDDEN),
        "Transformer/encoder_norm/bias": rand(HIDDEN),
        "head/kernel": rand(HIDDEN, CLASSES),
        "head/bias": rand(CLASSES),
    }
    tokens = GRID * GRID
    if pooling == "tok":
        arrays["cls"] = rand(1, 1, HIDDEN)
        tokens += int(old_layout)
    posemb_key = "Transformer/posembed_input/pos_embedding" if old_layout else "pos_embedding"
    arrays[posemb_key] = rand(1, tokens, HIDDEN)
    ln0, attn, ln1, mlp = (
        ("LayerNorm_0", "MultiHeadDotProductAttention_1", "LayerNorm_2", "MlpBlock_3")
        if old_layout
        else ("LayerNorm_0", "MultiHeadDotProductAttention_0", "LayerNorm_1", "MlpBlock_0")
    )
    for i in range(LAYERS):
        b = f"Transformer/encoderblock_{i}"
        for ln in (ln0, ln1):
            arrays[f"{b}/{ln}/scale"] = 1 + rand(HIDDEN)
            arrays[f"{b}/{ln}/bias"] = rand(HIDDEN)
        for name in ("query", "key", "value"):
            arrays[f"{b}/{attn}/{name}/kernel"] = rand(HIDDEN, HEADS, HEAD_DIM)
            arrays[f"{b}/{attn}/{name}/bias"] = rand(HEADS, HEAD_DIM)
        arrays[f"{b}/{attn}/out/kernel"] = rand(HEADS, HEAD_DIM, HIDDEN)
        arrays[f"{b}/{attn}/out/bias"] = rand(HIDDEN)
        arrays[f"{b}/{mlp}/Dense_0/kernel"] = rand(HIDDEN, MLP)
        arrays[f"{b}/{mlp}/Dense_0/bias"] = rand(MLP)
        arrays[f"{b}/{mlp}/Dense_1/kernel"] = rand(MLP, HIDDEN)
        arrays[f"{b}/{mlp}/Dense_1/bias"] = rand(HIDDEN)
    if pre_logits:
        arrays["pre_logits/kernel"] = rand(HIDDEN, HIDDEN)
        arrays["pre_logits/bias"] = rand(HIDDEN)
    return arrays
