"""Spatial transforms, applied to image and label together, in any number of spatial axes.

Shapes: ``image (*S, c)``, ``label (*S, n)`` with ``S`` the spatial shape (``(H, W)`` for
slices, ``(X, Y, Z)`` for volumes; the rank is read from the shapes at trace time).

Shift, scale, rotation, flips and the elastic displacement compose into one map from output
pixels to source coordinates (:func:`affine_coords` + :func:`elastic_displacement`), so each
sample is resampled once (:func:`warp`): the image (bi/tri)linearly, the label by nearest
neighbour or linearly and thresholded at 0.5 (``label_interp``), so it stays 0/1. Pixels from
outside the image are 0 (background), as in the robustness suite's geometric perturbations.

Rotations: in 2D one angle; in 3D one angle about each axis (:func:`rotation_inverse`), so
that a rotation about the last axis alone turns every slice ``[:, :, z]`` like the 2D one.

Why not dm-pix here: its ``affine_transform`` interpolates over all three axes of an
``(H, W, c)`` image (eight gathers per pixel, the channel axis included) and its
``elastic_deformation`` resamples channel by channel after a 25-tap blur of two noise fields,
tens of milliseconds per batch where :func:`sample` (four gathers shared by all channels) and
a coarse control grid take a few (docs/augmentation.md has the measurements).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from mednca_jax.data.preprocess import linear_resize_matrix

# Letters for the einsum strings built per rank: output axes, then input / grid axes.
_OUT, _IN = "hwdv", "ijkl"


def _plane_rotation_inverse(n: int, plane: tuple[int, int], angle: jax.Array) -> jax.Array:
    """``(n, n)`` inverse of a turn by ``angle`` in the plane of axes ``plane = (a, b)``:
    the 2D ``[[c, s], [-s, c]]`` in rows / columns ``a, b``, the identity elsewhere."""
    c, s = jnp.cos(angle), jnp.sin(angle)
    a, b = plane
    m = jnp.eye(n, dtype=jnp.float32)
    return m.at[a, a].set(c).at[a, b].set(s).at[b, a].set(-s).at[b, b].set(c)


def rotation_inverse(n: int, angle: jax.Array) -> jax.Array:
    """``(n, n)`` inverse rotation (output -> source) for ``n`` spatial axes.

    2D: ``angle`` is a scalar (radians, counter-clockwise on screen). 3D: ``angle (3,)``, one
    angle about each axis ``k`` (a turn in the plane of axes ``(k+1, k+2) mod 3``, the same
    sense as the 2D turn there); the forward rotation applies the turn about axis 0, then
    axis 1, then axis 2, so its inverse is the product in the opposite order. About axis 2
    alone, every slice ``[:, :, z]`` is turned exactly as a 2D image by the same angle.
    """
    if n == 2:
        c, s = jnp.cos(angle), jnp.sin(angle)
        # Rows grow downwards, so a counter-clockwise turn on screen is R = [[c, -s], [s, c]]
        # in (row, col): a point right of the centre moves up.
        return jnp.array([[c, s], [-s, c]], jnp.float32)
    if n == 3:
        angle = jnp.asarray(angle, jnp.float32)
        if angle.shape != (3,):
            raise ValueError(f"a 3D rotation takes one angle per axis, shape (3,); got shape {angle.shape}")
        turns = [_plane_rotation_inverse(3, ((k + 1) % 3, (k + 2) % 3), angle[k]) for k in range(3)]
        return turns[0] @ turns[1] @ turns[2]  # (R2 R1 R0)^-1 = R0^-1 R1^-1 R2^-1
    raise ValueError(f"rotations are defined for 2 or 3 spatial axes, got {n}")


def affine_matrix(
    shape: Sequence[int], shift: jax.Array, scale: jax.Array, angle: jax.Array, flip: jax.Array
) -> jax.Array:
    """The ``(n+1, n+1)`` pull map (output pixel -> source pixel, homogeneous coordinates
    ``(i_0, .., i_{n-1}, 1)``) of a flip, then a zoom by ``scale`` and a rotation by ``angle``
    (see :func:`rotation_inverse`: a scalar in 2D, ``(3,)`` in 3D) about the image centre, then
    a shift by ``shift (n,)`` pixels.

    ``flip``: ``(n,)`` booleans, mirror along each axis. ``scale > 1`` enlarges the content.
    The forward map is ``o = c + d + R(angle)·s·F·(i - c)``; the pull map is its inverse.
    """
    n = len(shape)
    centre = jnp.array([(s - 1) / 2.0 for s in shape], jnp.float32)
    rot_inv = rotation_inverse(n, angle)
    f = jnp.where(flip, -1.0, 1.0).astype(jnp.float32)
    a = (f[:, None] * rot_inv) / scale  # F⁻¹ R⁻¹ / s  (F is its own inverse)
    offset = centre - a @ (centre + jnp.asarray(shift, jnp.float32))
    last = jnp.array([[0.0] * n + [1.0]])
    return jnp.concatenate([jnp.concatenate([a, offset[:, None]], axis=1), last], axis=0)


def affine_coords(shape: Sequence[int], matrix: jax.Array) -> jax.Array:
    """``(n, *shape)`` source coordinates of every output pixel under ``matrix``."""
    n = len(shape)
    grids = jnp.meshgrid(*(jnp.arange(s, dtype=jnp.float32) for s in shape), indexing="ij")
    axes = _OUT[:n]
    return jnp.einsum(f"ij,j{axes}->i{axes}", matrix[:n, :n], jnp.stack(grids)) + matrix[:n, n].reshape((n,) + (1,) * n)


def elastic_displacement(shape: Sequence[int], noise: jax.Array, alpha: jax.Array) -> jax.Array:
    """A smooth random displacement ``(n, *shape)`` in pixels (Simard et al. 2003's elastic
    deformation, smoothed by interpolation instead of a Gaussian blur): ``noise (n, *grid)``
    in [-1, 1] on a coarse control grid, linearly interpolated to the image along each axis
    (the robustness suite's resize weights, as small static matrices) and scaled by ``alpha``,
    the largest displacement of a control point."""
    n = len(shape)
    ws = [jnp.asarray(linear_resize_matrix(noise.shape[1 + a], shape[a]), jnp.float32) for a in range(n)]  # (S_a, g_a)
    out, grid = _OUT[:n], _IN[:n]
    # operands w_0, noise, w_1, ..: in 2D the string is "hi,cij,wj->chw"
    terms = [out[0] + grid[0], "c" + grid] + [out[a] + grid[a] for a in range(1, n)]
    return alpha * jnp.einsum(",".join(terms) + "->c" + out, ws[0], noise, *ws[1:])


def sample(x: jax.Array, coords: jax.Array, order: int) -> jax.Array:
    """``x (*S, c)`` at the fractional source coordinates ``coords (n, *S')``; 0 outside.

    ``order`` 1: (multi)linear, ``2**n`` taps; 0: nearest. Integer coordinates return the
    pixels exactly.
    """
    shape, c = x.shape[:-1], x.shape[-1]
    n = len(shape)
    flat = x.reshape(-1, c)

    def tap(idx: Sequence[jax.Array]) -> jax.Array:  # (*S', c); 0 outside the image
        inside, flat_idx = None, 0
        for i, size in zip(idx, shape):
            ok = (i >= 0) & (i <= size - 1)
            inside = ok if inside is None else inside & ok
            flat_idx = flat_idx * size + jnp.clip(i, 0, size - 1).astype(jnp.int32)  # row-major
        return jnp.where(inside[..., None], flat[flat_idx], 0.0)

    if order == 0:
        return tap([jnp.floor(coords[a] + 0.5) for a in range(n)]).astype(x.dtype)
    base = [jnp.floor(coords[a]) for a in range(n)]
    frac = [(coords[a] - base[a])[..., None] for a in range(n)]

    def lerp(a: int, idx: list[jax.Array]) -> jax.Array:
        # interpolate along axis a, then recursively along the later axes; in 2D this is
        # (1 - fy)·((1 - fx)·t00 + fx·t01) + fy·((1 - fx)·t10 + fx·t11)
        if a == n:
            return tap(idx)
        return (1 - frac[a]) * lerp(a + 1, idx + [base[a]]) + frac[a] * lerp(a + 1, idx + [base[a] + 1])

    return lerp(0, []).astype(x.dtype)


def warp(
    image: jax.Array, label: jax.Array, coords: jax.Array, label_interp: str = "nearest"
) -> tuple[jax.Array, jax.Array]:
    """Resample ``image (*S, c)`` (linearly) and ``label (*S, n)`` (nearest, or linearly and
    thresholded at 0.5) at the same source coordinates ``coords (n, *S)``."""
    if label_interp == "nearest":
        new_label = sample(label, coords, 0)
    else:
        new_label = (sample(label, coords, 1) > 0.5).astype(label.dtype)
    return sample(image, coords, 1), new_label
