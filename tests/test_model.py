"""One NCA level: the rule, the fire mask, padding, and the rollout with and without remat."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import random_level_params

from mednca_jax.model import (
    NCARule,
    count_params,
    fire_mask,
    im2col3x3,
    init_level_params,
    nca_step,
    nca_update,
    perceive,
    reflect_pad,
    rollout,
)

C, HID = 6, 16


def _state(seed=0, shape=(2, 9, 7, C)):
    return jax.random.normal(jax.random.PRNGKey(seed), shape)


def test_param_count_matches_the_original_formula():
    for c, h, expected in [(16, 128, 12_960), (32, 128, 35_008)]:
        p = init_level_params(jax.random.PRNGKey(0), c, h)
        assert count_params(p) == expected == 2 * (9 * c * c + c) + (3 * c * h + h) + h * c


def test_init_ranges_follow_pytorch_defaults():
    p = init_level_params(jax.random.PRNGKey(1), 32, 128)
    assert np.all(np.asarray(p["fc1"]["kernel"]) == 0)
    for name, fan_in in [("p0", 9 * 32), ("p1", 9 * 32), ("fc0", 96)]:
        k = np.asarray(p[name]["kernel"])
        bound = 1 / np.sqrt(fan_in)
        assert np.abs(k).max() <= bound and np.abs(k).max() > 0.9 * bound
        assert np.abs(np.asarray(p[name]["bias"])).max() <= bound


def test_flax_module_applies_the_plain_update():
    p = random_level_params(jax.random.PRNGKey(0), C, HID)
    x = _state()
    via_module = NCARule(C, HID).apply({"params": p}, x)
    np.testing.assert_allclose(via_module, nca_update(p, x), rtol=1e-6, atol=1e-6)


def test_fresh_nca_is_identity():
    p = init_level_params(jax.random.PRNGKey(0), C, HID)
    x = _state()
    out, _ = rollout(p, x, x[..., :1], jax.random.PRNGKey(3), 5, 0.0)
    np.testing.assert_array_equal(out, x)


def test_input_channels_never_change():
    p = random_level_params(jax.random.PRNGKey(0), C, HID, scale=2.0)
    x = _state()
    image = jax.random.uniform(jax.random.PRNGKey(5), x.shape[:-1] + (2,))
    x = x.at[..., :2].set(image)
    out, traj = rollout(p, x, image, jax.random.PRNGKey(3), 6, 0.3, trajectory=True)
    np.testing.assert_array_equal(out[..., :2], image)
    np.testing.assert_array_equal(traj[..., :2], jnp.broadcast_to(image, traj[..., :2].shape))
    assert not np.allclose(out[..., 2:], x[..., 2:])  # the rest did change


def test_rollout_writes_the_image_before_the_first_step():
    # The steps leave the input channels alone (fc1's columns for them are zeroed); the
    # rollout writes the image once, so a stale input channel in x never reaches a step.
    p = random_level_params(jax.random.PRNGKey(0), C, HID, scale=2.0)
    x = _state()
    image = jax.random.uniform(jax.random.PRNGKey(5), x.shape[:-1] + (1,))
    out, _ = rollout(p, x, image, jax.random.PRNGKey(3), 4, 0.5)
    ref, _ = rollout(p, x.at[..., :1].set(image), image, jax.random.PRNGKey(3), 4, 0.5)
    np.testing.assert_array_equal(out, ref)
    assert not np.allclose(x[..., :1], image)  # the two starts did differ


@pytest.mark.parametrize("rate", [0.0, 0.25, 0.5, 0.9])
def test_fire_rate_statistics(rate):
    m = fire_mask(jax.random.PRNGKey(0), (4, 64, 64, 8), rate)
    assert m.shape == (4, 64, 64, 1)
    frac = float(m.mean())
    if rate == 0.0:
        assert frac == 1.0
    else:
        n = m.size
        assert abs(frac - (1 - rate)) < 4 * np.sqrt(rate * (1 - rate) / n)


def test_masked_cells_keep_their_state():
    p = random_level_params(jax.random.PRNGKey(0), C, HID, scale=2.0)
    x = _state()
    key = jax.random.PRNGKey(9)
    out = nca_step(p, x, x[..., :1], key, 0.5)
    fired = np.asarray(fire_mask(key, x.shape, 0.5))[..., 0] > 0
    changed = np.any(np.asarray(out[..., 1:]) != np.asarray(x[..., 1:]), axis=-1)
    assert np.array_equal(changed, fired)


def test_reflect_padding_mirrors_without_repeating_the_border():
    x = jnp.arange(12.0).reshape(1, 3, 4, 1)
    xp = np.asarray(reflect_pad(x))[0, ..., 0]
    assert xp.shape == (5, 6)
    np.testing.assert_array_equal(xp[0, 1:-1], np.asarray(x)[0, 1, :, 0])  # row -1 -> row 1
    np.testing.assert_array_equal(xp[1:-1, 0], np.asarray(x)[0, :, 1, 0])  # col -1 -> col 1
    assert xp[0, 0] == x[0, 1, 1, 0]


def test_perception_equals_a_reflect_padded_convolution():
    p = random_level_params(jax.random.PRNGKey(0), C, HID)
    x = _state()
    y = perceive(p, x)
    for i, name in enumerate(["p0", "p1"]):
        ref = jax.lax.conv_general_dilated(
            reflect_pad(x), p[name]["kernel"], (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC")
        ) + p[name]["bias"]
        np.testing.assert_allclose(y[..., (i + 1) * C : (i + 2) * C], ref, atol=1e-5)
    np.testing.assert_array_equal(y[..., :C], x)
    assert im2col3x3(x).shape == x.shape[:-1] + (9 * C,)


def _loss(p, x, remat, steps):
    out, _ = rollout(p, x, x[..., :1], jax.random.PRNGKey(7), steps, 0.5, remat=remat)
    return jnp.sum(out**2)


@pytest.mark.parametrize("steps", [7, 9])
def test_remat_modes_agree_in_values_and_gradients(steps):
    p = random_level_params(jax.random.PRNGKey(0), C, HID)
    x = _state()
    ref_v, ref_g = jax.value_and_grad(_loss)(p, x, "none", steps)
    for mode in ["step", "nested"]:
        v, g = jax.value_and_grad(_loss)(p, x, mode, steps)
        np.testing.assert_allclose(v, ref_v, rtol=1e-6)
        for a, b in zip(jax.tree_util.tree_leaves(g), jax.tree_util.tree_leaves(ref_g)):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_trajectory_is_the_sequence_of_states_in_every_mode():
    p = random_level_params(jax.random.PRNGKey(0), C, HID)
    x = _state()
    outs = {}
    for mode in ["none", "nested"]:
        out, traj = rollout(p, x, x[..., :1], jax.random.PRNGKey(2), 10, 0.5, remat=mode, trajectory=True)
        assert traj.shape == (10,) + x.shape
        np.testing.assert_array_equal(traj[-1], out)
        outs[mode] = traj
    np.testing.assert_allclose(outs["none"], outs["nested"], atol=1e-6)
    step1 = nca_step(p, x, x[..., :1], jax.random.split(jax.random.PRNGKey(2), 10)[0], 0.5)
    np.testing.assert_allclose(outs["none"][0], step1, atol=1e-6)


def test_unknown_remat_mode_is_rejected():
    p = init_level_params(jax.random.PRNGKey(0), C, HID)
    with pytest.raises(ValueError, match="remat"):
        rollout(p, _state(), _state()[..., :1], jax.random.PRNGKey(0), 2, 0.5, remat="everything")
