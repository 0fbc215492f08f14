"""Each perturbation's defining property, on small hand-made images."""

from __future__ import annotations

import math

import numpy as np
import pytest

from mednca_jax.evaluate import perturbations as P


def _phantom(h: int = 32, w: int = 32, cy: float = 14.0, cx: float = 17.0, r: float = 7.0) -> tuple[np.ndarray, np.ndarray]:
    """A smooth bright disc on a dim background, and its label."""
    yy, xx = np.mgrid[:h, :w]
    d = np.sqrt((yy - cy) ** 2 + (xx - cx) ** 2)
    label = (d < r).astype(np.uint8)
    image = (0.2 + 0.7 / (1 + np.exp(2 * (d - r)))).astype(np.float32)
    return image, label


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


# ---------------------------------------------------------------- registry and errors


def test_registry_contents():
    assert set(P.PERTURBATIONS) == {
        "translation", "rotation", "gaussian_noise", "rician_noise", "bias_field",
        "ghosting", "spike", "motion", "blur", "gamma",
    }
    for p in P.PERTURBATIONS.values():
        assert p.kind in ("geometric", "intensity")
        assert (p.pair_fn is not None) == (p.kind == "geometric")
        assert all(0 < s <= 1 for s in p.severities) and p.scale


def test_unknown_name_and_bad_severity():
    img, lab = _phantom()
    with pytest.raises(ValueError, match="valid choices: translation, rotation"):
        P.apply_perturbation("jpeg", img, lab, 0.5, 0)
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match=r"severity must be in \[0, 1\]"):
            P.apply_perturbation("blur", img, lab, bad, 0)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        P.check_severities([0.5, 2.0])
    with pytest.raises(ValueError, match="label shape"):
        P.apply_perturbation("rotation", img, lab[:-1], 0.5, 0)


@pytest.mark.parametrize("name", sorted(P.PERTURBATIONS))
def test_severity_zero_is_identity_and_seeded(name):
    img, lab = _phantom()
    batch = np.stack([img, img[::-1]])
    labs = np.stack([lab, lab[::-1]])
    out, out_lab = P.apply_perturbation(name, batch, labs, 0.0, seed=3)
    np.testing.assert_array_equal(out, batch)
    np.testing.assert_array_equal(out_lab, labs)
    a, la = P.apply_perturbation(name, batch, labs, 0.75, seed=7)
    b, lb = P.apply_perturbation(name, batch, labs, 0.75, seed=7)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(la, lb)
    assert a.shape == batch.shape and a.dtype == np.float32
    assert a.min() >= 0 and a.max() <= 1  # clipped to the preprocessed range
    if name != "blur":  # blur is deterministic; the rest depend on the seed
        c, _ = P.apply_perturbation(name, batch, labs, 0.75, seed=8)
        assert not np.array_equal(a, c)
    assert not np.allclose(a, batch, atol=1e-4)  # and it does something
    # a single (H, W) image gives the first element of the batch result's distribution shape
    single, single_lab = P.apply_perturbation(name, img, lab, 0.75, seed=7)
    assert single.shape == img.shape and single_lab.shape == lab.shape


# ---------------------------------------------------------------- geometric


def test_translation_moves_image_and_label_identically():
    _, lab = _phantom()
    img = lab.astype(np.float32)
    for seed in range(5):
        out, out_lab = P.translation_with_label(img, lab, 1.0, _rng(seed))
        np.testing.assert_array_equal(out, out_lab.astype(np.float32))
        # displacement of the centroid is a quarter of the image
        c0 = np.argwhere(lab).mean(0)
        c1 = np.argwhere(out_lab).mean(0)
        assert abs(np.linalg.norm(c1 - c0) - 0.25 * 32) < 1.0


def test_translation_multichannel_label():
    img, lab = _phantom()
    lab2 = np.stack([lab, 1 - lab], -1)[None]  # (1, H, W, 2)
    out, out_lab = P.apply_perturbation("translation", img[None], lab2, 0.5, 1)
    assert out_lab.shape == lab2.shape
    ref, ref_lab = P.apply_perturbation("translation", img[None], lab[None], 0.5, 1)
    np.testing.assert_array_equal(out_lab[..., 0], ref_lab)


def test_rotation_moves_image_and_label_identically():
    h = w = 33
    _, lab = _phantom(h, w, cy=10, cx=20, r=5)
    img = lab.astype(np.float32)
    for seed in range(4):
        out, out_lab = P.rotation_with_label(img, lab, 1.0, _rng(seed))
        assert (np.abs((out > 0.5) - out_lab) > 0).mean() < 0.01
        c0, c1 = np.argwhere(lab).mean(0) - 16, np.argwhere(out_lab).mean(0) - 16
        angle = math.degrees(math.atan2(c1[0], c1[1]) - math.atan2(c0[0], c0[1]))
        assert abs(abs((angle + 180) % 360 - 180) - 45) < 3  # rotated by 45° about the centre
        assert abs(np.linalg.norm(c1) - np.linalg.norm(c0)) < 0.7


def test_rescale_sizes():
    img, lab = _phantom(64, 64)
    for size in P.SCALE_SIZES:
        out, out_lab = P.rescale(img[None], lab[None], size)
        assert out.shape == (1, size, size) and out_lab.shape == (1, size, size)
        assert set(np.unique(out_lab)) <= {0, 1}
        # foreground fraction and mean intensity are preserved
        assert abs(out_lab.mean() - lab.mean()) < 0.01
        assert abs(out.mean() - img.mean()) < 0.01
    same, same_lab = P.rescale(img, lab, 64)
    np.testing.assert_allclose(same, img, atol=1e-6)
    np.testing.assert_array_equal(same_lab, lab)
    # nearest resize back from a 2x upsampling is exact
    np.testing.assert_array_equal(P.resize_label(P.resize_label(lab, 128, batched=False), 64, batched=False), lab)


# ---------------------------------------------------------------- noise


def test_gaussian_noise_std():
    x = np.full((4, 64, 64), 0.5, np.float32)
    for s in (0.25, 1.0):
        d = P.gaussian_noise(x, s, _rng(1)) - x
        assert abs(d.std() - 0.2 * s) < 0.01 * s and abs(d.mean()) < 0.01 * s


def test_rician_noise_zero_image():
    x = np.zeros((4, 64, 64), np.float32)
    out = P.rician_noise(x, 1.0, _rng(2))
    assert out.min() >= 0
    assert abs(out.mean() - 0.2 * math.sqrt(math.pi / 2)) < 0.005  # Rayleigh mean
    # on a bright image it is close to Gaussian noise of the same sigma
    bright = P.rician_noise(np.ones_like(x), 0.5, _rng(2)) - 1
    assert abs(bright.std() - 0.1) < 0.005


# ---------------------------------------------------------------- bias field


def test_bias_field_smooth_multiplicative():
    img, _ = _phantom(48, 48)
    for seed in range(3):
        out = P.bias_field(img, 1.0, _rng(seed))
        ratio = out / img
        assert ratio.min() > 0
        assert ratio.min() >= 0.5 - 1e-5 and ratio.max() <= 2 + 1e-5
        assert np.isclose(np.abs(np.log(ratio)).max(), math.log(2), atol=1e-4)
        # smooth: second differences are tiny compared with the field's range
        d2 = np.abs(np.diff(np.log(ratio), 2, axis=0)).max() + np.abs(np.diff(np.log(ratio), 2, axis=1)).max()
        assert d2 < 0.05
        # the same field multiplies any image: ratio does not depend on the content
        other = P.bias_field(np.full_like(img, 0.3), 1.0, _rng(seed)) / 0.3
        np.testing.assert_allclose(other, ratio, rtol=1e-4)


# ---------------------------------------------------------------- k-space artefacts


def test_spike_adds_energy_at_one_location():
    img, _ = _phantom()
    for seed in range(5):
        out = P.spike(img, 0.8, _rng(seed))
        diff = np.abs(np.fft.fft2(out.astype(np.float64)) - np.fft.fft2(img.astype(np.float64)))
        big = np.argwhere(diff > 1e-3 * diff.max())
        assert len(big) == 2, big
        (a, b), (c, d) = big
        assert (a + c) % 32 == 0 and (b + d) % 32 == 0  # the spike and its conjugate mirror
        # a cosine of amplitude 0.25 * severity: k-space peak a·HW/2, image-space RMS a/√2
        assert diff[a, b] == pytest.approx(0.25 * 0.8 * 32 * 32 / 2, rel=1e-4)
        assert (out - img).std() == pytest.approx(0.25 * 0.8 / math.sqrt(2), rel=1e-3)


def test_ghosting_replica_offsets_and_lines():
    # a point source: ghosts only at multiples of N/4 along the phase-encode axis; the kept DC
    # line adds back the column mean (1/32), so the signed image keeps its mean
    x = np.zeros((32, 32), np.float32)
    x[5, 9] = 1.0
    out = P.ghosting(x, 1.0, _rng(0), axis=0)
    assert set(map(tuple, np.argwhere(out > 1e-6))) == {(r, 9) for r in range(32)}
    np.testing.assert_allclose(out[[13, 21, 29], 9], 0.25 - 1 / 32, atol=1e-6)  # severity / n_ghosts
    np.testing.assert_allclose(out[5, 9], 0.75 + 1 / 32, atol=1e-6)
    others = np.delete(out[:, 9], [5, 13, 21, 29])
    np.testing.assert_allclose(others, 1 / 32, atol=1e-6)
    # k-space: only every 4th line along the axis changes, never the DC line (image positive
    # enough that the magnitude does not fold)
    img, _ = _phantom()
    img = img + 1.0
    for axis in (0, 1):
        out = P.ghosting(img, 0.5, _rng(0), axis=axis)
        diff = np.abs(np.fft.fft2(out.astype(np.float64)) - np.fft.fft2(img.astype(np.float64)))
        per_line = diff.sum(axis=1 - axis)
        changed = np.flatnonzero(per_line > 1e-3 * per_line.max())
        assert set(changed) <= set(range(4, 32, 4)) and len(changed) >= 4


def test_motion_preserves_energy():
    img, _ = _phantom(48, 48, cy=24, cx=24, r=10)
    e0 = float((img.astype(np.float64) ** 2).sum())
    for seed in range(4):
        out = P.motion(img, 1.0, _rng(seed))
        e1 = float((out.astype(np.float64) ** 2).sum())
        assert abs(e1 / e0 - 1) < 0.05
        assert np.abs(out - img).max() > 0.02  # visible artefact


def test_motion_shift_only_preserves_energy_exactly(monkeypatch):
    # without the rotation the moved lines differ only by a phase ramp: Parseval makes the
    # energy of the (magnitude) image exactly the original's
    monkeypatch.setattr(P, "MAX_MOTION_ROTATION_DEG", 0.0)
    img, _ = _phantom(48, 48)
    out = P.motion(img, 1.0, _rng(5))
    assert float((out.astype(np.float64) ** 2).sum()) == pytest.approx(float((img.astype(np.float64) ** 2).sum()), rel=1e-5)
    assert np.abs(out - img).max() > 0.02


# ---------------------------------------------------------------- blur and gamma


def _high_freq_energy(x: np.ndarray) -> float:
    k = np.abs(np.fft.fft2(x)) ** 2
    f = np.sqrt(np.fft.fftfreq(x.shape[0])[:, None] ** 2 + np.fft.fftfreq(x.shape[1])[None, :] ** 2)
    return float(k[f > 0.15].sum())


def test_blur_reduces_high_frequencies():
    img, _ = _phantom()
    img = img + 0.1 * _rng(0).standard_normal(img.shape).astype(np.float32)
    energies = [_high_freq_energy(P.blur(img, s, _rng(0))) for s in (0.0, 0.25, 0.5, 1.0)]
    assert energies == sorted(energies, reverse=True) and energies[-1] < 0.05 * energies[0]
    assert P.blur(img, 1.0, _rng(0)).mean() == pytest.approx(img.mean(), abs=2e-3)  # mass kept


def test_gamma_monotonic():
    x = np.linspace(0, 1, 101, dtype=np.float32)[None, None, :].repeat(8, 0)  # (8, 1, 101)
    out = P.gamma(x, 1.0, _rng(0))[:, 0]
    assert np.all(np.diff(out, axis=1) > 0)
    np.testing.assert_allclose(out[:, [0, -1]], [[0, 1]] * 8, atol=1e-6)  # endpoints fixed
    mids = sorted(set(np.round(out[:, 50].astype(float), 4)))
    assert mids == [0.25, 0.7071]  # γ = 2 and γ = 1/2 both drawn
