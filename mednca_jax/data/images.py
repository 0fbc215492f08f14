"""Folders of plain 2D images and their masks (``data.format = "images"``, docs/data.md).

Layout::

    DIR/images/NAME.png   PNG, JPEG, TIFF or BMP: 8- or 16-bit grey, or RGB (an alpha channel is dropped)
    DIR/masks/NAME.png    the same stem (any of those suffixes): class values 0..n, or 0/255 for one class
    DIR/split.json        optional {"train": [...], "val": [...], "test": [...]} of stems

Each image is one case ("patient") of one slice. Its native grid is ``(h, w, 1)`` (a volume of
one slice along axis 2), so that :class:`~mednca_jax.data.cache.SliceSet` and the per-case
evaluation hold image folders unchanged. On the model grid ``data.image_size`` an image is
either stretched or resized with its aspect ratio kept and centred between zeros
(``data.resize``): images bilinearly, masks by nearest neighbour; the intensities are normalised
per channel as the slices of a volume (:func:`~mednca_jax.data.preprocess.normalize_slices`).
:func:`to_native` undoes the placement.

Reading is Pillow's, everything else NumPy. Problems with the files are collected over the
whole folder (:func:`check_image_cases`) and raised as one :class:`DataError` line naming the
first few files, before anything is written.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Iterable, NamedTuple, Sequence

import nibabel as nib
import numpy as np

from mednca_jax.config import DataConfig
from mednca_jax.data.files import write_bytes_atomic
from mednca_jax.data.msd import Case, DataError, VolumeMeta
from mednca_jax.data.preprocess import encode_labels, linear_resize_matrix, nearest_inverse_index, nearest_resize_index, normalize_slices

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
IMAGES_DIR, MASKS_DIR, SPLIT_JSON = "images", "masks", "split.json"
IMAGES_VERSION = "1"  # bump when the preprocessing of image folders changes: invalidates caches
MAX_LISTED = 5  # offending files named in one error message
BINARY_WHITE = 255  # a 0/255 mask is one class: 255 is read as 1
KIND = {1: "grey", 3: "RGB"}

# Pillow modes, by what they hold: one grey channel (with or without alpha) or colour.
_GREY_MODES = {"1", "L", "I", "F", "I;16", "I;16L", "I;16B", "I;16N"}
_GREY_ALPHA_MODES = {"LA", "La"}
_COLOUR_MODES = {"RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr", "LAB", "HSV", "P", "PA"}


class Placement(NamedTuple):
    """Where an image of native size ``(h, w)`` lies on the model grid: rows ``top : top +
    height``, columns ``left : left + width`` (the whole grid when stretched)."""

    top: int
    left: int
    height: int
    width: int


# --------------------------------------------------------------------------- listing
def image_files(folder: Path) -> list[Path]:
    """The image files of ``folder`` (not recursive, hidden files skipped), sorted by name;
    files with other suffixes are ignored."""
    if not folder.is_dir():
        return []
    return sorted(
        p for p in folder.iterdir()
        if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".") and p.is_file()
    )


def _by_stem(files: Iterable[Path], problems: list[str]) -> dict[str, Path]:
    out: dict[str, Path] = {}
    for p in files:
        if p.stem in out:
            problems.append(f"{p}: another file of the same name, {out[p.stem].name}, is there too (stems must be unique)")
        else:
            out[p.stem] = p
    return out


def _pair(root: Path) -> tuple[list[Case], list[str]]:
    """Cases (image, mask) of an image folder, and the problems of the pairing."""
    problems: list[str] = []
    images = _by_stem(image_files(root / IMAGES_DIR), problems)
    masks = _by_stem(image_files(root / MASKS_DIR), problems)
    for stem, p in images.items():
        if stem not in masks:
            problems.append(f"{p}: no mask (expected {root / MASKS_DIR / stem}.png or another image suffix)")
    for stem, p in masks.items():
        if stem not in images:
            problems.append(f"{p}: a mask without an image in {root / IMAGES_DIR}")
    cases = [Case(stem, p, masks[stem]) for stem, p in images.items() if stem in masks]
    return cases, problems


def raise_problems(problems: Sequence[str], what: str) -> None:
    """One :class:`DataError` line naming up to :data:`MAX_LISTED` of ``problems`` (none: nothing)."""
    if not problems:
        return
    more = f"; and {len(problems) - MAX_LISTED} more" if len(problems) > MAX_LISTED else ""
    raise DataError(f"{len(problems)} problem(s) in {what}: " + "; ".join(problems[:MAX_LISTED]) + more)


def _check_root(root: Path) -> None:
    if not root.is_dir():
        raise DataError(f"data folder {root} does not exist; pass a folder with images/ and masks/ (data.format = 'images')")
    if not (root / IMAGES_DIR).is_dir():
        hint = " (it looks like an MSD task folder: leave data.format = 'msd')" if (root / "imagesTr").is_dir() else ""
        raise DataError(f"{root} has no {IMAGES_DIR}/ subfolder; data.format = 'images' expects {IMAGES_DIR}/NAME.png "
                        f"and {MASKS_DIR}/NAME.png{hint}")
    if not image_files(root / IMAGES_DIR):
        raise DataError(f"{root / IMAGES_DIR} holds no image file ({', '.join(IMAGE_SUFFIXES)})")


def list_image_cases(root: str | Path) -> list[Case]:
    """The cases of an image folder, sorted by stem: ``Case(stem, images/stem.*, masks/stem.*)``.

    Raises:
        DataError: no such folder, no ``images/``, no image file, an image without a mask or a
            mask without an image, two files of one stem (one line naming up to 5 files).
    """
    root = Path(root).expanduser()
    _check_root(root)
    cases, problems = _pair(root)
    raise_problems(problems, root)
    return cases


# --------------------------------------------------------------------------- reading
def _open(path: Path):
    from PIL import Image

    try:
        img = Image.open(path)
        img.load()  # decodes everything: a truncated file fails here, not later
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise DataError(f"{path}: cannot be read as an image ({type(e).__name__}: {e})") from None
    return img


def read_image(path: str | Path) -> np.ndarray:
    """``(h, w, c)`` float32 of the stored values: ``c = 1`` for grey (8, 16 or 32 bit, float),
    3 for colour (RGB; RGBA drops the alpha, palette and CMYK images become RGB).

    Raises:
        DataError: unreadable or truncated file, an unsupported mode, NaN/inf values.
    """
    path = Path(path)
    img = _open(path)
    mode = img.mode
    if mode in _GREY_ALPHA_MODES:
        img = img.getchannel(0)
    elif mode in _COLOUR_MODES:
        img = img.convert("RGB")
    elif mode not in _GREY_MODES:
        raise DataError(f"{path}: image mode {mode!r} is not supported; save it as 8/16-bit grey or RGB")
    a = np.asarray(img)
    a = (a[..., None] if a.ndim == 2 else a).astype(np.float32)
    if min(a.shape[:2]) == 0:
        raise DataError(f"{path}: the image is empty ({a.shape[1]}x{a.shape[0]} pixels)")
    if not np.isfinite(a).all():
        raise DataError(f"{path}: the image holds NaN or inf values")
    return a


def read_mask(path: str | Path) -> np.ndarray:
    """``(h, w)`` int64 of the stored values (a colour mask whose channels agree counts as grey).

    Raises:
        DataError: unreadable file, a colour mask, non-integer values.
    """
    path = Path(path)
    img = _open(path)
    if img.mode in _GREY_ALPHA_MODES:
        img = img.getchannel(0)
    if img.mode in ("RGB", "RGBA", "RGBX"):
        rgb = np.asarray(img)[..., :3]
        if (rgb != rgb[..., :1]).any():
            raise DataError(f"{path}: the mask is a colour image; save class values 0..n as a greyscale (or palette) image")
        return rgb[..., 0].astype(np.int64)
    if img.mode not in _GREY_MODES | {"P"}:
        raise DataError(f"{path}: mask mode {img.mode!r} is not supported; save class values as an 8-bit greyscale PNG")
    m = np.asarray(img)  # a palette image gives its indices: the class values
    if m.dtype.kind == "f":
        if not np.isfinite(m).all() or (m != np.round(m)).any():
            raise DataError(f"{path}: the mask holds non-integer values; masks hold class values 0..n")
    return m.astype(np.int64)


def n_classes(data_cfg: DataConfig, n_out: int) -> int:
    """The largest class value a mask may hold: ``n_out`` (one class with the default
    ``data.labels = "foreground"`` and ``model.n_out = 1``)."""
    return int(n_out)


def mask_classes(mask: np.ndarray, path: Path, top: int) -> np.ndarray:
    """``(h, w)`` class values in ``0..top`` (uint8); a mask of only 0 and 255 is one class.

    Raises:
        DataError: negative values, or values above ``top`` (naming them and the fix).
    """
    values = np.unique(mask)
    if values.size and values[0] < 0:
        raise DataError(f"{path}: the mask has negative values {values[values < 0][:5].tolist()}")
    if top < BINARY_WHITE and set(values.tolist()) <= {0, BINARY_WHITE}:
        return (mask > 0).astype(np.uint8)  # a black-and-white mask: 255 is the one class
    extra = values[values > top]
    if extra.size:
        lossy = " (JPEG is lossy: save masks as PNG)" if path.suffix.lower() in (".jpg", ".jpeg") else ""
        raise DataError(
            f"{path}: the mask has values {extra[:5].tolist()} beyond the {top} class(es) of the config "
            f"(0..{top}, or 0/255 for a binary mask); fix the mask, or raise model.n_out with "
            f"data.labels = 'multiclass'{lossy}"
        )
    return mask.astype(np.uint8)


def read_case(case: Case, data_cfg: DataConfig, n_out: int) -> tuple[np.ndarray, np.ndarray | None]:
    """``image (h, w, c)`` float32 and ``mask (h, w)`` uint8 class values (None without a mask).

    Raises:
        DataError: a bad image or mask (see :func:`read_image`, :func:`read_mask`,
            :func:`mask_classes`), or a mask of another size than its image.
    """
    image = read_image(case.image)
    if case.label is None:
        return image, None
    raw = read_mask(case.label)
    if raw.shape != image.shape[:2]:
        h, w = image.shape[:2]
        raise DataError(f"{case.label}: the mask is {raw.shape[1]}x{raw.shape[0]} pixels, its image {case.image.name} "
                        f"{w}x{h}; a mask must have its image's size")
    return image, mask_classes(raw, Path(case.label), n_classes(data_cfg, n_out))


def check_image_cases(
    cases: Sequence[Case], data_cfg: DataConfig, n_out: int, where: str | Path, problems: Sequence[str] = ()
) -> tuple[int, Path]:
    """Read every image and mask of ``cases``; return the channel count (1 or 3) they share and
    the first image file.

    Raises:
        DataError: one line naming up to 5 bad files (``problems`` found before, then the
            unreadable ones, masks of another size or with values beyond the classes), or, when
            every file is readable, a folder mixing grey and colour images (naming one of each).
    """
    problems = list(problems)
    kinds: dict[int, Path] = {}
    for case in cases:
        try:
            image, _ = read_case(case, data_cfg, n_out)
        except DataError as e:
            problems.append(str(e))
            continue
        kinds.setdefault(image.shape[-1], case.image)
    raise_problems(problems, where)
    if len(kinds) > 1:
        raise DataError(f"{where} mixes grey and RGB images (grey: {kinds[1]}, RGB: {kinds[3]}); "
                        "convert them all to one kind")
    if not kinds:
        raise DataError(f"{where}: no image to check")
    return next(iter(kinds.items()))


def scan_image_folder(root: str | Path, data_cfg: DataConfig, n_out: int) -> tuple[list[Case], int, Path]:
    """:func:`list_image_cases` and :func:`check_image_cases` in one pass, so that one error
    names the pairing problems and the bad files together. Returns ``(cases, channels, first image)``."""
    root = Path(root).expanduser()
    _check_root(root)
    cases, problems = _pair(root)
    return (cases, *check_image_cases(cases, data_cfg, n_out, root, problems))


# --------------------------------------------------------------------------- geometry
def placement(native: tuple[int, int], grid: tuple[int, int], mode: str) -> Placement:
    """The model-grid region of an image of size ``native (h, w)`` on ``grid (H, W)``:
    ``stretch`` fills the grid; ``pad`` scales by ``min(H / h, W / w)`` and centres."""
    (h, w), (gh, gw) = native, grid
    if mode == "stretch":
        return Placement(0, 0, gh, gw)
    if mode != "pad":
        raise ValueError(f"unknown resize mode {mode!r}; expected 'pad' or 'stretch'")
    s = min(gh / h, gw / w)
    ph, pw = min(gh, max(1, round(h * s))), min(gw, max(1, round(w * s)))
    return Placement((gh - ph) // 2, (gw - pw) // 2, ph, pw)


def _place(region: np.ndarray, at: Placement, grid: tuple[int, int]) -> np.ndarray:
    out = np.zeros((*grid, *region.shape[2:]), region.dtype)
    out[at.top : at.top + at.height, at.left : at.left + at.width] = region
    return out


def image_to_grid(image: np.ndarray, data_cfg: DataConfig) -> np.ndarray:
    """``(h, w, c)`` -> ``(H, W, c)`` float32: bilinear resize into the image's
    :func:`placement`, each channel normalised to [0, 1] as a slice of a volume, zeros around."""
    grid = tuple(data_cfg.image_size)
    at = placement(image.shape[:2], grid, data_cfg.resize)
    a, b = linear_resize_matrix(image.shape[0], at.height), linear_resize_matrix(image.shape[1], at.width)
    resized = np.einsum("Hh,hwc,Ww->cHW", a, image.astype(np.float64), b, optimize=True)  # channels first
    return _place(np.moveaxis(normalize_slices(resized), 0, -1), at, grid)


def mask_to_grid(mask: np.ndarray, data_cfg: DataConfig) -> np.ndarray:
    """``(h, w, ...)`` -> ``(H, W, ...)``, nearest neighbour into the :func:`placement`, 0 around."""
    grid = tuple(data_cfg.image_size)
    at = placement(mask.shape[:2], grid, data_cfg.resize)
    region = mask[nearest_resize_index(mask.shape[0], at.height)][:, nearest_resize_index(mask.shape[1], at.width)]
    return _place(region, at, grid)


def grid_to_native(pred: np.ndarray, native: tuple[int, int], data_cfg: DataConfig) -> np.ndarray:
    """Undo :func:`mask_to_grid`: ``(H, W, ...)`` -> ``(h, w, ...)``, nearest neighbour, dtype
    kept. A mask placed on a grid at least as large as itself comes back pixel for pixel."""
    at = placement(native, tuple(data_cfg.image_size), data_cfg.resize)
    region = pred[at.top : at.top + at.height, at.left : at.left + at.width]
    return region[nearest_inverse_index(native[0], at.height)][:, nearest_inverse_index(native[1], at.width)]


def to_native(pred_slices: np.ndarray, native_shape: Sequence[int], data_cfg: DataConfig) -> np.ndarray:
    """``(1, H, W, ...)`` predictions of one image -> ``(h, w, 1, ...)`` on its native grid
    ``native_shape (h, w, 1)``, as :func:`~mednca_jax.data.preprocess.resample_to_native`
    returns a volume."""
    pred = np.asarray(pred_slices)
    if pred.ndim < 3 or pred.shape[0] != 1:
        raise ValueError(f"predictions of one image must be (1, H, W, ...), got shape {pred.shape}")
    return grid_to_native(pred[0], (int(native_shape[0]), int(native_shape[1])), data_cfg)[:, :, None]


def preprocess_image(
    image: np.ndarray, mask: np.ndarray | None, data_cfg: DataConfig, n_out: int = 1
) -> tuple[np.ndarray, np.ndarray | None]:
    """``image (h, w, c)``, ``mask (h, w)`` class values or None -> ``images (1, H, W, c)``
    float32 in [0, 1] and ``labels (1, H, W, n_out)`` float32 (or None)."""
    images = image_to_grid(image, data_cfg)[None]
    labels = None if mask is None else encode_labels(mask_to_grid(mask, data_cfg)[None], data_cfg.labels, n_out)
    return images, labels


def native_meta(image: np.ndarray) -> VolumeMeta:
    """The native grid ``(h, w, 1)`` of an image as a :class:`VolumeMeta` (identity affine)."""
    shape = (int(image.shape[0]), int(image.shape[1]), 1)
    header = nib.Nifti1Header()
    header.set_data_shape(shape)
    return VolumeMeta(shape, np.eye(4), header)


def load_image_case(case: Case, data_cfg: DataConfig, n_out: int = 1) -> tuple[np.ndarray, np.ndarray | None, VolumeMeta]:
    """One case, preprocessed: ``images (1, H, W, c)``, ``labels (1, H, W, n_out)`` or None,
    and its native grid (:func:`native_meta`)."""
    image, mask = read_case(case, data_cfg, n_out)
    images, labels = preprocess_image(image, mask, data_cfg, n_out)
    return images, labels, native_meta(image)


def native_mask(case: Case, data_cfg: DataConfig, n_out: int) -> np.ndarray:
    """The case's mask ``(h, w, 1)`` as class values (255 read as 1), like a label volume."""
    _, mask = read_case(case, data_cfg, n_out)
    if mask is None:
        raise DataError(f"{case.image} has no mask")
    return mask[:, :, None]


# --------------------------------------------------------------------------- writing
def write_mask_png(path: str | Path, labels: np.ndarray) -> Path:
    """Write ``labels (h, w)`` (or ``(h, w, 1)``) class values as an 8-bit greyscale PNG,
    atomically. The values are the classes themselves (0/1 for one class: nearly black)."""
    from PIL import Image

    a = np.asarray(labels)
    a = a[..., 0] if a.ndim == 3 else a
    if a.ndim != 2 or (a.size and (a.min() < 0 or a.max() > 255)):
        raise ValueError(f"labels must be (h, w) class values in 0..255, got shape {a.shape}")
    buf = io.BytesIO()
    Image.fromarray(a.astype(np.uint8)).save(buf, format="PNG")  # 2D uint8: mode L
    return write_bytes_atomic(Path(path), buf.getvalue())


def write_float_tiff(path: str | Path, values: np.ndarray) -> Path:
    """Write ``values (h, w)`` (or ``(h, w, 1)``) as a 32-bit float TIFF, atomically."""
    from PIL import Image

    a = np.asarray(values, np.float32)
    a = a[..., 0] if a.ndim == 3 else a
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="TIFF")  # 2D float32: mode F
    return write_bytes_atomic(Path(path), buf.getvalue())
