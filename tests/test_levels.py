"""Multi-level composition: resampling, crops, shapes, and input checks."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import random_params

from mednca_jax.config import ModelConfig
from mednca_jax.nca.rule import sample_keys
from mednca_jax.nca.levels import (
    InputError,
    downscale,
    forward,
    forward_train,
    random_crops,
    segment,
    upsample_nearest,
)


def test_bilinear_downscale_x4_is_the_mean_of_the_centre_2x2():
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 16, 12, 3))
    d = np.asarray(downscale(x, 4, "bilinear"))
    xn = np.asarray(x)
    expected = xn.reshape(2, 4, 4, 3, 4, 3)[:, :, 1:3, :, 1:3, :].mean(axis=(2, 4))
    np.testing.assert_allclose(d, expected, atol=1e-6)
    ref = jax.image.resize(x, (2, 4, 3, 3), "linear", antialias=False)
    np.testing.assert_allclose(d, ref, atol=1e-5)


def test_other_downscale_methods():
    x = jax.random.normal(jax.random.PRNGKey(0), (1, 8, 8, 1))
    np.testing.assert_allclose(downscale(x, 2, "area"), np.asarray(x).reshape(1, 4, 2, 4, 2, 1).mean(axis=(2, 4)), atol=1e-6)
    aa = downscale(x, 2, "antialias")
    assert aa.shape == (1, 4, 4, 1) and not np.allclose(aa, downscale(x, 2, "bilinear"))
    np.testing.assert_allclose(downscale(x, 3 - 1, "bilinear"), jax.image.resize(x, (1, 4, 4, 1), "linear", antialias=False), atol=1e-5)
    with pytest.raises(ValueError, match="unknown downscale"):
        downscale(x, 2, "lanczos")


def test_nearest_upsampling():
    x = jnp.arange(4.0).reshape(1, 2, 2, 1)
    u = np.asarray(upsample_nearest(x, 3))[0, ..., 0]
    assert u.shape == (6, 6)
    assert np.all(u[:3, :3] == 0) and np.all(u[3:, 3:] == 3) and np.all(u[:3, 3:] == 1)


def test_vmapped_crops_equal_a_python_loop():
    keys = sample_keys(jax.random.PRNGKey(4), 5)
    a = jax.random.normal(jax.random.PRNGKey(0), (5, 12, 10, 3))
    b = jax.random.normal(jax.random.PRNGKey(1), (5, 12, 10, 1))
    ca, cb = random_crops(keys, (a, b), 4)
    corners = []
    for i in range(5):  # each sample's window from its own key
        ky, kx = jax.random.split(keys[i])
        y, x = int(jax.random.randint(ky, (), 0, 9)), int(jax.random.randint(kx, (), 0, 7))
        corners.append((y, x))
        np.testing.assert_array_equal(ca[i], np.asarray(a)[i, y : y + 4, x : x + 4])
        np.testing.assert_array_equal(cb[i], np.asarray(b)[i, y : y + 4, x : x + 4])
    assert len(set(corners)) > 1
    # a shard of the batch crops exactly its own samples
    part = random_crops(keys[2:], (a[2:],), 4)[0]
    np.testing.assert_array_equal(part, ca[2:])


def test_forward_shapes_and_label_cropped_with_the_image(tiny_cfg):
    m = tiny_cfg.model
    p = random_params(m)
    img = jax.random.uniform(jax.random.PRNGKey(0), (3, 16, 16, 1))
    logits = forward(p, m, img, jax.random.PRNGKey(1), m.fire_rate)
    assert logits.shape == (3, 16, 16, 1)
    # the label is the image itself, so its crop must equal the image channel of the crop
    lg, lab = forward_train(p, m, img, img, jax.random.PRNGKey(2), m.fire_rate)
    assert lg.shape == lab.shape == (3, 8, 8, 1)
    found = [
        any(np.array_equal(lab[i], img[i, y : y + 8, x : x + 8]) for y in range(9) for x in range(9)) for i in range(3)
    ]
    assert all(found)


def test_whole_image_training_when_patch_is_zero(tiny_cfg):
    m = dataclasses.replace(tiny_cfg.model, patch_size=0)
    p = random_params(m)
    img = jax.random.uniform(jax.random.PRNGKey(0), (2, 16, 16, 1))
    lg, lab = forward_train(p, m, img, img, jax.random.PRNGKey(2), 0.0)
    np.testing.assert_array_equal(lab, img)
    np.testing.assert_allclose(lg, forward(p, m, img, jax.random.PRNGKey(9), 0.0), atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("steps,scales", [((3,), (1,)), ((2, 2, 2), (4, 2, 1))])
def test_any_number_of_levels(steps, scales):
    m = ModelConfig(channels=5, hidden=8, steps=steps, scales=scales, patch_size=4, remat="none")
    p = random_params(m)
    img = jax.random.uniform(jax.random.PRNGKey(0), (2, 16, 16, 1))
    logits, states = forward(p, m, img, jax.random.PRNGKey(1), 0.0, return_states=True)
    assert logits.shape == (2, 16, 16, 1)
    assert [s.shape[1] for s in states] == [16 // s for s in scales]
    lg, _ = forward_train(p, m, img, img, jax.random.PRNGKey(2), m.fire_rate)
    assert lg.shape == (2, 4, 4, 1) and np.all(np.isfinite(lg))


def test_segment_accepts_2d_3d_4d_and_rejects_bad_input(tiny_cfg):
    p = random_params(tiny_cfg.model)
    img = np.random.default_rng(0).random((16, 16), dtype=np.float32)
    key = jax.random.PRNGKey(0)
    a = segment(p, tiny_cfg, img, key, fire_rate=0.0)
    b = segment(p, tiny_cfg, img[None], key, fire_rate=0.0)
    c = segment(p, tiny_cfg, img[None, ..., None], key, fire_rate=0.0)
    assert a.shape == (1, 16, 16, 1)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, c)
    assert float(a.min()) >= 0 and float(a.max()) <= 1
    with pytest.raises(InputError, match="rank"):
        segment(p, tiny_cfg, img[None, None, None], key)
    with pytest.raises(InputError, match="channels"):
        segment(p, tiny_cfg, np.zeros((1, 16, 16, 3), np.float32), key)
    with pytest.raises(InputError, match="divisible"):
        segment(p, tiny_cfg, np.zeros((1, 15, 16), np.float32), key)
    bad = img.copy()
    bad[3, 4] = np.nan
    with pytest.raises(InputError, match="NaN"):
        segment(p, tiny_cfg, bad, key)
    for rate in (-0.1, 1.0):
        with pytest.raises(InputError, match="fire_rate"):
            segment(p, tiny_cfg, img, key, fire_rate=rate)


def test_trajectory_ends_in_the_forward_state(tiny_cfg):
    from mednca_jax.nca.levels import forward_trajectory

    m = tiny_cfg.model
    p = random_params(m)
    img = jax.random.uniform(jax.random.PRNGKey(0), (2, 16, 16, 1))
    traj = forward_trajectory(p, m, img, jax.random.PRNGKey(1), 0.5)
    assert traj.shape == (sum(m.steps), 2, 16, 16, m.channels)
    logits = forward(p, m, img, jax.random.PRNGKey(1), 0.5)
    np.testing.assert_allclose(traj[-1][..., m.n_in : m.n_in + m.n_out], logits, atol=1e-5)
