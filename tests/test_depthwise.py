"""The depthwise convolution (values and hand-written gradients) against the dense-filter
convolution it replaces in the reference perception, in 1D, 2D and 3D (tiny shapes)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mednca_jax.nca.depthwise import depthwise_conv_reflect
from mednca_jax.nca.perceptions import dense_from_depthwise
from mednca_jax.nca.rule import Rule, conv_reflect, init_level, perceive


def _dense(x, kernel, precision="float32"):
    return conv_reflect(x, dense_from_depthwise(kernel), precision)


@pytest.mark.parametrize(
    "spatial,k,m",
    [((11,), 5, 1), ((9, 7), 3, 3), ((9, 8, 7), 7, 1), ((5, 4), 1, 2), ((6, 5, 4), 5, 2)],
)
def test_values_and_gradients_match_the_dense_filters(spatial, k, m):
    c = 3
    x = jax.random.normal(jax.random.key(0), (2, *spatial, c))
    kernel = jax.random.normal(jax.random.key(1), (k,) * len(spatial) + (c, m))
    # a random cotangent: every tap and cell gets a different weight in the gradients
    g = jax.random.normal(jax.random.key(2), (2, *spatial, m * c))
    vjp = jax.jit(lambda f, x, w: (lambda out, pull: (out, *pull(g)))(*jax.vjp(f, x, w)), static_argnums=0)
    got, gx, gw = vjp(depthwise_conv_reflect, x, kernel)
    want, wx, ww = vjp(_dense, x, kernel)
    assert got.shape == (2, *spatial, m * c)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6 * float(jnp.abs(want).max()))
    for a, b in ((gx, wx), (gw, ww)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=2e-6 * float(jnp.abs(b).max()))


def test_bfloat16_rounds_the_inputs_like_the_dense_conv():
    x = jax.random.normal(jax.random.key(2), (1, 6, 5, 4, 2))
    kernel = jax.random.normal(jax.random.key(3), (3, 3, 3, 2, 1))
    run = jax.jit(lambda x, w: (depthwise_conv_reflect(x, w, "bfloat16"), _dense(x, w, "bfloat16"), depthwise_conv_reflect(x, w)))
    got, want, full = run(x, kernel)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert float(jnp.abs(got - full).max()) > 1e-4  # it did round


@pytest.mark.parametrize("perception,ndim", [("depthwise", 3), ("sobel", 2)])
def test_perceive_takes_the_compact_form(perception, ndim, monkeypatch):
    # perceive() of a perception with a depthwise form gives the dense filters' features,
    # and runs the depthwise conv, not conv_reflect
    import mednca_jax.nca.rule as rule_mod
    from mednca_jax.nca.perceptions import filters_of

    rule = Rule(perception=perception, channels=4, hidden=8, ndim=ndim, kernel_size=3)
    params = init_level(jax.random.key(4), rule)
    x = jax.random.normal(jax.random.key(5), (2,) + (5,) * ndim + (4,))
    kernel, bias = filters_of(rule, params)
    want = jnp.concatenate([x, conv_reflect(x, kernel) + bias], -1)

    def refuse(*a, **k):
        raise AssertionError("the dense conv ran")

    monkeypatch.setattr(rule_mod, "conv_reflect", refuse)
    got = jax.jit(perceive, static_argnums=0)(rule, params, x)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("spatial,k", [((9, 8, 7), 7), ((9, 7), 3), ((6, 5, 4), 3), ((12,), 5)])
def test_kernel_gradient_by_fft_equals_the_toeplitz_products(spatial, k):
    # the two kernel-gradient forms (depthwise._kernel_grad picks one by the window's taps)
    from mednca_jax.nca import depthwise

    xp = jax.random.normal(jax.random.key(3), (2, *(s + k - 1 for s in spatial), 4))
    g = jax.random.normal(jax.random.key(4), (2, *spatial, 4))
    fft, toeplitz = depthwise._kernel_grad_fft(xp, g, k), depthwise._kernel_grad_toeplitz(xp, g, k)
    assert fft.shape == toeplitz.shape == (k,) * len(spatial) + (4,)
    np.testing.assert_allclose(fft, toeplitz, rtol=1e-5, atol=1e-5 * float(jnp.abs(toeplitz).max()))
