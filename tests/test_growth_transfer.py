"""Grown leaves go back to JAX in one transfer per expand, and only JAX inputs do."""

import jax
import numpy as np
import optax
from test_growth_preservation import make_config, random_params

import growth
from growth import transfer


def _counting_device_put(monkeypatch) -> list[int]:
    calls: list[int] = []
    device_put = jax.device_put

    def counted(x, *args, **kwargs):
        calls.append(len(x))
        return device_put(x, *args, **kwargs)

    monkeypatch.setattr(transfer.jax, "device_put", counted)
    return calls


def test_every_grown_leaf_is_a_jax_array_after_one_transfer(monkeypatch):
    config = make_config("decoder")
    params = jax.tree.map(jax.numpy.asarray, random_params(config))
    state = optax.adam(1e-3).init(params)
    calls = _counting_device_put(monkeypatch)
    requests = ["mlp_dim=9", "add_layer@1", "hidden=10:pad", "add_layer@0"]
    _, new_params, new_state = growth.expand(
        config, params, requests, rng=jax.random.key(0), opt_state=state
    )
    leaves = jax.tree.leaves((new_params, new_state))
    assert all(isinstance(leaf, jax.Array) for leaf in leaves)
    grown = [leaf for leaf in leaves if leaf.ndim]  # every array leaf changed shape
    assert calls == [len(grown)]


def test_host_inputs_stay_on_the_host_for_width_growth(monkeypatch):
    config = make_config("decoder")
    params = jax.tree.map(np.asarray, random_params(config))
    calls = _counting_device_put(monkeypatch)
    _, new_params, _ = growth.expand(config, params, ["mlp_dim=9"], rng=jax.random.key(0))
    assert all(isinstance(leaf, np.ndarray) for leaf in jax.tree.leaves(new_params))
    assert calls == []


def test_to_device_outside_expand_transfers_at_once():
    arrays = [transfer.aligned_zeros((3, 4), np.float32), np.ones(5, np.float32)]
    placed = transfer.to_device(arrays)
    assert all(isinstance(a, jax.Array) for a in placed)
    with transfer.deferred_transfer() as deferred:
        noted = transfer.to_device(arrays)
        assert noted[0] is arrays[0]
        tree = deferred.place({"a": noted[0], "b": [noted[1], np.zeros(2)]})
    assert isinstance(tree["a"], jax.Array) and isinstance(tree["b"][0], jax.Array)
    assert isinstance(tree["b"][1], np.ndarray)  # not noted: left alone
