"""One NCA level: the rule's pieces, its parameters, the fire mask and the rollout."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import random_level_params

from mednca_jax.nca.perceptions import filters_of, sobel_bank
from mednca_jax.nca.rollout import count_params, nca_step, rollout
from mednca_jax.nca.rule import Rule, check_rule, conv_reflect, fire_mask, init_level, perceive, sample_keys, step, update

C, HID = 6, 16
R = Rule(channels=C, hidden=HID)


def _state(seed=0, shape=(2, 9, 7, C)):
    return jax.random.normal(jax.random.PRNGKey(seed), shape)


def test_param_count_matches_the_original_formula():
    for c, h, expected in [(16, 128, 12_960), (32, 128, 35_008)]:
        p = init_level(jax.random.PRNGKey(0), Rule(channels=c, hidden=h))
        assert count_params(p) == expected == 2 * (9 * c * c + c) + (3 * c * h + h) + h * c


def test_sobel_rule_has_only_the_mlp_parameters():
    p = init_level(jax.random.PRNGKey(0), Rule("sobel", channels=16, hidden=128))
    assert set(p) == {"fc0", "fc1"} and p["fc0"]["kernel"].shape == (4 * 16, 128)
    assert count_params(p) == 4 * 16 * 128 + 128 + 128 * 16


def test_init_ranges_follow_pytorch_defaults():
    p = init_level(jax.random.PRNGKey(1), Rule(channels=32, hidden=128))
    assert np.all(np.asarray(p["fc1"]["kernel"]) == 0)
    for name, fan_in in [("p0", 9 * 32), ("p1", 9 * 32), ("fc0", 96)]:
        k = np.asarray(p[name]["kernel"])
        bound = 1 / np.sqrt(fan_in)
        assert np.abs(k).max() <= bound and np.abs(k).max() > 0.9 * bound
        assert np.abs(np.asarray(p[name]["bias"])).max() <= bound


def test_fresh_nca_is_identity():
    p = init_level(jax.random.PRNGKey(0), R)
    x = _state()
    out, _ = rollout(p, x, x[..., :1], jax.random.PRNGKey(3), 5, 0.0, rule=R)
    np.testing.assert_array_equal(out, x)


def test_input_channels_always_hold_the_image():
    p = random_level_params(jax.random.PRNGKey(0), C, HID, scale=2.0)
    x = _state()
    image = jax.random.uniform(jax.random.PRNGKey(5), x.shape[:-1] + (2,))
    out, traj = rollout(p, x, image, jax.random.PRNGKey(3), 6, 0.3, trajectory=True, rule=R)
    np.testing.assert_array_equal(out[..., :2], image)
    np.testing.assert_array_equal(traj[..., :2], jnp.broadcast_to(image, traj[..., :2].shape))
    assert not np.allclose(out[..., 2:], x[..., 2:])  # the rest did change


@pytest.mark.parametrize("rate", [0.0, 0.25, 0.5, 0.9])
def test_fire_rate_statistics(rate):
    m = fire_mask(sample_keys(jax.random.PRNGKey(0), 4), (64, 64), rate)
    assert m.shape == (4, 64, 64) and m.dtype == bool
    frac = float(m.mean())
    if rate == 0.0:
        assert frac == 1.0
    else:
        assert abs(frac - (1 - rate)) < 4 * np.sqrt(rate * (1 - rate) / m.size)


def test_masked_cells_keep_their_state():
    p = random_level_params(jax.random.PRNGKey(0), C, HID, scale=2.0)
    x = _state()
    key = jax.random.PRNGKey(9)
    out = nca_step(p, x, x[..., :1], key, 0.5, rule=R)
    first_step_keys = jnp.stack([jax.random.split(k, 1)[0] for k in sample_keys(key, 2)])
    fired = np.asarray(fire_mask(first_step_keys, (9, 7), 0.5))
    changed = np.any(np.asarray(out[..., 1:]) != np.asarray(x[..., 1:]), axis=-1)
    assert np.array_equal(changed, fired) and 0 < fired.mean() < 1


def _numpy_conv(x, kernel):
    """Reflect-padded k^d cross-correlation by explicit loops over the taps (any rank, odd k)."""
    nd, r = x.ndim - 2, kernel.shape[0] // 2
    xp = np.pad(x, [(0, 0)] + [(r, r)] * nd + [(0, 0)], mode="reflect")
    out = np.zeros(x.shape[:-1] + (kernel.shape[-1],))
    for tap in np.ndindex(*kernel.shape[:nd]):
        window = xp[(slice(None),) + tuple(slice(t, t + n) for t, n in zip(tap, x.shape[1:-1]))]
        out += window @ kernel[tap]
    return out


@pytest.mark.parametrize("shape", [(2, 9, 7, C), (1, 5, 6, 4, C)], ids=["2d", "3d"])
def test_conv_is_a_reflect_padded_cross_correlation_of_any_rank(shape):
    x = np.asarray(_state(shape=shape))
    kernel = np.asarray(jax.random.normal(jax.random.PRNGKey(1), (3,) * (len(shape) - 2) + (C, 5)))
    np.testing.assert_allclose(conv_reflect(jnp.asarray(x), jnp.asarray(kernel)), _numpy_conv(x, kernel), rtol=1e-5, atol=1e-5)


def test_learned_perception_is_the_two_convs_after_x():
    p = random_level_params(jax.random.PRNGKey(0), C, HID)
    x = _state()
    y = perceive(R, p, x)
    np.testing.assert_array_equal(y[..., :C], x)
    for i, name in enumerate(["p0", "p1"]):
        ref = _numpy_conv(np.asarray(x), np.asarray(p[name]["kernel"])) + np.asarray(p[name]["bias"])
        np.testing.assert_allclose(y[..., (i + 1) * C : (i + 2) * C], ref, atol=1e-5)


def test_sobel_filters_measure_gradients_and_curvature():
    # On the ramp x = 2h + 3w + h^2 the Sobel features are the central differences and the
    # Laplacian is 2 everywhere inside the image.
    h, w = np.meshgrid(np.arange(8.0), np.arange(9.0), indexing="ij")
    x = jnp.asarray((2 * h + 3 * w + h**2)[None, :, :, None].repeat(2, axis=-1), jnp.float32)
    y = np.asarray(perceive(Rule("sobel", channels=2), {}, x))[0, 1:-1, 1:-1]
    np.testing.assert_allclose(y[..., 2:4], (2 + 2 * h[1:-1, 1:-1])[..., None].repeat(2, -1), atol=1e-4)  # d/dh
    np.testing.assert_allclose(y[..., 4:6], 3.0, atol=1e-4)  # d/dw
    np.testing.assert_allclose(y[..., 6:8], 2.0, atol=1e-4)  # Laplacian
    assert sobel_bank(3).shape == (4, 3, 3, 3)
    kernel, bias = filters_of(Rule("sobel", channels=2, ndim=3), {})
    assert kernel.shape == (3, 3, 3, 2, 8) and bias.shape == (8,)


@pytest.mark.slow
def test_a_3d_rollout_of_the_reference_rule():
    # The reference rule is rank-generic: a 3D state steps with 3x3x3 perceptions.
    for perception in ["learned", "sobel"]:
        rule = Rule(perception, channels=C, hidden=HID, ndim=3)
        p = init_level(jax.random.PRNGKey(0), rule)
        p["fc1"]["kernel"] = 0.3 * jax.random.normal(jax.random.PRNGKey(1), (HID, C))
        x = _state(shape=(2, 5, 6, 4, C))
        out, traj = rollout(p, x, x[..., :1], jax.random.PRNGKey(2), 3, 0.5, rule=rule, trajectory=True)
        assert out.shape == x.shape and traj.shape == (3,) + x.shape
        np.testing.assert_array_equal(out[..., :1], x[..., :1])
        d = update(rule, p, perceive(rule, p, x))
        assert d.shape == x.shape and not np.allclose(out, x)


def test_bfloat16_matmuls_stay_close_to_float32():
    p = random_level_params(jax.random.PRNGKey(0), C, HID)
    x = _state()
    f32, _ = rollout(p, x, x[..., :1], jax.random.PRNGKey(3), 4, 0.5, rule=R)
    b16, _ = rollout(p, x, x[..., :1], jax.random.PRNGKey(3), 4, 0.5, rule=R._replace(precision="bfloat16"))
    assert b16.dtype == jnp.float32
    err = float(jnp.abs(b16 - f32).max() / jnp.abs(f32).max())
    assert 0 < err < 0.05


def _loss(p, x, remat, steps):
    out, _ = rollout(p, x, x[..., :1], jax.random.PRNGKey(7), steps, 0.5, remat=remat, rule=R)
    return jnp.sum(out**2)


def test_remat_modes_run_different_programs():
    # "step" checkpoints every step and "nested" blocks of steps too: their backward programs
    # hold remat (checkpoint) regions, "none" holds none.
    p = random_level_params(jax.random.PRNGKey(0), C, HID)
    x = _state()

    def n_remat(mode):
        jaxpr = str(jax.make_jaxpr(jax.grad(_loss), static_argnums=(2, 3))(p, x, mode, 9))
        return jaxpr.count("checkpoint") + jaxpr.count("remat")

    assert n_remat("none") == 0
    assert n_remat("step") >= 1 and n_remat("nested") > n_remat("step")


def test_trajectory_is_the_sequence_of_states_in_every_mode():
    p = random_level_params(jax.random.PRNGKey(0), C, HID)
    x = _state()
    outs = {}
    for mode in ["none", "nested"]:
        out, traj = rollout(p, x, x[..., :1], jax.random.PRNGKey(2), 10, 0.5, remat=mode, trajectory=True, rule=R)
        assert traj.shape == (10,) + x.shape
        np.testing.assert_array_equal(traj[-1], out)
        outs[mode] = traj
    np.testing.assert_allclose(outs["none"], outs["nested"], atol=1e-6)
    first = jnp.stack([jax.random.split(k, 10)[0] for k in sample_keys(jax.random.PRNGKey(2), 2)])
    step1 = step(R, p, x, x[..., :1], fire_mask(first, (9, 7), 0.5))
    np.testing.assert_allclose(outs["none"][0], step1, atol=1e-6)


def test_unknown_remat_mode_is_rejected():
    p = init_level(jax.random.PRNGKey(0), R)
    with pytest.raises(ValueError, match="remat"):
        rollout(p, _state(), _state()[..., :1], jax.random.PRNGKey(0), 2, 0.5, remat="everything", rule=R)


# --------------------------------------------------------------------------- the description
@pytest.mark.parametrize("ndim,k", [(2, 5), (2, 7), (3, 5)])
def test_learned_perception_of_any_odd_kernel(ndim, k):
    rule = Rule(kernel_size=k, channels=C, hidden=HID, ndim=ndim)
    p = init_level(jax.random.PRNGKey(0), rule)
    assert p["p0"]["kernel"].shape == (k,) * ndim + (C, C)
    x = _state(shape=(1,) + (9, 8, 7)[:ndim] + (C,))
    y = np.asarray(perceive(rule, p, x))
    ref = _numpy_conv(np.asarray(x), np.asarray(p["p1"]["kernel"])) + np.asarray(p["p1"]["bias"])
    np.testing.assert_allclose(y[..., 2 * C :], ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("ndim,k", [(2, 3), (3, 7)])
def test_depthwise_perception_convolves_each_channel_alone(ndim, k):
    rule = Rule("depthwise", kernel_size=k, channels=C, hidden=HID, ndim=ndim)
    p = init_level(jax.random.PRNGKey(0), rule)
    assert rule.n_features == C and p["p0"]["kernel"].shape == (k,) * ndim + (C, 1)
    assert p["fc0"]["kernel"].shape == (2 * C, HID)
    bound = 1 / np.sqrt(k**ndim)  # a conv with groups = C: fan-in k^d
    assert 0.9 * bound < np.abs(np.asarray(p["p0"]["kernel"])).max() <= bound
    x = np.asarray(_state(shape=(2,) + (8, 9, 8)[:ndim] + (C,)))
    y = np.asarray(perceive(rule, p, jnp.asarray(x)))[..., C:]
    for c in range(C):
        ref = _numpy_conv(x[..., c : c + 1], np.asarray(p["p0"]["kernel"])[..., c : c + 1, :])[..., 0] + float(p["p0"]["bias"][c])
        np.testing.assert_allclose(y[..., c], ref, rtol=1e-5, atol=1e-5)


def test_batch_norm_update_uses_the_statistics_of_the_batch():
    rule = Rule(norm="batch", channels=C, hidden=HID)
    p = random_level_params(jax.random.PRNGKey(0), rule=rule)
    p["bn"] = {"scale": jnp.linspace(0.5, 2.0, HID), "bias": jnp.linspace(-1.0, 1.0, HID)}
    y = np.asarray(perceive(rule, p, _state()), np.float64)
    h = y @ np.asarray(p["fc0"]["kernel"]) + np.asarray(p["fc0"]["bias"])
    mean, var = h.reshape(-1, HID).mean(0), h.reshape(-1, HID).var(0)
    hn = (h - mean) / np.sqrt(var + 1e-5) * np.asarray(p["bn"]["scale"]) + np.asarray(p["bn"]["bias"])
    ref = np.maximum(hn, 0) @ np.asarray(p["fc1"]["kernel"])
    got = np.asarray(update(rule, p, jnp.asarray(y, jnp.float32)))
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5)
    # one sample's update depends on the rest of its batch (no running statistics)
    alone = np.asarray(update(rule, p, jnp.asarray(y[:1], jnp.float32)))
    assert not np.allclose(alone, got[:1], atol=1e-3)
    assert set(init_level(jax.random.PRNGKey(0), rule)) == {"p0", "p1", "fc0", "bn", "fc1"}
    assert "bn" not in init_level(jax.random.PRNGKey(0), R)


def test_check_rule_names_what_does_not_fit():
    with pytest.raises(ValueError, match="odd"):
        check_rule(Rule(kernel_size=4))
    with pytest.raises(ValueError, match="norm"):
        check_rule(Rule(norm="layer"))
    with pytest.raises(ValueError, match="sobel.*kernel_size 3"):
        check_rule(Rule("sobel", kernel_size=5))
    with pytest.raises(ValueError, match="unknown perception 'nope'"):
        check_rule(Rule("nope"))
    with pytest.raises(ValueError, match="unknown update 'nope'"):
        check_rule(Rule(update="nope"))


def test_registries_refuse_a_taken_name_and_take_new_entries():
    from mednca_jax.nca.perceptions import PERCEPTIONS, Perception, register_perception
    from mednca_jax.nca.updates import UPDATES, Update, get_update, register_update

    with pytest.raises(ValueError, match="already registered"):
        register_perception("learned", Perception(lambda r: r.channels, lambda k, r: {}, apply=lambda p, x, r: x))
    with pytest.raises(ValueError, match="already registered"):
        register_update("mlp", Update(get_update("mlp").init, lambda p, y, r: y[..., : r.channels]))
    try:
        register_perception("test_square", Perception(lambda r: r.channels, lambda k, r: {}, apply=lambda p, x, r: x * x))
        register_update("test_copy", Update(lambda k, r: {}, lambda p, y, r: 0.1 * y[..., r.channels :]))
        rule = Rule("test_square", update="test_copy", channels=C, hidden=HID)
        x = _state()
        out = step(rule, {}, x, x[..., :1], jnp.ones(x.shape[:-1], bool))
        expect = np.asarray(x) + 0.1 * np.asarray(x) ** 2
        expect[..., :1] = np.asarray(x)[..., :1]
        np.testing.assert_allclose(out, expect, rtol=1e-6)
    finally:
        PERCEPTIONS.pop("test_square", None)
        UPDATES.pop("test_copy", None)


def test_a_state_that_does_not_fit_the_rule_is_refused():
    p = init_level(jax.random.PRNGKey(0), R)
    with pytest.raises(ValueError, match="6 channels"):
        rollout(p, _state(shape=(1, 5, 5, 4)), _state()[..., :1], jax.random.PRNGKey(0), 2, 0.5, rule=R)
    with pytest.raises(ValueError, match="2 spatial axes"):
        rollout(p, _state(shape=(1, 5, 5, 5, C)), _state()[..., :1], jax.random.PRNGKey(0), 2, 0.5, rule=R)
