"""Logical axis rules: plain data that shards every model's parameters and activations."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec

from models import decoder, partitioning, vit


def one_device_mesh():
    return jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("data", "model"))


def vit_variables():
    module = vit.ViT(vit.vit_tiny(image_shape=(8, 8, 1), patch_size=2))
    # Abstract init: the names and shapes are all the rules need.
    return module, jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, 8, 8, 1)))


def decoder_variables():
    module = decoder.Decoder(decoder.decoder_tiny(vocab_size=32, max_len=8))
    return module, module.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))


def test_rules_are_plain_data():
    rules = partitioning.standard_logical_axis_rules()
    assert all(isinstance(name, str) and axis in (None, "data", "model") for name, axis in rules)
    rules_dict = dict(rules)
    assert rules_dict["batch"] == "data"
    assert {rules_dict[n] for n in ("mlp", "heads", "vocab")} == {"model"}
    assert {rules_dict[n] for n in ("embed", "kv", "length")} == {None}


def test_every_param_name_has_a_rule_and_maps_to_the_mesh():
    rules = partitioning.standard_logical_axis_rules()
    known = {name for name, _ in rules}
    mesh = one_device_mesh()
    for _, variables in (vit_variables(), decoder_variables()):
        specs = nn.get_partition_spec(variables["params"])
        for spec in jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, PartitionSpec)):
            assert set(spec) - {None} <= known, spec
        # flax's own mapping accepts every spec (no logical name twice in one param).
        nn.logical_to_mesh_sharding(specs, mesh, rules)
    specs = nn.get_partition_spec(vit_variables()[1]["params"])
    mesh_specs = nn.logical_to_mesh(specs, rules)
    assert mesh_specs["block_0"]["mlp"]["wi"]["kernel"] == PartitionSpec(None, "model")
    assert mesh_specs["block_0"]["attn"]["out"]["kernel"] == PartitionSpec("model", None, None)


def test_activation_constraints_apply_under_a_mesh():
    module, variables = decoder_variables()
    params = nn.unbox(variables["params"])
    tokens = jnp.ones((2, 8), jnp.int32)
    expected = module.apply({"params": params}, tokens)
    with one_device_mesh(), nn.logical_axis_rules(partitioning.standard_logical_axis_rules()):
        sharded = jax.jit(module.apply)({"params": params}, tokens)
    np.testing.assert_allclose(expected, sharded, rtol=1e-5, atol=1e-5)
