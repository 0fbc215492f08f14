"""A generated image-folder task (``data.format = "images"``) for the tests and the demo.

Each image shows one or two "target" ellipses (mask class 1) and up to three "distractor"
ellipses on a textured background with an illumination gradient and noise; targets lie on top
where they overlap. Grey images: the targets are the brightest objects, the distractors of
intermediate intensity. RGB images: targets and distractors have about the same luminance
and differ in colour only (reddish targets, greenish or bluish distractors), so a model must
read the colour channels.

Sizes and aspect ratios vary per image (heights of 40..160 pixels, widths 2.5 times smaller to larger), and the files
cover the readable formats: PNG (8- and 16-bit grey, RGB, RGBA), JPEG, TIFF (16-bit grey, RGB)
and BMP; masks are PNG or TIFF, holding 0/1 or 0/255. Everything is a function of ``seed``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mednca_jax.data.images import IMAGES_DIR, MASKS_DIR
from mednca_jax.data.synthetic import _smooth_noise, _soft

# grey levels before the gradient and noise
BACKGROUND, DISTRACTOR, TARGET = 0.30, 0.52, 0.78
# RGB: luminance 0.299 R + 0.587 G + 0.114 B of about 0.49 for every object colour
TARGET_RGB = (0.85, 0.35, 0.30)
DISTRACTOR_RGB = ((0.30, 0.62, 0.33), (0.40, 0.42, 0.95))
BACKGROUND_RGB = (0.30, 0.30, 0.30)
SIDES = (40, 160)
MAX_ASPECT = 2.5
# file kinds by image index: (suffix, bits) for grey, (suffix, alpha) for RGB
GREY_FILES = ((".png", 8), (".png", 16), (".jpg", 8), (".tif", 16), (".bmp", 8))
RGB_FILES = ((".png", False), (".png", True), (".jpg", False), (".tif", False), (".bmp", False))


def _ellipse(rng: np.random.Generator, shape: tuple[int, int], lo: float, hi: float) -> np.ndarray:
    """Occupancy ``(h, w)`` in [0, 1] of a random rotated ellipse, semi-axes ``lo..hi`` of the short side."""
    h, w = shape
    side = min(h, w)
    cy, cx = rng.uniform(0.2, 0.8) * h, rng.uniform(0.2, 0.8) * w
    a, b = rng.uniform(lo, hi, 2) * side
    t = rng.uniform(0, np.pi)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    u = (xx - cx) * np.cos(t) + (yy - cy) * np.sin(t)
    v = -(xx - cx) * np.sin(t) + (yy - cy) * np.cos(t)
    rho = np.sqrt((u / a) ** 2 + (v / b) ** 2)
    return _soft((rho - 1) * min(a, b))


def make_image(rng: np.random.Generator, shape: tuple[int, int], rgb: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """One scene: ``image (h, w, c)`` float64 in [0, 1] (c = 3 with ``rgb``, else 1) and
    ``mask (h, w)`` uint8 in {0, 1}."""
    h, w = shape
    c = 3 if rgb else 1
    side = min(h, w)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    ramp = (rng.normal(0, 0.08) * (yy / h - 0.5) + rng.normal(0, 0.08) * (xx / w - 0.5))[..., None]
    texture = 0.05 * _smooth_noise(rng, (h, w, c), max(side / 16, 1.0))
    image = np.asarray(BACKGROUND_RGB if rgb else (BACKGROUND,)) + texture + ramp
    for _ in range(rng.integers(1, 4)):  # distractors first: targets cover them
        colour = np.asarray(DISTRACTOR_RGB[rng.integers(len(DISTRACTOR_RGB))] if rgb else (DISTRACTOR,))
        occ = _ellipse(rng, shape, 0.06, 0.16)[..., None]
        image += (colour + rng.normal(0, 0.02, c) + ramp - image) * occ
    mask = np.zeros(shape, np.float64)
    for _ in range(rng.integers(1, 3)):
        occ = _ellipse(rng, shape, 0.10, 0.24)
        image += (np.asarray(TARGET_RGB if rgb else (TARGET,)) + rng.normal(0, 0.02, c) + ramp - image) * occ[..., None]
        mask = np.maximum(mask, occ)
    image += rng.normal(0, 0.03, image.shape)
    return np.clip(image, 0.0, 1.0), (mask >= 0.5).astype(np.uint8)


def _save(path: Path, array: np.ndarray) -> None:
    from PIL import Image

    kw = {"quality": 95} if path.suffix == ".jpg" else {}
    Image.fromarray(array).save(path, **kw)


def write_image_task(
    root: str | Path, n: int = 100, rgb: bool = False, seed: int = 0, sides: tuple[int, int] = SIDES
) -> Path:
    """Write ``n`` images and masks to ``root/images/img_NNN.*`` and ``root/masks/img_NNN.*``.

    Image ``i`` uses ``default_rng([seed, i, rgb])``; its height and width lie in ``sides``
    with an aspect ratio up to 1 : 2.5, its file kind cycles through :data:`GREY_FILES` /
    :data:`RGB_FILES`; masks alternate 0/1 and 0/255 values, every fourth one a TIFF. Returns
    ``root``.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if sides[0] < 16 or sides[1] < sides[0]:
        raise ValueError(f"sides must be (lo, hi) with 16 <= lo <= hi, got {sides}")
    root = Path(root)
    (root / IMAGES_DIR).mkdir(parents=True, exist_ok=True)
    (root / MASKS_DIR).mkdir(parents=True, exist_ok=True)
    for i in range(n):
        rng = np.random.default_rng([seed, i, int(rgb)])
        h = int(rng.integers(sides[0], sides[1] + 1))
        w = int(np.clip(round(h * np.exp(rng.uniform(-1, 1) * np.log(MAX_ASPECT))), sides[0] // 2, sides[1] * 2))
        image, mask = make_image(rng, (h, w), rgb)
        name = f"img_{i:03d}"
        if rgb:
            suffix, alpha = RGB_FILES[i % len(RGB_FILES)]
            stored = np.round(image * 255).astype(np.uint8)
            if alpha:
                stored = np.concatenate([stored, np.full((h, w, 1), 255, np.uint8)], axis=-1)
        else:
            suffix, bits = GREY_FILES[i % len(GREY_FILES)]
            # 16-bit files use a part of the range only: the normalisation must not assume 0..65535
            scale, dtype = (255, np.uint8) if bits == 8 else (rng.uniform(4000, 60000), np.uint16)
            stored = np.round(image[..., 0] * scale).astype(dtype)
        _save(root / IMAGES_DIR / f"{name}{suffix}", stored)
        mask_suffix = ".tif" if i % 4 == 3 else ".png"
        _save(root / MASKS_DIR / f"{name}{mask_suffix}", mask * (255 if i % 2 else 1))
    return root
