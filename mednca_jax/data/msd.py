"""Reading Medical Segmentation Decathlon (MSD) task folders.

Layout (https://medicaldecathlon.com)::

    ROOT/dataset.json          optional here; "training": [{"image": "./imagesTr/x.nii.gz",
                               "label": "./labelsTr/x.nii.gz"}, ...], "test": ["./imagesTs/y.nii.gz"]
    ROOT/imagesTr/NAME.nii.gz  3D (X, Y, Z) or 4D (X, Y, Z, M) images
    ROOT/labelsTr/NAME.nii.gz  3D (X, Y, Z) integer labels, same file name as the image
    ROOT/imagesTs/NAME.nii.gz  unlabelled images

Every problem with the input raises :class:`DataError` naming the file and what to do.
"""

from __future__ import annotations

import gzip
import json
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, Sequence

import nibabel as nib
import numpy as np

from mednca_jax.config import DataConfig
from mednca_jax.errors import MedNCAError

NIFTI_SUFFIXES = (".nii.gz", ".nii")
AFFINE_ATOL = 1e-3  # mm; MSD files of one case differ by float round-off at most
MAX_CHANNELS = 64  # a 4D image with more "channels" is a time series, not modalities


class DataError(MedNCAError, ValueError):
    """The input data is unusable; the message names the file and the fix."""


@dataclass(frozen=True)
class Case:
    """One patient: an image file and (for training data) its label file.

    ``label_values`` are the label values allowed by dataset.json ("labels" keys), and
    ``n_modalities`` its "modality" count; ``None`` when unknown (no dataset.json).
    """

    name: str
    image: Path
    label: Path | None = None
    label_values: tuple[int, ...] | None = None
    n_modalities: int | None = None


class VolumeMeta(NamedTuple):
    """Native voxel grid of a case, to write predictions back in the input's geometry.

    ``shape`` is the 3D shape (X, Y, Z) of the (channel-selected) image, ``affine`` (4, 4)
    its voxel-to-world matrix, ``header`` a copy of the image header with a 3D data shape.
    """

    shape: tuple[int, int, int]
    affine: np.ndarray
    header: nib.Nifti1Header


class LoadedCase(NamedTuple):
    """``image (X, Y, Z) float32``, ``label (X, Y, Z) int16`` or None, :class:`VolumeMeta`."""

    image: np.ndarray
    label: np.ndarray | None
    meta: VolumeMeta


def case_name(path: str | Path) -> str:
    """File name without the NIfTI suffix: ``imagesTr/hippocampus_001.nii.gz`` -> ``hippocampus_001``."""
    name = Path(path).name
    for suf in NIFTI_SUFFIXES:
        if name.endswith(suf):
            return name[: -len(suf)]
    return name


def _nifti_files(folder: Path) -> list[Path]:
    # "._x.nii.gz" are macOS AppleDouble files shipped inside the MSD tarballs: skip hidden files.
    if not folder.is_dir():
        return []
    return sorted(
        p for p in folder.iterdir() if p.name.endswith(NIFTI_SUFFIXES) and not p.name.startswith(".") and p.is_file()
    )


def _resolve(root: Path, rel: Any, where: str) -> Path:
    if not isinstance(rel, str) or not rel:
        raise DataError(f"{root / 'dataset.json'}: {where} must be a file path string, got {rel!r}; fix dataset.json")
    path = (root / rel).resolve() if not Path(rel).is_absolute() else Path(rel)
    if not path.is_file():
        raise DataError(
            f"{root / 'dataset.json'}: {where} points to {path}, which does not exist; "
            "fix dataset.json or restore the file"
        )
    return path


def _read_dataset_json(root: Path) -> dict[str, Any]:
    path = root / "dataset.json"
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"{path} is not valid JSON ({e}); fix it or delete it to list imagesTr/labelsTr by file name") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path} cannot be read ({e})") from None
    if not isinstance(meta, dict):
        raise DataError(f"{path}: expected a JSON object with a 'training' list, got {type(meta).__name__}")
    if "training" not in meta:
        raise DataError(f"{path} has no 'training' key; an MSD dataset.json lists its cases under 'training'")
    if not isinstance(meta["training"], list):
        raise DataError(f"{path}: 'training' must be a list of {{'image': ..., 'label': ...}} entries")
    return meta


def _label_values(meta: dict[str, Any], path: Path) -> tuple[int, ...] | None:
    labels = meta.get("labels")
    if labels is None:
        return None
    try:
        return tuple(sorted(int(k) for k in labels))
    except (TypeError, ValueError):
        raise DataError(f"{path}: 'labels' must map integer values to names, e.g. {{\"0\": \"background\"}}, got {labels!r}") from None


def _cases_from_json(root: Path) -> list[Case]:
    meta = _read_dataset_json(root)
    jpath = root / "dataset.json"
    values = _label_values(meta, jpath)
    modality = meta.get("modality")
    n_mod = len(modality) if isinstance(modality, dict) and modality else None
    cases = []
    for i, entry in enumerate(meta["training"]):
        if not isinstance(entry, dict) or "image" not in entry:
            raise DataError(f"{jpath}: training entry {i} must be an object with 'image' and 'label', got {entry!r}")
        image = _resolve(root, entry["image"], f"training entry {i} 'image'")
        if entry.get("label") is None:
            raise DataError(f"{jpath}: training entry {i} ({image.name}) has no 'label'; add it or move the image to 'test'")
        label = _resolve(root, entry["label"], f"training entry {i} 'label'")
        cases.append(Case(case_name(image), image, label, values, n_mod))
    for i, entry in enumerate(meta.get("test") or []):
        rel = entry.get("image") if isinstance(entry, dict) else entry  # MSD: plain strings
        image = _resolve(root, rel, f"test entry {i}")
        cases.append(Case(case_name(image), image, None, values, n_mod))
    return cases


def _cases_from_folders(root: Path) -> list[Case]:
    labels = {case_name(p): p for p in _nifti_files(root / "labelsTr")}
    cases = []
    for img in _nifti_files(root / "imagesTr"):
        name = case_name(img)
        if name not in labels:
            raise DataError(
                f"{img} has no label (expected {root / 'labelsTr' / img.name}); "
                "add the label or move the image to imagesTs/"
            )
        cases.append(Case(name, img, labels.pop(name)))
    if labels:
        extra = sorted(labels.values())[0]
        raise DataError(f"{extra} has no image in {root / 'imagesTr'}; add the image or remove the label")
    cases += [Case(case_name(p), p, None) for p in _nifti_files(root / "imagesTs")]
    return cases


def list_cases(root: str | Path, *, require_dataset_json: bool = False) -> list[Case]:
    """List the cases of an MSD task folder, labelled ("training") first, then unlabelled.

    Uses ``dataset.json`` when present, else pairs ``imagesTr``/``labelsTr`` by file name
    (``imagesTs`` files become unlabelled cases). Order is that of the listing; anything
    that depends on order (splits) must sort names itself.

    Raises:
        DataError: ``root`` is not an MSD task folder, dataset.json is malformed or missing
            (when ``require_dataset_json``), an entry points to a missing file, an image has
            no label, or two cases share a name.
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"data folder {root} does not exist; pass an MSD task folder (with imagesTr/, labelsTr/)")
    if not (root / "imagesTr").is_dir():
        raise DataError(
            f"{root} is not an MSD task folder: it has no imagesTr/ subfolder; "
            "expected imagesTr/NAME.nii.gz, labelsTr/NAME.nii.gz and dataset.json"
        )
    if (root / "dataset.json").is_file():
        cases = _cases_from_json(root)
    elif require_dataset_json:
        raise DataError(f"{root / 'dataset.json'} is missing; an MSD task folder needs one (see medicaldecathlon.com)")
    else:
        cases = _cases_from_folders(root)
    if not cases:
        raise DataError(f"{root} lists no cases: imagesTr/ holds no .nii.gz files")
    seen: dict[str, Path] = {}
    for c in cases:
        if c.name in seen:
            raise DataError(f"two cases are named {c.name!r}: {seen[c.name]} and {c.image}; case names must be unique")
        seen[c.name] = c.image
    return cases


def _read_nifti(path: Path, what: str) -> tuple[np.ndarray, nib.Nifti1Image]:
    """Read a NIfTI file's array (scaling applied, stored dtype kept when unscaled)."""
    if not path.is_file():
        raise DataError(f"{what} file {path} does not exist")
    try:
        img = nib.load(str(path))
        # np.asarray(dataobj) applies scl_slope/inter and reads the whole (gzip) stream,
        # so truncation surfaces here, not later.
        data = np.asarray(img.dataobj)
    except (OSError, EOFError, zlib.error, gzip.BadGzipFile, ValueError, nib.filebasedimages.ImageFileError) as e:
        raise DataError(
            f"{what} file {path} cannot be read as NIfTI, it is truncated or corrupt "
            f"({type(e).__name__}: {e}); re-download or re-extract it"
        ) from None
    return data, img


def _select_channel(data: np.ndarray, path: Path, channel: int, n_modalities: int | None) -> np.ndarray:
    """(X, Y, Z) or (X, Y, Z, M) -> (X, Y, Z); checks ``channel`` against the image."""
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]  # (X, Y, Z, 1) is a 3D image written as 4D
    if data.ndim == 3:
        if channel != 0:
            raise DataError(f"{path} is a 3D image (one channel) but data.channel = {channel}; set data.channel = 0")
        if n_modalities not in (None, 1):
            raise DataError(f"{path} is 3D but dataset.json lists {n_modalities} modalities; fix dataset.json")
        return data
    if data.ndim != 4:
        raise DataError(f"{path} has shape {data.shape}; expected a 3D (X, Y, Z) or 4D (X, Y, Z, M) image")
    m = data.shape[3]
    if m > MAX_CHANNELS:
        raise DataError(
            f"{path} has shape {data.shape}: {m} volumes along axis 3 looks like a time series, "
            f"not modalities; convert it to a 3D image or at most {MAX_CHANNELS} modality channels"
        )
    if n_modalities is not None and n_modalities != m:
        raise DataError(f"{path} has {m} channels but dataset.json lists {n_modalities} modalities; fix dataset.json")
    if not 0 <= channel < m:
        raise DataError(f"{path} has {m} channels (0..{m - 1}) but data.channel = {channel}; choose one of them")
    return data[..., channel]


def _check_label(label: np.ndarray, path: Path, allowed: tuple[int, ...] | None) -> np.ndarray:
    if label.ndim == 4 and label.shape[3] == 1:
        label = label[..., 0]
    if label.ndim != 3:
        raise DataError(f"label file {path} has shape {label.shape}; expected a 3D (X, Y, Z) integer label")
    if label.dtype.kind == "f":
        bad = ~np.isfinite(label) | (label != np.round(label))
        if bad.any():
            raise DataError(
                f"label file {path} has {int(bad.sum())} non-integer voxels (e.g. {label[bad].flat[0]!r}); "
                "labels must hold integer class values (is this an image saved as a label?)"
            )
    elif label.dtype.kind not in "iub":
        raise DataError(f"label file {path} has dtype {label.dtype}; expected integer class values")
    values = np.unique(label)
    if values.size and values[0] < 0:
        raise DataError(f"label file {path} has negative values {values[values < 0].tolist()}; labels must be >= 0")
    if allowed is not None:
        extra = sorted(set(values.astype(np.int64).tolist()) - set(allowed))
        if extra:
            raise DataError(
                f"label file {path} has values {extra} not listed in dataset.json 'labels' {list(allowed)}; "
                "fix the label or dataset.json"
            )
    if values.size and values[-1] > np.iinfo(np.int16).max:
        raise DataError(f"label file {path} has value {values[-1]}; expected a few classes")
    return label.astype(np.int16)


def load_case(case: Case, data_cfg: DataConfig) -> LoadedCase:
    """Read one case: ``image (X, Y, Z) float32`` (channel ``data_cfg.channel`` of a 4D
    image), ``label (X, Y, Z) int16`` or None, and its :class:`VolumeMeta`.

    Any stored dtype is accepted (MSD hippocampus files are uint8 or float32 up to ~1.7e6).

    Raises:
        DataError: unreadable/truncated file, bad channel, NaN/inf or constant image,
            image/label shape or affine mismatch, label values that are not class values.
    """
    raw, img = _read_nifti(case.image, "image")
    data = _select_channel(raw, case.image, data_cfg.channel, case.n_modalities)
    if min(data.shape) == 0:
        raise DataError(f"image file {case.image} is empty (shape {data.shape})")
    image = data.astype(np.float32)
    bad = ~np.isfinite(image)
    if bad.any():
        raise DataError(
            f"image file {case.image} has {int(bad.sum())} NaN/inf voxels (or values beyond float32); "
            "fix the file or leave the case out"
        )
    if image.min() == image.max():
        raise DataError(f"image file {case.image} is constant (every voxel = {image.flat[0]}); the file is blank or broken")

    header = img.header.copy()
    header.set_data_shape(image.shape)  # drop the modality axis: predictions are 3D
    meta = VolumeMeta(tuple(int(s) for s in image.shape), np.asarray(img.affine, dtype=np.float64), header)

    label = None
    if case.label is not None:
        lraw, limg = _read_nifti(case.label, "label")
        label = _check_label(lraw, case.label, case.label_values)
        if label.shape != image.shape:
            raise DataError(
                f"label file {case.label} has shape {label.shape} but its image {case.image} has "
                f"{image.shape} (channel selected); they must be the same voxel grid"
            )
        if not np.allclose(limg.affine, img.affine, atol=AFFINE_ATOL, rtol=0):
            raise DataError(
                f"label file {case.label} has a different affine than its image {case.image} "
                f"(max difference {np.abs(limg.affine - img.affine).max():.4g}); they must be the same "
                "voxel grid: resample the label onto the image"
            )
    return LoadedCase(image, label, meta)


def largest_label(cases: Sequence[Case], data_cfg: DataConfig) -> int:
    """The largest label value of the cases' label files (read and checked as
    :func:`load_case` does): the number of classes K of ``data.labels = "classes"`` when
    ``data.classes`` leaves it to the data."""
    return max((int(lab.max()) for c in cases if (lab := load_case(c, data_cfg).label) is not None and lab.size), default=0)


def write_volume(path: str | Path, volume: np.ndarray, meta: VolumeMeta, dtype: Any = np.uint8) -> Path:
    """Write ``volume (X, Y, Z)`` (e.g. a predicted label) with the input's affine and header."""
    volume = np.asarray(volume)
    if volume.shape[:3] != tuple(meta.shape):
        raise ValueError(f"volume shape {volume.shape} does not match the native grid {meta.shape}")
    header = meta.header.copy()
    header.set_data_dtype(dtype)
    header.set_data_shape(volume.shape)
    header["scl_slope"], header["scl_inter"] = 1.0, 0.0  # stored values are the labels themselves
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(volume.astype(dtype), meta.affine, header), str(path))
    return path
