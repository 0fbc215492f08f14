"""Spatial transforms, applied to image and label together.

Shift, scale, rotation, flips and the elastic displacement compose into one map from output
pixels to source coordinates (:func:`affine_coords` + :func:`elastic_displacement`), so each
sample is resampled once (:func:`warp`): the image bilinearly, the label by nearest neighbour
or bilinearly and thresholded at 0.5 (``label_interp``), so it stays 0/1. Pixels from outside
the image are 0 (background), as in the robustness suite's geometric perturbations.

Why not dm-pix here: its ``affine_transform`` interpolates over all three axes of an
``(H, W, c)`` image (eight gathers per pixel, the channel axis included) and its
``elastic_deformation`` resamples channel by channel after a 25-tap blur of two noise fields,
tens of milliseconds per batch where :func:`sample` (four gathers shared by all channels) and
a coarse control grid take a few (docs/augmentation.md has the measurements).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mednca_jax.data.preprocess import linear_resize_matrix


def affine_matrix(
    shape: tuple[int, int], shift: jax.Array, scale: jax.Array, angle: jax.Array, flip: jax.Array
) -> jax.Array:
    """The ``(3, 3)`` pull map (output pixel -> source pixel, homogeneous ``(row, col, 1)``) of
    a flip, then a zoom by ``scale`` and a rotation by ``angle`` (radians, counter-clockwise on
    screen) about the image centre, then a shift by ``shift = (rows, cols)`` pixels.

    ``flip``: ``(2,)`` booleans, mirror along H, along W. ``scale > 1`` enlarges the content.
    The forward map is ``o = c + d + R(angle)·s·F·(i - c)``; the pull map is its inverse.
    """
    h, w = shape
    centre = jnp.array([(h - 1) / 2.0, (w - 1) / 2.0], jnp.float32)
    c, s = jnp.cos(angle), jnp.sin(angle)
    # Rows grow downwards, so a counter-clockwise turn on screen is R = [[c, -s], [s, c]] in
    # (row, col): a point right of the centre moves up.
    rot_inv = jnp.array([[c, s], [-s, c]], jnp.float32)
    f = jnp.where(flip, -1.0, 1.0).astype(jnp.float32)
    a = (f[:, None] * rot_inv) / scale  # F⁻¹ R⁻¹ / s  (F is its own inverse)
    offset = centre - a @ (centre + jnp.asarray(shift, jnp.float32))
    return jnp.concatenate([jnp.concatenate([a, offset[:, None]], axis=1), jnp.array([[0.0, 0.0, 1.0]])], axis=0)


def affine_coords(shape: tuple[int, int], matrix: jax.Array) -> jax.Array:
    """``(2, H, W)`` source coordinates (row, col) of every output pixel under ``matrix``."""
    h, w = shape
    rows, cols = jnp.meshgrid(jnp.arange(h, dtype=jnp.float32), jnp.arange(w, dtype=jnp.float32), indexing="ij")
    return jnp.einsum("ij,jhw->ihw", matrix[:2, :2], jnp.stack([rows, cols])) + matrix[:2, 2, None, None]


def elastic_displacement(shape: tuple[int, int], noise: jax.Array, alpha: jax.Array) -> jax.Array:
    """A smooth random displacement ``(2, H, W)`` in pixels (Simard et al. 2003's elastic
    deformation, smoothed by interpolation instead of a Gaussian blur): ``noise (2, gh, gw)``
    in [-1, 1] on a coarse control grid, linearly interpolated to the image (the robustness
    suite's resize weights, as two small static matrices) and scaled by ``alpha``, the largest
    displacement of a control point."""
    wy = jnp.asarray(linear_resize_matrix(noise.shape[1], shape[0]), jnp.float32)  # (H, gh)
    wx = jnp.asarray(linear_resize_matrix(noise.shape[2], shape[1]), jnp.float32)  # (W, gw)
    return alpha * jnp.einsum("hi,cij,wj->chw", wy, noise, wx)


def sample(x: jax.Array, coords: jax.Array, order: int) -> jax.Array:
    """``x (H, W, c)`` at the fractional source coordinates ``coords (2, H', W')``; 0 outside.

    ``order`` 1: bilinear; 0: nearest. Integer coordinates return the pixels exactly.
    """
    h, w, c = x.shape
    flat = x.reshape(h * w, c)
    ys, xs = coords[0], coords[1]

    def tap(yy: jax.Array, xx: jax.Array) -> jax.Array:  # (H', W', c); 0 outside the image
        inside = (yy >= 0) & (yy <= h - 1) & (xx >= 0) & (xx <= w - 1)
        idx = jnp.clip(yy, 0, h - 1).astype(jnp.int32) * w + jnp.clip(xx, 0, w - 1).astype(jnp.int32)
        return jnp.where(inside[..., None], flat[idx], 0.0)

    if order == 0:
        return tap(jnp.floor(ys + 0.5), jnp.floor(xs + 0.5)).astype(x.dtype)
    y0, x0 = jnp.floor(ys), jnp.floor(xs)
    fy, fx = (ys - y0)[..., None], (xs - x0)[..., None]
    out = (1 - fy) * ((1 - fx) * tap(y0, x0) + fx * tap(y0, x0 + 1)) + fy * ((1 - fx) * tap(y0 + 1, x0) + fx * tap(y0 + 1, x0 + 1))
    return out.astype(x.dtype)


def warp(
    image: jax.Array, label: jax.Array, coords: jax.Array, label_interp: str = "nearest"
) -> tuple[jax.Array, jax.Array]:
    """Resample ``image (H, W, c)`` (bilinear) and ``label (H, W, n)`` (nearest, or bilinear
    thresholded at 0.5) at the same source coordinates ``coords (2, H, W)``."""
    if label_interp == "nearest":
        new_label = sample(label, coords, 0)
    else:
        new_label = (sample(label, coords, 1) > 0.5).astype(label.dtype)
    return sample(image, coords, 1), new_label
