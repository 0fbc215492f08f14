"""Acquisition artefacts simulated in k-space with ``jnp.fft``: low resolution, ghosting,
spike, motion. Each maps one image ``(*S, c)`` to one image; the FFT runs over every spatial
axis (``S`` is ``(H, W)`` for slices, ``(X, Y, Z)`` for volumes), the channels are separate.

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


def _spatial_axes(x: jax.Array) -> tuple[int, ...]:
    return tuple(range(x.ndim - 1))


def _fftn(x: jax.Array) -> jax.Array:
    return jnp.fft.fftn(x, axes=_spatial_axes(x))


def _ifftn(k: jax.Array) -> jax.Array:
    return jnp.fft.ifftn(k, axes=_spatial_axes(k))


def _freqs(n: int) -> np.ndarray:
    return np.fft.fftfreq(n).astype(np.float32)  # cycles per pixel, FFT order


def _along(v: jax.Array | np.ndarray, axis: int, ndim: int) -> jax.Array | np.ndarray:
    """``v (n,)`` reshaped to broadcast along ``axis`` of ``ndim`` axes."""
    return v.reshape(tuple(-1 if a == axis else 1 for a in range(ndim)))


def _select_axis(axis: jax.Array, per_axis: list[jax.Array]) -> jax.Array:
    """``per_axis[axis]`` for a traced ``axis`` (a chain of ``where``; shapes stay static)."""
    out = per_axis[-1]
    for a in range(len(per_axis) - 2, -1, -1):
        out = jnp.where(axis == a, per_axis[a], out)
    return out


def low_resolution(image: jax.Array, keep: jax.Array) -> jax.Array:
    """A lower-resolution acquisition: only the central ``keep`` fraction of k-space along each
    axis is measured (``keep`` in (0, 1]; 1 is the identity up to rounding). Real part out.

    This is how a smaller acquisition matrix loses resolution in MRI (with its Gibbs ringing),
    and it keeps the output shape, which resizing down and up by a traced factor would not.
    """
    shape = image.shape[:-1]
    mask = None
    for a, s in enumerate(shape):
        inside = _along(jnp.abs(_freqs(s)), a, len(shape)) <= 0.5 * keep + 1e-6
        mask = inside if mask is None else mask & inside
    return _ifftn(_fftn(image) * mask[..., None]).real.astype(image.dtype)


def ghosting(image: jax.Array, strength: jax.Array, axis: jax.Array, period: int = 4) -> jax.Array:
    """Every ``period``-th phase-encode line (but DC) along ``axis`` (a spatial axis, e.g. 0:
    rows, 1: columns; may be traced) scaled by ``1 - strength``; magnitude out. Replicas of
    the mean-free image at multiples of ``N / period``, of amplitude ``strength / period``."""
    shape = image.shape[:-1]
    line = lambda n: jnp.where((np.arange(n) % period == 0) & (np.arange(n) != 0), 1.0 - strength, 1.0)  # noqa: E731
    masks = [jnp.broadcast_to(_along(line(s), a, len(shape)), shape) for a, s in enumerate(shape)]
    return jnp.abs(_ifftn(_fftn(image) * _select_axis(axis, masks)[..., None])).astype(image.dtype)


def spike(image: jax.Array, amplitude: jax.Array, *where: jax.Array) -> jax.Array:
    """A k-space spike and its conjugate mirror, so the image stays real: ``where`` is the
    spike's index along each spatial axis (FFT order), then its phase, e.g. ``(ky, kx, phase)``
    for an image and ``(kx, ky, kz, phase)`` for a volume. The stripes are
    ``amplitude · cos(2π Σ_a k_a·i_a / S_a + phase)``; ``k`` must not be its own mirror (not
    DC or a Nyquist corner)."""
    shape = image.shape[:-1]
    if len(where) != len(shape) + 1:
        raise ValueError(f"spike of a {len(shape)}D image: {len(shape)} indices and a phase expected, got {len(where)} values")
    *k_idx, phase = where
    amp = amplitude
    for s in shape:
        amp = amp * s
    amp = amp / 2.0  # FFT scale: a cosine of amplitude a has two peaks a·prod(S)/2
    k = _fftn(image)
    k = k.at[tuple(k_idx)].add(amp * jnp.exp(1j * phase))
    k = k.at[tuple((-ki) % s for ki, s in zip(k_idx, shape))].add(amp * jnp.exp(-1j * phase))
    return _ifftn(k).real.astype(image.dtype)


def motion(
    image: jax.Array, shift: jax.Array, angle: jax.Array, moved_fraction: jax.Array, axis: jax.Array
) -> jax.Array:
    """Rigid motion during the acquisition: the last ``moved_fraction`` of the phase-encode
    lines along ``axis`` (acquired from the most negative to the most positive frequency) come
    from a copy rotated by ``angle`` (radians; a scalar in 2D, one angle per axis ``(3,)`` in
    3D, see :func:`mednca_jax.augment.spatial.rotation_inverse`) and shifted by ``shift (n,)``
    pixels (a k-space phase ramp: sub-pixel, no interpolation). Magnitude out."""
    shape = image.shape[:-1]
    n = len(shape)
    still = affine_matrix(shape, jnp.zeros(n), 1.0, angle, jnp.zeros(n, bool))
    rotated = sample(image, affine_coords(shape, still), 1)
    phase = None
    for a, s in enumerate(shape):
        term = _along(_freqs(s), a, n) * shift[a]
        phase = term if phase is None else phase + term
    ramp = jnp.exp(-2j * jnp.pi * phase)
    k_moved = _fftn(rotated) * ramp[..., None]

    def late(a: int) -> jax.Array:  # (*S,) whether a line along axis a is acquired after the motion
        s = shape[a]
        order = np.argsort(np.argsort(_freqs(s), kind="stable"), kind="stable")  # acquisition rank
        return jnp.broadcast_to(_along(order >= s - jnp.round(moved_fraction * s), a, n), shape)

    moved = _select_axis(axis, [late(a) for a in range(n)])
    return jnp.abs(_ifftn(jnp.where(moved[..., None], k_moved, _fftn(image)))).astype(image.dtype)
