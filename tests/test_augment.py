"""On-device augmentation (mednca_jax.augment) and the [augment] config section."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mednca_jax.augment import AUGMENT_KEY_TAG, augment_batch, augment_keys, augment_keys_of, augment_sample, spatial
from mednca_jax.nca.rule import sample_keys
from conftest import TINY_RUN_TOML
from mednca_jax.augment import intensity, kspace
from mednca_jax.config import AUGMENT_PRESETS, AugmentConfig, ConfigError, from_dict

PROBS = [f.name for f in dataclasses.fields(AugmentConfig) if f.name.startswith("p_")]
PROBS_2D = [p for p in PROBS if p != "p_flip_d"]  # p_flip_d mirrors a third axis: volumes only
SPATIAL = {"p_shift", "p_scale", "p_rotate", "p_flip_h", "p_flip_w", "p_flip_d", "p_elastic"}
SIZE = 32
VOLUME = (16, 16, 12)  # a small 3D grid: every 3D test compiles its own program


def _batch(n=4, size=SIZE, seed=0):
    """Images with a bright off-centre rectangle (the label) on a textured background."""
    rng = np.random.default_rng(seed)
    img = 0.2 * rng.random((n, size, size, 1), dtype=np.float32)
    lab = np.zeros((n, size, size, 1), np.float32)
    for i in range(n):
        y, x = rng.integers(4, size - 14, 2)
        lab[i, y : y + 9, x : x + 6] = 1.0
    img += 0.7 * lab
    return {"image": jnp.asarray(img), "label": jnp.asarray(lab)}


def _only(name, p=1.0, **kw):
    return AugmentConfig(**{name: p}, **kw)


@pytest.fixture(scope="module")
def batch():
    return _batch()


@pytest.mark.parametrize("name", PROBS_2D)
def test_each_transform_keeps_shapes_dtypes_binary_labels_and_changes_the_image(name, batch):
    acfg = _only(name)
    out = augment_batch(batch, augment_keys(jax.random.PRNGKey(1), 4), acfg)
    for k in ("image", "label"):
        assert out[k].shape == batch[k].shape and out[k].dtype == batch[k].dtype
    assert np.all(np.isfinite(out["image"]))
    assert set(np.unique(np.asarray(out["label"]))) <= {0.0, 1.0}
    assert float(jnp.min(out["image"])) >= 0.0 and float(jnp.max(out["image"])) <= 1.0  # clipped / in range
    diff = np.abs(np.asarray(out["image"]) - np.asarray(batch["image"])).max(axis=(1, 2, 3))
    assert np.all(diff > 1e-4), f"{name} at probability 1 left a sample unchanged: {diff}"
    if name not in SPATIAL:
        np.testing.assert_array_equal(out["label"], batch["label"])  # intensity: the label is untouched


def test_preset_none_is_the_identity_and_probability_zero_paths_are_bit_identical(batch):
    assert augment_batch(batch, augment_keys(jax.random.PRNGKey(0), 4), AugmentConfig()) is batch
    # Every transform traced but (practically) never firing: the where() must give back the input.
    never = AugmentConfig(**{p: 1e-12 for p in PROBS_2D})
    out = jax.jit(lambda b, k: augment_batch(b, k, never))(batch, augment_keys(jax.random.PRNGKey(0), 4))
    np.testing.assert_array_equal(out["image"], batch["image"])
    np.testing.assert_array_equal(out["label"], batch["label"])


def test_integer_shift_moves_image_and_label_by_the_same_amount(batch):
    img, lab = batch["image"][0], batch["label"][0]
    m = spatial.affine_matrix((SIZE, SIZE), jnp.array([3.0, -2.0]), 1.0, 0.0, jnp.zeros(2, bool))
    out_img, out_lab = spatial.warp(img, lab, spatial.affine_coords((SIZE, SIZE), m))
    expect = lambda a: np.pad(np.asarray(a), ((3, 0), (0, 2), (0, 0)))[:SIZE, 2:]  # noqa: E731
    np.testing.assert_array_equal(out_img, expect(img))
    np.testing.assert_array_equal(out_lab, expect(lab))


def test_rotation_by_90_degrees_and_flip_are_exact(batch):
    img = batch["image"][0]
    for angle, flip, ref in ((math.pi / 2, (False, False), np.rot90(np.asarray(img), 1)), (0.0, (False, True), np.asarray(img)[:, ::-1])):
        m = spatial.affine_matrix((SIZE, SIZE), jnp.zeros(2), 1.0, angle, jnp.array(flip))
        out = spatial.sample(img, spatial.affine_coords((SIZE, SIZE), m), 1)
        np.testing.assert_allclose(out, ref, atol=1e-5)


@pytest.mark.parametrize("label_interp", ["nearest", "bilinear"])
def test_random_geometry_moves_image_and_label_together(label_interp):
    """With image = label, the warped image's centre of mass is the warped label's (within a
    pixel: the label is resampled by nearest neighbour / threshold, the image bilinearly)."""
    b = _batch(n=6, seed=3)
    b = {"image": b["label"], "label": b["label"]}
    acfg = AugmentConfig(p_shift=1.0, p_scale=1.0, p_rotate=1.0, p_elastic=1.0, p_flip_w=0.5, label_interp=label_interp)
    out = augment_batch(b, augment_keys(jax.random.PRNGKey(7), 6), acfg)
    yy, xx = np.mgrid[:SIZE, :SIZE]
    for img, lab, orig in zip(np.asarray(out["image"])[..., 0], np.asarray(out["label"])[..., 0], np.asarray(b["label"])[..., 0]):
        assert lab.sum() > 0
        c_img = np.array([(img * yy).sum(), (img * xx).sum()]) / img.sum()
        c_lab = np.array([(lab * yy).sum(), (lab * xx).sum()]) / lab.sum()
        c_orig = np.array([(orig * yy).sum(), (orig * xx).sum()]) / orig.sum()
        assert np.abs(c_img - c_lab).max() < 1.0, (c_img, c_lab)
        assert np.abs(c_img - c_orig).max() > 0.5  # it did move


def test_deterministic_for_a_key_and_different_for_another(batch):
    acfg = AugmentConfig.from_preset("default")
    f = jax.jit(lambda b, k: augment_batch(b, augment_keys(k, 4), acfg))
    a, b2, c = f(batch, jax.random.PRNGKey(5)), f(batch, jax.random.PRNGKey(5)), f(batch, jax.random.PRNGKey(6))
    np.testing.assert_array_equal(a["image"], b2["image"])
    np.testing.assert_array_equal(a["label"], b2["label"])
    assert not np.array_equal(np.asarray(a["image"]), np.asarray(c["image"]))


@pytest.mark.slow
def test_per_sample_keys_a_batch_equals_its_halves_with_their_own_keys(batch):
    acfg = AugmentConfig.from_preset("default", p_shift=1.0, p_gamma=1.0, p_spike=1.0)
    key = jax.random.PRNGKey(11)
    whole = augment_batch(batch, augment_keys(key, 4), acfg)
    rows = augment_keys(key, 4)
    halves = [augment_batch({k: v[i : i + 2] for k, v in batch.items()}, rows[i : i + 2], acfg) for i in (0, 2)]
    # the same draws; the float ops may vectorise differently at another batch size
    np.testing.assert_allclose(whole["image"], np.concatenate([h["image"] for h in halves]), atol=1e-6)
    np.testing.assert_array_equal(whole["label"], np.concatenate([h["label"] for h in halves]))
    # ... and a sample's result does not depend on its neighbours
    k3 = jax.random.fold_in(jax.random.fold_in(key, 3), AUGMENT_KEY_TAG)  # row 3's key, spelled out
    np.testing.assert_array_equal(jax.random.key_data(k3), jax.random.key_data(augment_keys_of(sample_keys(key, 4))[3]))
    one = jax.jit(lambda i, l, k: augment_sample(i, l, k, acfg))(batch["image"][3], batch["label"][3], k3)
    np.testing.assert_allclose(one[0], whole["image"][3], atol=1e-6)  # (eager op-by-op rounds differently)
    np.testing.assert_array_equal(one[1], whole["label"][3])


# ------------------------------------------------------------------ the transforms' physics


def test_gaussian_and_rician_noise_have_the_asked_spread():
    x = jnp.zeros((64, 64, 1))
    n = jax.random.normal(jax.random.PRNGKey(0), (2, 64, 64, 1))
    assert abs(float(jnp.std(intensity.gaussian_noise(x, n[0], 0.1))) - 0.1) < 0.01
    rayleigh = intensity.rician_noise(x, n, 0.1)  # on a zero image: Rayleigh, mean σ·sqrt(π/2)
    assert float(jnp.min(rayleigh)) >= 0 and abs(float(jnp.mean(rayleigh)) - 0.1 * math.sqrt(math.pi / 2)) < 0.01


def test_bias_field_stays_within_its_bounds_and_blur_keeps_the_mean():
    x = jnp.ones((32, 32, 1))
    coeffs = jax.random.uniform(jax.random.PRNGKey(0), (len(intensity.BIAS_TERMS),), minval=-1, maxval=1)
    field = intensity.bias_field(x, coeffs, 1.0)
    assert 0.5 - 1e-5 <= float(field.min()) and float(field.max()) <= 2.0 + 1e-5
    assert max(float(field.max()), 1 / float(field.min())) > 1.9  # one bound is reached
    img = _batch(1)["image"][0]
    blurred = intensity.blur(img, 1.5, 2.0)
    assert abs(float(blurred.mean()) - float(img.mean())) < 0.01 and float(blurred.std()) < float(img.std())


def test_kspace_artefacts():
    img = _batch(1)["image"][0]
    np.testing.assert_allclose(kspace.low_resolution(img, 1.0), img, atol=1e-5)
    low = kspace.low_resolution(img, 0.3)
    assert float(jnp.abs(jnp.diff(low, axis=0)).mean()) < 0.6 * float(jnp.abs(jnp.diff(img, axis=0)).mean())
    np.testing.assert_allclose(kspace.ghosting(img, 0.0, 0), img, atol=1e-5)
    assert float(jnp.abs(kspace.ghosting(img, 1.0, 1) - img).max()) > 0.05
    stripes = kspace.spike(img, 0.25, 3, 5, 0.0) - img  # 0.25·cos(2π(3y/H + 5x/W))
    yy, xx = np.mgrid[:SIZE, :SIZE]
    np.testing.assert_allclose(stripes[..., 0], 0.25 * np.cos(2 * np.pi * (3 * yy / SIZE + 5 * xx / SIZE)), atol=1e-5)
    np.testing.assert_allclose(kspace.motion(img, jnp.zeros(2), 0.0, 0.3, 0), img, atol=1e-5)
    moved = kspace.motion(img, jnp.array([3.0, 0.0]), 0.0, 1.0, 0)  # every line after a 3-row move
    np.testing.assert_allclose(moved[3:], img[:-3], atol=1e-4)


# ------------------------------------------------------------------ 3D volumes


def _volume_batch(n=2, shape=VOLUME, seed=0, channels=1):
    """Volumes with a bright off-centre box (the label) on a textured background."""
    rng = np.random.default_rng(seed)
    img = 0.2 * rng.random((n, *shape, channels), dtype=np.float32)
    lab = np.zeros((n, *shape, 1), np.float32)
    for i in range(n):
        lo = [int(rng.integers(2, s - 7)) for s in shape]
        lab[(i, *(slice(a, a + 5) for a in lo))] = 1.0
    img += 0.7 * lab
    return {"image": jnp.asarray(img), "label": jnp.asarray(lab)}


@pytest.fixture(scope="module")
def volumes():
    return _volume_batch()


def _still(shape, **kw):
    """The identity pull map of ``shape``, with the given parts replaced."""
    n = len(shape)
    parts = {"shift": jnp.zeros(n), "scale": 1.0, "angle": 0.0 if n == 2 else jnp.zeros(n), "flip": jnp.zeros(n, bool), **kw}
    return spatial.affine_coords(shape, spatial.affine_matrix(shape, **parts))


@pytest.mark.parametrize("name", PROBS)
def test_each_transform_on_volumes_keeps_shapes_dtypes_binary_labels_and_changes_the_image(name, volumes):
    out = jax.jit(lambda b, k: augment_batch(b, k, _only(name)))(volumes, augment_keys(jax.random.PRNGKey(1), 2))
    for k in ("image", "label"):
        assert out[k].shape == volumes[k].shape and out[k].dtype == volumes[k].dtype
    assert np.all(np.isfinite(out["image"]))
    assert set(np.unique(np.asarray(out["label"]))) <= {0.0, 1.0}
    assert float(jnp.min(out["image"])) >= 0.0 and float(jnp.max(out["image"])) <= 1.0
    diff = np.abs(np.asarray(out["image"]) - np.asarray(volumes["image"])).max(axis=(1, 2, 3, 4))
    assert np.all(diff > 1e-4), f"{name} at probability 1 left a volume unchanged: {diff}"
    if name not in SPATIAL:
        np.testing.assert_array_equal(out["label"], volumes["label"])


@pytest.mark.parametrize("axis, name", [(0, "p_flip_h"), (1, "p_flip_w"), (2, "p_flip_d")])
def test_flips_of_volumes_are_exact_mirrors_and_their_own_inverse(axis, name, volumes):
    img, lab = volumes["image"][0], volumes["label"][0]
    flip = jnp.arange(3) == axis
    once = spatial.warp(img, lab, _still(VOLUME, flip=flip))
    np.testing.assert_array_equal(once[0], np.flip(np.asarray(img), axis))
    np.testing.assert_array_equal(once[1], np.flip(np.asarray(lab), axis))
    twice = spatial.warp(*once, _still(VOLUME, flip=flip))
    np.testing.assert_array_equal(twice[0], img)
    np.testing.assert_array_equal(twice[1], lab)
    # through the pipeline: the flip alone, along its own axis
    out = augment_batch(volumes, augment_keys(jax.random.PRNGKey(2), 2), _only(name))
    np.testing.assert_array_equal(out["image"], np.flip(np.asarray(volumes["image"]), axis + 1))
    np.testing.assert_array_equal(out["label"], np.flip(np.asarray(volumes["label"]), axis + 1))


def test_zero_rotation_and_unit_scale_of_a_volume_are_the_identity(volumes):
    img, lab = volumes["image"][0], volumes["label"][0]
    out = spatial.warp(img, lab, _still(VOLUME), "bilinear")
    np.testing.assert_array_equal(out[0], img)
    np.testing.assert_array_equal(out[1], lab)
    acfg = AugmentConfig(p_rotate=1.0, rotate_deg=0.0, p_scale=1.0, scale_range=(1.0, 1.0))
    out = augment_batch(volumes, augment_keys(jax.random.PRNGKey(3), 2), acfg)
    np.testing.assert_allclose(out["image"], volumes["image"], atol=1e-6)
    np.testing.assert_array_equal(out["label"], volumes["label"])


def test_3d_rotation_is_a_proper_rotation_composed_from_the_three_axes():
    angles = jnp.array([0.3, -0.5, 0.7])
    r = np.asarray(spatial.rotation_inverse(3, angles))
    np.testing.assert_allclose(r @ r.T, np.eye(3), atol=1e-6)
    assert abs(np.linalg.det(r) - 1.0) < 1e-6
    one = [np.asarray(spatial.rotation_inverse(3, jnp.zeros(3).at[k].set(angles[k]))) for k in range(3)]
    np.testing.assert_allclose(r, one[0] @ one[1] @ one[2], atol=1e-6)
    for k in range(3):  # the turn about axis k leaves axis k alone
        np.testing.assert_allclose(one[k][k], np.eye(3)[k], atol=1e-7)
    with pytest.raises(ValueError, match="one angle per axis"):
        spatial.rotation_inverse(3, 0.3)


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_rotating_a_volume_about_an_axis_rotates_each_of_its_slices_like_the_2d_code(axis):
    """About axis k, the slices across k turn as 2D images whose rows and columns are the axes
    ``(k+1, k+2) mod 3``; about the last axis, the slices ``[:, :, z]`` themselves. With an
    in-plane shift and flip (a zoom would mix the slices: it scales axis k too)."""
    shape = (14, 18, 10)
    vol = _volume_batch(1, shape, seed=4, channels=2)
    img, lab = vol["image"][0], vol["label"][0]
    angle = 0.4
    rows, cols = (axis + 1) % 3, (axis + 2) % 3
    shift3 = jnp.zeros(3).at[rows].set(1.5).at[cols].set(-2.25)
    flip3 = jnp.zeros(3, bool).at[cols].set(True)
    coords = _still(shape, shift=shift3, angle=jnp.zeros(3).at[axis].set(angle), flip=flip3)
    out_img, out_lab = spatial.warp(img, lab, coords)

    # the same slices as 2D images (rows, cols, c)
    to2d = lambda a: np.moveaxis(np.asarray(a), (axis, rows, cols), (0, 1, 2))  # noqa: E731
    s2 = (shape[rows], shape[cols])
    coords2 = _still(s2, shift=jnp.array([1.5, -2.25]), angle=angle, flip=jnp.array([False, True]))
    for i, (sl_img, sl_lab) in enumerate(zip(to2d(img), to2d(lab))):
        ref_img, ref_lab = spatial.warp(jnp.asarray(sl_img), jnp.asarray(sl_lab), coords2)
        np.testing.assert_allclose(to2d(out_img)[i], ref_img, atol=1e-5)
        np.testing.assert_array_equal(to2d(out_lab)[i], ref_lab)
    assert np.abs(np.asarray(out_img) - np.asarray(img)).max() > 0.1  # it did turn


def _pipeline_angles(key, acfg):
    """The angles the pipeline draws for a rotation-only config: a volume's about axes 0, 1, 2
    come from slots 2, 3, 1 of "rotate"; a 2D sample's from slot 1."""
    from mednca_jax.augment import _Draws

    d = _Draws(key, {})  # a rotation-only config draws no fields
    a = math.radians(acfg.rotate_deg)
    return np.array([float(d.u("rotate", s, -a, a)) for s in (2, 3, 1)])


def test_the_pipeline_turns_a_volume_about_z_by_the_angle_a_2d_sample_gets_from_the_same_key():
    key = augment_keys(jax.random.PRNGKey(9), 1)
    acfg = AugmentConfig(p_rotate=1.0, rotate_deg=30.0)
    angles = _pipeline_angles(key[0], acfg)
    assert np.all(np.abs(angles) <= math.radians(30.0)) and np.all(np.abs(angles) > 0)
    img2 = _batch(1, size=20, seed=2)
    out2 = augment_batch(img2, key, acfg)
    ref2 = spatial.warp(img2["image"][0], img2["label"][0], _still((20, 20), angle=angles[2]))
    np.testing.assert_allclose(out2["image"][0], ref2[0], atol=1e-5)
    vol = _volume_batch(1, seed=7)
    out3 = augment_batch(vol, key, acfg)
    ref3 = spatial.warp(vol["image"][0], vol["label"][0], _still(VOLUME, angle=jnp.asarray(angles, jnp.float32)))
    np.testing.assert_allclose(out3["image"][0], ref3[0], atol=1e-5)
    np.testing.assert_array_equal(out3["label"][0], ref3[1])


def test_3d_kspace_artefacts():
    img = _volume_batch(1, seed=5)["image"][0]
    np.testing.assert_allclose(kspace.low_resolution(img, 1.0), img, atol=1e-5)
    low = kspace.low_resolution(img, 0.3)
    for axis in range(3):  # high frequencies removed along every axis
        assert float(jnp.abs(jnp.diff(low, axis=axis)).mean()) < 0.6 * float(jnp.abs(jnp.diff(img, axis=axis)).mean()), axis
    k_img, k_low = np.abs(np.fft.fftn(np.asarray(img)[..., 0])), np.abs(np.fft.fftn(np.asarray(low)[..., 0]))
    high = np.ones(VOLUME, bool)
    for a, s in enumerate(VOLUME):
        high &= np.abs(np.fft.fftfreq(s)).reshape([-1 if b == a else 1 for b in range(3)]) > 0.25
    assert (k_low[high] ** 2).sum() < 0.01 * (k_img[high] ** 2).sum()
    np.testing.assert_allclose(kspace.ghosting(img, 0.0, 2), img, atol=1e-5)
    for axis in range(3):
        ghost = kspace.ghosting(img, 1.0, axis)
        assert float(jnp.abs(ghost - img).max()) > 0.05
    assert float(jnp.abs(kspace.ghosting(img, 1.0, 0) - kspace.ghosting(img, 1.0, 2)).max()) > 0.05  # the axis matters
    stripes = kspace.spike(img, 0.25, 3, 5, 2, 0.0) - img
    xx, yy, zz = np.meshgrid(*(np.arange(s) for s in VOLUME), indexing="ij")
    ref = 0.25 * np.cos(2 * np.pi * (3 * xx / VOLUME[0] + 5 * yy / VOLUME[1] + 2 * zz / VOLUME[2]))
    np.testing.assert_allclose(stripes[..., 0], ref, atol=1e-5)
    with pytest.raises(ValueError, match="3 indices and a phase"):
        kspace.spike(img, 0.25, 3, 5, 0.0)
    np.testing.assert_allclose(kspace.motion(img, jnp.zeros(3), jnp.zeros(3), 0.3, 2), img, atol=1e-5)
    moved = kspace.motion(img, jnp.array([0.0, 0.0, 3.0]), jnp.zeros(3), 1.0, 0)  # every line after a 3-voxel move along Z
    np.testing.assert_allclose(moved[:, :, 3:], img[:, :, :-3], atol=1e-4)


def test_3d_intensity_transforms():
    ones = jnp.ones((*VOLUME, 1))
    from mednca_jax.augment import intensity as it

    coeffs = jax.random.uniform(jax.random.PRNGKey(0), (len(it.bias_terms(3)),), minval=-1, maxval=1)
    assert len(it.bias_terms(3)) == 19 and it.bias_terms(2) == it.BIAS_TERMS
    field = it.bias_field(ones, coeffs, 1.0)
    assert 0.5 - 1e-5 <= float(field.min()) and float(field.max()) <= 2.0 + 1e-5
    assert max(float(field.max()), 1 / float(field.min())) > 1.9
    assert float(jnp.abs(jnp.diff(field, axis=2)).max()) > 1e-3  # it varies along Z too
    img = _volume_batch(1, seed=6)["image"][0]
    blurred = it.blur(img, 1.5, 2.0)
    assert abs(float(blurred.mean()) - float(img.mean())) < 0.01
    for axis in range(3):  # smoothed along every axis
        assert float(jnp.abs(jnp.diff(blurred, axis=axis)).mean()) < 0.5 * float(jnp.abs(jnp.diff(img, axis=axis)).mean()), axis
    # contrast about the mean of the whole volume (not of each slice)
    c = it.contrast(img, 1.25)
    np.testing.assert_allclose(float(c.mean()), float(img.mean()), atol=1e-5)
    np.testing.assert_allclose(c - c.mean(), 1.25 * (img - img.mean()), atol=1e-5)


def test_3d_elastic_displacement_is_smooth_bounded_and_zero_without_alpha():
    shape, spacing = VOLUME, 8
    grid = tuple(-(-s // spacing) + 1 for s in shape)
    noise = jax.random.uniform(jax.random.PRNGKey(0), (3, *grid), minval=-1, maxval=1)
    disp = spatial.elastic_displacement(shape, noise, 2.0)
    assert disp.shape == (3, *shape)
    assert float(jnp.abs(disp).max()) <= 2.0 + 1e-5 and float(jnp.abs(disp).max()) > 0.5
    for axis in range(1, 4):  # neighbours move alike: a smooth field
        assert float(jnp.abs(jnp.diff(disp, axis=axis)).max()) < 1.0
    np.testing.assert_array_equal(spatial.elastic_displacement(shape, noise, 0.0), jnp.zeros((3, *shape)))


def test_3d_default_preset_is_finite_deterministic_and_depends_on_the_key(volumes):
    acfg = AugmentConfig.from_preset("default", p_flip_d=0.5)
    f = jax.jit(lambda b, k: augment_batch(b, augment_keys(k, 2), acfg))
    a, b2, c = f(volumes, jax.random.PRNGKey(5)), f(volumes, jax.random.PRNGKey(5)), f(volumes, jax.random.PRNGKey(6))
    assert np.all(np.isfinite(a["image"])) and set(np.unique(np.asarray(a["label"]))) <= {0.0, 1.0}
    np.testing.assert_array_equal(a["image"], b2["image"])
    np.testing.assert_array_equal(a["label"], b2["label"])
    assert not np.array_equal(np.asarray(a["image"]), np.asarray(c["image"]))


def test_every_transform_compiles_for_a_volume_batch(volumes):
    """All transforms traced and firing on a (2, 16, 16, 12, 1) batch: it compiles and runs
    (the compile time is printed, not asserted: it depends on the machine's load)."""
    import time

    acfg = AugmentConfig(**{p: 1.0 for p in PROBS})
    t0 = time.perf_counter()
    compiled = jax.jit(lambda b, k: augment_batch(b, k, acfg)).lower(volumes, augment_keys(jax.random.PRNGKey(0), 2)).compile()
    print(f"compile of every transform for {volumes['image'].shape}: {time.perf_counter() - t0:.1f} s")
    out = compiled(volumes, augment_keys(jax.random.PRNGKey(0), 2))
    assert out["image"].shape == volumes["image"].shape and np.all(np.isfinite(out["image"]))
    assert set(np.unique(np.asarray(out["label"]))) <= {0.0, 1.0}


def test_every_transform_draws_from_fixed_positions_whatever_the_fields():
    """A sample's numbers: the slots of the first ids, the fields, and the slots of ids
    appended since (flip_d) far beyond them; each number is the counter-based uniform at its
    position, so no transform's numbers move when another is enabled or the image grows."""
    from mednca_jax.augment import FIELDS_AFTER, LATE_COUNTER, SLOTS, TRANSFORM_IDS, _Draws
    from mednca_jax.nca import prng

    assert list(TRANSFORM_IDS.values()) == list(range(len(TRANSFORM_IDS))) and TRANSFORM_IDS["flip_d"] >= FIELDS_AFTER
    key = augment_keys(jax.random.PRNGKey(4), 1)[0]
    d = _Draws(key, {"bias": (9,), "gaussian_noise": (2, 3, 4, 1)})
    head = FIELDS_AFTER * SLOTS
    u = np.asarray(prng.uniform(key, (head + 33,)))
    np.testing.assert_array_equal(np.asarray(d.scalars[:FIELDS_AFTER]).ravel(), u[:head])
    np.testing.assert_array_equal(d.fields["bias"], u[head : head + 9])
    np.testing.assert_array_equal(np.asarray(d.fields["gaussian_noise"]).ravel(), u[head + 9 :])
    late = (len(TRANSFORM_IDS) - FIELDS_AFTER) * SLOTS
    at = np.asarray(prng.uniform_at(key, jnp.arange(LATE_COUNTER, LATE_COUNTER + late, dtype=jnp.uint32)))
    np.testing.assert_array_equal(np.asarray(d.scalars[FIELDS_AFTER:]).ravel(), at)
    other = _Draws(key, {"rician_noise": (2, 2, 5, 5, 5, 1)})
    np.testing.assert_array_equal(other.scalars, d.scalars)


def test_flip_d_is_refused_for_2d_samples_and_accepted_for_volumes(batch):
    with pytest.raises(ValueError, match="p_flip_d"):
        augment_batch(batch, augment_keys(jax.random.PRNGKey(0), 4), _only("p_flip_d"))
    cfg = from_dict({"data": {"image_size": [32, 32, 24]}, "augment": {"p_flip_d": 0.5}})
    assert cfg.augment.p_flip_d == 0.5


# ------------------------------------------------------------------ config


def test_default_preset_and_explicit_keys_override_it():
    a = from_dict({"augment": {"preset": "default", "p_gamma": 0.0, "rotate_deg": 30}}).augment
    assert a.p_gamma == 0.0 and a.rotate_deg == 30.0
    assert a.p_shift == AUGMENT_PRESETS["default"]["p_shift"] > 0 and a.enabled
    assert not from_dict({}).augment.enabled  # existing configs: no augmentation


def test_strong_preset_fires_twice_as_often_as_default_except_spike_and_noise():
    default, strong = (from_dict({"augment": {"preset": name}}).augment for name in ("default", "strong"))
    probs = [f.name for f in dataclasses.fields(default) if f.name.startswith("p_")]
    fired = [p for p in probs if getattr(strong, p) > 0]
    assert len(fired) >= 10 and set(AUGMENT_PRESETS["strong"]) == set(fired)
    same = {"p_spike", "p_gaussian_noise", "p_rician_noise"}
    for p in probs:
        factor = 1 if p in same else 2
        assert getattr(strong, p) == pytest.approx(factor * getattr(default, p)), p
    assert all(getattr(default, p) > 0 for p in same)
    # ranges are shared: the presets differ in how often a transform fires, not how strongly
    assert (strong.rotate_deg, strong.noise_std, strong.scale_range) == (default.rotate_deg, default.noise_std, default.scale_range)


@pytest.mark.parametrize(
    "raw, key",
    [
        ({"augment": {"p_gamma": 1.5}}, "augment.p_gamma"),
        ({"augment": {"preset": "heavy"}}, "augment.preset"),
        ({"augment": {"p_gama": 0.5}}, "augment.p_gama"),
        ({"augment": {"scale_range": [1.4, 0.7]}}, "augment.scale_range"),
        ({"augment": {"label_interp": "cubic"}}, "augment.label_interp"),
        ({"augment": {"lowres_range": [0.0, 1.0]}}, "augment.lowres_range"),
        ({"augment": {"noise_std": "big"}}, "augment.noise_std"),
        ({"augment": {"p_flip_d": 0.5}}, "augment.p_flip_d"),  # 2D slices have no third axis
        ({"train": {"schedule": "budget_cosine"}}, "train.schedule"),
        ({"train": {"schedule": "cosin"}}, "train.schedule"),
        ({"train": {"ema_decay": 1.0}}, "train.ema_decay"),
        ({"train": {"clip_grad_norm": -1.0}}, "train.clip_grad_norm"),
        ({"train": {"lr_final": 0.0, "schedule": "budget_exponential", "time_limit_min": 5}}, "train.lr_final"),
    ],
)
def test_config_errors_name_the_key(raw, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        from_dict(raw)


# ------------------------------------------------------------------ the recipe end to end

RECIPE = TINY_RUN_TOML.replace('name = "tiny"', 'name = "tiny_recipe"') + """clip_grad_norm = 1.0
ema_decay = 0.9
[augment]
preset = "strong"  # the most transforms per step
"""


@pytest.mark.slow
def test_resume_with_augmentation_and_ema_is_exact(tmp_path, monkeypatch):
    """The EMA is checkpointed and restored, and the augmentation keys follow the step keys:
    a run stopped at step 4 and resumed ends where an uninterrupted one does."""
    from mednca_jax.train import checkpoint as ckpt
    from mednca_jax.config import loads
    from mednca_jax.data import make_synthetic_task
    from conftest import train

    monkeypatch.setenv("MEDNCA_CACHE", str(tmp_path / "cache"))
    data = tmp_path / "synth"
    make_synthetic_task(data, n_cases=6, seed=0, shape=(24, 24, 24))
    cfg = loads(RECIPE)
    assert train(cfg, tmp_path / "full", data, progress=False)["step"] == 6
    assert train(cfg, tmp_path / "part", data, progress=False, stop_after=4)["step"] == 4
    assert train(cfg, tmp_path / "part", data, resume=True, progress=False)["step"] == 6

    def latest(run):
        items, step = ckpt.restore(run, {"params": None, "train": None}, which="latest")
        return step, jax.tree_util.tree_leaves(items["params"]), jax.tree_util.tree_leaves(items["train"]["ema"])

    (s_full, p_full, e_full), (s_part, p_part, e_part) = latest(tmp_path / "full"), latest(tmp_path / "part")
    assert s_full == s_part == 6
    for a, b in zip(p_full + e_full, p_part + e_part):
        np.testing.assert_array_equal(a, b)
    assert any(not np.array_equal(e, p) for e, p in zip(e_full, p_full))  # the EMA is not the params
    # the best checkpoint holds the EMA of its step (validated with it), not the raw params
    best, best_step = ckpt.restore(tmp_path / "full", {"params": None}, which="best")
    same, _ = ckpt.restore(tmp_path / "full", {"params": None, "train": None}, which="latest", step=best_step)
    for a, b in zip(jax.tree_util.tree_leaves(best["params"]), jax.tree_util.tree_leaves(same["train"]["ema"])):
        np.testing.assert_array_equal(a, b)


@pytest.mark.slow
def test_cost_benchmark_quick_mode_runs_and_writes_its_figures(tmp_path):
    import json
    import os
    import subprocess
    import sys

    from conftest import REPO

    out = tmp_path / "cost.json"
    res = subprocess.run([sys.executable, "benchmarks/augment_cost.py", "--quick", "--json", str(out)], cwd=REPO,
                         capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert res.returncode == 0, res.stderr[-3000:]
    fig = json.loads(out.read_text())
    assert fig["ratio"] > 0 and set(fig["median_s"]) == {"none", "default", "augment alone"}
    assert "augmented / plain step" in res.stdout
