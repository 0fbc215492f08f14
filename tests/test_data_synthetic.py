"""Synthetic MSD task: deterministic, readable as MSD, fast, structure visible but not trivial."""

import json
import time

import nibabel as nib
import numpy as np
import pytest

from mednca_jax.config import DataConfig
from mednca_jax.data import list_cases, load_case, load_slices, make_synthetic_task

SMALL = (24, 28, 24)


def _arrays(root):
    return [np.asarray(nib.load(str(p)).dataobj) for p in sorted(root.rglob("*.nii.gz"))]


def test_deterministic_and_seed_dependent(tmp_path):
    a = _arrays(make_synthetic_task(tmp_path / "a", n_cases=3, seed=4, shape=SMALL))
    b = _arrays(make_synthetic_task(tmp_path / "b", n_cases=3, seed=4, shape=SMALL))
    c = _arrays(make_synthetic_task(tmp_path / "c", n_cases=3, seed=5, shape=SMALL))
    assert len(a) == 6
    assert all(x.dtype == y.dtype and np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))


def test_layout_and_content(tmp_path):
    root = make_synthetic_task(tmp_path / "t", n_cases=4, seed=0, shape=SMALL)
    meta = json.loads((root / "dataset.json").read_text())
    assert meta["numTraining"] == 4 and set(meta["labels"]) == {"0", "1", "2"}
    cases = list_cases(root)
    assert [c.name for c in cases] == [f"synth_{i:03d}" for i in range(4)]
    dtypes = [nib.load(str(c.image)).get_data_dtype() for c in cases]
    assert dtypes[0] == np.uint8 and dtypes[1] == np.float32  # both storage kinds, like the real data
    for c in cases:
        image, label, info = load_case(c, DataConfig())
        assert image.shape == label.shape == SMALL
        assert set(np.unique(label)) == {0, 1, 2}
        assert 0.005 < (label > 0).mean() < 0.2
        assert np.isfinite(image).all() and image.min() >= 0


def test_structure_is_visible_but_not_a_threshold(tmp_path):
    root = make_synthetic_task(tmp_path / "t", n_cases=4, seed=1, shape=(40, 48, 32))
    s = load_slices(list_cases(root), DataConfig(), tmp_path / "cache")
    img, lab = s.images[..., 0], s.labels[..., 0] > 0
    inside, outside = img[lab], img[~lab]
    assert inside.mean() - outside.mean() > 0.25  # contrast: the target is bright
    # ...but a global threshold cannot separate it (rim, distractor, bias, noise)
    best = max(
        2 * ((img > t) & lab).sum() / ((img > t).sum() + lab.sum()) for t in np.linspace(0.3, 0.95, 27)
    )
    assert best < 0.8, best


def test_24_cases_fast(tmp_path):
    t0 = time.perf_counter()
    make_synthetic_task(tmp_path / "t", n_cases=24, seed=0)
    assert time.perf_counter() - t0 < 5.0
    assert len(list((tmp_path / "t" / "imagesTr").glob("*.nii.gz"))) == 24


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="n_cases"):
        make_synthetic_task(tmp_path, n_cases=0)
    with pytest.raises(ValueError, match="too small"):
        make_synthetic_task(tmp_path, shape=(8, 8, 8))
