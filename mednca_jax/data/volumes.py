"""MSD volumes -> whole 3D arrays on a model grid, as M3D-NCA preprocesses them.

``keep_original_scale`` (the original's choice): each volume is placed, unresized, at the
corner ``[0:x, 0:y, 0:z]`` of a zero grid (64x64x52 for MSD hippocampus, whose volumes all
fit); ``resample``: the volume is resized to the grid (trilinear for images, nearest for
labels). Intensities follow the original's sequence (docs/design.md): rescale to [0, 1]
between the 0.5 and 99.5 percentiles (clipping outside), place in the grid, z-normalise over
the whole grid, rescale again. The fixture of ``../shared/reference/m3d_hippocampus``
(``tests/test_data_volumes.py``) checks this sequence to float32 round-off.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from mednca_jax.data.msd import DataError
from mednca_jax.data.preprocess import encode_labels, nearest_resize_index

from mednca_jax.config import PLACEMENTS, DataConfig

PERCENTILES = (0.5, 99.5)
# Part of the cache key of a volume (data/cache.py): bump when the preprocessing changes.
VOLUMES_VERSION = 1


def rescale_percentiles(volume: np.ndarray, percentiles: Sequence[float] = PERCENTILES) -> np.ndarray:
    """Clip to the given percentiles of all voxels, then min-max to [0, 1] (a constant volume
    becomes zeros)."""
    lo, hi = np.percentile(volume, percentiles)
    v = np.clip(volume.astype(np.float32), lo, hi)
    span = float(v.max() - v.min())
    return (v - v.min()) / span if span > 0 else np.zeros_like(v)


def z_normalise(volume: np.ndarray) -> np.ndarray:
    """``(v - mean) / std`` over all voxels (unchanged when the volume is constant)."""
    std = float(volume.std())
    return (volume - volume.mean()) / std if std > 0 else volume - volume.mean()


def check_fits_grid(shape: Sequence[int], grid: Sequence[int], what: str = "volume") -> None:
    """:class:`DataError` naming ``what`` unless a volume of ``shape`` fits unresized in the
    model grid (``keep_original_scale``), with what to do instead."""
    shape, grid = tuple(int(s) for s in shape), tuple(int(g) for g in grid)
    if len(shape) != len(grid) or any(s > g for s, g in zip(shape, grid)):
        raise DataError(
            f"{what} has shape {shape}, larger than the model grid {list(grid)} (data.image_size); "
            "enlarge data.image_size or use data.placement = \"resample\""
        )


def place_in_grid(volume: np.ndarray, grid: Sequence[int], what: str = "volume") -> np.ndarray:
    """``volume`` at the corner of a zero array of shape ``grid``; :class:`DataError` naming
    ``what`` when it does not fit."""
    check_fits_grid(volume.shape, grid, what)
    out = np.zeros(tuple(int(g) for g in grid), volume.dtype)
    out[tuple(slice(0, s) for s in volume.shape)] = volume
    return out


def _linear_matrix(n_in: int, n_out: int) -> np.ndarray:
    """``(n_out, n_in)`` linear interpolation with half-pixel centres (align_corners=False)."""
    x = (np.arange(n_out) + 0.5) * n_in / n_out - 0.5
    x = np.clip(x, 0, n_in - 1)
    lo = np.floor(x).astype(int)
    hi = np.minimum(lo + 1, n_in - 1)
    w = x - lo
    m = np.zeros((n_out, n_in), np.float64)
    m[np.arange(n_out), lo] += 1 - w
    m[np.arange(n_out), hi] += w
    return m


def resize_linear(volume: np.ndarray, grid: Sequence[int]) -> np.ndarray:
    """Separable (tri)linear resize of ``volume`` to ``grid``."""
    out = volume.astype(np.float64)
    for axis, n in enumerate(grid):
        out = np.moveaxis(np.tensordot(_linear_matrix(out.shape[axis], int(n)), np.moveaxis(out, axis, 0), axes=1), 0, axis)
    return out.astype(np.float32)


def resize_nearest_nd(volume: np.ndarray, grid: Sequence[int]) -> np.ndarray:
    """Nearest-neighbour resize of ``volume`` to ``grid`` (labels)."""
    index = np.ix_(*[nearest_resize_index(s, int(n)) for s, n in zip(volume.shape, grid)])
    return volume[index]


def preprocess_volume_3d(
    image: np.ndarray, label: np.ndarray | None, grid: Sequence[int], placement: str = "keep_original_scale",
    what: str = "volume",
) -> tuple[np.ndarray, np.ndarray | None]:
    """One case -> ``(image (*grid) float32 in [0, 1], label (*grid) or None)``, as M3D-NCA
    prepares it (see the module docstring)."""
    if placement not in PLACEMENTS:
        raise DataError(f"unknown placement {placement!r}; use one of {PLACEMENTS}")
    first = rescale_percentiles(image)
    if placement == "keep_original_scale":
        grid_image = place_in_grid(first, grid, what)
        grid_label = None if label is None else place_in_grid(label, grid, what)
    else:
        grid_image = resize_linear(first, grid)
        grid_label = None if label is None else resize_nearest_nd(label, grid)
    return rescale_percentiles(z_normalise(grid_image)), grid_label


def volume_to_native(grid_volume: np.ndarray, native_shape: Sequence[int], placement: str = "keep_original_scale") -> np.ndarray:
    """A prediction on the model grid ``(*grid, ...)`` back in the scan's own grid
    ``(*native_shape, ...)``: the corner the volume was placed in (``keep_original_scale``), or
    a nearest-neighbour resize (``resample``; labels and variances alike). Trailing axes
    (classes) are kept."""
    native = tuple(int(n) for n in native_shape[:3])
    if placement == "keep_original_scale":
        return grid_volume[tuple(slice(0, n) for n in native)]
    index = np.ix_(*[nearest_resize_index(g, n) for g, n in zip(grid_volume.shape[:3], native)])
    return grid_volume[index]


def volume_sample(
    image: np.ndarray, label: np.ndarray | None, data_cfg: DataConfig, n_out: int = 1, what: str = "volume"
) -> tuple[np.ndarray, np.ndarray | None]:
    """One case as the 3D pipeline stores it: ``images (1, X, Y, Z, 1)`` float32 and
    ``labels (1, X, Y, Z, n_out)`` (:func:`~mednca_jax.data.preprocess.encode_labels` of
    ``data.labels``) or None: a volume is the one "slice" of its case, so batches, evaluation and
    the cache treat 2D slices and 3D volumes alike."""
    grid_image, grid_label = preprocess_volume_3d(image, label, data_cfg.image_size, data_cfg.placement, what)
    labels = None if grid_label is None else encode_labels(grid_label[None], data_cfg.labels, n_out)
    return grid_image[None, ..., None].astype(np.float32), labels
