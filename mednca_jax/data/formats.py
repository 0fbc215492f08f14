"""What depends on ``data.format``, in one place: a task's cases and first split, a case's
label on its native grid, predictions taken back to that grid and written there, and what the
data decides in the config (``model.n_in`` of an image folder).

``msd``: NIfTI task folders (:mod:`.msd`, :mod:`.preprocess`). ``images``: folders of 2D
images and masks (:mod:`.images`), each image a case of one slice with the native grid
``(h, w, 1)``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from mednca_jax.config import Config, ConfigError, DataConfig
from mednca_jax.data import images as img
from mednca_jax.data.msd import Case, DataError, VolumeMeta, list_cases, load_case, write_volume
from mednca_jax.data.preprocess import preprocess_volume, resample_to_native
from mednca_jax.data.volumes import volume_sample, volume_to_native
from mednca_jax.data.split import Split, read_split, split_from_config

GENERATED_KINDS = (1, 3)  # model.n_in of the generated image task: grey or RGB


def is_images(data_cfg: DataConfig | None) -> bool:
    return data_cfg is not None and data_cfg.format == "images"


def list_task_cases(root: str | Path, data_cfg: DataConfig | None = None) -> list[Case]:
    """The cases of a task folder of ``data_cfg.format`` (MSD when ``data_cfg`` is None)."""
    return img.list_image_cases(root) if is_images(data_cfg) else list_cases(root)


def initial_split(names: Sequence[str], root: str | Path, data_cfg: DataConfig) -> Split:
    """The split of a new run: an image folder's own ``split.json`` when it has one, else the
    seeded split of ``data.split`` / ``data.split_seed``.

    Raises:
        DataError: the folder's split.json is malformed, names unknown stems, or has no
            training case.
    """
    path = Path(root) / img.SPLIT_JSON
    if not (is_images(data_cfg) and path.is_file()):
        return split_from_config(names, data_cfg)
    split = read_split(path)
    unknown = sorted(set(split.train + split.val + split.test) - set(names))
    if unknown:
        raise DataError(f"{path} names images that are not in {Path(root) / img.IMAGES_DIR} with a mask: {unknown[:5]}; "
                        "fix split.json (it lists stems: file names without the suffix)")
    if not split.train:
        raise DataError(f"{path} has an empty 'train' list; list the stems to train on")
    return Split(*(tuple(sorted(p)) for p in (split.train, split.val, split.test)))


def native_label(case: Case, data_cfg: DataConfig, n_out: int) -> np.ndarray:
    """The case's label on its native grid: ``(X, Y, Z)`` integers (an image's ``(h, w, 1)``)."""
    if is_images(data_cfg):
        return img.native_mask(case, data_cfg, n_out)
    label = load_case(case, data_cfg).label
    if label is None:
        raise DataError(f"{case.image} has no label")
    return label


def preprocess_scan(
    image: np.ndarray, label: np.ndarray | None, data_cfg: DataConfig, n_out: int = 1, what: str = "volume"
) -> tuple[np.ndarray, np.ndarray | None]:
    """An MSD scan ``(X, Y, Z)`` (and its label, or None) -> the model's inputs: 2D slices
    ``(S, H, W, 1)`` (:func:`~mednca_jax.data.preprocess.preprocess_volume`) or, for a 3D model
    (``data.volumetric``), the whole volume ``(1, X', Y', Z', 1)`` on the model grid
    (:func:`~mednca_jax.data.volumes.volume_sample`); labels ``(..., n_out)`` alike.
    :func:`to_native` is the way back."""
    if data_cfg.volumetric:
        return volume_sample(image, label, data_cfg, n_out, what)
    return preprocess_volume(image, label, data_cfg, n_out)


def to_native(pred_slices: np.ndarray, native_shape: Sequence[int], slice_axis: int, data_cfg: DataConfig) -> np.ndarray:
    """A case's ``(S, H, W, ...)`` model-grid predictions -> its native grid ``(X, Y, Z, ...)``
    (3D: its ``(1, X', Y', Z', ...)`` volume on the model grid)."""
    if data_cfg.volumetric:
        return volume_to_native(pred_slices[0], native_shape, data_cfg.placement)
    if is_images(data_cfg):
        return img.to_native(pred_slices, native_shape, data_cfg)
    return resample_to_native(pred_slices, tuple(native_shape), slice_axis)


def write_native(folder: Path, name: str, volume: np.ndarray, meta: VolumeMeta, data_cfg: DataConfig,
                 dtype: Any = np.uint8) -> Path:
    """Write a native-grid volume as ``folder/name.nii.gz`` (MSD) or, for an image, labels
    (uint8) as ``folder/name.png`` and anything else as a float ``folder/name.tif``."""
    if not is_images(data_cfg):
        return write_volume(folder / f"{name}.nii.gz", volume, meta, dtype)
    if np.dtype(dtype) == np.uint8:
        return img.write_mask_png(folder / f"{name}.png", volume)
    return img.write_float_tiff(folder / f"{name}.tif", volume)


def with_image_channels(cfg: Config, channels: int, example: Path, *, trained: bool) -> Config:
    """``cfg`` for images of ``channels`` channels (``example``: one of them). A run being set
    up (not ``trained``) takes ``model.n_in`` from them unless the config chose another value
    than the default 1; a trained model must match.

    Raises:
        DataError: the channels contradict ``model.n_in``, or ``model.channels`` cannot hold
            them (with the key to change).
    """
    n_in = cfg.model.n_in
    if channels == n_in:
        return cfg
    kind = img.KIND[channels]
    if trained:
        raise DataError(f"{example} is {kind} ({channels} channel(s)) but the model reads "
                        f"{img.KIND.get(n_in, f'{n_in}-channel')} images (model.n_in = {n_in}); give it images of that kind")
    if n_in != 1:
        raise DataError(f"{example} is {kind} ({channels} channel(s)) but the config sets model.n_in = {n_in}; leave "
                        "model.n_in at 1: with data.format = 'images' it is taken from the files")
    try:
        return cfg.replace(model=dataclasses.replace(cfg.model, n_in=channels))
    except ConfigError as e:
        raise ConfigError(f"the images are {kind} (model.n_in = {channels}): {e}") from None


def resolve_data_config(cfg: Config, data_dir: str | Path | None) -> Config:
    """The config a new run trains with: for an image folder, every file checked (one error
    for all bad files, before anything is written) and ``model.n_in`` set from them. Without
    ``data_dir`` the generated image task is grey, or RGB with ``model.n_in = 3``."""
    if not is_images(cfg.data):
        return cfg
    if data_dir is None:
        if cfg.model.n_in not in GENERATED_KINDS:
            raise DataError(f"the generated image task is grey (model.n_in = 1) or RGB (3), not model.n_in = "
                            f"{cfg.model.n_in}; pass --data with your own images")
        return cfg
    _, channels, example = img.scan_image_folder(data_dir, cfg.data, cfg.model.n_out)
    return with_image_channels(cfg, channels, example, trained=False)


def check_task_cases(cases: Sequence[Case], cfg: Config, where: str | Path) -> None:
    """Before a trained model reads ``cases``: for images, every file checked and of the
    model's kind (grey / RGB). MSD cases are checked as they are read."""
    if is_images(cfg.data) and cases:
        channels, example = img.check_image_cases(cases, cfg.data, cfg.model.n_out, where)
        with_image_channels(cfg, channels, example, trained=True)
