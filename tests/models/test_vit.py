"""ViT and its components; the image classifier's t5x contract."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from models import base, classifier, vit


def tiny(**kw):
    base = dict(image_shape=(8, 8, 1), patch_size=2, num_classes=5, head_zero_init=False)
    return vit.vit_tiny(**{**base, **kw})


def batch(n=4, seed=0, num_classes=5):
    rng = np.random.default_rng(seed)
    return {
        "image": jnp.asarray(rng.uniform(size=(n, 8, 8, 1)), jnp.float32),
        "label": jnp.asarray(rng.integers(0, num_classes, n), jnp.int32),
    }


def init_model(config, **kw):
    model = classifier.ImageClassifierModel(vit.ViT(config), optax.adam(1e-3), **kw)
    variables = model.get_initial_variables(jax.random.key(0), {"image": (2, 8, 8, 1)})
    return model, variables


@pytest.mark.parametrize(
    "norm,scaling,pooling", [("layernorm", "runtime", "cls"), ("rmsnorm", "folded", "gap")]
)
def test_contract_jit_matches_eager(norm, scaling, pooling):
    model, variables = init_model(tiny(norm=norm, attention_scaling=scaling, pooling=pooling))
    params = nn.unbox(variables["params"])
    b = batch()
    loss, metrics = model.loss_fn(params, b, None)
    jit_loss, jit_metrics = jax.jit(model.loss_fn)(params, b, None)
    assert np.isfinite(loss)
    np.testing.assert_allclose(loss, jit_loss, rtol=1e-5)
    np.testing.assert_allclose(metrics["accuracy"].compute(), jit_metrics["accuracy"].compute())
    preds, aux = model.predict_batch_with_aux(params, b)
    assert preds.shape == (4,) and preds.dtype == jnp.int32
    np.testing.assert_array_equal(preds, jax.jit(model.predict_batch)(params, b))
    np.testing.assert_array_equal(preds, jnp.argmax(aux["logits"], -1))
    scores = model.score_batch(params, b)
    np.testing.assert_allclose(scores, jax.jit(model.score_batch)(params, b), rtol=1e-5, atol=1e-6)
    # Mean cross-entropy is minus the mean label log-probability.
    np.testing.assert_allclose(loss, -jnp.mean(scores), rtol=1e-5)


def test_training_reduces_loss():
    model, variables = init_model(tiny())
    params = nn.unbox(variables["params"])
    opt = optax.adam(1e-2)
    state = opt.init(params)
    b = batch(16)

    @jax.jit
    def step(params, state):
        (loss, _), grads = jax.value_and_grad(model.loss_fn, has_aux=True)(params, b, None)
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state, loss

    first = None
    for _ in range(80):
        params, state, loss = step(params, state)
        first = loss if first is None else first
    assert loss < 0.5 * first


def test_every_param_has_logical_axes():
    _, variables = init_model(tiny())
    specs = nn.get_partition_spec(variables["params"])
    leaves = jax.tree_util.tree_leaves_with_path(nn.unbox(variables["params"]))
    flat_specs = dict(
        jax.tree_util.tree_leaves_with_path(
            specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec)
        )
    )
    for path, leaf in leaves:
        spec = flat_specs[path]
        assert len(spec) == leaf.ndim, (path, spec)
    block = variables["params"]["block_0"]
    assert nn.get_partition_spec(block)["attn"]["query"]["kernel"] == jax.sharding.PartitionSpec(
        "embed", "heads", "kv"
    )
    assert set(variables["params"]) == set(vit.component_slots(tiny()))


def test_dropout_uses_rng_and_is_off_in_eval():
    model, variables = init_model(tiny(dropout_rate=0.5))
    params = nn.unbox(variables["params"])
    b = batch()
    eval1, _ = model.loss_fn(params, b, None)
    eval2, _ = model.loss_fn(params, b, None)
    train1, _ = model.loss_fn(params, b, jax.random.key(1))
    train2, _ = model.loss_fn(params, b, jax.random.key(2))
    assert eval1 == eval2 and train1 != train2


def test_components_compose_to_the_model():
    config = tiny()
    model, variables = init_model(config)
    params = nn.unbox(variables["params"])
    b = batch()

    def run(return_prelogits=False):
        x = b["image"]
        for slot in vit.component_slots(config):
            module = vit.make_component(config, slot)
            x = vit.apply_component(
                module, slot, params[slot], x, return_prelogits=return_prelogits
            )
        return x

    np.testing.assert_array_equal(run(), model.module.apply({"params": params}, b["image"]))
    assert run(return_prelogits=True).shape == (4, config.hidden)


def test_bad_config_and_inputs_raise():
    with pytest.raises(ValueError, match="patch_size"):
        vit.ViTConfig(image_shape=(8, 8, 1), patch_size=3)
    with pytest.raises(ValueError, match="norm"):
        vit.ViTConfig(norm="batchnorm")
    model, variables = init_model(tiny())
    with pytest.raises(ValueError, match="image shape"):
        model.loss_fn(
            nn.unbox(variables["params"]),
            {"image": jnp.zeros((2, 4, 4, 1)), "label": jnp.zeros(2, jnp.int32)},
            None,
        )


def test_wrapper_is_a_t5x_base_model_when_t5x_is_present():
    t5x_models = pytest.importorskip("t5x.models")
    assert base.T5X_AVAILABLE
    assert issubclass(classifier.ImageClassifierModel, t5x_models.BaseModel)
