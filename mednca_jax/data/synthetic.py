"""Embedded default data: a small synthetic MSD-layout task ("hippocampus-like").

Each case is a head-like ellipsoid (bright thin rim, textured tissue) holding a curved,
tapering tube -- the structure to segment, labelled 1 (thick "head" half) and 2 ("tail")
like the MSD hippocampus -- next to a dark "ventricle" and a round "distractor" blob of
intermediate intensity. A smooth multiplicative bias field and Rician noise are applied.
The tube is the only elongated mid-bright object, but neither a global threshold (the rim
is brighter, the bias shifts levels by up to ~15%) nor shape alone gives it away.

Files are stored like the real data: some cases uint8, others float32 with large,
case-specific intensity scales. Everything is a function of ``seed``.
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np

# mean intensities before bias and noise
BACKGROUND, TISSUE, RIM, VENTRICLE, DISTRACTOR, TARGET = 0.05, 0.40, 0.70, 0.15, 0.62, 0.85


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, ...], sigma: float) -> np.ndarray:
    """Gaussian-filtered white noise (via FFT, periodic), unit std."""
    white = rng.standard_normal(shape)
    freqs = np.meshgrid(*[np.fft.fftfreq(n) for n in shape[:-1]], np.fft.rfftfreq(shape[-1]), indexing="ij")
    gain = np.exp(-2 * (np.pi * sigma) ** 2 * sum(f**2 for f in freqs))
    axes = tuple(range(len(shape)))
    out = np.fft.irfftn(np.fft.rfftn(white, axes=axes) * gain, s=shape, axes=axes)
    return out / (out.std() + 1e-12)


def _soft(sdf: np.ndarray) -> np.ndarray:
    """Partial-volume occupancy of a signed distance (voxels): 1 inside, 0 outside, 0.5 on the surface."""
    return np.clip(0.5 - sdf, 0.0, 1.0)


def _random_frame(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Two orthonormal vectors spanning the tube's bending plane (tilted off the slice plane)."""
    u = rng.normal(size=3)
    u[2] *= 0.5  # prefer in-plane elongation, like the hippocampus in axial slices
    u /= np.linalg.norm(u)
    v = np.cross(u, rng.normal(size=3))
    return u, v / np.linalg.norm(v)


def make_case(rng: np.random.Generator, shape: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """One synthetic case: ``image (X, Y, Z)`` float64 roughly in [0, 1.2], ``label (X, Y, Z)`` uint8 in {0, 1, 2}."""
    shp = np.asarray(shape, dtype=np.float64)
    grid = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float64) for n in shape], indexing="ij"), axis=-1)

    # head: ellipsoid filling most of the crop, longer than the crop along the slice axis
    # (no slice is pure background, as in real crops); rim = shell of ~2 voxels
    centre = shp / 2 + rng.uniform(-1.5, 1.5, 3)
    radii = shp * rng.uniform(0.44, 0.52, 3) * np.array([1.0, 1.0, 1.4])
    rho = np.sqrt((((grid - centre) / radii) ** 2).sum(-1))
    head_sdf = (rho - 1) * radii.min()
    image = BACKGROUND + (TISSUE - BACKGROUND) * _soft(head_sdf)
    image += 0.05 * _smooth_noise(rng, shape, 1.5) * _soft(head_sdf)  # tissue texture
    image += (RIM - image) * _soft(np.abs(head_sdf + 1.2) - 1.0)

    # target: circular arc with tapering radius, sampled densely; sdf = min_k |x - p_k| - r_k
    u, v = _random_frame(rng)
    arc_r = rng.uniform(12, 17)
    theta = rng.uniform(0, 2 * np.pi) + np.linspace(0, rng.uniform(1.2, 1.7), 48)
    r_k = np.linspace(rng.uniform(5.0, 6.5), rng.uniform(3.0, 3.8), theta.size)
    arc = arc_r * (np.cos(theta)[:, None] * u + np.sin(theta)[:, None] * v)
    lo, hi = (arc - r_k[:, None]).min(0), (arc + r_k[:, None]).max(0)
    margin = 4.0
    low, high = margin - lo, shp - 1 - margin - hi  # keep the whole tube inside the crop
    offset = rng.uniform(low, np.maximum(high, low))
    pts = arc + offset
    # sdf only inside the tube's bounding box (+ margin): outside it every use saturates
    box_lo = np.maximum(np.floor((pts - r_k[:, None]).min(0) - 4), 0).astype(int)
    box_hi = np.minimum(np.ceil((pts + r_k[:, None]).max(0) + 5), shp).astype(int)
    box = tuple(slice(a, b) for a, b in zip(box_lo, box_hi))
    sub = grid[box].astype(np.float32)
    d = sum((sub[..., a, None] - pts[:, a].astype(np.float32)) ** 2 for a in range(3))  # (x, y, z, K)
    d = np.sqrt(d) - r_k.astype(np.float32)
    tube_sdf = np.full(shape, 10.0)
    k_near = np.zeros(shape, dtype=np.int64)
    k_near[box] = d.argmin(-1)
    tube_sdf[box] = d.min(-1)

    # dark "ventricle" hugging the concave side of the arc, and a round distractor of
    # intermediate intensity nearby -- both kept >= 2 voxels away from the tube so the
    # label stays well defined
    mid = pts[theta.size // 2]
    inward = (offset - mid) / (np.linalg.norm(offset - mid) + 1e-9)
    vent_c = mid + inward * (r_k[theta.size // 2] + 4.0)
    vent_sdf = np.sqrt((((grid - vent_c) / np.array([3.0, 2.0, 2.5])) ** 2).sum(-1)) * 2.0 - 2.0
    vent_sdf = np.maximum(vent_sdf, 2.0 - tube_sdf)  # carve out the tube's neighbourhood
    image += (VENTRICLE - image) * _soft(vent_sdf)
    dist_r = rng.uniform(3.0, 4.0)
    for _ in range(100):  # rejection sampling: inside the head, near but clear of the tube
        dist_c = rng.uniform(centre - 0.6 * radii, centre + 0.6 * radii)
        gap = (np.sqrt(((dist_c - pts) ** 2).sum(-1)) - r_k).min() - dist_r
        if 3.0 < gap < 9.0 and np.linalg.norm(dist_c - vent_c) > dist_r + 4:
            break
    dist_sdf = np.maximum(np.sqrt(((grid - dist_c) ** 2).sum(-1)) - dist_r, 2.5 - tube_sdf)
    image += (DISTRACTOR + 0.04 * rng.standard_normal() - image) * _soft(dist_sdf)
    image += (TARGET - image) * _soft(tube_sdf)

    label = np.zeros(shape, dtype=np.uint8)
    inside = tube_sdf < 0
    label[inside] = np.where(k_near[inside] < int(0.45 * theta.size), 1, 2)

    # smooth multiplicative bias (linear ramp + low-frequency wobble, within ~ +-15%)
    ramp = ((grid - shp / 2) / shp) @ rng.normal(0, 0.18, 3)
    bias = np.clip(1 + ramp + 0.04 * _smooth_noise(rng, shape, 6.0), 0.8, 1.2)
    image = image * bias

    # Rician noise: magnitude of a complex signal with Gaussian noise in both channels
    sigma = rng.uniform(0.025, 0.045)
    image = np.sqrt((image + sigma * rng.standard_normal(shape)) ** 2 + (sigma * rng.standard_normal(shape)) ** 2)
    return image, label


def make_synthetic_task(
    root: str | Path, n_cases: int = 24, seed: int = 0, shape: tuple[int, int, int] = (40, 48, 32)
) -> Path:
    """Write an MSD-layout task to ``root``: ``imagesTr/synth_NNN.nii.gz`` (3D images, uint8 for
    even and float32 for odd cases), ``labelsTr/`` (uint8, 0/1/2) and ``dataset.json``.

    Deterministic for ``seed`` (case ``i`` uses ``default_rng([seed, i])``). Returns ``root``.
    """
    if n_cases < 1:
        raise ValueError(f"n_cases must be >= 1, got {n_cases}")
    if min(shape) < 24:
        raise ValueError(f"shape {shape} is too small for the synthetic anatomy; use >= 24 per axis")
    root = Path(root)
    (root / "imagesTr").mkdir(parents=True, exist_ok=True)
    (root / "labelsTr").mkdir(parents=True, exist_ok=True)
    training = []
    for i in range(n_cases):
        rng = np.random.default_rng([seed, i])
        image, label = make_case(rng, tuple(shape))
        affine = np.diag([1.0, 1.0, 1.0, 1.0])
        affine[:3, 3] = rng.uniform(-50, 50, 3).round(2)
        if i % 2 == 0:  # uint8, like part of the real MSD hippocampus files
            stored = np.clip(np.round(image / max(image.max(), 1e-6) * 255), 0, 255).astype(np.uint8)
        else:  # float32 with a case-specific raw scale (real data reaches ~1.7e6)
            stored = (image * 10 ** rng.uniform(2.0, 6.0)).astype(np.float32)
        name = f"synth_{i:03d}.nii.gz"
        for sub, arr in (("imagesTr", stored), ("labelsTr", label)):
            img = nib.Nifti1Image(arr, affine)
            img.header.set_xyzt_units("mm")
            nib.save(img, str(root / sub / name))
        training.append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"})
    meta = {
        "name": "Synthetic",
        "description": "Synthetic hippocampus-like task generated by mednca_jax.data.synthetic",
        "tensorImageSize": "3D",
        "modality": {"0": "MRI"},
        "labels": {"0": "background", "1": "head", "2": "tail"},
        "numTraining": n_cases,
        "numTest": 0,
        "seed": seed,
        "training": training,
        "test": [],
    }
    (root / "dataset.json").write_text(json.dumps(meta, indent=2) + "\n")
    return root
