"""Intensity transforms of one image ``(*S, c)`` (the label is untouched): ``S`` is the
spatial shape, ``(H, W)`` or ``(X, Y, Z)``; each function works for any number of spatial axes.

Gamma and brightness are dm-pix's; contrast is written here (dm-pix's takes the mean over the
last two spatial axes only, per slice of a volume), and so are the bias field, the two noise
models and the blur (dm-pix's is a slow convolution on CPU, see :func:`blur`). Each function is deterministic given its parameters; the
random draws live in :mod:`mednca_jax.augment` (the pipeline). The physical meaning of each
parameter matches the test-time perturbation of the same name in
:mod:`mednca_jax.evaluate.perturbations`, so the augmentation ranges can be read against its severities.
"""

from __future__ import annotations

import itertools
import math

import dm_pix as pix
import jax
import jax.numpy as jnp
import numpy as np

from mednca_jax.evaluate.perturbations import BIAS_ORDER



def bias_terms(ndim: int) -> tuple[tuple[int, ...], ...]:
    """Exponents of the monomials ``Π_a u_a^(e_a)`` with ``1 <= Σ e_a <= BIAS_ORDER`` (no
    constant: it would only rescale), in lexicographic order (in 2D ``y^i x^j``, ``i`` outer)."""
    return tuple(e for e in itertools.product(range(BIAS_ORDER + 1), repeat=ndim) if 0 < sum(e) <= BIAS_ORDER)


BIAS_TERMS: tuple[tuple[int, ...], ...] = bias_terms(2)  # the 2D family of perturbations.bias_field


def gamma(image: jax.Array, g: jax.Array) -> jax.Array:
    """``clip(x, 0, 1) ** g`` (dm-pix; the clip keeps negative values from becoming NaN)."""
    return pix.adjust_gamma(image, g)


def brightness(image: jax.Array, delta: jax.Array) -> jax.Array:
    """``x + delta``."""
    return pix.adjust_brightness(image, delta)


def contrast(image: jax.Array, factor: jax.Array) -> jax.Array:
    """``factor · (x - mean) + mean``, the mean over the image (per channel): dm-pix's
    ``adjust_contrast`` with the mean over every spatial axis (the same operations in 2D)."""
    mean = jnp.mean(image, axis=tuple(range(image.ndim - 1)), keepdims=True)
    return jnp.asarray(factor, image.dtype) * (image - mean) + mean


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
    """Gaussian blur with ``sigma`` pixels (may be traced) along every spatial axis, reflect
    padding, like ``perturbations.blur``. The kernel spans ``±ceil(3·max_sigma)`` pixels
    whatever ``sigma`` is, so shapes stay static.

    Written as one small matrix product per spatial axis (one einsum): dm-pix's
    ``gaussian_blur`` (a grouped convolution) took 23 ms on a 48 x 64 x 64 batch, these about
    2 ms (shared 2-core AMD EPYC, 2026-12-01).
    """
    shape = image.shape[:-1]
    n = len(shape)
    r = max(1, math.ceil(3 * max_sigma))
    mats = [_reflect_gaussian_matrix(s, sigma, min(r, s - 1)) for s in shape]
    out, src = "ilnp"[:n], "jkmo"[:n]
    # operands g_0, image, g_1, ..: in 2D the string is "ij,jkc,lk->ilc"
    terms = [out[0] + src[0], src + "c"] + [out[a] + src[a] for a in range(1, n)]
    return jnp.einsum(",".join(terms) + "->" + out + "c", mats[0], image, *mats[1:]).astype(image.dtype)


def bias_polynomial(shape: tuple[int, ...], coeffs: jax.Array) -> jax.Array:
    """``q (*shape)`` = Σ c_e Π_a u_a^(e_a) over :func:`bias_terms` on ``[-1, 1]^n``, scaled to
    ``max |q| = 1`` (in 2D the field family of ``perturbations.bias_field``)."""
    grids = jnp.meshgrid(*(jnp.linspace(-1.0, 1.0, s) for s in shape), indexing="ij")
    terms = bias_terms(len(shape))
    if coeffs.shape != (len(terms),):
        raise ValueError(f"{len(shape)}D bias field: {len(terms)} coefficients expected, got shape {coeffs.shape}")
    monomials = []
    for e in terms:
        m = grids[0] ** e[0]
        for g, k in zip(grids[1:], e[1:]):
            m = m * g**k
        monomials.append(m)
    q = jnp.tensordot(coeffs, jnp.stack(monomials), axes=1)  # monomials (T, *shape)
    m = jnp.max(jnp.abs(q))
    return jnp.where(m > 0, q / jnp.where(m > 0, m, 1.0), q)


def bias_field(image: jax.Array, coeffs: jax.Array, strength: jax.Array) -> jax.Array:
    """Smooth multiplicative inhomogeneity ``x · 2**(strength · q)``: within ``[2**-s, 2**s]``."""
    q = bias_polynomial(image.shape[:-1], coeffs)
    return image * jnp.exp2(strength * q)[..., None]


def gaussian_noise(image: jax.Array, noise: jax.Array, std: jax.Array) -> jax.Array:
    """``x + std · n`` for standard normal ``noise`` of the image's shape."""
    return image + std * noise


def rician_noise(image: jax.Array, noise: jax.Array, sigma: jax.Array) -> jax.Array:
    """Magnitude of a complex signal with Gaussian noise on both parts: ``|x + σn₁ + iσn₂|``.

    ``noise``: ``(2, *S, c)`` standard normal. Non-negative, like magnitude MR images.
    """
    return jnp.hypot(image + sigma * noise[0], sigma * noise[1])
