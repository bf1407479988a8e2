"""Text classifier contract on a generic module, feature converters, the BaseModel surface."""

import clu.metrics as clu_metrics
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import seqio
import tensorflow as tf

from models import base, classifier, feature_converters, layers


class BagOfWords(nn.Module):
    """The smallest text classifier: mean of token embeddings over non-padding, a dense head."""

    vocab: int = 20
    hidden: int = 8
    classes: int = 3

    @nn.compact
    def __call__(self, inputs_BxL, deterministic=True):
        table = layers.logical_param(
            self, "embedding", nn.initializers.normal(1.0), (self.vocab, self.hidden),
            ("vocab", "embed"), jnp.float32,
        )  # fmt: skip
        valid_BxL = (inputs_BxL > 0).astype(jnp.float32)
        summed_BxD = jnp.einsum("bl,bld->bd", valid_BxL, jnp.take(table, inputs_BxL, axis=0))
        pooled_BxD = summed_BxD / jnp.maximum(valid_BxL.sum(-1, keepdims=True), 1.0)
        pooled_BxD = nn.Dropout(0.5)(pooled_BxD, deterministic=deterministic)
        return layers.Projection(
            "bd,dk->bk", (self.hidden, self.classes), ("embed", "classes"), ("classes",),
            name="head",
        )(pooled_BxD)  # fmt: skip


def text_batch():
    inputs = np.array([[2, 5, 7, 0, 0], [3, 3, 4, 9, 1], [6, 0, 0, 0, 0]], np.int32)
    return {"inputs": jnp.asarray(inputs), "label": jnp.array([0, 2, 1], jnp.int32)}


def test_text_classifier_contract():
    model = classifier.TextClassifierModel(BagOfWords())
    assert model.FEATURE_CONVERTER_CLS is feature_converters.TextClassificationFeatureConverter
    variables = model.get_initial_variables(
        jax.random.key(0), {"inputs": (2, 5), "label": (2,)}, {"inputs": jnp.int32}
    )
    assert nn.get_partition_spec(variables["params"])["head"]["kernel"] == (
        jax.sharding.PartitionSpec("embed", "classes")
    )
    params = nn.unbox(variables["params"])
    b = text_batch()
    loss, metrics = model.loss_fn(params, b, None)
    jit_loss, jit_metrics = jax.jit(model.loss_fn)(params, b, None)
    np.testing.assert_allclose(loss, jit_loss, rtol=1e-5)
    np.testing.assert_allclose(metrics["loss"].compute(), loss, rtol=1e-5)
    assert 0.0 <= float(jit_metrics["accuracy"].compute()) <= 1.0
    scores = model.score_batch(params, b)
    np.testing.assert_allclose(loss, -jnp.mean(scores), rtol=1e-5)
    np.testing.assert_allclose(scores, jax.jit(model.score_batch)(params, b), rtol=1e-5)
    preds, aux = jax.jit(model.predict_batch_with_aux)(params, b)
    np.testing.assert_array_equal(preds, model.predict_batch(params, b))
    np.testing.assert_allclose(aux["scores"], jnp.max(jax.nn.log_softmax(aux["logits"]), -1))
    # eval_fn is the deterministic loss; a dropout rng changes the training loss.
    np.testing.assert_allclose(model.eval_fn(params, b)[0], loss, rtol=1e-6)
    assert model.loss_fn(params, b, jax.random.key(3))[0] != loss


class GivenLogits(nn.Module):
    """Returns its input as the logits (no parameters)."""

    @nn.compact
    def __call__(self, inputs, deterministic=True):
        return inputs


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_classifier_metrics_are_clus_average_and_accuracy(label_smoothing):
    """The loss and accuracy metrics equal clu's from_model_output, ties broken as argmax."""
    logits = jnp.array([[1.0, 3.0, 3.0], [2.0, 0.5, -1.0], [0.0, 0.0, 0.0], [0.2, 0.1, 0.9]])
    labels = jnp.array([2, 0, 0, 1], jnp.int32)  # a tie lost, a win, a tie won, a miss
    model = classifier.TextClassifierModel(GivenLogits(), label_smoothing=label_smoothing)
    loss, metrics = jax.jit(model.loss_fn)({}, {"inputs": logits, "label": labels}, None)
    targets = optax.smooth_labels(jax.nn.one_hot(labels, 3), label_smoothing)
    want = {
        "loss": clu_metrics.Average.from_model_output(optax.softmax_cross_entropy(logits, targets)),
        "accuracy": clu_metrics.Accuracy.from_model_output(logits=logits, labels=labels),
    }
    assert {k: type(v) for k, v in metrics.items()} == {k: type(v) for k, v in want.items()}
    for name, metric in want.items():
        np.testing.assert_allclose(metrics[name].total, metric.total, rtol=1e-6)
        assert metrics[name].count.dtype == metric.count.dtype
        assert int(metrics[name].count) == int(metric.count) == 4
    assert float(metrics["accuracy"].compute()) == 0.5
    np.testing.assert_allclose(metrics["loss"].compute(), loss, rtol=1e-6)


def test_text_classifier_on_the_encoder():
    encoder = pytest.importorskip("models.encoder")
    config = encoder.tiny(num_classes=3)
    model = classifier.TextClassifierModel(encoder.Encoder(config))
    variables = model.get_initial_variables(jax.random.key(0), {"inputs": (2, 5)})
    params = nn.unbox(variables["params"])
    b = text_batch()
    loss, _ = model.loss_fn(params, b, None)
    np.testing.assert_allclose(loss, jax.jit(model.loss_fn)(params, b, None)[0], rtol=1e-5)
    assert np.isfinite(loss)


def converted(converter, features, lengths):
    ds = tf.data.Dataset.from_tensors(features)
    return list(converter(ds, lengths).as_numpy_iterator())[0]


def test_image_converter_passes_features_through():
    fc = feature_converters.ImageClassificationFeatureConverter(pack=False)
    image = np.random.default_rng(0).uniform(size=(4, 4, 1)).astype(np.float32)
    features = {"image": image, "label": np.int32(2), "task_id": np.int64(1), "extra": "x"}
    out = converted(fc, features, None)
    assert set(out) == {"image", "label", "task_id"}
    np.testing.assert_array_equal(out["image"], image)
    assert out["task_id"].dtype == np.int32 and out["task_id"] == 1
    assert fc.get_model_feature_lengths({}) == {}


def test_text_converter_pads_and_trims():
    fc = feature_converters.TextClassificationFeatureConverter(pack=False)
    short = converted(
        fc, {"inputs": np.array([5, 6], np.int32), "label": np.int32(1)}, {"inputs": 4}
    )
    np.testing.assert_array_equal(short["inputs"], [5, 6, 0, 0])
    long = converted(
        fc, {"inputs": np.arange(1, 7, dtype=np.int32), "label": np.int32(0)}, {"inputs": 4}
    )
    np.testing.assert_array_equal(long["inputs"], [1, 2, 3, 4])
    assert set(long) == {"inputs", "label"}
    assert fc.get_model_feature_lengths({"inputs": 4}) == {"inputs": 4}


def test_converters_reject_bad_input():
    with pytest.raises(ValueError, match="packing"):
        feature_converters.ImageClassificationFeatureConverter(pack=True)
    fc = feature_converters.TextClassificationFeatureConverter(pack=False)
    ds = tf.data.Dataset.from_tensors({"inputs": np.array([1], np.int32), "label": np.int32(0)})
    with pytest.raises(ValueError, match="length"):
        fc(ds, {})
    bad = tf.data.Dataset.from_tensors({"inputs": np.array([1], np.int64), "label": np.int32(0)})
    with pytest.raises(ValueError, match="dtype"):
        fc(bad, {"inputs": 4})
    assert isinstance(fc, seqio.FeatureConverter)


def test_base_model_surface():
    for name in ("loss_fn", "eval_fn", "predict_batch", "predict_batch_with_aux"):
        assert callable(getattr(base.BaseModel, name))
    for name in ("score_batch", "get_initial_variables"):
        assert name in base.BaseModel.__abstractmethods__
    with pytest.raises(TypeError):
        base.BaseModel(optimizer_def=None)  # abstract
    model = classifier.ImageClassifierModel(BagOfWords(), optimizer_def="opt")
    assert isinstance(model, base.BaseModel) and model.optimizer_def == "opt"
