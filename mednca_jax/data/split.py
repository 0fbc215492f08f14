"""Patient-level, seeded train/val/test split.

Every slice of a patient lands on one side because we split case *names*, never slices.
The split depends only on the set of names, the fractions and the seed -- not on the
order in which files were listed (names are sorted before the seeded permutation).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from mednca_jax.config import DataConfig
from mednca_jax.data.files import write_bytes_atomic
from mednca_jax.data.msd import DataError

PARTS = ("train", "val", "test")


@dataclass(frozen=True)
class Split:
    """Case names per part, each sorted. ``fractions``/``seed`` record how it was made."""

    train: tuple[str, ...]
    val: tuple[str, ...]
    test: tuple[str, ...]
    fractions: tuple[float, float, float] = (0.0, 0.0, 0.0)
    seed: int = 0

    def part(self, name: str) -> tuple[str, ...]:
        if name not in PARTS:
            raise KeyError(f"unknown split part {name!r}; expected one of {PARTS}")
        return getattr(self, name)

    def to_dict(self) -> dict:
        return {"train": list(self.train), "val": list(self.val), "test": list(self.test),
                "fractions": list(self.fractions), "seed": self.seed}


def _counts(n: int, fractions: Sequence[float]) -> list[int]:
    """Largest-remainder rounding of ``n * fractions``; then every part with a positive
    fraction gets >= 1 case (taken from the largest part) when ``n`` allows."""
    raw = [n * f for f in fractions]
    counts = [int(np.floor(r)) for r in raw]
    order = sorted(range(len(raw)), key=lambda i: (-(raw[i] - counts[i]), i))
    for i in order[: n - sum(counts)]:
        counts[i] += 1
    for i, f in enumerate(fractions):
        if f > 0 and counts[i] == 0:
            donor = max(range(len(counts)), key=lambda k: (counts[k], -k))
            if counts[donor] > 1:
                counts[donor] -= 1
                counts[i] += 1
    return counts


def make_split(names: Iterable[str], fractions: Sequence[float] = (0.7, 0.1, 0.2), seed: int = 0) -> Split:
    """Split case names into train/val/test by ``fractions`` with a seeded permutation.

    Raises:
        DataError: duplicate names, no names, or fractions that are not three values >= 0
            summing to 1.
    """
    names = list(names)
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise DataError(f"case names must be unique for a patient-level split; duplicated: {dup[:5]}")
    if not names:
        raise DataError("cannot split an empty list of cases")
    fractions = tuple(float(f) for f in fractions)
    if len(fractions) != 3 or min(fractions) < 0 or abs(sum(fractions) - 1) > 1e-6:
        raise DataError(f"split fractions must be three values >= 0 summing to 1, got {list(fractions)}")
    ordered = sorted(names)  # order independence: the listing order never matters
    perm = np.random.default_rng(seed).permutation(len(ordered))
    shuffled = [ordered[i] for i in perm]
    n_train, n_val, _ = _counts(len(ordered), fractions)
    parts = (shuffled[:n_train], shuffled[n_train : n_train + n_val], shuffled[n_train + n_val :])
    return Split(*(tuple(sorted(p)) for p in parts), fractions=fractions, seed=int(seed))


def split_from_config(names: Iterable[str], data_cfg: DataConfig) -> Split:
    """:func:`make_split` with ``data_cfg.split`` and ``data_cfg.split_seed``."""
    return make_split(names, data_cfg.split, data_cfg.split_seed)


def write_split(path: str | Path, split: Split) -> Path:
    """Write the split as JSON, atomically (a crash never leaves a half-written file)."""
    return write_bytes_atomic(path, (json.dumps(split.to_dict(), indent=2) + "\n").encode())


def read_split(path: str | Path) -> Split:
    """Read a split written by :func:`write_split`.

    Raises:
        DataError: missing file, bad JSON, missing parts, or a case in two parts.
    """
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(f"split file {path} does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"split file {path} is not valid JSON ({e})") from None
    if not isinstance(raw, dict) or not all(isinstance(raw.get(p), list) for p in PARTS):
        raise DataError(f"split file {path} must be an object with lists 'train', 'val', 'test'")
    parts = [tuple(str(n) for n in raw[p]) for p in PARTS]
    all_names = [n for p in parts for n in p]
    if len(set(all_names)) != len(all_names):
        raise DataError(f"split file {path} puts a case in more than one part (or twice in one)")
    fr = raw.get("fractions", [0.0, 0.0, 0.0])
    return Split(*parts, fractions=tuple(float(f) for f in fr), seed=int(raw.get("seed", 0)))
