"""Preprocessing: OpenCV-like resizes, normalisation, label encoding, parity with the original."""

from pathlib import Path

import numpy as np
import pytest
from conftest import REFERENCE as REF, require

from mednca_jax.config import DataConfig
from mednca_jax.data import (
    Case,
    DataError,
    cubic_resize_matrix,
    encode_labels,
    load_case,
    nearest_inverse_index,
    nearest_resize_index,
    normalize_slices,
    preprocess_volume,
    resample_to_native,
    resize_bicubic,
    resize_nearest,
)



# -- bicubic -------------------------------------------------------------------------------
def test_bicubic_identity_and_constant():
    x = np.random.default_rng(0).normal(size=(2, 7, 5))
    np.testing.assert_allclose(resize_bicubic(x, (7, 5)), x, atol=1e-12)
    c = np.full((1, 6, 9), 3.25)
    for size in [(13, 4), (64, 64), (3, 17), (1, 1)]:
        np.testing.assert_allclose(resize_bicubic(c, size), 3.25, atol=1e-12)


def test_bicubic_hand_values_opencv_kernel():
    # [0, 1] -> 4 samples: x = (i + .5) / 2 - .5 = -.25, .25, .75, 1.25; Keys a = -0.75,
    # border replicated. e.g. out[1] = w(.75) + w(1.75) = 0.26171875 - 0.03515625.
    out = resize_bicubic(np.array([[[0.0, 1.0]]]), (1, 4))[0, 0]
    np.testing.assert_allclose(out, [-0.10546875, 0.2265625, 0.7734375, 1.10546875], atol=1e-12)
    # the same on the other axis (separable, H then W)
    out_h = resize_bicubic(np.array([[[0.0], [1.0]]]), (4, 1))[0, :, 0]
    np.testing.assert_allclose(out_h, out, atol=1e-12)


def test_bicubic_ramp():
    ramp = np.arange(20.0) * 0.3 + 1.0
    # 2x shrink samples half-way between inputs (t = .5, symmetric taps): exact pair means
    # inside (OpenCV's INTER_CUBIC does no antialiasing)
    down = cubic_resize_matrix(20, 10) @ ramp
    np.testing.assert_allclose(down[1:-1], 0.5 * (ramp[2:-3:2] + ramp[3:-2:2]), atol=1e-12)
    # Keys a = -0.5 reproduces linear functions exactly away from the border; a = -0.75 does
    # not (which is why the kernel constant matters)
    pos = (np.arange(23) + 0.5) * 10 / 23 - 0.5
    exact = 2 + 0.7 * pos
    inner = slice(5, -5)
    np.testing.assert_allclose((cubic_resize_matrix(10, 23, a=-0.5) @ (2 + 0.7 * np.arange(10.0)))[inner], exact[inner], atol=1e-12)
    assert np.abs((cubic_resize_matrix(10, 23) @ (2 + 0.7 * np.arange(10.0)))[inner] - exact[inner]).max() > 1e-3
    # rows sum to 1 for any sizes (constants preserved, border replication included)
    for n_in, n_out in [(38, 64), (64, 16), (5, 3), (1, 4)]:
        np.testing.assert_allclose(cubic_resize_matrix(n_in, n_out).sum(1), 1.0, atol=1e-12)


# -- nearest -------------------------------------------------------------------------------
def test_nearest_index_rule():
    # OpenCV INTER_NEAREST: src = floor(dst * in / out)
    np.testing.assert_array_equal(nearest_resize_index(3, 5), [0, 0, 1, 1, 2])
    np.testing.assert_array_equal(nearest_resize_index(5, 2), [0, 2])
    lab = np.arange(6).reshape(1, 2, 3)
    np.testing.assert_array_equal(resize_nearest(lab, (4, 3))[0], [[0, 1, 2], [0, 1, 2], [3, 4, 5], [3, 4, 5]])


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_resample_to_native_roundtrip(axis):
    rng = np.random.default_rng(axis)
    native = (7, 9, 5)
    lab = rng.integers(0, 3, size=native)
    cfg = DataConfig(image_size=(16, 12), slice_axis=axis, labels="multiclass")
    img = rng.normal(size=native)
    images, labels = preprocess_volume(img, lab, cfg, n_out=2)
    assert images.shape == (native[axis], 16, 12, 1) and labels.shape == (native[axis], 16, 12, 2)
    pred = labels[..., 0] + 2 * labels[..., 1]  # back to class values
    back = resample_to_native(pred, native, axis)
    assert back.shape == native
    np.testing.assert_array_equal(back, lab)  # upsampled nearest is exactly invertible
    with pytest.raises(ValueError, match="slices"):
        resample_to_native(pred[:-1], native, axis)


def test_nearest_inverse_when_shrinking_is_close():
    for n, m in [(320, 256), (100, 64)]:
        fwd = nearest_resize_index(n, m)
        assert np.abs(fwd[nearest_inverse_index(n, m)] - np.arange(n)).max() <= 1


# -- normalisation and labels ----------------------------------------------------------------
def test_normalize_constant_empty_and_range():
    rng = np.random.default_rng(1)
    s = np.stack([np.zeros((8, 8)), np.full((8, 8), 7.0), rng.normal(size=(8, 8)) * 1e6, np.eye(8)])
    out = normalize_slices(s)
    assert out.dtype == np.float32 and np.isfinite(out).all()
    assert out.min() >= 0 and out.max() <= 1
    np.testing.assert_array_equal(out[0], 0)
    np.testing.assert_array_equal(out[1], 0)
    assert out[2].min() == 0 and out[2].max() == 1
    # one bright pixel in 400: the 0.5 and 99.5 percentiles coincide (the original divides
    # by zero there); we give 1 above the percentile, 0 elsewhere
    one = np.zeros((1, 20, 20))
    one[0, 3, 4] = 5
    o = normalize_slices(one)
    assert np.isfinite(o).all() and o[0, 3, 4] == 1 and o.sum() == 1


def test_normalize_is_percentile_rescale():
    x = np.random.default_rng(2).gamma(2.0, size=(3, 16, 16)) * 100 + 17
    out = normalize_slices(x)
    for i in range(3):
        lo, hi = np.percentile(x[i], [0.5, 99.5])
        np.testing.assert_allclose(out[i], np.clip((x[i] - lo) / (hi - lo), 0, 1), atol=1e-6)


def test_encode_labels():
    lab = np.array([[[0, 1], [2, 3]]])
    fg = encode_labels(lab, "foreground")
    np.testing.assert_array_equal(fg[0, ..., 0], [[0, 1], [1, 1]])
    mc = encode_labels(lab, "multiclass", 3)
    assert mc.shape == (1, 2, 2, 3) and mc.dtype == np.float32
    np.testing.assert_array_equal(mc[0, 1, 1], [0, 0, 1])
    np.testing.assert_array_equal(mc[0, 0, 0], [0, 0, 0])
    with pytest.raises(DataError, match="n_out"):
        encode_labels(lab, "multiclass", 2)
    with pytest.raises(DataError, match="n_out"):
        encode_labels(lab, "foreground", 2)


# -- parity with the original ----------------------------------------------------------------
@pytest.fixture(scope="module")
def fixture_374():
    require(REF / "hippocampus_374_fire0.npz", REF / "hippocampus_374" / "image.nii.gz")
    case = Case("hippocampus_374", REF / "hippocampus_374" / "image.nii.gz", REF / "hippocampus_374" / "label.nii.gz")
    image, label, meta = load_case(case, DataConfig())
    return np.load(REF / "hippocampus_374_fire0.npz"), image, label, meta


def test_matches_original_preprocessing(fixture_374):
    ref, image, label, meta = fixture_374
    assert meta.shape == (38, 48, 39)
    images, labels = preprocess_volume(image, label, DataConfig())
    assert images.shape == ref["image"].shape + (1,) == (39, 64, 64, 1)
    err = np.abs(images[..., 0] - ref["image"])
    assert err.mean() < 1e-5 and err.max() < 1e-4, (err.mean(), err.max())  # measured 2.5e-8 / 1.8e-7
    np.testing.assert_array_equal(labels[..., 0], ref["label"])
    # orientation: slices keep (X, Y) as (H, W); a transpose would be far off
    assert np.abs(np.swapaxes(images[..., 0], 1, 2) - ref["image"]).mean() > 0.1
    # the prediction path back to the native grid returns the label exactly
    back = resample_to_native(ref["label"], meta.shape, 2)
    np.testing.assert_array_equal(back, label > 0)
