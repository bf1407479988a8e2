"""Decoder-only LM: causality, the t5x contract, jit == eager."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models import decoder, lm


def make(**kw):
    config = decoder.decoder_tiny(vocab_size=40, max_len=16, **kw)
    model = lm.DecoderOnlyLMModel(decoder.Decoder(config))
    variables = model.get_initial_variables(jax.random.key(0), {"decoder_input_tokens": (2, 12)})
    return model, nn.unbox(variables["params"])


def lm_batch(seed=0):
    rng = np.random.default_rng(seed)
    targets = rng.integers(1, 40, (3, 12)).astype(np.int32)
    targets[2, 8:] = 0
    inputs = np.pad(targets[:, :-1], ((0, 0), (1, 0)))
    return {
        "decoder_input_tokens": jnp.asarray(inputs),
        "decoder_target_tokens": jnp.asarray(targets),
        "decoder_loss_weights": jnp.asarray((targets > 0).astype(np.int32)),
    }


@pytest.mark.parametrize("tie", [False, True])
def test_contract_jit_matches_eager(tie):
    model, params = make(tie_embeddings=tie)
    b = lm_batch()
    loss, metrics = model.loss_fn(params, b, None)
    jit_loss, _ = jax.jit(model.loss_fn)(params, b, None)
    assert np.isfinite(loss)
    np.testing.assert_allclose(loss, jit_loss, rtol=1e-5)
    scores = model.score_batch(params, b)
    np.testing.assert_allclose(scores, jax.jit(model.score_batch)(params, b), rtol=1e-5)
    # The loss is the mean over weighted tokens of minus the log-likelihood.
    np.testing.assert_allclose(
        loss, -jnp.sum(scores) / jnp.sum(b["decoder_loss_weights"]), rtol=1e-5
    )
    tokens, aux = model.predict_batch_with_aux(params, b)
    assert tokens.shape == (3, 12) and aux["scores"].shape == (3,)
    np.testing.assert_array_equal(tokens, jax.jit(model.predict_batch)(params, b))


def test_causal():
    model, params = make()
    b = lm_batch()
    logits = model._logits(params, b)
    changed = dict(b, decoder_input_tokens=b["decoder_input_tokens"].at[:, 7:].set(5))
    logits2 = model._logits(params, changed)
    np.testing.assert_array_equal(logits[:, :7], logits2[:, :7])
    assert not np.allclose(logits[:, 7:], logits2[:, 7:])


def test_greedy_decoding_follows_argmax():
    model, params = make()
    b = lm_batch()
    tokens, _ = model.predict_batch_with_aux(params, b)
    inputs = jnp.pad(tokens[:, :-1], ((0, 0), (1, 0)))
    logits = model._logits(params, {"decoder_input_tokens": inputs})
    np.testing.assert_array_equal(tokens, jnp.argmax(logits, -1))


def test_param_axes_and_too_long_input():
    model, _ = make()
    variables = model.get_initial_variables(jax.random.key(0), {"decoder_input_tokens": (1, 4)})
    specs = nn.get_partition_spec(variables["params"])
    assert specs["embed"]["embedding"] == jax.sharding.PartitionSpec("vocab", "embed")
    assert specs["block_0"]["mlp"]["wi_0"]["kernel"] == jax.sharding.PartitionSpec("embed", "mlp")
    with pytest.raises(ValueError, match="max_len"):
        model.get_initial_variables(jax.random.key(0), {"decoder_input_tokens": (1, 17)})


def test_z_loss_adds_the_weighted_log_partition():
    model, params = make()
    b = lm_batch()
    z_model = lm.DecoderOnlyLMModel(model.module, z_loss=1e-2)
    logits = model._logits(params, b)
    weights = b["decoder_loss_weights"]
    penalty = 1e-2 * jnp.sum(jnp.square(jax.nn.logsumexp(logits, -1)) * weights) / jnp.sum(weights)
    np.testing.assert_allclose(
        z_model.loss_fn(params, b, None)[0], model.loss_fn(params, b, None)[0] + penalty, rtol=1e-5
    )


def test_packed_segments_do_not_see_each_other():
    model, params = make()
    first, second = jnp.arange(1, 6), jnp.arange(10, 17)
    packed = {
        "decoder_input_tokens": jnp.concatenate([first, second])[None],
        "decoder_segment_ids": jnp.array([[1] * 5 + [2] * 7]),
        "decoder_positions": jnp.concatenate([jnp.arange(5), jnp.arange(7)])[None],
    }
    logits = model._logits(params, packed)
    alone = model._logits(params, {"decoder_input_tokens": second[None]})
    np.testing.assert_allclose(logits[:, 5:], alone, rtol=1e-5, atol=1e-5)
