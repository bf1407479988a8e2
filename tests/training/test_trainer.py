"""Trainer invariants in-process: resume exactness, checkpoint metadata and shape errors,
metric merging, partitioning of the optimizer state, the input prefetch thread."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import trainer_testlib as tl
from clu import metrics as clu_metrics

from evogrow import train
from training import checkpoints, data, loop, partitioning, trainer


def _cfg(split, shuffle=False):
    return data.DatasetConfig(tl.TOY_TASK, None, split, 32, shuffle, module=None)


def _train(model_dir, total_steps, hidden=32, period=10, steps_per_execution=None):
    model = tl.ToyClassifier(tl.ToyMLP(tl.ToyConfig(hidden=hidden)))
    return train.train(
        model=model,
        train_dataset_cfg=_cfg("train", shuffle=True),
        train_eval_dataset_cfg=None,
        infer_eval_dataset_cfg=_cfg("test"),
        checkpoint_cfg=checkpoints.CheckpointConfig(checkpoints.SaveCheckpointConfig(period)),
        partitioner=partitioning.Partitioner(logical_axis_rules=tl.TOY_RULES),
        model_dir=str(model_dir),
        total_steps=total_steps,
        eval_steps=1,
        eval_period=0,
        stats_period=5,
        random_seed=3,
        steps_per_execution=steps_per_execution,
    )


@pytest.mark.parametrize("steps_per_execution", [1, 4])
def test_resume_is_bit_identical(tmp_path, monkeypatch, steps_per_execution):
    """With blocks of 4 steps the straight run dispatches blocks over steps the stopped
    one takes one at a time (see `test_dispatch_sizes_block_between_stops`)."""
    blocks = []
    monkeypatch.setattr(
        trainer.Trainer,
        "train_steps",
        lambda self, state, acc, batches, _steps=trainer.Trainer.train_steps: (
            blocks.append(len(batches["label"])) or _steps(self, state, acc, batches)
        ),
    )
    run = functools.partial(_train, steps_per_execution=steps_per_execution)
    _, uninterrupted = run(tmp_path / "straight", 24)
    assert blocks == ([4, 4, 4] if steps_per_execution == 4 else [])
    run(tmp_path / "stopped", 13)  # stops (and checkpoints) mid-period, off the grid
    step, resumed = run(tmp_path / "stopped", 24)
    assert step == 24 and int(resumed.step) == 24
    for a, b in zip(jax.tree.leaves(uninterrupted), jax.tree.leaves(resumed), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_dispatch_sizes_block_between_stops():
    def stops_at(step):  # stats every 5, checkpoints every 10, the end
        return step % 5 == 0 or step % 10 == 0 or step == 24

    assert list(loop.dispatch_sizes(0, 24, 4, stops_at)) == [4] + [1] * 12 + [4, 4]
    assert list(loop.dispatch_sizes(13, 24, 4, stops_at)) == [1, 1, 1, 4, 4]
    assert list(loop.dispatch_sizes(0, 7, 1, stops_at)) == [1] * 7
    assert list(loop.dispatch_sizes(0, 10, 4, lambda s: s == 10)) == [4, 4, 1, 1]
    assert train.default_steps_per_execution(["cpu"] * 8) == train.CPU_STEPS_PER_EXECUTION > 1
    assert train.default_steps_per_execution(["gpu"]) == 1
    with pytest.raises(ValueError, match="steps_per_execution"):
        _train("/nonexistent", 1, steps_per_execution=0)


def test_numpy_steps_groups_the_batches_in_order():
    import tensorflow as tf

    ds = tf.data.Dataset.range(20).map(lambda i: {"x": tf.fill([2], i)})
    sizes = [1, 3, 3, 1, 4, 4]  # groups inside, equal to and across chunks of 3
    got = list(data.numpy_steps(ds, sizes, chunk=3))
    assert [steps for steps, _ in got] == sizes
    assert got[0][1]["x"].shape == (2,) and got[1][1]["x"].shape == (3, 2)
    flat = np.concatenate([b["x"].reshape(-1, 2) for _, b in got])
    np.testing.assert_array_equal(flat[:, 0], np.arange(16))
    assert [n for n, _ in data.numpy_steps(ds.take(5), [4, 4])] == [4]  # the data ran out


def test_train_steps_equal_single_steps():
    """A block of steps in one dispatch gives the state and metrics of one step each."""
    shapes, types = tl.toy_inputs(32)
    p = partitioning.Partitioner(logical_axis_rules=tl.TOY_RULES)
    t = trainer.Trainer(tl.ToyClassifier(), p, shapes, types, jax.random.key(0))
    arrays = tl._toy_arrays("train")
    batches = [{k: v[32 * i : 32 * (i + 1)] for k, v in arrays.items()} for i in range(3)]
    single, acc1 = t.init_state(jax.random.key(1)), t.empty_metrics()
    for batch in batches:
        single, acc1 = t.train_step(single, acc1, p.shard_batch(batch, 32))
    stacked = {k: np.stack([b[k] for b in batches]) for k in batches[0]}
    block, acc3 = t.train_steps(
        t.init_state(jax.random.key(1)), t.empty_metrics(), p.shard_batch(stacked, 32, True)
    )
    assert int(block.step) == 3
    for a, b in zip(jax.tree.leaves(single), jax.tree.leaves(block), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert trainer.compute_metrics(acc1) == trainer.compute_metrics(acc3)


def test_checkpoint_metadata_and_shape_mismatch(tmp_path):
    _train(tmp_path / "run", 2)
    ckpt = checkpoints.Checkpointer(str(tmp_path / "run" / "checkpoints"), read_only=True)
    meta = ckpt.read_metadata()
    assert meta["step"] == 2
    assert meta["architecture"]["config_class"].endswith("ToyConfig")
    assert meta["architecture"]["config"] == {"hidden": 32, "num_classes": 4, "dropout": 0.1}
    assert checkpoints.architecture_config(meta["architecture"]) == tl.ToyConfig()

    wider = tl.ToyClassifier(tl.ToyMLP(tl.ToyConfig(hidden=48)))
    shapes, types = tl.toy_inputs(32)
    p = partitioning.Partitioner(logical_axis_rules=tl.TOY_RULES)
    t = trainer.Trainer(wider, p, shapes, types, jax.random.key(0))
    target = partitioning.with_shardings(t.abstract_state, t.state_shardings)
    with pytest.raises(checkpoints.CheckpointShapeError) as error:
        ckpt.restore({"params": target.params})
    message = str(error.value)
    assert "Dense_0/kernel: checkpoint (64, 32) vs model (64, 48)" in message
    assert "Dense_1/kernel: checkpoint (32, 4) vs model (48, 4)" in message


@pytest.mark.parametrize("with_last", [False, True], ids=["additive", "general"])
def test_merge_metrics_matches_host_merge(with_last):
    """The on-device accumulator merges like clu's own `merge`, also for metrics whose
    identity is not zeros (`LastValue`), and keeps each field's dtype."""
    steps = []
    for i in range(3):
        metrics = {
            "loss": clu_metrics.Average.from_model_output(jnp.array([1.0, 3.0]) * (i + 1)),
            "accuracy": clu_metrics.Accuracy.from_model_output(
                logits=jnp.array([[0.0, 1.0], [1.0, 0.0], [0.0, 1.0]]) * i,
                labels=jnp.array([1, 0, 0]),
            ),
            "norm": clu_metrics.Average(total=jnp.bfloat16(1.5 * i), count=jnp.int32(2)),
        }
        if with_last:
            metrics["last"] = clu_metrics.LastValue.from_model_output(jnp.array([float(i)]))
        steps.append(metrics)
    acc = trainer.MetricsAccumulator.empty(jax.eval_shape(lambda: steps[0]))
    assert int(acc.num_steps) == 0
    merge = jax.jit(trainer.merge_metrics)
    for metrics in steps:
        acc = merge(acc, metrics)
    host = functools.reduce(lambda a, b: {k: a[k].merge(b[k]) for k in a}, steps)
    expected = {name: float(metric.compute()) for name, metric in host.items()}
    assert trainer.compute_metrics(acc) == pytest.approx(expected)
    assert expected["loss"] == pytest.approx(4.0)
    if with_last:
        assert expected["last"] == 2.0
    assert int(acc.num_steps) == 3
    assert acc.metrics["norm"].total.dtype == jnp.bfloat16


def test_optimizer_state_is_partitioned_like_params():
    shapes, types = tl.toy_inputs(32)
    p = partitioning.Partitioner(logical_axis_rules=tl.TOY_RULES)
    t = trainer.Trainer(tl.ToyClassifier(), p, shapes, types, jax.random.key(0))
    adam = t.state_shardings.opt_state[0]
    assert adam.mu["Dense_0"]["kernel"].spec == t.state_shardings.params["Dense_0"]["kernel"].spec
    assert adam.nu["Dense_1"]["kernel"].spec == jax.sharding.PartitionSpec("model", None)
    assert adam.count.spec == jax.sharding.PartitionSpec()
    assert p.get_data_layout(32) == partitioning.DataLayout(32, 0, 1, 32)


def test_partitioned_train_step_matches_plain_update():
    shapes, types = tl.toy_inputs(32)
    p = partitioning.Partitioner(logical_axis_rules=tl.TOY_RULES)
    model = tl.ToyClassifier()
    t = trainer.Trainer(model, p, shapes, types, jax.random.key(0))
    state = t.init_state(jax.random.key(1))
    params0 = jax.device_get(state.params)
    opt0 = jax.device_get(state.opt_state)
    batch = {k: v[:32] for k, v in tl._toy_arrays("train").items()}
    state, acc = t.train_step(state, t.empty_metrics(), p.shard_batch(batch, 32))
    (loss, _), grads = jax.jit(jax.value_and_grad(model.loss_fn, has_aux=True))(
        params0, batch, jax.random.fold_in(jax.random.key(0), 0)
    )
    updates, _ = model.optimizer_def.update(grads, opt0, params0)
    expected = jax.tree.map(lambda p_, u: p_ + u, params0, updates)
    assert tl.params_close(state.params, expected, atol=1e-6)
    assert trainer.compute_metrics(acc)["loss"] == pytest.approx(float(loss), rel=1e-5)


def test_device_prefetcher_keeps_order_and_reraises_in_the_consumer():
    batches = [{"x": np.full(2, i)} for i in range(5)]
    prefetcher = data.DevicePrefetcher(iter(batches), lambda batch: batch["x"])
    got = list(prefetcher)
    prefetcher.close()
    np.testing.assert_array_equal(np.stack(got), np.stack([b["x"] for b in batches]))

    def broken():
        yield {"x": np.zeros(2)}
        raise OSError("disk gone")

    prefetcher = data.DevicePrefetcher(broken(), lambda batch: batch["x"])
    next(prefetcher)
    with pytest.raises(OSError, match="disk gone"):
        next(prefetcher)
    prefetcher.close()
