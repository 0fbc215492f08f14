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
SPATIAL = {"p_shift", "p_scale", "p_rotate", "p_flip_h", "p_flip_w", "p_elastic"}
SIZE = 32


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


@pytest.mark.parametrize("name", PROBS)
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
    never = AugmentConfig(**{p: 1e-12 for p in PROBS})
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
