"""Test-time perturbations for the robustness suite: geometric shifts and MRI artefacts (NumPy).

Every perturbation is a function ``fn(image, severity, rng, *, ndim=2) -> image`` where

* ``image`` is ``S`` or ``(B, *S)`` float32 with ``S`` the spatial shape of rank ``ndim``:
  ``(H, W)`` / ``(B, H, W)`` slices (the default) or ``(X, Y, Z)`` / ``(B, X, Y, Z)`` volumes
  (``ndim = 3``), intensities in ``[0, 1]`` (the range of the preprocessed slices,
  docs/design.md, "Preprocessing"). The rank is an argument, not read off ``image.ndim``: a
  batch of slices and one volume both have three axes;
* ``severity`` is a float in ``[0, 1]``: 0 returns the image unchanged, 1 is the strongest
  setting, documented below in physical terms (intensity unit = the ``[0, 1]`` range);
* ``rng`` is a ``numpy.random.Generator``; each image of a batch gets its own random draws.
  The random numbers drawn do not depend on ``severity``, so one seed gives the same direction
  / noise pattern / field at every severity, only scaled (smooth Dice-vs-severity curves).

The functions do not clip; :func:`apply_perturbation` (what evaluation uses) clips the result
to ``[0, 1]`` like the preprocessing's final percentile clip, so models see inputs in their
trained range.

Severity scales (``s`` = severity, ``N`` = image side in pixels, 3D: voxels):

=============== ========== ==========================================================================
name            kind       at severity ``s``
=============== ========== ==========================================================================
translation     geometric  integer shift by ``0.25·s·(H, W)`` in a random direction, zero fill
rotation        geometric  rotation about the centre by ``±45°·s`` (random sign), zero fill
gaussian_noise  intensity  additive N(0, σ²), ``σ = 0.2·s``
rician_noise    intensity  magnitude of a complex signal with N(0, σ²) noise on both parts, σ = 0.2·s
bias_field      intensity  × ``exp(s·ln2·q)``, q a random cubic polynomial in (y, x) with max|q| = 1:
                           the field spans up to ``[1/2, 2]`` at s = 1
ghosting        intensity  every 4th phase-encode k-space line but DC scaled by ``1 − s`` (magnitude
                           image): mean-free replicas of amplitude ``s/4`` at ``±N/4, ±N/2``
spike           intensity  one k-space spike (± its conjugate) = herringbone stripes of amplitude 0.25·s
motion          intensity  the last 10–40 % of phase-encode lines come from a copy moved by
                           ``0.1·s·N`` px (random direction) and rotated ``±10°·s``
blur            intensity  Gaussian blur, ``σ = 2·s`` pixels
gamma           intensity  ``x ** γ`` with ``γ = 2**(±s)`` (random sign): γ in {1/2, 2} at s = 1
=============== ========== ==========================================================================

Volumes (``ndim = 3``) use the same functions and constants, ``N`` being each axis' size in
voxels of the model grid: translation shifts by ``0.25·s·N_i·u_i`` along a random unit vector
``u`` (uniform on the sphere); rotation turns about a random axis through the centre
(uniform on the sphere) by ``±45°·s``; the bias polynomial is cubic in (x, y, z) (19 terms);
ghosting, spike and motion act on the 3D k-space (``np.fft.fftn`` over the spatial axes; a
"line" is a plane of k-space, the phase-encode axis any of the three, motion's rotation about
a random axis); blur is separable over all three axes; the noises and gamma act per voxel.
The 2D results and random draws are those of the 2D-only definitions.

Geometric perturbations move the label with the image (nearest neighbour); see
:func:`translation_with_label`, :func:`rotation_with_label`. Resolution changes (the NCA's
scale claim) are not a severity but an image size: :data:`SCALE_SIZES` and :func:`rescale`
(3D: the model grid times :data:`SCALE_FACTORS_3D`, :func:`scaled_grid`).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from mednca_jax.data.preprocess import linear_resize_matrix

DEFAULT_SEVERITIES: tuple[float, ...] = (0.25, 0.5, 0.75, 1.0)
SCALE_SIZES: tuple[int, ...] = (48, 64, 96, 128)
# 3D: the "scale" grids are the model grid times these factors (:func:`scaled_grid`)
SCALE_FACTORS_3D: tuple[float, ...] = (0.75, 1.0, 1.5)

# Severity-1 constants (see the module docstring).
MAX_SHIFT_FRACTION = 0.25
MAX_ROTATION_DEG = 45.0
MAX_NOISE_STD = 0.2
MAX_LOG_BIAS = math.log(2.0)
BIAS_ORDER = 3
N_GHOSTS = 4
MAX_SPIKE_AMPLITUDE = 0.25
MAX_MOTION_SHIFT_FRACTION = 0.1
MAX_MOTION_ROTATION_DEG = 10.0
MOTION_MOVED_FRACTION = (0.1, 0.4)
MAX_BLUR_SIGMA = 2.0
MAX_LOG2_GAMMA = 1.0

Image = np.ndarray


# ----------------------------------------------------------------------------- helpers


def _check_severity(severity: float) -> float:
    s = float(severity)
    if not (0.0 <= s <= 1.0) or math.isnan(s):
        raise ValueError(f"severity must be in [0, 1] (0 = identity, 1 = strongest), got {severity!r}")
    return s


def _spatial_names(ndim: int) -> str:
    return "H, W" if ndim == 2 else ("X, Y, Z" if ndim == 3 else ", ".join(f"N{i}" for i in range(ndim)))


def _as_batch(image: np.ndarray, ndim: int = 2) -> tuple[np.ndarray, bool]:
    """``(B, *S)`` float32 view (``S`` of rank ``ndim``) and whether the input was a single
    ``S``-shaped image."""
    x = np.asarray(image, dtype=np.float32)
    if ndim < 1:
        raise ValueError(f"the spatial rank ndim must be >= 1, got {ndim}")
    if x.ndim == ndim:
        return x[None], True
    if x.ndim == ndim + 1:
        return x, False
    names = _spatial_names(ndim)
    raise ValueError(f"image must be ({names}) or (B, {names}), got shape {x.shape}")


def _label_batch(label: np.ndarray, batch_shape: tuple[int, ...], single: bool) -> np.ndarray:
    """Labels as ``(B, *S, ...)``: same spatial shape as the image, optional trailing axes."""
    y = np.asarray(label)
    if single:
        y = y[None]
    if y.shape[: len(batch_shape)] != batch_shape:
        raise ValueError(f"label shape {np.shape(label)} does not match image shape {batch_shape[1 if single else 0:]}")
    return y


def _directions(rng: np.random.Generator, n: int, ndim: int) -> np.ndarray:
    """``(n, ndim)`` random unit vectors, uniform on the sphere. 2D draws an angle ``t`` and
    returns ``(sin t, cos t)`` (rows, columns); other ranks normalise a standard normal draw."""
    if ndim == 2:
        theta = rng.uniform(0.0, 2 * math.pi, size=n)
        return np.array([(math.sin(t), math.cos(t)) for t in theta], dtype=np.float64).reshape(n, 2)
    v = rng.standard_normal((n, ndim))
    norm = np.linalg.norm(v, axis=1, keepdims=True)
    return v / np.where(norm > 0, norm, 1.0)


def _rotation_axes(rng: np.random.Generator, n: int, ndim: int, about: Sequence[float] | None) -> list[np.ndarray | None]:
    """The rotation axis of each of ``n`` images: None in 2D; in 3D ``about`` (normalised) or,
    when None, a random unit vector per volume (drawn here)."""
    if ndim == 2:
        if about is not None:
            raise ValueError("a rotation axis ('about') only applies to 3D volumes")
        return [None] * n
    if ndim != 3:
        raise ValueError(f"rotations are defined for 2D images and 3D volumes, got spatial rank {ndim}")
    if about is None:
        return list(_directions(rng, n, 3))
    u = np.asarray(about, dtype=np.float64)
    if u.shape != (3,) or not np.linalg.norm(u) > 0:
        raise ValueError(f"the rotation axis must be a non-zero 3-vector, got {about!r}")
    return [u / np.linalg.norm(u)] * n


def _rotation_matrix(ndim: int, angle_rad: float, axis: np.ndarray | None) -> np.ndarray:
    """``(ndim, ndim)``: 2D ``[[cos, −sin], [sin, cos]]``; 3D the rotation by ``angle`` about the
    unit vector ``axis`` (Rodrigues), in array-axis order — about ``(0, 0, 1)`` its upper-left
    block is the 2D matrix."""
    c, s = math.cos(angle_rad), math.sin(angle_rad)
    if ndim == 2:
        return np.array([[c, -s], [s, c]])
    u = np.asarray(axis, dtype=np.float64)
    cross = np.array([[0.0, -u[2], u[1]], [u[2], 0.0, -u[0]], [-u[1], u[0], 0.0]])
    return c * np.eye(3) + s * cross + (1.0 - c) * np.outer(u, u)


def _rotation_source(shape: Sequence[int], angle_rad: float, axis: np.ndarray | None = None) -> list[np.ndarray]:
    """Source coordinates (one array of ``shape`` per axis) of every output pixel / voxel for a
    rotation by ``angle`` about the centre (3D: about ``axis`` through the centre)."""
    shape = tuple(int(n) for n in shape)
    centre = [(n - 1) / 2.0 for n in shape]
    grids = np.meshgrid(*[np.arange(n, dtype=np.float64) for n in shape], indexing="ij")
    r = _rotation_matrix(len(shape), angle_rad, axis)
    coords = []
    for i in range(len(shape)):
        c = centre[i]
        for j in range(len(shape)):
            c = c + r[i, j] * (grids[j] - centre[j])
        coords.append(c)
    return coords


def _in_bounds(idx: Sequence[np.ndarray], shape: Sequence[int]) -> np.ndarray:
    ok = (idx[0] >= 0) & (idx[0] < shape[0])
    for i, n in zip(idx[1:], shape[1:]):
        ok = ok & (i >= 0) & (i < n)
    return ok


def _sample_linear(img: np.ndarray, coords: Sequence[np.ndarray]) -> np.ndarray:
    """``img`` (rank ``len(coords)``) at fractional coordinates, (bi/tri)linear; zero outside."""
    shape = img.shape
    base = [np.floor(c).astype(np.int64) for c in coords]
    frac = [c - b for c, b in zip(coords, base)]
    out = np.zeros(coords[0].shape, np.float64)
    for corner in itertools.product((0, 1), repeat=len(shape)):
        idx = [b + d for b, d in zip(base, corner)]
        ok = _in_bounds(idx, shape)
        val = np.where(ok, img[tuple(np.clip(i, 0, n - 1) for i, n in zip(idx, shape))], 0.0)
        for d, f in zip(corner, frac):
            val = val * (f if d else 1 - f)
        out += val
    return out


def _sample_nearest(arr: np.ndarray, coords: Sequence[np.ndarray]) -> np.ndarray:
    """``arr (*S, ...)`` (``S`` of rank ``len(coords)``) at the nearest voxel of each
    coordinate; zero outside."""
    shape = arr.shape[: len(coords)]
    idx = [np.rint(c).astype(np.int64) for c in coords]
    ok = _in_bounds(idx, shape)
    out = arr[tuple(np.clip(i, 0, n - 1) for i, n in zip(idx, shape))]
    ok = ok.reshape(ok.shape + (1,) * (arr.ndim - len(coords)))
    return np.where(ok, out, np.zeros_like(out))


def _shift_zero(arr: np.ndarray, shift: Sequence[int]) -> np.ndarray:
    """Integer shift of ``arr (*S, ...)`` (content moves by ``+shift[i]`` along axis ``i``),
    zero fill; trailing axes beyond ``len(shift)`` are carried along."""
    out = np.zeros_like(arr)
    shape = arr.shape[: len(shift)]
    if any(abs(d) >= n for d, n in zip(shift, shape)):
        return out
    dst = tuple(slice(max(d, 0), n + min(d, 0)) for d, n in zip(shift, shape))
    src = tuple(slice(max(-d, 0), n + min(-d, 0)) for d, n in zip(shift, shape))
    out[dst] = arr[src]
    return out


def _along(v: np.ndarray, axis: int, ndim: int) -> np.ndarray:
    """1-D ``v`` reshaped to broadcast along ``axis`` of a rank-``ndim`` array."""
    shape = [1] * ndim
    shape[axis] = -1
    return v.reshape(shape)


def _finish(x: np.ndarray, single: bool) -> np.ndarray:
    x = x.astype(np.float32, copy=False)
    return x[0] if single else x


# ----------------------------------------------------------------------------- geometric


def translation_with_label(
    image: Image, label: np.ndarray | None, severity: float, rng: np.random.Generator, *, ndim: int = 2
) -> tuple[Image, np.ndarray | None]:
    """Shift image and label by the same integer offset, zero padding.

    Severity ``s``: displacement ``0.25·s·N_i`` voxels along axis ``i`` (``N_i`` its size) times
    the component ``u_i`` of a random unit direction ``u`` (2D: angle uniform in ``[0, 2π)``;
    nD: uniform on the sphere), i.e. up to a quarter of the field of view at ``s = 1``.
    ``image``: ``S`` or ``(B, *S)`` with ``S`` of rank ``ndim`` (``(H, W)``, ``(X, Y, Z)``);
    ``label``: matching ``S[+C]`` / ``(B, *S[, C])``, or None.
    """
    s = _check_severity(severity)
    x, single = _as_batch(image, ndim)
    y = None if label is None else _label_batch(label, x.shape, single)
    u = _directions(rng, len(x), ndim)
    out_x, out_y = x.copy(), None if y is None else y.copy()
    shape = x.shape[1:]
    for b in range(len(x)):
        shift = tuple(int(round(s * MAX_SHIFT_FRACTION * n * float(u[b, i]))) for i, n in enumerate(shape))
        out_x[b] = _shift_zero(x[b], shift)
        if y is not None:
            out_y[b] = _shift_zero(y[b], shift)
    return _finish(out_x, single), None if out_y is None else (out_y[0] if single else out_y)


def rotation_with_label(
    image: Image, label: np.ndarray | None, severity: float, rng: np.random.Generator, *, ndim: int = 2,
    about: Sequence[float] | None = None,
) -> tuple[Image, np.ndarray | None]:
    """Rotate image (bi/trilinear) and label (nearest) about the image centre by the same angle.

    Severity ``s``: angle ``±45°·s`` with a random sign; voxels from outside are zero. 3D
    (``ndim = 3``): the rotation axis through the centre is ``about`` (a 3-vector in array-axis
    order) or, when None, a random unit vector per volume, uniform on the sphere; about
    ``(0, 0, 1)`` every Z slice turns as the 2D rotation does. Coordinates are voxel indices
    (the model grid), as in 2D. Shapes as in :func:`translation_with_label`.
    """
    s = _check_severity(severity)
    x, single = _as_batch(image, ndim)
    y = None if label is None else _label_batch(label, x.shape, single)
    signs = rng.choice((-1.0, 1.0), size=len(x))
    axes = _rotation_axes(rng, len(x), ndim, about)
    if s == 0.0:
        return _finish(x.copy(), single), None if y is None else (y[0] if single else y).copy()
    out_x, out_y = np.empty_like(x), None if y is None else np.empty_like(y)
    for b, sign in enumerate(signs):
        coords = _rotation_source(x.shape[1:], math.radians(sign * s * MAX_ROTATION_DEG), axes[b])
        out_x[b] = _sample_linear(x[b], coords)
        if y is not None:
            out_y[b] = _sample_nearest(y[b], coords)
    return _finish(out_x, single), None if out_y is None else (out_y[0] if single else out_y)


def translation(image: Image, severity: float, rng: np.random.Generator, *, ndim: int = 2) -> Image:
    """Image-only :func:`translation_with_label`."""
    return translation_with_label(image, None, severity, rng, ndim=ndim)[0]


def rotation(image: Image, severity: float, rng: np.random.Generator, *, ndim: int = 2, about: Sequence[float] | None = None) -> Image:
    """Image-only :func:`rotation_with_label`."""
    return rotation_with_label(image, None, severity, rng, ndim=ndim, about=about)[0]


# ----------------------------------------------------------------------------- resolution


def _size_nd(size: int | Sequence[int], ndim: int) -> tuple[int, ...]:
    if isinstance(size, (int, np.integer)):
        return (int(size),) * ndim
    out = tuple(int(n) for n in size)
    if len(out) != ndim:
        raise ValueError(f"size {tuple(size)} must have {ndim} entries (one per spatial axis)")
    return out


def resize_image(image: Image, size: int | Sequence[int], *, ndim: int = 2) -> Image:
    """Separable linear resize (anti-aliased when shrinking) of ``S`` / ``(B, *S)`` to ``size``
    (an int: every side; else one entry per spatial axis)."""
    x, single = _as_batch(image, ndim)
    sz = _size_nd(size, ndim)
    if ndim == 2:
        h, w = sz
        out = linear_resize_matrix(x.shape[1], h) @ x.astype(np.float64) @ linear_resize_matrix(x.shape[2], w).T
        return _finish(out, single)
    out = x.astype(np.float64)
    for ax, m in enumerate(sz, start=1):
        out = np.moveaxis(np.tensordot(linear_resize_matrix(out.shape[ax], m), np.moveaxis(out, ax, 0), axes=1), 0, ax)
    return _finish(out, single)


def resize_label(label: np.ndarray, size: int | Sequence[int], batched: bool | None = None, *, ndim: int = 2) -> np.ndarray:
    """Nearest-neighbour resize of a label (or a hard prediction).

    ``label``: ``S``, ``(B, *S)`` or ``(B, *S, C)`` (``S`` of rank ``ndim``); an array of rank
    ``ndim + 1`` is read as a batch unless ``batched=False`` (then ``(*S, C)``).
    """
    y = np.asarray(label)
    if batched is None:
        batched = y.ndim >= ndim + 1
    if not batched:
        y = y[None]
    out = y
    for ax, m in enumerate(_size_nd(size, ndim), start=1):
        n = y.shape[ax]
        out = np.take(out, np.minimum((np.arange(m) + 0.5) * n / m, n - 1).astype(np.int64), axis=ax)
    return out if batched else out[0]


def rescale(
    image: Image, label: np.ndarray | None, size: int | Sequence[int], *, ndim: int = 2
) -> tuple[Image, np.ndarray | None]:
    """Resample image (linear) and label (nearest) to ``size`` (e.g. one of :data:`SCALE_SIZES`;
    3D: a grid of :func:`scaled_grid`).

    The NCA's rule is resolution-agnostic, so it can be evaluated on the rescaled slice directly;
    a fixed-size model is evaluated the same way or on ``resize_image`` back to its size.
    """
    x, single = _as_batch(image, ndim)
    out_x = resize_image(x, size, ndim=ndim)
    if label is None:
        return _finish(out_x, single), None
    y = _label_batch(label, x.shape, single)
    out_y = resize_label(y, size, batched=True, ndim=ndim)
    return _finish(out_x, single), out_y[0] if single else out_y


def scaled_grid(grid: Sequence[int], factor: float, multiple: int = 1) -> tuple[int, ...]:
    """``grid`` times ``factor``, each side rounded to the nearest multiple of ``multiple``
    (at least ``multiple``): the 3D ``"scale"`` grids (:data:`SCALE_FACTORS_3D`)."""
    m = max(1, int(multiple))
    return tuple(max(m, int(round(float(factor) * int(n) / m)) * m) for n in grid)


# ----------------------------------------------------------------------------- intensity


def gaussian_noise(image: Image, severity: float, rng: np.random.Generator, *, ndim: int = 2) -> Image:
    """Additive white Gaussian noise, std ``0.2·s`` (a fifth of the intensity range at s = 1),
    independent per voxel. ``image``: ``S`` or ``(B, *S)``, ``S`` of rank ``ndim``."""
    s = _check_severity(severity)
    x, single = _as_batch(image, ndim)
    noise = rng.standard_normal(x.shape)
    return _finish(x + s * MAX_NOISE_STD * noise, single)


def rician_noise(image: Image, severity: float, rng: np.random.Generator, *, ndim: int = 2) -> Image:
    """Rician noise of magnitude MRI: ``|x + n₁ + i·n₂|``, ``n₁, n₂ ~ N(0, σ²)``, ``σ = 0.2·s``.

    Non-negative; on a zero image the mean is ``σ·sqrt(π/2)`` (Rayleigh), on bright regions
    it tends to Gaussian noise with a small upward bias ``σ²/(2x)``. Any spatial rank ``ndim``.
    """
    s = _check_severity(severity)
    x, single = _as_batch(image, ndim)
    n = rng.standard_normal((2,) + x.shape)
    if s == 0.0:
        return _finish(x.copy(), single)
    sigma = s * MAX_NOISE_STD
    return _finish(np.hypot(x + sigma * n[0], sigma * n[1]), single)


def _bias_exponents(ndim: int) -> list[tuple[int, ...]]:
    """Exponents of the monomials of total degree ``1 … BIAS_ORDER`` in ``ndim`` variables,
    in lexicographic order (2D: ``y^i x^j``, ``i`` outer)."""
    return [e for e in itertools.product(range(BIAS_ORDER + 1), repeat=ndim) if 0 < sum(e) <= BIAS_ORDER]


def _bias_polynomial(shape: Sequence[int], coeffs: np.ndarray) -> np.ndarray:
    """Σ c_e Π_i t_i^e_i over the monomials of :func:`_bias_exponents` (``t_i`` in [-1, 1]
    along axis ``i``), scaled to max |q| = 1."""
    shape = tuple(int(n) for n in shape)
    grids = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    q = np.zeros(shape)
    for c, e in zip(coeffs, _bias_exponents(len(shape))):  # no constant: it would only rescale
        t = c
        for g, p in zip(grids, e):
            t = t * g**p
        q += t
    m = np.abs(q).max()
    return q / m if m > 0 else q


_N_BIAS_TERMS = (BIAS_ORDER + 1) * (BIAS_ORDER + 2) // 2 - 1  # 2D; any rank: len(_bias_exponents(ndim))


def bias_field(image: Image, severity: float, rng: np.random.Generator, *, ndim: int = 2) -> Image:
    """Smooth multiplicative intensity inhomogeneity (coil sensitivity).

    ``x · exp(s·ln2·q)`` with ``q`` a random polynomial of degree ≤ 3 in the ``ndim`` spatial
    coordinates (each in [-1, 1]; coefficients U(-1, 1), no constant term; 9 terms in 2D, 19
    in 3D) normalised to ``max |q| = 1``: at ``s = 1`` the field lies in ``[1/2, 2]`` and
    reaches one of the bounds.
    """
    s = _check_severity(severity)
    x, single = _as_batch(image, ndim)
    coeffs = rng.uniform(-1.0, 1.0, size=(len(x), len(_bias_exponents(ndim))))
    out = np.empty_like(x)
    for b in range(len(x)):
        out[b] = x[b] * np.exp(s * MAX_LOG_BIAS * _bias_polynomial(x.shape[1:], coeffs[b]))
    return _finish(out, single)


def ghosting(
    image: Image, severity: float, rng: np.random.Generator, *, axis: int | None = None, n_ghosts: int = N_GHOSTS,
    ndim: int = 2,
) -> Image:
    """Ghosting: periodic k-space line errors along the phase-encode axis (magnitude output).

    Every ``n_ghosts``-th line (3D: plane) of the (unshifted) k-space (``np.fft.fftn`` over the
    spatial axes) along ``axis`` (0: rows, 1: columns, 2: slices; None: random per image) is
    multiplied by ``1 − s``, except the DC line (kept, as torchio's "restore" of the k-space
    centre does, so the mean intensity is unchanged). In image space that subtracts
    ``s / n_ghosts`` times the mean-free replicas shifted by multiples of ``N / n_ghosts``
    along the axis; the magnitude of the result is returned (ghosts over dark background are
    positive). At ``s = 1`` (every 4th line lost) the ghosts have a quarter of the object's
    contrast.
    """
    s = _check_severity(severity)
    x, single = _as_batch(image, ndim)
    axes = rng.integers(0, ndim, size=len(x)) if axis is None else np.full(len(x), int(axis))
    if s == 0.0:
        return _finish(x.copy(), single)
    out = np.empty_like(x)
    for b, ax in enumerate(axes):
        k = np.fft.fftn(x[b])
        n = k.shape[ax]
        idx = np.arange(n)
        mod = np.where((idx % n_ghosts == 0) & (idx != 0), 1.0 - s, 1.0)
        k = k * _along(mod, int(ax), ndim)
        out[b] = np.abs(np.fft.ifftn(k))
    return _finish(out, single)


def spike_location(shape: Sequence[int], rng: np.random.Generator) -> tuple[int, ...]:
    """A random k-space index (one entry per axis, FFT order) at least 2 lines from DC on one
    axis and not its own conjugate (so the spike and its mirror are two distinct locations)."""
    while True:
        ks = [int(rng.integers(-(n // 2) + 1, (n + 1) // 2)) for n in shape]
        if max(abs(k) for k in ks) >= 2:
            return tuple(k % n for k, n in zip(ks, shape))


def spike(image: Image, severity: float, rng: np.random.Generator, *, ndim: int = 2) -> Image:
    """A k-space spike (herringbone artefact): energy added at one k-space location and its
    conjugate mirror, which keeps the image real.

    In image space: ``+ 0.25·s·cos(2π Σ_i k_i·r_i/N_i + φ)`` plane-wave stripes, random
    frequency ``k`` (:func:`spike_location`) and phase φ. Any spatial rank ``ndim``.
    """
    s = _check_severity(severity)
    x, single = _as_batch(image, ndim)
    shape = x.shape[1:]
    locs = [spike_location(shape, rng) for _ in range(len(x))]
    phases = rng.uniform(0.0, 2 * math.pi, size=len(x))
    if s == 0.0:
        return _finish(x.copy(), single)
    out = np.empty_like(x)
    amp = s * MAX_SPIKE_AMPLITUDE  # FFT scale: a cosine of amplitude a has peaks a·(Π N_i)/2
    for n in shape:
        amp = amp * n
    amp = amp / 2.0
    for b, (loc, phi) in enumerate(zip(locs, phases)):
        k = np.fft.fftn(x[b])
        k[loc] += amp * np.exp(1j * phi)
        k[tuple((-i) % n for i, n in zip(loc, shape))] += amp * np.exp(-1j * phi)
        out[b] = np.fft.ifftn(k).real
    return _finish(out, single)


def motion(
    image: Image, severity: float, rng: np.random.Generator, *, axis: int | None = None, ndim: int = 2,
    about: Sequence[float] | None = None,
) -> Image:
    """Rigid motion during acquisition: later phase-encode lines come from a moved copy.

    Lines (3D: planes) are acquired along ``axis`` (an axis index; None: random) from the most
    negative to the most positive frequency; after a random 60–90 % of them the subject has
    moved by ``0.1·s·N_i·u_i`` voxels along each axis ``i`` (``u`` a random unit direction;
    sub-pixel, applied as a k-space phase ramp) and rotated by ``±10°·s`` (3D: about ``about``
    or a random axis through the centre, as in :func:`rotation_with_label`). Magnitude image
    out. Total energy is preserved up to the rotation's interpolation (the shift only changes
    k-space phases). 2D and 3D (``ndim``).
    """
    s = _check_severity(severity)
    x, single = _as_batch(image, ndim)
    B, shape = len(x), x.shape[1:]
    axes = rng.integers(0, ndim, size=B) if axis is None else np.full(B, int(axis))
    moved_fraction = rng.uniform(*MOTION_MOVED_FRACTION, size=B)
    direction = _directions(rng, B, ndim)
    signs = rng.choice((-1.0, 1.0), size=B)
    rot_axes = _rotation_axes(rng, B, ndim, about)
    if s == 0.0:
        return _finish(x.copy(), single)
    freq = [_along(np.fft.fftfreq(n), i, ndim) for i, n in enumerate(shape)]
    out = np.empty_like(x)
    for b in range(B):
        coords = _rotation_source(shape, math.radians(signs[b] * s * MAX_MOTION_ROTATION_DEG), rot_axes[b])
        moved = _sample_linear(x[b], coords)
        d = [s * MAX_MOTION_SHIFT_FRACTION * n * float(direction[b, i]) for i, n in enumerate(shape)]
        ramp = freq[0] * d[0]
        for f, di in zip(freq[1:], d[1:]):
            ramp = ramp + f * di
        k_moved = np.fft.fftn(moved) * np.exp(-2j * math.pi * ramp)
        k = np.fft.fftn(x[b])
        ax = int(axes[b])
        freqs = np.fft.fftfreq(shape[ax])
        n = len(freqs)
        # acquisition order = ascending frequency; the last `moved_fraction` of lines moved
        late = np.argsort(np.argsort(freqs, kind="stable"), kind="stable") >= n - round(moved_fraction[b] * n)
        out[b] = np.abs(np.fft.ifftn(np.where(_along(late, ax, ndim), k_moved, k)))
    return _finish(out, single)


def _gaussian_kernel(sigma: float) -> np.ndarray:
    r = max(1, int(math.ceil(3 * sigma)))
    t = np.arange(-r, r + 1, dtype=np.float64)
    k = np.exp(-0.5 * (t / sigma) ** 2)
    return k / k.sum()


def _convolve_axis(x: np.ndarray, k: np.ndarray, axis: int) -> np.ndarray:
    r = len(k) // 2
    pad = [(0, 0)] * x.ndim
    pad[axis] = (r, r)
    xp = np.pad(x, pad, mode="reflect" if x.shape[axis] > r else "edge")
    n = x.shape[axis]
    return sum(k[i] * np.take(xp, np.arange(i, i + n), axis=axis) for i in range(len(k)))


def blur(image: Image, severity: float, rng: np.random.Generator, *, ndim: int = 2) -> Image:
    """Gaussian blur (reflect padding), ``σ = 2·s`` voxels along every spatial axis
    (separable); deterministic (``rng`` unused)."""
    s = _check_severity(severity)
    x, single = _as_batch(image, ndim)
    sigma = s * MAX_BLUR_SIGMA
    if sigma < 1e-3:
        return _finish(x.copy(), single)
    k = _gaussian_kernel(sigma)
    out = x.astype(np.float64)
    for ax in range(1, ndim + 1):
        out = _convolve_axis(out, k, ax)
    return _finish(out, single)


def gamma(image: Image, severity: float, rng: np.random.Generator, *, ndim: int = 2) -> Image:
    """Gamma (contrast) change ``x ** γ``, ``γ = 2**(±s)`` (random sign per image).

    γ > 1 darkens mid-tones, γ < 1 brightens them; strictly increasing on ``[0, 1]``. The input
    is clipped to ``[0, 1]`` first (``x ** γ`` of a negative value is undefined).
    """
    s = _check_severity(severity)
    x, single = _as_batch(image, ndim)
    signs = rng.choice((-1.0, 1.0), size=len(x))
    if s == 0.0:
        return _finish(x.copy(), single)
    g = (2.0 ** (signs * s * MAX_LOG2_GAMMA)).reshape((-1,) + (1,) * ndim)
    return _finish(np.clip(x, 0.0, 1.0) ** g, single)


# ----------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class Perturbation:
    """One registered perturbation.

    ``fn(image, severity, rng, *, ndim=2) -> image``; for geometric ones ``pair_fn(image,
    label, severity, rng, *, ndim=2) -> (image, label)`` applies the identical transform to
    the label. ``ndim``: the spatial rank (2: ``(H, W)`` slices, 3: ``(X, Y, Z)`` volumes).
    """

    name: str
    kind: str  # "geometric" (moves the label too) or "intensity" (label unchanged)
    fn: Callable[..., Image]
    scale: str  # what severity 1 means
    severities: tuple[float, ...] = DEFAULT_SEVERITIES
    pair_fn: Callable[..., tuple[Image, np.ndarray | None]] | None = field(default=None, repr=False)


PERTURBATIONS: dict[str, Perturbation] = {
    p.name: p
    for p in (
        Perturbation("translation", "geometric", translation, "shift by a quarter of the image", pair_fn=translation_with_label),
        Perturbation("rotation", "geometric", rotation, "rotation by ±45°", pair_fn=rotation_with_label),
        Perturbation("gaussian_noise", "intensity", gaussian_noise, "additive noise, std 0.2"),
        Perturbation("rician_noise", "intensity", rician_noise, "Rician noise, σ 0.2"),
        Perturbation("bias_field", "intensity", bias_field, "multiplicative field within [1/2, 2]"),
        Perturbation("ghosting", "intensity", ghosting, "every 4th k-space line lost: ghosts of 1/4 intensity"),
        Perturbation("spike", "intensity", spike, "k-space spike: stripes of amplitude 0.25"),
        Perturbation("motion", "intensity", motion, "10–40 % of k-space from a copy moved 10 % of the FOV and 10°"),
        Perturbation("blur", "intensity", blur, "Gaussian blur, σ 2 px"),
        Perturbation("gamma", "intensity", gamma, "gamma 1/2 or 2"),
    )
}


def get_perturbation(name: str) -> Perturbation:
    """The registered perturbation ``name``; ``ValueError`` listing the valid names otherwise."""
    try:
        return PERTURBATIONS[name]
    except KeyError:
        raise ValueError(f"unknown perturbation {name!r}; valid choices: {', '.join(PERTURBATIONS)}") from None


def apply_perturbation(
    name: str,
    images: Image,
    labels: np.ndarray | None,
    severity: float,
    seed: int,
    *,
    clip: bool = True,
    ndim: int = 2,
) -> tuple[Image, np.ndarray | None]:
    """Apply perturbation ``name`` at ``severity`` with a fresh ``default_rng(seed)``.

    Args:
        images: ``S`` or ``(B, *S)`` in ``[0, 1]``, ``S`` the spatial shape of rank ``ndim``:
            ``(H, W)`` / ``(B, H, W)`` slices (``ndim = 2``) or ``(X, Y, Z)`` /
            ``(B, X, Y, Z)`` volumes (``ndim = 3``). The rank is explicit because a batch of
            slices and one volume both have three axes.
        labels: matching ``S[+C]`` / ``(B, *S[, C])`` array or None; geometric
            perturbations move it with the image (nearest neighbour), intensity ones return it
            unchanged.
        severity: in ``[0, 1]``; 0 returns copies of the inputs.
        seed: same seed, same result.
        clip: clip the perturbed images to ``[0, 1]`` (the preprocessed range).
        ndim: the spatial rank of ``images`` (2 or 3; rotation and motion need one of these,
            the others take any rank).

    Raises:
        ValueError: unknown name (the message lists the valid ones) or severity outside [0, 1].
    """
    p = get_perturbation(name)
    s = _check_severity(severity)
    rng = np.random.default_rng(seed)
    if p.pair_fn is not None:
        out, out_labels = p.pair_fn(images, labels, s, rng, ndim=ndim)
    else:
        out = p.fn(images, s, rng, ndim=ndim)
        out_labels = None if labels is None else np.array(labels, copy=True)
    if clip:
        out = np.clip(out, 0.0, 1.0)
    return out, out_labels


def check_severities(severities: Sequence[float]) -> tuple[float, ...]:
    """Validate a list of severities (e.g. from ``--severities``); ValueError if any is outside [0, 1]."""
    bad = [s for s in severities if not (0.0 <= float(s) <= 1.0)]
    if bad:
        raise ValueError(f"severities must lie in [0, 1] (0 = identity, 1 = strongest), got {bad}")
    return tuple(float(s) for s in severities)
