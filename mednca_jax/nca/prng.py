"""Uniform draws equal bit for bit to ``jax.random.uniform``, written as plain elementwise ops.

Why: on XLA:CPU, JAX lowers its default PRNG (Threefry-2x32) as a rolled loop of five
iterations that copies the whole counter state each time, a few percent of an inference
rollout's time for its fire masks (docs/performance.md). The same hash written out as
additions, rotations and xors is one fused elementwise pass. The numbers
are unchanged: ``tests/test_prng.py`` compares them with ``jax.random.uniform``.

Threefry-2x32 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC 2011): 20
rounds in 5 groups of 4, with a key injection after each group. Keys of any other
implementation fall back to ``jax.random.uniform``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))
_KEY_PARITY = np.uint32(0x1BD11BDA)


def _rotate_left(v: jax.Array, r: int) -> jax.Array:
    return (v << np.uint32(r)) | (v >> np.uint32(32 - r))


def threefry2x32(k0: jax.Array, k1: jax.Array, x0: jax.Array, x1: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The Threefry-2x32 hash of counters ``(x0, x1)`` under key ``(k0, k1)``; all uint32,
    broadcast together."""
    ks = (k0, k1, k0 ^ k1 ^ _KEY_PARITY)
    x0, x1 = x0 + ks[0], x1 + ks[1]
    for group in range(5):
        for r in _ROTATIONS[group % 2]:
            x0 = x0 + x1
            x1 = _rotate_left(x1, r) ^ x0
        x0 = x0 + ks[(group + 1) % 3]
        x1 = x1 + ks[(group + 2) % 3] + np.uint32(group + 1)
    return x0, x1


def counter_based(key: jax.Array) -> bool:
    """Whether ``key`` draws through :func:`uniform_at` (partitionable Threefry-2x32, the default)."""
    return str(jax.random.key_impl(key)) == "threefry2x32" and bool(jax.config.jax_threefry_partitionable)


def uniform_at(key: jax.Array, counter: jax.Array) -> jax.Array:
    """The numbers at positions ``counter`` (uint32) of ``jax.random.uniform(key, (n,))``, for
    any ``n`` above them, without drawing the others. Keys with :func:`counter_based` only:
    other layouts have no position-wise numbers."""
    if not counter_based(key):
        raise ValueError(f"uniform_at needs a partitionable threefry2x32 key, got {jax.random.key_impl(key)}")
    typed = jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key)
    data = jax.random.key_data(key) if typed else key
    b0, b1 = threefry2x32(data[0], data[1], jnp.zeros_like(counter), counter)
    mantissa = ((b0 ^ b1) >> np.uint32(9)) | np.uint32(0x3F800000)
    return jax.lax.bitcast_convert_type(mantissa, jnp.float32) - np.float32(1.0)


def uniform(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """``jax.random.uniform(key, shape)`` (float32 in [0, 1)), the same numbers.

    Follows JAX's partitionable Threefry layout (the default): the counter of element ``i`` is
    ``(i // 2**32, i % 2**32)`` in row-major order, its 32 random bits are the xor of the two
    output words, and the top 23 bits become the mantissa of a float in [1, 2), minus 1.
    """
    n = int(np.prod(shape))
    if not counter_based(key) or n >= 2**32:
        return jax.random.uniform(key, shape, jnp.float32)
    return uniform_at(key, jax.lax.iota(jnp.uint32, n).reshape(shape))
