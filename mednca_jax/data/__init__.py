"""Data: MSD task folders -> preprocessed 2D slices ``(S, H, W, C)`` -> batches.

Pure NumPy + nibabel. Typical use::

    cases = list_cases(root)                          # msd.py
    split = split_from_config([c.name for c in cases], cfg.data)
    train = load_slices([c for c in cases if c.name in split.train], cfg.data, n_out=cfg.model.n_out)
    batches = BatchIterator.from_config(train, cfg.data, cfg.train.batch_size, cfg.train.seed)

Folders of 2D images and masks (``data.format = "images"``) are read by ``images.py`` into the
same slices; ``formats.py`` holds what depends on the format (docs/data.md).
"""

from mednca_jax.data.cache import SliceSet, cache_key, default_cache_dir, load_case_slices, load_slices
from mednca_jax.data.loader import BatchIterator, eval_batches
from mednca_jax.data.msd import Case, DataError, LoadedCase, VolumeMeta, case_name, largest_label, list_cases, load_case, write_volume
from mednca_jax.data.preprocess import (
    PREPROCESS_VERSION,
    cubic_resize_matrix,
    encode_labels,
    nearest_inverse_index,
    nearest_resize_index,
    normalize_slices,
    preprocess_volume,
    resample_to_native,
    resize_bicubic,
    resize_nearest,
    to_slices,
)
from mednca_jax.data.split import Split, make_split, read_split, split_from_config, write_split
from mednca_jax.data.synthetic import make_synthetic_task

__all__ = [
    "BatchIterator", "Case", "DataError", "LoadedCase", "PREPROCESS_VERSION", "SliceSet", "Split",
    "VolumeMeta", "cache_key", "case_name", "cubic_resize_matrix", "default_cache_dir", "encode_labels",
    "eval_batches", "largest_label", "list_cases", "load_case", "load_case_slices", "load_slices", "make_split",
    "make_synthetic_task", "nearest_inverse_index", "nearest_resize_index", "normalize_slices",
    "preprocess_volume", "read_split", "resample_to_native", "resize_bicubic", "resize_nearest",
    "split_from_config", "to_slices", "write_split", "write_volume",
]
