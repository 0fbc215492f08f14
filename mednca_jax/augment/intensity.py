"""Intensity transforms of one image ``(H, W, c)`` (the label is untouched).

Gamma, brightness and contrast are dm-pix's; the bias field, the two noise models and the blur
(dm-pix's is a slow convolution on CPU, see :func:`blur`) are written here. Each function is deterministic given its parameters; the
random draws live in :mod:`mednca_jax.augment` (the pipeline). The physical meaning of each
parameter matches the test-time perturbation of the same name in
:mod:`mednca_jax.evaluate.perturbations`, so the augmentation ranges can be read against its severities.
"""

from __future__ import annotations

import math

import dm_pix as pix
import jax
import jax.numpy as jnp
import numpy as np

from mednca_jax.evaluate.perturbations import BIAS_ORDER

# Monomials y^i x^j with 1 <= i + j <= BIAS_ORDER (no constant: it would only rescale).
BIAS_TERMS: tuple[tuple[int, int], ...] = tuple(
    (i, j) for i in range(BIAS_ORDER + 1) for j in range(BIAS_ORDER + 1 - i) if i + j > 0
)


def gamma(image: jax.Array, g: jax.Array) -> jax.Array:
    """``clip(x, 0, 1) ** g`` (dm-pix; the clip keeps negative values from becoming NaN)."""
    return pix.adjust_gamma(image, g)


def brightness(image: jax.Array, delta: jax.Array) -> jax.Array:
    """``x + delta``."""
    return pix.adjust_brightness(image, delta)


def contrast(image: jax.Array, factor: jax.Array) -> jax.Array:
    """``factor · (x - mean) + mean``, the mean over the image (per channel)."""
    return pix.adjust_contrast(image, factor)


def _reflect_gaussian_matrix(n: int, sigma: jax.Array, radius: int) -> jax.Array:
    """``(n, n)`` matrix of a 1-D Gaussian blur with reflect padding (``np.pad`` "reflect")."""
    t = np.arange(-radius, radius + 1)
    src = np.arange(n)[:, None] + t[None, :]  # (n, taps) source index of each tap, unreflected
    period = 2 * (n - 1)
    src = np.abs((src + period) % period)
    src = np.where(src > n - 1, period - src, src)
    taps = jnp.exp(-0.5 * (jnp.asarray(t, jnp.float32) / sigma) ** 2)
    taps = taps / jnp.sum(taps)
    onehot = np.eye(n, dtype=np.float32)[src]  # (n, taps, n), static
    return jnp.einsum("t,itj->ij", taps, onehot)


def blur(image: jax.Array, sigma: jax.Array, max_sigma: float) -> jax.Array:
    """Gaussian blur with ``sigma`` pixels (may be traced), reflect padding, like
    ``perturbations.blur``. The kernel spans ``±ceil(3·max_sigma)`` pixels whatever ``sigma``
    is, so shapes stay static.

    Written as two small matrix products (rows, then columns): dm-pix's ``gaussian_blur`` (a
    grouped convolution) took 23 ms on a 48 x 64 x 64 batch, these about 2 ms (shared 2-core
    AMD EPYC, 2026-12-01).
    """
    h, w = image.shape[:2]
    r = max(1, math.ceil(3 * max_sigma))
    gh = _reflect_gaussian_matrix(h, sigma, min(r, h - 1))
    gw = _reflect_gaussian_matrix(w, sigma, min(r, w - 1))
    return jnp.einsum("ij,jkc,lk->ilc", gh, image, gw).astype(image.dtype)


def bias_polynomial(shape: tuple[int, int], coeffs: jax.Array) -> jax.Array:
    """``q (H, W)`` = Σ c_ij y^i x^j over :data:`BIAS_TERMS` on ``[-1, 1]²``, scaled to
    ``max |q| = 1`` (the same field family as ``perturbations.bias_field``)."""
    h, w = shape
    yy, xx = jnp.meshgrid(jnp.linspace(-1.0, 1.0, h), jnp.linspace(-1.0, 1.0, w), indexing="ij")
    monomials = jnp.stack([yy**i * xx**j for i, j in BIAS_TERMS])  # (T, H, W)
    q = jnp.tensordot(coeffs, monomials, axes=1)
    m = jnp.max(jnp.abs(q))
    return jnp.where(m > 0, q / jnp.where(m > 0, m, 1.0), q)


def bias_field(image: jax.Array, coeffs: jax.Array, strength: jax.Array) -> jax.Array:
    """Smooth multiplicative inhomogeneity ``x · 2**(strength · q)``: within ``[2**-s, 2**s]``."""
    q = bias_polynomial(image.shape[:2], coeffs)
    return image * jnp.exp2(strength * q)[:, :, None]


def gaussian_noise(image: jax.Array, noise: jax.Array, std: jax.Array) -> jax.Array:
    """``x + std · n`` for standard normal ``noise`` of the image's shape."""
    return image + std * noise


def rician_noise(image: jax.Array, noise: jax.Array, sigma: jax.Array) -> jax.Array:
    """Magnitude of a complex signal with Gaussian noise on both parts: ``|x + σn₁ + iσn₂|``.

    ``noise``: ``(2, H, W, c)`` standard normal. Non-negative, like magnitude MR images.
    """
    return jnp.hypot(image + sigma * noise[0], sigma * noise[1])
