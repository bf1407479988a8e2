"""The one training loop: frozen leaves never change, best validation kept, actions' order."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from clu import metrics as clu_metrics

from training import loop, partitioning, trainer


class _TwoLayers:
    """A two-matrix regression in the t5x model contract (enough to train and freeze)."""

    optimizer_def = optax.adam(1e-2)

    def get_initial_variables(self, rng, input_shapes, input_types):
        del input_shapes, input_types
        a, b = jax.random.split(rng)
        return {"params": {"a": jax.random.normal(a, (4, 3)), "b": jax.random.normal(b, (3, 2))}}

    def loss_fn(self, params, batch, dropout_rng):
        del dropout_rng
        y = batch["x"] @ params["a"] @ params["b"]
        loss = jnp.mean((y - 1.0) ** 2)
        return loss, {"loss": clu_metrics.Average.from_model_output(loss)}


def _batches(seed=0):
    rng = np.random.default_rng(seed)
    while True:
        yield 1, {"x": rng.normal(size=(8, 4)).astype(np.float32)}


def _trainer(mask=None):
    return trainer.Trainer(
        _TwoLayers(),
        partitioning.Partitioner(),
        {"x": (8, 4)},
        {"x": np.float32},
        jax.random.key(0),
        trainable_mask=mask,
    )


def test_frozen_leaves_are_bit_identical_and_have_no_optimizer_state():
    tr = _trainer({"a": False, "b": True})
    params = jax.device_get(tr.init_state(jax.random.key(1)).params)
    state = tr.state_from_params(params)
    assert [leaf.shape for leaf in jax.tree.leaves(state.opt_state) if leaf.ndim] == [(3, 2)] * 2
    progress = loop.run(loop.Progress.start(tr, state), _batches(), 12)
    out = jax.device_get(progress.state.params)
    np.testing.assert_array_equal(out["a"], params["a"])
    assert not np.array_equal(out["b"], params["b"])


def test_masked_step_equals_unmasked_step_on_the_trainable_leaves():
    """Freezing `a` is the same as training `b` in a model where `a` is a constant."""
    masked = _trainer({"a": False, "b": True})
    full = _trainer()
    params = jax.device_get(full.init_state(jax.random.key(2)).params)
    a = params["a"]
    start = loop.Progress.start(masked, masked.state_from_params(params))
    progress = loop.run(start, _batches(), 5)

    b = jnp.asarray(params["b"])
    tx = optax.adam(1e-2)
    opt = tx.init(b)
    batches = _batches()

    def loss(b, x):
        return jnp.mean((x @ a @ b - 1.0) ** 2)

    for _ in range(5):
        grad = jax.grad(loss)(b, next(batches)[1]["x"])
        updates, opt = tx.update(grad, opt, b)
        b = optax.apply_updates(b, updates)
    np.testing.assert_allclose(jax.device_get(progress.state.params["b"]), b, rtol=1e-5, atol=1e-6)


def test_keep_best_keeps_the_best_validation_and_its_step():
    tr = _trainer()
    state = tr.init_state(jax.random.key(3))
    qualities = iter([0.1, 0.7, 0.7, 0.2])
    seen = []

    def validate(params):
        seen.append(jax.device_get(params["b"]).copy())
        return next(qualities)

    keep = loop.KeepBest(3, validate)
    loop.run(loop.Progress.start(tr, state), _batches(), 12, [keep])
    assert keep.validations == [(3, 0.1), (6, 0.7), (9, 0.7), (12, 0.2)]
    assert keep.best_step == 6 and keep.best_quality == 0.7  # a tie keeps the earlier
    np.testing.assert_array_equal(jax.device_get(keep.best_params["b"]), seen[1])
    assert len(keep.train_losses) == 4


def test_actions_run_in_order_at_their_steps_and_batches_running_out_is_an_error():
    tr = _trainer()
    calls = []
    actions = [
        loop.When(lambda s: s % 2 == 0, lambda p: calls.append(("even", p.step))),
        loop.When(lambda s: s % 3 == 0, lambda p: calls.append(("three", p.step))),
    ]
    loop.run(loop.Progress.start(tr, tr.init_state(jax.random.key(4))), _batches(), 6, actions)
    assert calls == [("even", 2), ("three", 3), ("even", 4), ("even", 6), ("three", 6)]
    with pytest.raises(ValueError, match="ran out at step 2 of 5"):
        loop.run(
            loop.Progress.start(tr, tr.init_state(jax.random.key(4))),
            loop.single_steps([{"x": np.ones((8, 4), np.float32)}] * 2),
            5,
        )
