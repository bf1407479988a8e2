"""Growth's draws: jax.random's threefry bits, computed entry by entry."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from growth import ops

_SHAPES = [(), (1,), (7,), (3, 5), (33, 17, 3)]


def _key_bits(key):
    if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
        return np.asarray(jax.random.key_data(key)).tobytes()
    return np.asarray(key).tobytes()


@pytest.mark.parametrize("make_key", [jax.random.key, jax.random.PRNGKey], ids=["typed", "raw"])
@pytest.mark.parametrize("shape", _SHAPES)
def test_normal_is_jax_random_normal_bit_for_bit(make_key, shape):
    key = make_key(11)
    expected = np.asarray(jax.random.normal(key, shape, jnp.float32)).tobytes()
    assert np.asarray(ops.normal(key, shape)).tobytes() == expected
    jitted = jax.jit(ops.normal, static_argnums=1)
    assert np.asarray(jitted(key, shape)).tobytes() == expected


@pytest.mark.parametrize("make_key", [jax.random.key, jax.random.PRNGKey], ids=["typed", "raw"])
@pytest.mark.parametrize("data", [0, 1, 12345, 2**31 - 1, 2**32 - 1])
def test_fold_in_is_jax_random_fold_in(make_key, data):
    key = make_key(5)
    folded = ops.fold_in(key, data)
    expected = jax.random.fold_in(key, data)
    assert folded.dtype == expected.dtype
    assert _key_bits(folded) == _key_bits(expected)
    assert _key_bits(jax.jit(ops.fold_in, static_argnums=1)(key, data)) == _key_bits(expected)


def test_other_key_implementations_draw_through_jax_random():
    key = jax.random.key(3, impl="rbg")
    expected = jax.random.normal(jax.random.fold_in(key, 9), (4, 6), jnp.float32)
    drawn = ops.normal(ops.fold_in(key, 9), (4, 6))
    assert np.asarray(drawn).tobytes() == np.asarray(expected).tobytes()
