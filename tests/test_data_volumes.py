"""3D volumes on a model grid: the original's placement and intensity sequence."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import REFERENCE, require

from mednca_jax.data import DataError
from mednca_jax.data.volumes import place_in_grid, preprocess_volume_3d, rescale_percentiles, resize_linear, resize_nearest_nd


def test_rescale_clips_at_the_percentiles():
    v = np.arange(1000, dtype=np.float32).reshape(10, 10, 10)
    v[0, 0, 0] = 1e6  # an outlier is clipped, not allowed to squash the rest
    r = rescale_percentiles(v)
    assert r.min() == 0.0 and r.max() == 1.0
    lo, hi = np.percentile(v, (0.5, 99.5))
    np.testing.assert_allclose(r[5, 5, 5], (555 - lo) / (hi - lo), rtol=1e-5)
    assert rescale_percentiles(np.ones((3, 3, 3))).max() == 0.0


def test_placement_at_the_corner_and_its_error():
    v = np.ones((3, 4, 2), np.float32)
    g = place_in_grid(v, (5, 5, 5))
    assert g.shape == (5, 5, 5) and g[:3, :4, :2].all() and g.sum() == v.sum()
    with pytest.raises(DataError, match=r"case_7 has shape \(3, 4, 2\), larger than the model grid \[2, 5, 5\]"):
        place_in_grid(v, (2, 5, 5), "case_7")


def test_resample_mode_resizes_image_and_label():
    rng = np.random.default_rng(0)
    img, lab = rng.random((6, 8, 4)).astype(np.float32), (rng.random((6, 8, 4)) > 0.5).astype(np.int16)
    i, l = preprocess_volume_3d(img, lab, (12, 16, 8), "resample")
    assert i.shape == l.shape == (12, 16, 8) and set(np.unique(l)) <= {0, 1}
    np.testing.assert_array_equal(resize_nearest_nd(lab, (12, 16, 8))[::2, ::2, ::2], lab)
    # linear resize keeps a linear ramp linear inside the volume
    ramp = np.broadcast_to(np.arange(8.0)[None, :, None], (4, 8, 4)).astype(np.float32)
    up = resize_linear(ramp, (4, 16, 4))
    np.testing.assert_allclose(np.diff(up[0, 1:-1, 0]), 0.5, atol=1e-5)


@pytest.mark.parametrize("placement", ["keep_original_scale"])
def test_the_original_preprocessing_of_the_m3d_fixture(placement):
    import nibabel as nib

    require(REFERENCE / "m3d_hippocampus" / "fixture.npz", REFERENCE / "hippocampus_374" / "image.nii.gz")
    image = np.asarray(nib.load(REFERENCE / "hippocampus_374" / "image.nii.gz").dataobj, np.float32)
    label = np.asarray(nib.load(REFERENCE / "hippocampus_374" / "label.nii.gz").dataobj, np.int16)
    with np.load(REFERENCE / "m3d_hippocampus" / "fixture.npz") as f:
        want_image, want_label = f["image"], f["label"]
    got_image, got_label = preprocess_volume_3d(image, label, (64, 64, 52), placement, "hippocampus_374")
    assert np.abs(got_image - want_image).max() < 1e-5
    np.testing.assert_array_equal(got_label > 0, want_label > 0)
