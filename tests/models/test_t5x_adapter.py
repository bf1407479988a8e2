"""models.t5x_adapter: boxed evogrow variables -> t5x's params + params_axes (no t5x needed)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from flax.linen import partitioning as flax_partitioning

from models.t5x_adapter import T5XModel, t5x_variables


def _named(init, names):
    return nn.with_logical_partitioning(init, names)


class TwoLayer(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.Dense(
            6,
            kernel_init=_named(nn.initializers.lecun_normal(), ("embed", "mlp")),
            bias_init=_named(nn.initializers.normal(), ("mlp",)),
            name="wi",
        )(x)
        temperature = self.param("temperature", nn.initializers.ones, ())
        head = nn.Dense(
            3,
            kernel_init=_named(nn.initializers.lecun_normal(), ("mlp", "classes")),
            use_bias=False,
            name="head",
        )
        return head(x) * temperature


class Unnamed(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(3)(x)


class Inner:
    """A minimal evogrow-style model without predict_batch_with_aux."""

    FEATURE_CONVERTER_CLS = object

    def __init__(self, module):
        self.module = module

    def get_initial_variables(self, rng, input_shapes, input_types=None):
        return self.module.init(rng, jnp.zeros(input_shapes["x"], jnp.float32))

    def loss_fn(self, params, batch, dropout_rng):
        logits = self.module.apply({"params": params}, batch["x"])
        return jnp.mean(logits**2), {}

    def predict_batch(self, params, batch, rng=None):
        return jnp.argmax(self.module.apply({"params": params}, batch["x"]), -1)

    def score_batch(self, params, batch, return_intermediates=False):
        return jnp.max(self.module.apply({"params": params}, batch["x"]), -1)


def test_params_unchanged_and_axes_match_the_boxes():
    boxed = TwoLayer().init(jax.random.key(0), jnp.ones((2, 4)))
    converted = t5x_variables(boxed)
    assert set(converted) == {"params", "params_axes"}
    unboxed = nn.unbox(boxed["params"])
    same = jax.tree.map(np.array_equal, converted["params"], unboxed)
    assert all(jax.tree.leaves(same))
    axes = flax_partitioning.get_axis_names(converted["params_axes"])
    flat = {"/".join(k): tuple(v) for k, v in traverse_util.flatten_dict(axes).items()}
    assert flat == {
        "wi/kernel": ("embed", "mlp"),
        "wi/bias": ("mlp",),
        "head/kernel": ("mlp", "classes"),
        "temperature": (),
    }
    raw = traverse_util.flatten_dict(converted["params_axes"])
    assert all(k[-1].endswith("_axes") for k in raw)


def test_conversion_works_under_eval_shape():
    shapes = jax.eval_shape(
        lambda rng: t5x_variables(TwoLayer().init(rng, jnp.ones((2, 4)))), jax.random.key(0)
    )
    assert shapes["params"]["wi"]["kernel"].shape == (4, 6)


def test_rejects_unnamed_params_and_other_collections():
    with pytest.raises(ValueError, match="Dense_0/(kernel|bias)"):
        t5x_variables(Unnamed().init(jax.random.key(0), jnp.ones((2, 4))))
    boxed = dict(TwoLayer().init(jax.random.key(0), jnp.ones((2, 4))))
    with pytest.raises(ValueError, match="batch_stats"):
        t5x_variables({**boxed, "batch_stats": {}})


def test_wrapper_forwards_and_defaults_aux():
    inner = Inner(TwoLayer())
    model = T5XModel(inner, optimizer_def="t5x optimizer")
    assert model.FEATURE_CONVERTER_CLS is object and model.optimizer_def == "t5x optimizer"
    variables = model.get_initial_variables(jax.random.key(1), {"x": (2, 4), "label": (2,)})
    params, batch = variables["params"], {"x": jnp.arange(8.0).reshape(2, 4)}
    assert model.loss_fn(params, batch, None)[0] == inner.loss_fn(params, batch, None)[0]
    assert model.eval_fn(params, batch)[0] == inner.loss_fn(params, batch, None)[0]
    predictions, aux = model.predict_batch_with_aux(params, batch, None)
    np.testing.assert_array_equal(predictions, inner.predict_batch(params, batch))
    assert aux == {}
    np.testing.assert_array_equal(
        model.score_batch(params, batch), inner.score_batch(params, batch)
    )
