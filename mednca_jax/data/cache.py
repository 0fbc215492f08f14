"""Preprocessed-slice cache and the :class:`SliceSet` that training and evaluation use.

One ``.npz`` per case under the cache dir (default ``$MEDNCA_CACHE`` or
``~/.cache/mednca_jax``), named by a hash of everything its content depends on: the image
and label files (absolute path, size, mtime), the data config fields used by
preprocessing, ``n_out`` and :data:`PREPROCESS_VERSION`. Editing a file, changing the
config or the code version therefore misses the cache instead of serving stale slices.
Files are written atomically (temp file + ``os.replace``); the data folder is only read.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import nibabel as nib
import numpy as np

from mednca_jax.config import DataConfig
from mednca_jax.data.images import IMAGES_VERSION, load_image_case
from mednca_jax.data.msd import Case, DataError, VolumeMeta, load_case
from mednca_jax.data.formats import preprocess_scan
from mednca_jax.data.preprocess import PREPROCESS_VERSION
from mednca_jax.data.volumes import VOLUMES_VERSION


def default_cache_dir() -> Path:
    """``$MEDNCA_CACHE`` if set, else ``~/.cache/mednca_jax``."""
    env = os.environ.get("MEDNCA_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "mednca_jax"


def _file_id(path: Path | None) -> list:
    if path is None:
        return [None]
    st = Path(path).stat()
    return [str(Path(path).resolve()), st.st_size, st.st_mtime_ns]


def cache_key(case: Case, data_cfg: DataConfig, n_out: int = 1) -> str:
    """Hex key of a case's preprocessed slices (see module docstring for what it covers)."""
    ident = {
        "version": PREPROCESS_VERSION,
        "image": _file_id(case.image),
        "label": _file_id(case.label),
        "label_values": list(case.label_values) if case.label_values is not None else None,
        "n_modalities": case.n_modalities,
        "image_size": list(data_cfg.image_size),
        "slice_axis": data_cfg.slice_axis,
        "channel": data_cfg.channel,
        "labels": data_cfg.labels,
        "n_out": n_out,
    }
    if data_cfg.format != "msd":  # only then: the keys of existing MSD caches stay valid
        ident.update(format=data_cfg.format, resize=data_cfg.resize, images_version=IMAGES_VERSION)
    if data_cfg.volumetric:
        ident.update(placement=data_cfg.placement, volumes_version=VOLUMES_VERSION)
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:32]


@dataclass
class SliceSet:
    """All slices of a list of cases, in case order then slice order (3D: one volume per case).

    images      (N, H, W, n_in) float32 in [0, 1]; 3D (``data.volumetric``): (K, X, Y, Z, n_in)
    labels      (N, H, W, n_out) float32 in {0, 1}, or None when no case has labels
    case_index  (N,) int32: index into ``case_names``
    slice_index (N,) int32: index along the slice axis of the native volume
    case_names  (K,) names; ``native_shapes`` (K,) (X, Y, Z); ``affines`` (K, 4, 4);
    headers     (K,) NIfTI headers (3D) of the images, to write predictions back
    image_paths (K,) source files
    """

    images: np.ndarray
    labels: np.ndarray | None
    case_index: np.ndarray
    slice_index: np.ndarray
    case_names: tuple[str, ...]
    native_shapes: tuple[tuple[int, int, int], ...]
    affines: np.ndarray
    headers: tuple[nib.Nifti1Header, ...]
    image_paths: tuple[Path, ...]
    slice_axis: int = 2

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def has_foreground(self) -> np.ndarray:
        """``(N,)`` bool: the slice's label has any foreground (all False without labels)."""
        if self.labels is None:
            return np.zeros(len(self), dtype=bool)
        return self.labels.reshape(len(self), -1).max(axis=1) > 0

    def case_slices(self, k: int | str) -> np.ndarray:
        """Row indices ``(S,)`` of case ``k`` (index or name), in slice order."""
        if isinstance(k, str):
            k = self.case_names.index(k)
        return np.flatnonzero(self.case_index == k)

    def meta(self, k: int | str) -> VolumeMeta:
        """Native geometry of case ``k`` for :func:`resample_to_native` / :func:`write_volume`."""
        if isinstance(k, str):
            k = self.case_names.index(k)
        return VolumeMeta(self.native_shapes[k], self.affines[k], self.headers[k])

    def subset(self, names: Sequence[str]) -> "SliceSet":
        """The slices of the named cases (e.g. one split part), in the order given."""
        missing = [n for n in names if n not in self.case_names]
        if missing:
            raise DataError(f"cases {missing[:5]} are not in this data set (have {len(self.case_names)} cases)")
        ks = [self.case_names.index(n) for n in names]
        rows = np.concatenate([self.case_slices(k) for k in ks]) if ks else np.zeros(0, np.int64)
        remap = np.full(len(self.case_names), -1, dtype=np.int32)
        remap[ks] = np.arange(len(ks), dtype=np.int32)
        return SliceSet(
            images=self.images[rows],
            labels=None if self.labels is None else self.labels[rows],
            case_index=remap[self.case_index[rows]],
            slice_index=self.slice_index[rows],
            case_names=tuple(self.case_names[k] for k in ks),
            native_shapes=tuple(self.native_shapes[k] for k in ks),
            affines=self.affines[ks] if ks else np.zeros((0, 4, 4)),
            headers=tuple(self.headers[k] for k in ks),
            image_paths=tuple(self.image_paths[k] for k in ks),
            slice_axis=self.slice_axis,
        )


def _header_bytes(header: nib.Nifti1Header) -> np.ndarray:
    return np.frombuffer(header.binaryblock, dtype=np.uint8)


def _header_from_bytes(block: np.ndarray) -> nib.Nifti1Header:
    raw = block.tobytes()
    cls = nib.Nifti2Header if len(raw) == nib.Nifti2Header.sizeof_hdr else nib.Nifti1Header
    return cls(binaryblock=raw, check=False)


def _compute(case: Case, data_cfg: DataConfig, n_out: int) -> dict[str, np.ndarray]:
    if data_cfg.format == "images":  # one 2D image: one slice, native grid (h, w, 1)
        images, labels, meta = load_image_case(case, data_cfg, n_out)
    else:
        image, label, meta = load_case(case, data_cfg)
        try:
            images, labels = preprocess_scan(image, label, data_cfg, n_out, what="the volume")  # 3D: one "slice"
        except DataError as e:
            raise DataError(f"{case.label or case.image}: {e}") from None
    out = {
        "images": images,
        "native_shape": np.asarray(meta.shape, dtype=np.int64),
        "affine": meta.affine,
        "header": _header_bytes(meta.header),
    }
    if labels is not None:
        # labels are 0/1: store as uint8 (8x smaller on disk than float32)
        out["labels"] = labels.astype(np.uint8)
    return out


def _read_entry(path: Path) -> dict[str, np.ndarray] | None:
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except FileNotFoundError:
        return None
    except Exception:  # a corrupt cache file is recomputed, never trusted
        return None


def _write_entry(path: Path, entry: dict[str, np.ndarray]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **entry)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; a normal file's mode
        os.replace(tmp, path)  # atomic: readers see the old file or the whole new one
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_case_slices(
    case: Case, data_cfg: DataConfig, cache_dir: str | Path | None = None, n_out: int = 1, use_cache: bool = True
) -> dict[str, np.ndarray]:
    """Preprocessed slices of one case, from the cache when valid (then no file is read).

    Returns a dict: ``images (S,H,W,n_in) float32``, optional ``labels (S,H,W,n_out) uint8``,
    ``native_shape (3,)``, ``affine (4,4)``, ``header`` (raw header bytes).
    """
    if not use_cache:
        return _compute(case, data_cfg, n_out)
    cache_dir = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    for what, f in (("image", case.image), ("label", case.label)):
        if f is not None and not Path(f).is_file():
            raise DataError(f"{what} file {f} of case {case.name!r} does not exist")
    path = cache_dir / f"{case.name}-{cache_key(case, data_cfg, n_out)}.npz"
    entry = _read_entry(path)
    expect_labels = case.label is not None
    if entry is not None and "images" in entry and ("labels" in entry) == expect_labels:
        return entry
    entry = _compute(case, data_cfg, n_out)
    try:
        _write_entry(path, entry)
    except OSError as e:  # read-only or full cache dir: still work, just uncached
        warnings.warn(f"could not write the slice cache {path} ({e}); continuing without caching", stacklevel=2)
    return entry


def load_slices(
    cases: Sequence[Case],
    data_cfg: DataConfig,
    cache_dir: str | Path | None = None,
    n_out: int = 1,
    *,
    use_cache: bool = True,
) -> SliceSet:
    """Load and preprocess ``cases`` into one :class:`SliceSet` (cached per case).

    Labelled and unlabelled cases cannot be mixed (training needs every label).

    Raises:
        DataError: from :func:`load_case` on a cache miss, or a mix of labelled/unlabelled cases.
    """
    cases = list(cases)
    if not cases:
        raise DataError("no cases to load")
    n_labelled = sum(c.label is not None for c in cases)
    if 0 < n_labelled < len(cases):
        unl = next(c for c in cases if c.label is None)
        raise DataError(f"{unl.image} has no label but other cases do; load labelled and unlabelled cases separately")
    entries = [load_case_slices(c, data_cfg, cache_dir, n_out, use_cache) for c in cases]
    counts = [e["images"].shape[0] for e in entries]
    return SliceSet(
        images=np.concatenate([e["images"] for e in entries]).astype(np.float32, copy=False),
        labels=np.concatenate([e["labels"] for e in entries]).astype(np.float32) if n_labelled else None,
        case_index=np.repeat(np.arange(len(cases), dtype=np.int32), counts),
        slice_index=np.concatenate([np.arange(c, dtype=np.int32) for c in counts]),
        case_names=tuple(c.name for c in cases),
        native_shapes=tuple(tuple(int(s) for s in e["native_shape"]) for e in entries),
        affines=np.stack([e["affine"] for e in entries]).astype(np.float64),
        headers=tuple(_header_from_bytes(e["header"]) for e in entries),
        image_paths=tuple(c.image for c in cases),
        slice_axis=data_cfg.slice_axis,
    )
