"""Acquisition artefacts simulated in k-space with ``jnp.fft``: low resolution, ghosting,
spike, motion. Each maps one image ``(H, W, c)`` to one image; the FFT runs over ``(H, W)``.

Parameters have the meaning of the perturbation of the same name in
:mod:`mednca_jax.evaluate.perturbations` (its docstring gives the physics); that module is NumPy with
per-image Python loops, so it cannot run inside the jitted step, and these are the traced
counterparts: an index or axis that it picks in Python is an array here, selected with
``jnp.where`` so that shapes stay static.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from mednca_jax.augment.spatial import affine_coords, affine_matrix, sample


def _fft2(x: jax.Array) -> jax.Array:
    return jnp.fft.fft2(x, axes=(0, 1))


def _ifft2(k: jax.Array) -> jax.Array:
    return jnp.fft.ifft2(k, axes=(0, 1))


def _freqs(n: int) -> np.ndarray:
    return np.fft.fftfreq(n).astype(np.float32)  # cycles per pixel, FFT order


def low_resolution(image: jax.Array, keep: jax.Array) -> jax.Array:
    """A lower-resolution acquisition: only the central ``keep`` fraction of k-space along each
    axis is measured (``keep`` in (0, 1]; 1 is the identity up to rounding). Real part out.

    This is how a smaller acquisition matrix loses resolution in MRI (with its Gibbs ringing),
    and it keeps the output shape, which resizing down and up by a traced factor would not.
    """
    h, w = image.shape[:2]
    fy, fx = jnp.abs(_freqs(h))[:, None], jnp.abs(_freqs(w))[None, :]
    mask = (fy <= 0.5 * keep + 1e-6) & (fx <= 0.5 * keep + 1e-6)
    return _ifft2(_fft2(image) * mask[:, :, None]).real.astype(image.dtype)


def ghosting(image: jax.Array, strength: jax.Array, axis: jax.Array, period: int = 4) -> jax.Array:
    """Every ``period``-th phase-encode line (but DC) along ``axis`` (0: rows, 1: columns; may
    be traced) scaled by ``1 - strength``; magnitude out. Replicas of the mean-free image at
    multiples of ``N / period``, of amplitude ``strength / period``."""
    h, w = image.shape[:2]
    line = lambda n: jnp.where((np.arange(n) % period == 0) & (np.arange(n) != 0), 1.0 - strength, 1.0)  # noqa: E731
    mask = jnp.where(axis == 0, line(h)[:, None] * jnp.ones((1, w)), jnp.ones((h, 1)) * line(w)[None, :])
    return jnp.abs(_ifft2(_fft2(image) * mask[:, :, None])).astype(image.dtype)


def spike(image: jax.Array, amplitude: jax.Array, ky: jax.Array, kx: jax.Array, phase: jax.Array) -> jax.Array:
    """A k-space spike at ``(ky, kx)`` (FFT order) and its conjugate mirror, so the image stays
    real: herringbone stripes ``amplitude · cos(2π(ky·y/H + kx·x/W) + phase)``. ``(ky, kx)``
    must not be its own mirror (not DC or a Nyquist corner)."""
    h, w = image.shape[:2]
    amp = amplitude * h * w / 2.0  # FFT scale: a cosine of amplitude a has two peaks a·HW/2
    k = _fft2(image)
    k = k.at[ky, kx].add(amp * jnp.exp(1j * phase))
    k = k.at[(-ky) % h, (-kx) % w].add(amp * jnp.exp(-1j * phase))
    return _ifft2(k).real.astype(image.dtype)


def motion(
    image: jax.Array, shift: jax.Array, angle: jax.Array, moved_fraction: jax.Array, axis: jax.Array
) -> jax.Array:
    """Rigid motion during the acquisition: the last ``moved_fraction`` of the phase-encode
    lines along ``axis`` (acquired from the most negative to the most positive frequency) come
    from a copy rotated by ``angle`` (radians) and shifted by ``shift = (rows, cols)`` pixels
    (a k-space phase ramp: sub-pixel, no interpolation). Magnitude out."""
    h, w = image.shape[:2]
    rotated = sample(image, affine_coords((h, w), affine_matrix((h, w), jnp.zeros(2), 1.0, angle, jnp.zeros(2, bool))), 1)
    fy, fx = _freqs(h)[:, None], _freqs(w)[None, :]
    ramp = jnp.exp(-2j * jnp.pi * (fy * shift[0] + fx * shift[1]))
    k_moved = _fft2(rotated) * ramp[:, :, None]

    def late(n: int) -> jax.Array:  # (n,) whether a line is acquired after the motion
        order = np.argsort(np.argsort(_freqs(n), kind="stable"), kind="stable")  # acquisition rank
        return order >= n - jnp.round(moved_fraction * n)

    moved = jnp.where(axis == 0, late(h)[:, None] & jnp.ones((1, w), bool), jnp.ones((h, 1), bool) & late(w)[None, :])
    return jnp.abs(_ifft2(jnp.where(moved[:, :, None], k_moved, _fft2(image)))).astype(image.dtype)
