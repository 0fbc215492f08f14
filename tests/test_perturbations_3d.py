"""The perturbations on volumes ``(B, X, Y, Z)`` (``ndim=3``): each one's contract, the label
moving with the geometric ones, and ties to the 2D definitions (tests/test_perturbations.py)
on volumes constant along Z, where the 3D perturbation reduces to the 2D one per slice."""

from __future__ import annotations

import math

import numpy as np
import pytest

from mednca_jax.evaluate import perturbations as P

SHAPE = (16, 14, 12)


def _sphere(shape=SHAPE, centre=(6.0, 8.0, 5.0), r=4.0) -> tuple[np.ndarray, np.ndarray]:
    """A smooth bright ball on a dim background ``(X, Y, Z)``, and its label."""
    g = np.meshgrid(*[np.arange(n, dtype=np.float64) for n in shape], indexing="ij")
    d = np.sqrt(sum((gi - c) ** 2 for gi, c in zip(g, centre)))
    label = (d < r).astype(np.uint8)
    image = (0.2 + 0.7 / (1 + np.exp(2 * (d - r)))).astype(np.float32)
    return image, label


def _batch() -> tuple[np.ndarray, np.ndarray]:
    a, la = _sphere()
    b, lb = _sphere(centre=(9.0, 6.0, 7.0), r=3.5)
    return np.stack([a, b]), np.stack([la, lb])[..., None]  # labels (B, X, Y, Z, 1)


def _z_constant(h=20, w=18, depth=6) -> np.ndarray:
    """A 2D phantom repeated along Z: ``(X, Y, Z)``."""
    yy, xx = np.mgrid[:h, :w]
    img = 0.2 + 0.6 * np.exp(-((yy - 8.0) ** 2 + (xx - 10.0) ** 2) / 20.0) + 0.1 * (xx / w)
    return np.repeat(img.astype(np.float32)[..., None], depth, axis=2)


@pytest.mark.parametrize("name", sorted(P.PERTURBATIONS))
def test_3d_contract_shape_identity_seed_range(name):
    images, labels = _batch()
    out0, lab0 = P.apply_perturbation(name, images, labels, 0.0, seed=3, ndim=3)
    np.testing.assert_array_equal(out0, images)
    np.testing.assert_array_equal(lab0, labels)
    a, la = P.apply_perturbation(name, images, labels, 1.0, seed=5, ndim=3)
    b, lb = P.apply_perturbation(name, images, labels, 1.0, seed=5, ndim=3)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(la, lb)
    assert a.shape == images.shape and a.dtype == np.float32 and la.shape == labels.shape
    assert a.min() >= 0.0 and a.max() <= 1.0
    assert np.abs(a - images).max() > 1e-2  # severity 1 visibly changes every kind
    single, single_lab = P.apply_perturbation(name, images[0], labels[0], 0.5, seed=1, ndim=3)
    assert single.shape == SHAPE and single_lab.shape == labels.shape[1:]
    if P.PERTURBATIONS[name].kind == "intensity":
        np.testing.assert_array_equal(la, labels)


def test_the_rank_is_the_argument_not_the_shape():
    """One volume (X, Y, Z) and a batch of slices (B, H, W) both have three axes."""
    vol = _sphere()[0]
    as_slices = P.apply_perturbation("blur", vol, None, 1.0, 0)[0]  # 16 slices of 14 x 12
    as_volume = P.apply_perturbation("blur", vol, None, 1.0, 0, ndim=3)[0]
    assert as_slices.shape == as_volume.shape == SHAPE
    assert np.abs(as_slices - as_volume).max() > 1e-3  # ndim=3 also blurs along the first axis
    with pytest.raises(ValueError, match=r"\(X, Y, Z\) or \(B, X, Y, Z\)"):
        P.apply_perturbation("blur", vol[0], None, 1.0, 0, ndim=3)
    with pytest.raises(ValueError, match="2D images and 3D volumes"):
        P.apply_perturbation("rotation", np.zeros((2, 4, 4, 4, 4), np.float32), None, 0.5, 0, ndim=4)


def test_geometric_3d_move_the_label_with_the_image():
    images, labels = _batch()
    binary = labels[..., 0].astype(np.float32)
    for name in ("translation", "rotation"):
        for seed in range(3):
            out, lab = P.apply_perturbation(name, binary, labels, 1.0, seed, ndim=3)
            moved = lab[..., 0] > 0
            assert not np.array_equal(moved, labels[..., 0] > 0)  # it moved
            if name == "translation":  # the same integer shift: exactly the image
                np.testing.assert_array_equal(moved, out > 0.5)
            else:  # bilinear image vs nearest label: the same ball, borders aside
                inter = np.logical_and(moved, out > 0.5).sum()
                assert 2 * inter / (moved.sum() + (out > 0.5).sum()) > 0.85


def test_translation_3d_shifts_a_quarter_of_each_side_along_a_unit_vector():
    vol = np.zeros((40, 32, 24), np.float32)
    vol[20, 16, 12] = 1.0
    shifts = []
    for seed in range(8):
        out = P.translation(vol, 1.0, np.random.default_rng(seed), ndim=3)
        d = np.array(np.unravel_index(np.argmax(out), out.shape)) - (20, 16, 12)
        # |d_i| = round(0.25 * N_i * |u_i|) with |u| = 1
        scaled = d / (0.25 * np.array(vol.shape))
        assert abs(np.linalg.norm(scaled) - 1.0) < 0.2, (seed, d)
        shifts.append(tuple(d))
    assert len(set(shifts)) == 8 and any(s[2] != 0 for s in shifts)  # random directions, Z included
    half = P.translation(vol, 0.5, np.random.default_rng(0), ndim=3)
    d_half = np.array(np.unravel_index(np.argmax(half), half.shape)) - (20, 16, 12)
    assert np.abs(d_half - np.array(shifts[0]) / 2).max() <= 0.5 + 1e-9  # same direction, half as far


def test_translation_3d_of_a_z_constant_volume_shifts_each_slice_as_in_2d():
    vol = _z_constant()
    out = P.translation(vol, 0.6, np.random.default_rng(4), ndim=3)
    (dx, dy, dz), = [np.array(s) for s in [_shift_of(vol, out)]]
    kept = [z for z in range(vol.shape[2]) if 0 <= z - dz < vol.shape[2]]
    assert kept
    for z in kept:
        np.testing.assert_array_equal(out[..., z], P._shift_zero(vol[..., 0], (dx, dy)))
    for z in set(range(vol.shape[2])) - set(kept):
        assert not out[..., z].any()


def _shift_of(vol: np.ndarray, out: np.ndarray) -> tuple[int, int, int]:
    """The integer shift that takes ``vol`` to ``out`` (exhaustive, small volumes)."""
    for dx in range(-vol.shape[0] // 2, vol.shape[0] // 2 + 1):
        for dy in range(-vol.shape[1] // 2, vol.shape[1] // 2 + 1):
            for dz in range(-vol.shape[2] // 2, vol.shape[2] // 2 + 1):
                if np.array_equal(P._shift_zero(vol, (dx, dy, dz)), out):
                    return dx, dy, dz
    raise AssertionError("not an integer shift")


def test_rotation_3d_about_z_is_the_2d_rotation_of_every_slice():
    vol = _z_constant()
    lab = (vol > 0.5).astype(np.uint8)
    for seed in range(3):
        out, out_lab = P.rotation_with_label(vol, lab, 0.8, np.random.default_rng(seed), ndim=3, about=(0, 0, 1))
        ref, ref_lab = P.rotation_with_label(vol[..., 0], lab[..., 0], 0.8, np.random.default_rng(seed))
        for z in range(vol.shape[2]):
            np.testing.assert_allclose(out[..., z], ref, atol=1e-6)
            np.testing.assert_array_equal(out_lab[..., z], ref_lab)


def test_rotation_3d_about_a_random_axis_keeps_distances_to_the_centre():
    shape = (21, 21, 21)
    vol, lab = _sphere(shape, centre=(10.0, 10.0, 15.0), r=3.0)  # off-centre ball
    axes = set()
    for seed in range(4):
        out, out_lab = P.rotation_with_label(vol, lab, 1.0, np.random.default_rng(seed), ndim=3)
        c0 = np.array(np.nonzero(lab)).mean(axis=1) - 10.0
        c1 = np.array(np.nonzero(out_lab)).mean(axis=1) - 10.0
        assert abs(np.linalg.norm(c1) - np.linalg.norm(c0)) < 0.5  # a rotation about the centre
        angle = math.degrees(math.acos(np.clip(c0 @ c1 / (np.linalg.norm(c0) * np.linalg.norm(c1)), -1, 1)))
        assert angle <= 45.0 + 3.0  # the ball's own angle: at most the rotation's
        assert abs(int(out_lab.sum()) - int(lab.sum())) <= 0.15 * lab.sum()
        axes.add(tuple(np.round(c1, 1)))
    assert len(axes) == 4  # a different axis / sign per seed


def test_bias_polynomial_3d_restricted_to_x_y_is_the_2d_one():
    exps2, exps3 = P._bias_exponents(2), P._bias_exponents(3)
    assert len(exps2) == P._N_BIAS_TERMS == 9 and len(exps3) == 19
    c2 = np.random.default_rng(0).uniform(-1, 1, len(exps2))
    c3 = np.array([c2[exps2.index(e[:2])] if e[2] == 0 else 0.0 for e in exps3])
    q3 = P._bias_polynomial((20, 18, 5), c3)
    q2 = P._bias_polynomial((20, 18), c2)
    for z in range(5):
        np.testing.assert_allclose(q3[..., z], q2, atol=1e-12)


def test_bias_field_3d_spans_half_to_double_at_severity_1():
    ones = np.full((3, 12, 10, 8), 0.4, np.float32)
    for s in (0.5, 1.0):
        field = P.bias_field(ones, s, np.random.default_rng(2), ndim=3) / 0.4
        log = np.log(field.reshape(3, -1))
        np.testing.assert_allclose(np.abs(log).max(axis=1), s * math.log(2), rtol=1e-5)
        assert np.ptp(log[:, :], axis=1).min() > 0.1 * s  # varies across the volume


def test_noise_3d_is_the_per_voxel_noise_of_2d():
    """Per-voxel noise does not depend on the rank: one volume draws what its X slices would."""
    vol = _z_constant()
    for name in ("gaussian_noise", "rician_noise"):
        fn = P.PERTURBATIONS[name].fn
        a = fn(vol, 0.7, np.random.default_rng(9), ndim=3)
        b = fn(vol, 0.7, np.random.default_rng(9))  # the same array as 20 slices (18, 6)
        np.testing.assert_array_equal(a, b)
    flat = np.full((1, 24, 24, 24), 0.5, np.float32)
    noise = P.gaussian_noise(flat, 1.0, np.random.default_rng(0), ndim=3) - 0.5
    assert abs(noise.std() - P.MAX_NOISE_STD) < 0.005 and abs(noise.mean()) < 0.005


def test_blur_3d_of_a_z_constant_volume_is_the_2d_blur_of_each_slice():
    vol = _z_constant()
    out = P.blur(vol, 0.75, None, ndim=3)
    ref = P.blur(np.moveaxis(vol, 2, 0), 0.75, None)  # (Z, X, Y) slices
    np.testing.assert_allclose(np.moveaxis(out, 2, 0), ref, atol=1e-6)
    ball = _sphere()[0]
    assert P.blur(ball, 1.0, None, ndim=3).max() < ball.max() - 0.05  # a 3D ball spreads along Z too


def test_ghosting_3d_of_a_z_constant_volume_is_the_2d_ghosting_of_each_slice():
    vol = _z_constant()
    for axis in (0, 1):
        out = P.ghosting(vol, 0.9, np.random.default_rng(0), axis=axis, ndim=3)
        ref = P.ghosting(np.moveaxis(vol, 2, 0), 0.9, np.random.default_rng(0), axis=axis)
        np.testing.assert_allclose(np.moveaxis(out, 2, 0), ref, atol=1e-5)
    # along Z, a Z-constant volume has no k-space but kz = 0: nothing to ghost
    np.testing.assert_allclose(P.ghosting(vol, 1.0, np.random.default_rng(0), axis=2, ndim=3), vol, atol=1e-5)


def test_spike_3d_adds_one_plane_wave_of_amplitude_quarter_s():
    vol = _sphere()[0]
    for s in (0.4, 1.0):
        out = P.spike(vol, s, np.random.default_rng(1), ndim=3)
        diff = out.astype(np.float64) - vol
        k = np.abs(np.fft.fftn(diff))
        assert (k > 1e-3 * k.max()).sum() == 2  # the spike and its conjugate
        # a cosine of amplitude a has FFT peaks a * (number of voxels) / 2
        np.testing.assert_allclose(k.max() / (vol.size / 2), P.MAX_SPIKE_AMPLITUDE * s, rtol=1e-4)
        assert np.abs(diff).max() <= P.MAX_SPIKE_AMPLITUDE * s + 1e-5
    locs = {P.spike_location(SHAPE, np.random.default_rng(i)) for i in range(30)}
    assert any(loc[2] != 0 for loc in locs) and all(len(loc) == 3 for loc in locs)


def test_motion_3d_of_a_z_constant_volume():
    """Rotated about Z, a Z-constant volume stays Z-constant and its k-space is the kz = 0
    plane alone: motion along X / Y acts on every slice alike, and along Z (where the moved
    late planes are never kz = 0) it changes nothing."""
    vol = _z_constant()
    for axis in (0, 1):
        out = P.motion(vol, 1.0, np.random.default_rng(axis), axis=axis, ndim=3, about=(0, 0, 1))
        assert np.ptp(out, axis=2).max() < 1e-5 and np.abs(out - vol).max() > 0.02
    np.testing.assert_allclose(P.motion(vol, 1.0, np.random.default_rng(0), axis=2, ndim=3, about=(0, 0, 1)), vol, atol=1e-5)
    ball = _sphere()[0]
    out = P.motion(ball, 1.0, np.random.default_rng(0), ndim=3)
    assert np.abs(out - ball).max() > 0.02
    # the shift is a phase ramp and the magnitude changes little energy (the rotation's interpolation aside)
    assert abs((out.astype(np.float64) ** 2).sum() / (ball.astype(np.float64) ** 2).sum() - 1) < 0.1


def test_rescale_3d_grids():
    images, labels = _batch()
    assert P.scaled_grid((16, 16, 12), 0.75, 2) == (12, 12, 8)
    assert P.scaled_grid((16, 16, 12), 1.5, 2) == (24, 24, 18)
    assert P.scaled_grid((16, 16, 12), 1.0, 4) == (16, 16, 12)
    img, lab = P.rescale(images, labels, (24, 21, 18), ndim=3)
    assert img.shape == (2, 24, 21, 18) and lab.shape == (2, 24, 21, 18, 1)
    assert set(np.unique(lab)) <= {0, 1} and 0.0 <= img.min() and img.max() <= 1.0
    # the ball keeps its place and grows with the grid (voxel count x 24*21*18 / (16*14*12))
    ratio = lab[0].sum() / labels[0].sum()
    assert abs(ratio - 24 * 21 * 18 / (16 * 14 * 12)) < 0.35 * ratio
    back, _ = P.rescale(img, None, SHAPE, ndim=3)
    assert np.abs(back - images).mean() < 0.02
