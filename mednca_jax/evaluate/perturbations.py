"""Test-time perturbations for the robustness suite: geometric shifts and MRI artefacts (NumPy).

Every perturbation is a function ``fn(image, severity, rng) -> image`` where

* ``image`` is ``(H, W)`` or ``(B, H, W)`` float32, intensities in ``[0, 1]`` (the range of the
  preprocessed slices, docs/design.md, "Preprocessing");
* ``severity`` is a float in ``[0, 1]``: 0 returns the image unchanged, 1 is the strongest
  setting, documented below in physical terms (intensity unit = the ``[0, 1]`` range);
* ``rng`` is a ``numpy.random.Generator``; each image of a batch gets its own random draws.
  The random numbers drawn do not depend on ``severity``, so one seed gives the same direction
  / noise pattern / field at every severity, only scaled (smooth Dice-vs-severity curves).

The functions do not clip; :func:`apply_perturbation` (what evaluation uses) clips the result
to ``[0, 1]`` like the preprocessing's final percentile clip, so models see inputs in their
trained range.

Severity scales (``s`` = severity, ``N`` = image side in pixels):

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

Geometric perturbations move the label with the image (nearest neighbour); see
:func:`translation_with_label`, :func:`rotation_with_label`. Resolution changes (the NCA's
scale claim) are not a severity but an image size: :data:`SCALE_SIZES` and :func:`rescale`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from mednca_jax.data.preprocess import linear_resize_matrix

DEFAULT_SEVERITIES: tuple[float, ...] = (0.25, 0.5, 0.75, 1.0)
SCALE_SIZES: tuple[int, ...] = (48, 64, 96, 128)

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


def _as_batch(image: np.ndarray) -> tuple[np.ndarray, bool]:
    """``(B, H, W)`` float32 view and whether the input was a single ``(H, W)`` image."""
    x = np.asarray(image, dtype=np.float32)
    if x.ndim == 2:
        return x[None], True
    if x.ndim == 3:
        return x, False
    raise ValueError(f"image must be (H, W) or (B, H, W), got shape {x.shape}")


def _label_batch(label: np.ndarray, batch_shape: tuple[int, ...], single: bool) -> np.ndarray:
    """Labels as ``(B, H, W, ...)``: same spatial shape as the image, optional trailing axes."""
    y = np.asarray(label)
    if single:
        y = y[None]
    if y.shape[:3] != batch_shape:
        raise ValueError(f"label shape {np.shape(label)} does not match image shape {batch_shape[1 if single else 0:]}")
    return y


def _centre(h: int, w: int) -> tuple[float, float]:
    return (h - 1) / 2.0, (w - 1) / 2.0


def _grid(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    return np.meshgrid(np.arange(h, dtype=np.float64), np.arange(w, dtype=np.float64), indexing="ij")


def _sample_bilinear(img: np.ndarray, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
    """``img (H, W)`` at fractional pixel coordinates; zero outside the image."""
    h, w = img.shape
    y0, x0 = np.floor(ys).astype(np.int64), np.floor(xs).astype(np.int64)
    fy, fx = ys - y0, xs - x0
    out = np.zeros(ys.shape, np.float64)
    for dy, wy in ((0, 1 - fy), (1, fy)):
        for dx, wx in ((0, 1 - fx), (1, fx)):
            yy, xx = y0 + dy, x0 + dx
            ok = (yy >= 0) & (yy < h) & (xx >= 0) & (xx < w)
            out += np.where(ok, img[np.clip(yy, 0, h - 1), np.clip(xx, 0, w - 1)], 0.0) * wy * wx
    return out


def _sample_nearest(arr: np.ndarray, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
    """``arr (H, W, ...)`` at the nearest pixel of each coordinate; zero outside."""
    h, w = arr.shape[:2]
    yy, xx = np.rint(ys).astype(np.int64), np.rint(xs).astype(np.int64)
    ok = (yy >= 0) & (yy < h) & (xx >= 0) & (xx < w)
    out = arr[np.clip(yy, 0, h - 1), np.clip(xx, 0, w - 1)]
    ok = ok.reshape(ok.shape + (1,) * (arr.ndim - 2))
    return np.where(ok, out, np.zeros_like(out))


def _rotation_source(h: int, w: int, angle_rad: float) -> tuple[np.ndarray, np.ndarray]:
    """Source coordinates of every output pixel for a rotation by ``angle`` about the centre."""
    cy, cx = _centre(h, w)
    yy, xx = _grid(h, w)
    c, s = math.cos(angle_rad), math.sin(angle_rad)
    # inverse map: rotate output coordinates back by -angle
    ys = cy + c * (yy - cy) - s * (xx - cx)
    xs = cx + s * (yy - cy) + c * (xx - cx)
    return ys, xs


def _shift_zero(arr: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """Integer shift of ``arr (H, W, ...)`` (content moves by +dy rows, +dx cols), zero fill."""
    h, w = arr.shape[:2]
    out = np.zeros_like(arr)
    if abs(dy) >= h or abs(dx) >= w:
        return out
    out[max(dy, 0) : h + min(dy, 0), max(dx, 0) : w + min(dx, 0)] = arr[
        max(-dy, 0) : h + min(-dy, 0), max(-dx, 0) : w + min(-dx, 0)
    ]
    return out


def _finish(x: np.ndarray, single: bool) -> np.ndarray:
    x = x.astype(np.float32, copy=False)
    return x[0] if single else x


# ----------------------------------------------------------------------------- geometric


def translation_with_label(
    image: Image, label: np.ndarray | None, severity: float, rng: np.random.Generator
) -> tuple[Image, np.ndarray | None]:
    """Shift image and label by the same integer offset, zero padding.

    Severity ``s``: displacement ``0.25·s·H`` rows and ``0.25·s·W`` columns along a random
    direction (unit vector), i.e. a quarter of the field of view at ``s = 1``.
    ``label``: ``(H, W[, C])`` / ``(B, H, W[, C])`` matching ``image``, or None.
    """
    s = _check_severity(severity)
    x, single = _as_batch(image)
    y = None if label is None else _label_batch(label, x.shape, single)
    theta = rng.uniform(0.0, 2 * math.pi, size=len(x))
    out_x, out_y = x.copy(), None if y is None else y.copy()
    h, w = x.shape[1:]
    for b, t in enumerate(theta):
        dy = int(round(s * MAX_SHIFT_FRACTION * h * math.sin(t)))
        dx = int(round(s * MAX_SHIFT_FRACTION * w * math.cos(t)))
        out_x[b] = _shift_zero(x[b], dy, dx)
        if y is not None:
            out_y[b] = _shift_zero(y[b], dy, dx)
    return _finish(out_x, single), None if out_y is None else (out_y[0] if single else out_y)


def rotation_with_label(
    image: Image, label: np.ndarray | None, severity: float, rng: np.random.Generator
) -> tuple[Image, np.ndarray | None]:
    """Rotate image (bilinear) and label (nearest) about the image centre by the same angle.

    Severity ``s``: angle ``±45°·s`` with a random sign; pixels from outside are zero.
    """
    s = _check_severity(severity)
    x, single = _as_batch(image)
    y = None if label is None else _label_batch(label, x.shape, single)
    signs = rng.choice((-1.0, 1.0), size=len(x))
    if s == 0.0:
        return _finish(x.copy(), single), None if y is None else (y[0] if single else y).copy()
    out_x, out_y = np.empty_like(x), None if y is None else np.empty_like(y)
    for b, sign in enumerate(signs):
        ys, xs = _rotation_source(*x.shape[1:], math.radians(sign * s * MAX_ROTATION_DEG))
        out_x[b] = _sample_bilinear(x[b], ys, xs)
        if y is not None:
            out_y[b] = _sample_nearest(y[b], ys, xs)
    return _finish(out_x, single), None if out_y is None else (out_y[0] if single else out_y)


def translation(image: Image, severity: float, rng: np.random.Generator) -> Image:
    """Image-only :func:`translation_with_label`."""
    return translation_with_label(image, None, severity, rng)[0]


def rotation(image: Image, severity: float, rng: np.random.Generator) -> Image:
    """Image-only :func:`rotation_with_label`."""
    return rotation_with_label(image, None, severity, rng)[0]


# ----------------------------------------------------------------------------- resolution


def _size2(size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(size, (int, np.integer)):
        return int(size), int(size)
    h, w = size
    return int(h), int(w)


def resize_image(image: Image, size: int | Sequence[int]) -> Image:
    """Bilinear resize (anti-aliased when shrinking) of ``(H, W)`` / ``(B, H, W)`` to ``size``."""
    x, single = _as_batch(image)
    h, w = _size2(size)
    out = linear_resize_matrix(x.shape[1], h) @ x.astype(np.float64) @ linear_resize_matrix(x.shape[2], w).T
    return _finish(out, single)


def resize_label(label: np.ndarray, size: int | Sequence[int], batched: bool | None = None) -> np.ndarray:
    """Nearest-neighbour resize of a label (or a hard prediction).

    ``label``: ``(H, W)``, ``(B, H, W)`` or ``(B, H, W, C)``; a 3-D array is read as a batch
    unless ``batched=False`` (then ``(H, W, C)``).
    """
    y = np.asarray(label)
    if batched is None:
        batched = y.ndim >= 3
    if not batched:
        y = y[None]
    h, w = _size2(size)
    rows = np.minimum((np.arange(h) + 0.5) * y.shape[1] / h, y.shape[1] - 1).astype(np.int64)
    cols = np.minimum((np.arange(w) + 0.5) * y.shape[2] / w, y.shape[2] - 1).astype(np.int64)
    out = y[:, rows][:, :, cols]
    return out if batched else out[0]


def rescale(image: Image, label: np.ndarray | None, size: int | Sequence[int]) -> tuple[Image, np.ndarray | None]:
    """Resample image (bilinear) and label (nearest) to ``size`` (e.g. one of :data:`SCALE_SIZES`).

    The NCA's rule is resolution-agnostic, so it can be evaluated on the rescaled slice directly;
    a fixed-size model is evaluated the same way or on ``resize_image`` back to its size.
    """
    x, single = _as_batch(image)
    out_x = resize_image(x, size)
    if label is None:
        return _finish(out_x, single), None
    y = _label_batch(label, x.shape, single)
    out_y = resize_label(y, size, batched=True)
    return _finish(out_x, single), out_y[0] if single else out_y


# ----------------------------------------------------------------------------- intensity


def gaussian_noise(image: Image, severity: float, rng: np.random.Generator) -> Image:
    """Additive white Gaussian noise, std ``0.2·s`` (a fifth of the intensity range at s = 1)."""
    s = _check_severity(severity)
    x, single = _as_batch(image)
    noise = rng.standard_normal(x.shape)
    return _finish(x + s * MAX_NOISE_STD * noise, single)


def rician_noise(image: Image, severity: float, rng: np.random.Generator) -> Image:
    """Rician noise of magnitude MRI: ``|x + n₁ + i·n₂|``, ``n₁, n₂ ~ N(0, σ²)``, ``σ = 0.2·s``.

    Non-negative; on a zero image the mean is ``σ·sqrt(π/2)`` (Rayleigh), on bright regions
    it tends to Gaussian noise with a small upward bias ``σ²/(2x)``.
    """
    s = _check_severity(severity)
    x, single = _as_batch(image)
    n = rng.standard_normal((2,) + x.shape)
    if s == 0.0:
        return _finish(x.copy(), single)
    sigma = s * MAX_NOISE_STD
    return _finish(np.hypot(x + sigma * n[0], sigma * n[1]), single)


def _bias_polynomial(h: int, w: int, coeffs: np.ndarray) -> np.ndarray:
    """Σ c_ij y^i x^j over 1 ≤ i+j ≤ BIAS_ORDER on [-1, 1]², scaled to max |q| = 1."""
    yy, xx = np.meshgrid(np.linspace(-1, 1, h), np.linspace(-1, 1, w), indexing="ij")
    q = np.zeros((h, w))
    k = 0
    for i in range(BIAS_ORDER + 1):
        for j in range(BIAS_ORDER + 1 - i):
            if i + j == 0:
                continue  # a constant would only rescale the image
            q += coeffs[k] * yy**i * xx**j
            k += 1
    m = np.abs(q).max()
    return q / m if m > 0 else q


_N_BIAS_TERMS = (BIAS_ORDER + 1) * (BIAS_ORDER + 2) // 2 - 1


def bias_field(image: Image, severity: float, rng: np.random.Generator) -> Image:
    """Smooth multiplicative intensity inhomogeneity (coil sensitivity).

    ``x · exp(s·ln2·q(y, x))`` with ``q`` a random polynomial of degree ≤ 3 (coefficients
    U(-1, 1), no constant term) normalised to ``max |q| = 1``: at ``s = 1`` the field lies in
    ``[1/2, 2]`` and reaches one of the bounds.
    """
    s = _check_severity(severity)
    x, single = _as_batch(image)
    coeffs = rng.uniform(-1.0, 1.0, size=(len(x), _N_BIAS_TERMS))
    out = np.empty_like(x)
    for b in range(len(x)):
        out[b] = x[b] * np.exp(s * MAX_LOG_BIAS * _bias_polynomial(*x.shape[1:], coeffs[b]))
    return _finish(out, single)


def ghosting(
    image: Image, severity: float, rng: np.random.Generator, *, axis: int | None = None, n_ghosts: int = N_GHOSTS
) -> Image:
    """Ghosting: periodic k-space line errors along the phase-encode axis (magnitude output).

    Every ``n_ghosts``-th line of the (unshifted) k-space along ``axis`` (0: rows, 1: columns;
    None: random per image) is multiplied by ``1 − s``, except the DC line (kept, as torchio's
    "restore" of the k-space centre does, so the mean intensity is unchanged). In image space
    that subtracts ``s / n_ghosts`` times the mean-free replicas shifted by multiples of
    ``N / n_ghosts`` along the axis; the magnitude of the result is returned (ghosts over dark
    background are positive). At ``s = 1`` (every 4th line lost) the ghosts have a quarter of
    the object's contrast.
    """
    s = _check_severity(severity)
    x, single = _as_batch(image)
    axes = rng.integers(0, 2, size=len(x)) if axis is None else np.full(len(x), int(axis))
    if s == 0.0:
        return _finish(x.copy(), single)
    out = np.empty_like(x)
    for b, ax in enumerate(axes):
        k = np.fft.fft2(x[b])
        n = k.shape[ax]
        idx = np.arange(n)
        mod = np.where((idx % n_ghosts == 0) & (idx != 0), 1.0 - s, 1.0)
        k = k * (mod[:, None] if ax == 0 else mod[None, :])
        out[b] = np.abs(np.fft.ifft2(k))
    return _finish(out, single)


def spike_location(shape: tuple[int, int], rng: np.random.Generator) -> tuple[int, int]:
    """A random k-space index ``(ky, kx)`` (FFT order) at least 2 lines from DC on one axis and
    not its own conjugate (so the spike and its mirror are two distinct locations)."""
    h, w = shape
    while True:
        ky = int(rng.integers(-(h // 2) + 1, (h + 1) // 2))
        kx = int(rng.integers(-(w // 2) + 1, (w + 1) // 2))
        if max(abs(ky), abs(kx)) >= 2:
            return ky % h, kx % w


def spike(image: Image, severity: float, rng: np.random.Generator) -> Image:
    """A k-space spike (herringbone artefact): energy added at one k-space location and its
    conjugate mirror, which keeps the image real.

    In image space: ``+ 0.25·s·cos(2π(ky·y/H + kx·x/W) + φ)`` stripes, random frequency
    (:func:`spike_location`) and phase φ.
    """
    s = _check_severity(severity)
    x, single = _as_batch(image)
    h, w = x.shape[1:]
    locs = [spike_location((h, w), rng) for _ in range(len(x))]
    phases = rng.uniform(0.0, 2 * math.pi, size=len(x))
    if s == 0.0:
        return _finish(x.copy(), single)
    out = np.empty_like(x)
    amp = s * MAX_SPIKE_AMPLITUDE * h * w / 2.0  # FFT scale: a cosine of amplitude a has peaks a·HW/2
    for b, ((ky, kx), phi) in enumerate(zip(locs, phases)):
        k = np.fft.fft2(x[b])
        k[ky, kx] += amp * np.exp(1j * phi)
        k[(-ky) % h, (-kx) % w] += amp * np.exp(-1j * phi)
        out[b] = np.fft.ifft2(k).real
    return _finish(out, single)


def motion(image: Image, severity: float, rng: np.random.Generator, *, axis: int | None = None) -> Image:
    """Rigid motion during acquisition: later phase-encode lines come from a moved copy.

    Lines are acquired along ``axis`` (0 / 1; None: random) from the most negative to the most
    positive frequency; after a random 60–90 % of them the subject has moved by ``0.1·s·N``
    pixels (random direction; sub-pixel, applied as a k-space phase ramp) and rotated by
    ``±10°·s``. Magnitude image out. Total energy is preserved up to the rotation's
    interpolation (the shift only changes k-space phases).
    """
    s = _check_severity(severity)
    x, single = _as_batch(image)
    B, h, w = x.shape
    axes = rng.integers(0, 2, size=B) if axis is None else np.full(B, int(axis))
    moved_fraction = rng.uniform(*MOTION_MOVED_FRACTION, size=B)
    direction = rng.uniform(0.0, 2 * math.pi, size=B)
    signs = rng.choice((-1.0, 1.0), size=B)
    if s == 0.0:
        return _finish(x.copy(), single)
    fy, fx = np.fft.fftfreq(h)[:, None], np.fft.fftfreq(w)[None, :]
    out = np.empty_like(x)
    for b in range(B):
        ys, xs = _rotation_source(h, w, math.radians(signs[b] * s * MAX_MOTION_ROTATION_DEG))
        moved = _sample_bilinear(x[b], ys, xs)
        dy = s * MAX_MOTION_SHIFT_FRACTION * h * math.sin(direction[b])
        dx = s * MAX_MOTION_SHIFT_FRACTION * w * math.cos(direction[b])
        k_moved = np.fft.fft2(moved) * np.exp(-2j * math.pi * (fy * dy + fx * dx))
        k = np.fft.fft2(x[b])
        freqs = np.fft.fftfreq(h if axes[b] == 0 else w)
        n = len(freqs)
        # acquisition order = ascending frequency; the last `moved_fraction` of lines moved
        late = np.argsort(np.argsort(freqs, kind="stable"), kind="stable") >= n - round(moved_fraction[b] * n)
        late = late[:, None] if axes[b] == 0 else late[None, :]
        out[b] = np.abs(np.fft.ifft2(np.where(late, k_moved, k)))
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


def blur(image: Image, severity: float, rng: np.random.Generator) -> Image:
    """Gaussian blur (reflect padding), ``σ = 2·s`` pixels; deterministic (``rng`` unused)."""
    s = _check_severity(severity)
    x, single = _as_batch(image)
    sigma = s * MAX_BLUR_SIGMA
    if sigma < 1e-3:
        return _finish(x.copy(), single)
    k = _gaussian_kernel(sigma)
    return _finish(_convolve_axis(_convolve_axis(x.astype(np.float64), k, 1), k, 2), single)


def gamma(image: Image, severity: float, rng: np.random.Generator) -> Image:
    """Gamma (contrast) change ``x ** γ``, ``γ = 2**(±s)`` (random sign per image).

    γ > 1 darkens mid-tones, γ < 1 brightens them; strictly increasing on ``[0, 1]``. The input
    is clipped to ``[0, 1]`` first (``x ** γ`` of a negative value is undefined).
    """
    s = _check_severity(severity)
    x, single = _as_batch(image)
    signs = rng.choice((-1.0, 1.0), size=len(x))
    if s == 0.0:
        return _finish(x.copy(), single)
    g = (2.0 ** (signs * s * MAX_LOG2_GAMMA))[:, None, None]
    return _finish(np.clip(x, 0.0, 1.0) ** g, single)


# ----------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class Perturbation:
    """One registered perturbation.

    ``fn(image, severity, rng) -> image``; for geometric ones ``pair_fn(image, label,
    severity, rng) -> (image, label)`` applies the identical transform to the label.
    """

    name: str
    kind: str  # "geometric" (moves the label too) or "intensity" (label unchanged)
    fn: Callable[[Image, float, np.random.Generator], Image]
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
) -> tuple[Image, np.ndarray | None]:
    """Apply perturbation ``name`` at ``severity`` with a fresh ``default_rng(seed)``.

    Args:
        images: ``(H, W)`` or ``(B, H, W)`` in ``[0, 1]``.
        labels: matching ``(H, W[, C])`` / ``(B, H, W[, C])`` array or None; geometric
            perturbations move it with the image (nearest neighbour), intensity ones return it
            unchanged.
        severity: in ``[0, 1]``; 0 returns copies of the inputs.
        seed: same seed, same result.
        clip: clip the perturbed images to ``[0, 1]`` (the preprocessed range).

    Raises:
        ValueError: unknown name (the message lists the valid ones) or severity outside [0, 1].
    """
    p = get_perturbation(name)
    s = _check_severity(severity)
    rng = np.random.default_rng(seed)
    if p.pair_fn is not None:
        out, out_labels = p.pair_fn(images, labels, s, rng)
    else:
        out = p.fn(images, s, rng)
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
