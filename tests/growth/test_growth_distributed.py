"""A growth event in a 2-process run: each process grows its own shards, nothing is gathered.

Two processes (`jax.distributed`, gloo collectives on CPU) with two CPU devices each hold
a decoder LM's train state on a 1 x 4 (data x model) mesh, so the model-sharded
parameters and Adam moments are split over both processes. `grow_train_state` (the
trainer's growth event) runs with every way of fetching a whole array to the host
disabled; then each process checks that the grown arrays have the new trainer's
shardings and are not fully addressable (no process holds them whole), that its shards
equal the same growth done on one local device, and that the grown model's loss on a
batch equals the loss before growth.
"""

import sys

import pytest
from multiprocess_testlib import run_processes

pytestmark = pytest.mark.multiprocess  # two jax.distributed processes

PROCESSES = 2
LOCAL_DEVICES = 2
REQUESTS = ["mlp_dim=48", "num_heads=8", "hidden=24:pad", "add_layer@1"]
TOLERANCE = 1e-5


def test_two_processes_grow_their_own_shards():
    env = {
        "XLA_FLAGS": f"--xla_force_host_platform_device_count={LOCAL_DEVICES}",
        "PJRT_NPROC": "16",
        "JAX_PLATFORMS": "cpu",
        "TF_CPP_MIN_LOG_LEVEL": "2",
    }
    run_processes(__file__, PROCESSES, env=env)


# ------------------------------------------------------------ the subprocesses' body
def _child(port: int, index: int) -> None:
    from training import distributed

    distributed.initialize(f"127.0.0.1:{port}", PROCESSES, index)

    import jax
    import numpy as np
    import optax
    from jax.experimental import multihost_utils

    from models import decoder
    from models.lm import DecoderOnlyLMModel
    from training import growth_schedule, partitioning, state_growth
    from training import trainer as trainer_lib

    assert jax.process_count() == PROCESSES
    assert jax.device_count() == PROCESSES * LOCAL_DEVICES
    # Heads, MLP and vocabulary are sharded on 'model' by the standard rules; sizes
    # divisible by 4 before and after growth.
    config = decoder.DecoderConfig(
        vocab_size=64, max_len=16, hidden=16, mlp_dim=32, num_heads=4, qk_dim=8, v_dim=8
    )
    model = DecoderOnlyLMModel(decoder.Decoder(config), optax.adam(1e-2))
    batch_size, length = 4, 12
    shapes = {
        k: (batch_size, length)
        for k in ("decoder_input_tokens", "decoder_target_tokens", "decoder_loss_weights")
    }
    types = {
        "decoder_input_tokens": np.int32,
        "decoder_target_tokens": np.int32,
        "decoder_loss_weights": np.float32,
    }
    tokens = np.random.default_rng(0).integers(1, 64, (batch_size, length)).astype(np.int32)
    host_batch = {
        "decoder_input_tokens": tokens,
        "decoder_target_tokens": np.roll(tokens, -1, axis=1),
        "decoder_loss_weights": np.ones((batch_size, length), np.float32),
    }
    rng = growth_schedule.growth_rng(5, 3)

    def started(partitioner):
        """A trainer and a state with non-zero moments (elementwise: the same bits on
        any mesh)."""
        trainer = trainer_lib.Trainer(model, partitioner, shapes, types, jax.random.key(0))
        warm = jax.jit(
            lambda s: trainer_lib.TrainState(
                step=s.step + 3,
                params=s.params,
                opt_state=jax.tree.map(lambda x: x + 0.5 if x.ndim else x + 3, s.opt_state),
            ),
            out_shardings=trainer.state_shardings,
        )
        return trainer, warm(trainer.init_state(jax.random.key(1)))

    partitioner = partitioning.Partitioner(num_partitions=PROCESSES * LOCAL_DEVICES)
    assert dict(partitioner.mesh.shape) == {"data": 1, "model": 4}
    trainer, state = started(partitioner)
    batch = partitioner.shard_batch(host_batch, batch_size)
    before = trainer.evaluate(state.params, iter([batch]))["loss"]

    def refuse(*args, **kwargs):
        raise AssertionError("growth fetched a whole array to the host")

    saved = (jax.device_get, multihost_utils.process_allgather)
    jax.device_get = multihost_utils.process_allgather = refuse
    try:
        result = state_growth.grow_train_state(trainer, state, REQUESTS, rng)
    finally:
        jax.device_get, multihost_utils.process_allgather = saved

    grown = (result.state.params, result.state.opt_state)
    expected = (result.trainer.state_shardings.params, result.trainer.state_shardings.opt_state)
    split = 0
    for leaf, sharding in zip(jax.tree.leaves(grown), jax.tree.leaves(expected), strict=True):
        assert leaf.sharding == sharding, (leaf.sharding, sharding)
        if "model" in tuple(sharding.spec):
            split += 1
            assert not leaf.is_fully_addressable  # the other process holds the rest
            assert len(leaf.addressable_shards) == LOCAL_DEVICES
            for shard in leaf.addressable_shards:
                assert shard.data.shape == sharding.shard_shape(leaf.shape)
    assert split > 0

    # The same growth of the same state on one local device, shard by shard.
    local = partitioning.Partitioner(devices=jax.local_devices()[:1])
    local_trainer, local_state = started(local)
    reference = state_growth.grow_train_state(local_trainer, local_state, REQUESTS, rng)
    wanted = (reference.state.params, reference.state.opt_state)
    for leaf, whole in zip(jax.tree.leaves(grown), jax.tree.leaves(wanted), strict=True):
        whole = np.asarray(whole)
        for shard in leaf.addressable_shards:
            np.testing.assert_array_equal(np.asarray(shard.data), whole[shard.index])

    after = result.trainer.evaluate(result.state.params, iter([batch]))["loss"]
    assert abs(after - before) <= TOLERANCE * abs(before), (before, after)
    print(f"ok process {index}: {split} leaves split over processes", flush=True)


if __name__ == "__main__":
    _child(int(sys.argv[1]), int(sys.argv[2]))
