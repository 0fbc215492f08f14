"""The batch-normalised linear layer of M3D-NCA's update, folded (one matmul, statistics from
the input's Gram matrix) against its literal definition, values and gradients."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mednca_jax.nca.updates import batch_norm, linear_batch_norm, matmul


def _literal(y, kernel, bias, scale, shift):
    return batch_norm(matmul(y, kernel, "float32") + bias, scale, shift)


@pytest.mark.parametrize("shape,offset", [((2, 6, 5, 4, 8), 0.0), ((3, 7, 9, 8), 0.0), ((2, 5, 4, 3, 8), 20.0)])
def test_folded_batch_norm_equals_the_literal_one(shape, offset):
    # offset: inputs whose mean is far from 0 relative to their spread (NCA states drift), where
    # a one-pass variance would cancel
    ks = jax.random.split(jax.random.key(0), 6)
    y = jax.random.normal(ks[0], shape) * 0.5 + offset + jax.random.normal(ks[1], shape[-1:])
    kernel = jax.random.normal(ks[2], (shape[-1], 16)) / np.sqrt(shape[-1])
    bias, scale, shift = jax.random.normal(ks[3], (16,)), 1 + 0.3 * jax.random.normal(ks[4], (16,)), jax.random.normal(ks[5], (16,))
    g = jax.random.normal(jax.random.key(1), shape[:-1] + (16,))  # a random cotangent
    args = (y, kernel, bias, scale, shift)
    got, pull_got = jax.vjp(linear_batch_norm, *args)
    want, pull_want = jax.vjp(_literal, *args)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    assert float(jnp.abs(want).max()) > 1.0
    for name, a, b in zip(("y", "kernel", "bias", "scale", "shift"), pull_got(g), pull_want(g)):
        tol = 2e-4 * max(1.0, float(jnp.abs(b).max()))
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=tol, err_msg=f"gradient w.r.t. {name}")
