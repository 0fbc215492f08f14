"""The elementwise Threefry in ``mednca_jax.nca.prng`` draws JAX's own numbers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mednca_jax.nca import prng


@pytest.mark.parametrize(
    "key, counter, expected",
    [  # Random123's known-answer vectors for Threefry-2x32, 20 rounds
        ((0, 0), (0, 0), (0x6B200159, 0x99BA4EFE)),
        ((0xFFFFFFFF, 0xFFFFFFFF), (0xFFFFFFFF, 0xFFFFFFFF), (0x1CB996FC, 0xBB002BE7)),
        ((0x13198A2E, 0x03707344), (0x243F6A88, 0x85A308D3), (0xC4923A9C, 0x483DF7A0)),
    ],
)
def test_threefry_known_answers(key, counter, expected):
    k0, k1, x0, x1 = (jnp.uint32(v) for v in key + counter)
    assert tuple(int(v) for v in prng.threefry2x32(k0, k1, x0, x1)) == expected


@pytest.mark.parametrize("shape", [(1,), (5,), (3, 7, 1), (2, 64, 64, 1)])
@pytest.mark.parametrize("make_key", [jax.random.PRNGKey, jax.random.key], ids=["raw", "typed"])
def test_uniform_equals_jax_bit_for_bit(shape, make_key):
    for seed in (0, 123456789):
        key = make_key(seed)
        np.testing.assert_array_equal(prng.uniform(key, shape), jax.random.uniform(key, shape))


def test_uniform_equals_jax_under_jit_and_vmap():
    keys = jax.random.split(jax.random.PRNGKey(1), 6)
    ours = jax.jit(jax.vmap(lambda k: prng.uniform(k, (300,))))(keys)
    np.testing.assert_array_equal(ours, jax.vmap(lambda k: jax.random.uniform(k, (300,)))(keys))
    assert 0.0 <= float(ours.min()) and float(ours.max()) < 1.0


def test_other_key_implementations_fall_back_to_jax():
    key = jax.random.key(3, impl="rbg")
    np.testing.assert_array_equal(prng.uniform(key, (4, 5)), jax.random.uniform(key, (4, 5)))


def test_uniform_at_gives_the_numbers_at_those_positions_of_a_longer_draw():
    key = jax.random.PRNGKey(3)
    full = np.asarray(jax.random.uniform(key, (300,)))
    counter = jnp.array([0, 7, 150, 299, 5], jnp.uint32)
    np.testing.assert_array_equal(prng.uniform_at(key, counter), full[np.asarray(counter)])
