"""Growth of a partitioned model and Adam state on 8 simulated CPU devices.

The device count is fixed when JAX starts, so the body runs in a subprocess (this file
run as a script) with XLA_FLAGS=--xla_force_host_platform_device_count=8. There, for a
4 x 2 and a 2 x 4 (data x model) mesh: parameters and Adam state are placed with the
partitioner's shardings, the expansion is planned from shapes, the shardings of the grown
state are derived from the new config's boxed abstract variables by the partitioner, and
one compiled program grows the sharded arrays straight into them: no gather (every
output has exactly the derived sharding, and the program's temporaries per device stay
below what growth adds per device: old + new state + the new entries' draws at most,
where a gather would hold whole arrays), the same bits as growing on one device
(threefry draws do not depend on the sharding), one optimizer step runs, and the jitted
forward under the mesh matches the logits before growth: width growth within 1e-5
(relative), depth growth bit for bit.
"""

import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.multiprocess  # 8 simulated devices in a subprocess

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
DEVICES = 8
MESHES = ((4, 2), (2, 4))  # (data, model)
TOLERANCE = 1e-5
WIDTH = ["mlp_dim=48", "num_heads=8", "qk_dim=12", "v_dim=12", "hidden=24:pad"]
DEPTH = ["add_layer@1"]


def test_growth_on_a_sharded_mesh():
    env = dict(os.environ)
    env.update(
        XLA_FLAGS=f"--xla_force_host_platform_device_count={DEVICES}",
        PJRT_NPROC="16",
        JAX_PLATFORMS="cpu",
        TF_CPP_MIN_LOG_LEVEL="2",
        PYTHONPATH=REPO,
    )
    out = subprocess.run(
        [sys.executable, os.path.abspath(__file__)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert out.returncode == 0, (out.stdout + out.stderr)[-5000:]
    for data, model in MESHES:
        for name in ("width", "depth"):
            assert f"ok {data}x{model} {name}" in out.stdout, out.stdout


# ------------------------------------------------------------ the subprocess's body
def _child() -> None:
    import math

    import flax.linen as nn
    import jax
    import numpy as np
    import optax
    from jax.sharding import PartitionSpec as P

    import growth
    from models import decoder
    from training import partitioning

    assert jax.device_count() == DEVICES, jax.devices()
    # Sizes divisible by a 'model' axis of 2 and 4, before and after growth: heads,
    # MLP and vocabulary are sharded on 'model' by the standard rules.
    config = decoder.DecoderConfig(
        vocab_size=64, max_len=16, hidden=16, mlp_dim=32, num_heads=4, qk_dim=8, v_dim=8
    )
    tokens = np.random.default_rng(0).integers(1, 64, (8, 12)).astype(np.int32)
    tx = optax.adam(1e-2)

    def abstract(config):
        boxed = jax.eval_shape(decoder.Decoder(config).init, jax.random.key(0), tokens)
        return boxed["params"]

    def shardings(partitioner, boxed_params):
        specs = partitioner.param_specs(boxed_params)
        params = nn.unbox(boxed_params)
        state_specs = partitioner.state_specs(jax.eval_shape(tx.init, params), specs, params)
        return partitioner.shardings(specs), partitioner.shardings(state_specs)

    def per_device_bytes(tree, tree_shardings):
        leaves = zip(jax.tree.leaves(tree), jax.tree.leaves(tree_shardings), strict=True)
        return sum(
            math.prod(sharding.shard_shape(leaf.shape)) * leaf.dtype.itemsize
            for leaf, sharding in leaves
        )

    def check_placed(tree, expected):
        for leaf, sharding in zip(jax.tree.leaves(tree), jax.tree.leaves(expected), strict=True):
            assert leaf.sharding == sharding, (leaf.sharding, sharding)
            shard_shape = sharding.shard_shape(leaf.shape)
            for shard in leaf.addressable_shards:
                assert shard.data.shape == shard_shape
                np.testing.assert_array_equal(shard.data, np.asarray(leaf)[shard.index])

    def forward(partitioner, config, params, param_shardings):
        model = decoder.Decoder(config)
        fn = partitioner.partition(
            lambda p, x: model.apply({"params": p}, x),
            in_shardings=(param_shardings, partitioner.batch_sharding),
            out_shardings=partitioner.replicated,
        )
        with jax.default_matmul_precision("highest"):
            return np.asarray(fn(params, partitioner.shard_batch({"x": tokens}, 8)["x"]))

    rng = np.random.default_rng(1)

    def draw(path, a):
        noise = rng.normal(size=a.shape)
        if len(a.shape) == 1:  # norm gains
            return (1.0 + 0.3 * noise).astype(np.float32)
        if "query" in jax.tree_util.keystr(path):  # the folded 1/sqrt(qk_dim)
            noise /= np.sqrt(config.qk_dim)
        return (noise / np.sqrt(a.shape[0])).astype(np.float32)

    host_params = jax.tree_util.tree_map_with_path(draw, nn.unbox(abstract(config)))
    for data, model in MESHES:
        partitioner = partitioning.Partitioner(num_partitions=model)
        assert dict(partitioner.mesh.shape) == {"data": data, "model": model}
        param_sh, state_sh = shardings(partitioner, abstract(config))
        # Wide axes really are split over 'model'.
        assert param_sh["block_0"]["mlp"]["wi_0"]["kernel"].spec == P(None, "model")
        assert param_sh["block_0"]["attn"]["out"]["kernel"].spec == P("model", None, None)
        params = jax.device_put(host_params, param_sh)
        state = jax.jit(tx.init, out_shardings=state_sh)(params)
        grads = jax.tree.map(lambda p: 0.1 * p + 0.01, params)
        update = jax.jit(tx.update, out_shardings=(param_sh, state_sh))
        _, state = update(grads, state, params)  # non-zero moments
        check_placed((params, state), (param_sh, state_sh))
        before = forward(partitioner, config, params, param_sh)

        for name, requests in (("width", WIDTH), ("depth", DEPTH)):
            expansion = growth.plan_expansion(config, params, requests, opt_state=state)
            new_config = expansion.config
            new_param_sh, new_state_sh = shardings(partitioner, abstract(new_config))
            out_shardings = (new_param_sh, new_state_sh)
            key = jax.random.key(2)
            compiled = expansion.lower(
                params, state, rng=key, out_shardings=out_shardings
            ).compile()
            stats = compiled.memory_analysis()
            memory = {
                name: getattr(stats, f"{name}_size_in_bytes")
                for name in ("argument", "output", "temp", "alias")
            }
            # The arguments are the old state's shards and the key's two words.
            key_bytes = jax.random.key_data(key).nbytes
            old_bytes = per_device_bytes((params, state), (param_sh, state_sh)) + key_bytes
            grown_abstract = expansion.abstract_state(params, state)
            new_bytes = per_device_bytes(grown_abstract, out_shardings)
            assert memory["argument"] == old_bytes, (memory, old_bytes)
            # Outputs: the new state's shards (and a table of pointers to them).
            pointers = 8 * len(jax.tree.leaves(grown_abstract))
            assert new_bytes <= memory["output"] <= new_bytes + pointers, (memory, new_bytes)
            assert memory["alias"] == 0  # not donated: the old state stays valid
            assert memory["temp"] <= new_bytes - old_bytes, (memory, old_bytes, new_bytes)
            print(f"memory {data}x{model} {name}: {memory}, old {old_bytes}, new {new_bytes}")
            new_params, new_state = expansion.apply(
                params, state, rng=key, out_shardings=out_shardings
            )
            check_placed((new_params, new_state), out_shardings)
            # The same bits as growing host copies on one device.
            _, one_params, one_state = growth.expand(
                config,
                jax.device_get(params),
                requests,
                rng=key,
                opt_state=jax.device_get(state),
            )
            for a, b in zip(
                jax.tree.leaves((one_params, one_state)),
                jax.tree.leaves((new_params, new_state)),
                strict=True,
            ):
                np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
            assert int(new_state[0].count) == 1
            after = forward(partitioner, new_config, new_params, new_param_sh)
            if name == "depth":
                np.testing.assert_array_equal(after, before)
            else:
                delta = float(np.max(np.abs(after - before)))
                assert delta <= TOLERANCE * float(np.max(np.abs(before))), delta
            # The grown state trains on: one jitted Adam step in the new shardings.
            new_update = jax.jit(tx.update, out_shardings=(new_param_sh, new_state_sh))
            new_grads = jax.tree.map(lambda p: 0.1 * p + 0.01, new_params)
            updates, stepped = new_update(new_grads, new_state, new_params)
            check_placed((updates, stepped), (new_param_sh, new_state_sh))
            assert int(stepped[0].count) == 2
            print(f"ok {data}x{model} {name}", flush=True)


if __name__ == "__main__":
    _child()
