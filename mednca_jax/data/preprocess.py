"""Volume -> 2D slices, exactly as the original Med-NCA (docs/design.md, "Preprocessing").

Per volume: slices along ``slice_axis``; each slice keeps the remaining two axes in array
order as (H, W) -- no transpose (verified against the parity fixture
``hippocampus_374_fire0.npz``: slice ``[:, :, z]`` of the (X, Y, Z) NIfTI array gives H = X,
W = Y; transposing instead gives a mean abs error of 0.25). Each slice is resized to
``image_size`` like OpenCV's ``cv2.resize`` (INTER_CUBIC for images, INTER_NEAREST for labels),
then normalised: min-max to [0, 1], z-normalisation (skipped when the slice sums to 0), and a
rescale to [0, 1] by the 0.5 / 99.5 percentiles with clipping.

The resizes are implemented in NumPy (no OpenCV dependency).
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from mednca_jax.config import LABEL_MODE_ALIASES, LABEL_MODES, DataConfig
from mednca_jax.data.msd import DataError

PREPROCESS_VERSION = "1"  # bump when the output of this module changes: invalidates caches
CUBIC_A = -0.75  # OpenCV's Keys coefficient (PIL and torch use -0.5)


def _keys_cubic(x: np.ndarray, a: float = CUBIC_A) -> np.ndarray:
    """Keys cubic convolution kernel, support [-2, 2]."""
    x = np.abs(x)
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return np.where(x <= 1, near, np.where(x < 2, far, 0.0))


@lru_cache(maxsize=64)
def _cubic_matrix(n_in: int, n_out: int, a: float) -> np.ndarray:
    m = np.zeros((n_out, n_in))
    # OpenCV maps output pixel centres to input: x = (i + 0.5) * n_in / n_out - 0.5, takes the
    # 4 taps floor(x) - 1 .. floor(x) + 2 and replicates the border (clamped indices add up).
    # No antialiasing when shrinking, as OpenCV's INTER_CUBIC.
    x = (np.arange(n_out) + 0.5) * (1.0 / (n_out / n_in)) - 0.5  # OpenCV's scale = 1 / (dst / src)
    x0 = np.floor(x).astype(np.int64)
    t = x - x0
    rows = np.arange(n_out)
    for k in range(-1, 3):
        np.add.at(m, (rows, np.clip(x0 + k, 0, n_in - 1)), _keys_cubic(t - k, a))
    m.setflags(write=False)
    return m


def cubic_resize_matrix(n_in: int, n_out: int, a: float = CUBIC_A) -> np.ndarray:
    """``(n_out, n_in)`` float64 matrix ``M`` with ``resized = M @ signal`` (OpenCV INTER_CUBIC
    for the default ``a``; read-only, cached)."""
    if n_in < 1 or n_out < 1:
        raise ValueError(f"sizes must be >= 1, got {n_in} -> {n_out}")
    return _cubic_matrix(int(n_in), int(n_out), float(a))


def linear_resize_matrix(n_in: int, n_out: int) -> np.ndarray:
    """``(n_out, n_in)`` linear-interpolation matrix ``M`` (``resized = M @ signal``), half-pixel
    centres; when shrinking, the triangle kernel is widened by ``n_in / n_out`` so that every
    input pixel contributes (anti-aliasing, like PIL's BILINEAR and ``jax.image``)."""
    if n_in < 1 or n_out < 1:
        raise ValueError(f"sizes must be >= 1, got {n_in} -> {n_out}")
    scale = n_in / n_out
    support = max(scale, 1.0)
    centres = (np.arange(n_out) + 0.5) * scale - 0.5
    j = np.arange(n_in)
    wts = np.maximum(0.0, 1.0 - np.abs(j[None, :] - centres[:, None]) / support)
    return wts / wts.sum(axis=1, keepdims=True)


def nearest_resize_index(n_in: int, n_out: int) -> np.ndarray:
    """``(n_out,)`` source indices of OpenCV INTER_NEAREST: ``floor(i * n_in / n_out)``.

    (Not the half-pixel rule of INTER_NEAREST_EXACT: that one differs from the fixture label.)
    """
    if n_in < 1 or n_out < 1:
        raise ValueError(f"sizes must be >= 1, got {n_in} -> {n_out}")
    return np.minimum(np.floor(np.arange(n_out) * (1.0 / (n_out / n_in))).astype(np.int64), n_in - 1)


def nearest_inverse_index(n_native: int, n_model: int) -> np.ndarray:
    """``(n_native,)`` model-grid indices that undo :func:`nearest_resize_index`.

    For each native index ``j``, the model pixel whose forward source is nearest to ``j``
    (the first such pixel on ties). When the model grid is at least as large as the native
    one (upsampling), every ``j`` is a forward source, so labels round-trip exactly.
    """
    fwd = nearest_resize_index(n_native, n_model)  # non-decreasing
    j = np.arange(n_native)
    after = np.minimum(np.searchsorted(fwd, j, side="left"), n_model - 1)
    before = np.maximum(after - 1, 0)
    use_before = np.abs(fwd[before] - j) < np.abs(fwd[after] - j)
    return np.where(use_before, before, after)


def resize_bicubic(slices: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize ``(S, h, w)`` -> ``(S, H, W)`` float64, like ``cv2.resize(..., INTER_CUBIC)``."""
    s = np.asarray(slices, dtype=np.float64)
    a = cubic_resize_matrix(s.shape[1], size[0])
    b = cubic_resize_matrix(s.shape[2], size[1])
    return np.einsum("Hh,shw,Ww->sHW", a, s, b, optimize=True)


def resize_nearest(slices: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize ``(S, h, w, ...)`` -> ``(S, H, W, ...)``, like ``cv2.resize(..., INTER_NEAREST)``; dtype kept."""
    s = np.asarray(slices)
    return s[:, nearest_resize_index(s.shape[1], size[0])][:, :, nearest_resize_index(s.shape[2], size[1])]


def to_slices(volume: np.ndarray, axis: int) -> np.ndarray:
    """``(X, Y, Z, ...)`` -> ``(S, H, W, ...)``: slice ``axis`` first, the other two in order."""
    return np.moveaxis(np.asarray(volume), axis, 0)


def normalize_slices(slices: np.ndarray) -> np.ndarray:
    """Per-slice intensity normalisation of ``(S, H, W)`` -> ``(S, H, W)`` float32 in [0, 1].

    min-max to [0, 1]; z-normalisation unless the slice sums to 0; rescale by the 0.5 and
    99.5 percentiles, clipped. Where the original divides by zero (a constant slice, or
    percentiles that coincide) we return 0 for values <= the low percentile and 1 above,
    never NaN: a constant slice becomes all zeros.
    """
    x = np.asarray(slices, dtype=np.float64)
    flat = x.reshape(x.shape[0], -1)
    lo, hi = flat.min(axis=1, keepdims=True), flat.max(axis=1, keepdims=True)
    rng = hi - lo
    x = (flat - lo) / np.where(rng > 0, rng, 1.0)
    # z-normalisation; mathematically a no-op before the percentile rescale, kept so
    # round-off matches the original.
    sums = x.sum(axis=1, keepdims=True)
    std = x.std(axis=1, keepdims=True)
    do_z = (sums != 0) & (std > 0)
    x = np.where(do_z, (x - x.mean(axis=1, keepdims=True)) / np.where(do_z, std, 1.0), x)
    p_lo, p_hi = np.percentile(x, [0.5, 99.5], axis=1, keepdims=True)
    width = p_hi - p_lo
    out = np.where(width > 0, (x - p_lo) / np.where(width > 0, width, 1.0), (x > p_hi).astype(np.float64))
    return np.clip(out, 0.0, 1.0).astype(np.float32).reshape(x.shape[0], *slices.shape[1:])


def encode_labels(label_slices: np.ndarray, mode: str, n_out: int = 1) -> np.ndarray:
    """Integer ``(S, H, W)`` -> ``(S, H, W, n_out)`` float32 targets.

    ``merge``: one channel, every label > 0 is 1 (the original). ``classes``: channel ``k`` is
    class ``k + 1`` for classes 1..n_out (background has no channel). The names of earlier
    versions (``foreground``, ``multiclass``) are read too.
    :func:`mednca_jax.losses.probabilities_to_labels` is the inverse for predictions.
    """
    lab = np.asarray(label_slices)
    mode = LABEL_MODE_ALIASES.get(mode, mode)
    if mode == "merge":
        if n_out != 1:
            raise DataError(f"data.labels = 'merge' gives one output channel, but model.n_out = {n_out}; "
                            "set model.n_out = 1 or data.labels = 'classes'")
        return (lab > 0).astype(np.float32)[..., None]
    if mode == "classes":
        top = int(lab.max()) if lab.size else 0
        if top > n_out:
            raise DataError(f"label has class {top} but model.n_out = {n_out} (data.classes: classes 1..n_out); "
                            f"set data.classes = {top} or leave data.classes and model.n_out out")
        return (lab[..., None] == np.arange(1, n_out + 1)).astype(np.float32)
    raise ValueError(f"unknown label mode {mode!r}; expected one of {LABEL_MODES}")


def preprocess_volume(
    image: np.ndarray, label: np.ndarray | None, data_cfg: DataConfig, n_out: int = 1
) -> tuple[np.ndarray, np.ndarray | None]:
    """``image (X, Y, Z)``, ``label (X, Y, Z)`` or None -> ``images (S, H, W, 1) float32`` in
    [0, 1] and ``labels (S, H, W, n_out) float32`` (or None); S = size along ``slice_axis``."""
    size = tuple(data_cfg.image_size)
    if image.ndim != 3:
        raise DataError(f"expected a 3D image (X, Y, Z), got shape {image.shape}")
    slices = resize_bicubic(to_slices(image, data_cfg.slice_axis), size)
    images = normalize_slices(slices)[..., None]
    labels = None
    if label is not None:
        if label.shape != image.shape:
            raise DataError(f"label shape {label.shape} differs from image shape {image.shape}")
        lab = resize_nearest(to_slices(label, data_cfg.slice_axis), size)
        labels = encode_labels(lab, data_cfg.labels, n_out)
    return images, labels


def resample_to_native(pred_slices: np.ndarray, native_shape: tuple[int, ...], slice_axis: int) -> np.ndarray:
    """Inverse of the slicing/resizing, nearest-neighbour: ``(S, H, W, ...)`` -> ``native_shape
    (X, Y, Z)`` (+ trailing dims), dtype kept. ``S`` must equal ``native_shape[slice_axis]``.

    Uses :func:`nearest_inverse_index`, so a label that went through :func:`preprocess_volume`
    with a model grid at least as large as the native slices comes back voxel for voxel.
    """
    pred = np.asarray(pred_slices)
    native_shape = tuple(int(s) for s in native_shape[:3])
    in_plane = tuple(s for i, s in enumerate(native_shape) if i != slice_axis)
    if pred.ndim < 3 or pred.shape[0] != native_shape[slice_axis]:
        raise ValueError(
            f"predictions of shape {pred.shape} do not fit native shape {native_shape}: "
            f"need {native_shape[slice_axis]} slices along axis {slice_axis}"
        )
    ia = nearest_inverse_index(in_plane[0], pred.shape[1])
    ib = nearest_inverse_index(in_plane[1], pred.shape[2])
    return np.moveaxis(pred[:, ia][:, :, ib], 0, slice_axis)
