"""Synthetic MSD task: deterministic, readable as MSD, enough for the demo's split, structure visible but not trivial."""

import hashlib
import json

import nibabel as nib
import numpy as np
import pytest

from mednca_jax.config import DataConfig, load_config
from mednca_jax.data import list_cases, load_case, load_slices, make_synthetic_task, split_from_config
from mednca_jax.named_configs import resolve_config_path

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


def test_demo_task_gives_distinct_cases_to_every_split_part(tmp_path):
    """What `mednca train --config demo` generates (trainer: synthetic_cases, split_seed) is
    enough for its split: distinct patients in train, val and test, none shared."""
    cfg = load_config(resolve_config_path("demo"))
    root = make_synthetic_task(tmp_path / "t", n_cases=cfg.data.synthetic_cases, seed=cfg.data.split_seed)
    cases = list_cases(root, require_dataset_json=True)
    assert len(cases) == cfg.data.synthetic_cases
    digests = {hashlib.sha256(np.asarray(nib.load(str(c.image)).dataobj).tobytes()).hexdigest() for c in cases}
    assert len(digests) == len(cases)  # no two patients share an image
    split = split_from_config([c.name for c in cases], cfg.data)
    parts = [set(split.train), set(split.val), set(split.test)]
    assert all(parts) and sum(map(len, parts)) == len(cases) and set.union(*parts) == {c.name for c in cases}


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="n_cases"):
        make_synthetic_task(tmp_path, n_cases=0)
    with pytest.raises(ValueError, match="too small"):
        make_synthetic_task(tmp_path, shape=(8, 8, 8))
