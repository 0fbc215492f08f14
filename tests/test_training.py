"""The jitted train step: learning, no retracing, the no-foreground rule, the schedule."""

import dataclasses
import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mednca_jax.networks import init_network_params
from mednca_jax.train.step import (
    init_train_state,
    learning_rate_schedule,
    make_optimizer,
    make_train_step,
)
from conftest import REPO, machine_backend


def _batch(seed, n=4, size=16, empty=False):
    rng = np.random.default_rng(seed)
    img = rng.random((n, size, size, 1), dtype=np.float32) * 0.3
    lab = np.zeros((n, size, size, 1), np.float32)
    if not empty:
        for i in range(n):
            y, x = rng.integers(2, size - 8, 2)
            lab[i, y : y + 6, x : x + 6] = 1
            img[i, y : y + 6, x : x + 6] += 0.6
    return {"image": jnp.asarray(img), "label": jnp.asarray(lab)}


@pytest.fixture(scope="module")
def setup(tiny_cfg):
    cfg = dataclasses.replace(tiny_cfg, model=dataclasses.replace(tiny_cfg.model, patch_size=0))
    tx = make_optimizer(cfg.train)
    step = make_train_step(cfg, tx, backend=machine_backend(cfg))
    return cfg, tx, step


@pytest.mark.slow
def test_train_step_learns_and_compiles_once(setup):
    cfg, tx, step = setup
    state = init_train_state(init_network_params(cfg, jax.random.PRNGKey(0)), tx)
    losses = []
    for i in range(60):
        state, m = step(state, _batch(i % 2), jax.random.PRNGKey(i))
        losses.append(float(m["loss"]))
    assert step._cache_size() == 1, "the train step was retraced"
    assert int(state.step) == 60
    assert np.mean(losses[-6:]) < 0.7 * np.mean(losses[:6]), losses
    assert np.isclose(float(m["lr"]), cfg.train.lr * cfg.train.lr_decay**59, rtol=1e-5)


def test_batch_without_foreground_makes_no_update(setup):
    cfg, tx, step = setup
    state = init_train_state(init_network_params(cfg, jax.random.PRNGKey(0)), tx)
    state, _ = step(state, _batch(0), jax.random.PRNGKey(0))  # non-zero Adam moments
    before = jax.tree_util.tree_map(np.array, (state.params, state.opt_state))
    state, m = step(state, _batch(1, empty=True), jax.random.PRNGKey(1))
    assert bool(m["skipped"]) and float(m["loss"]) == 0.0
    for a, b in zip(jax.tree_util.tree_leaves(before), jax.tree_util.tree_leaves((state.params, state.opt_state))):
        np.testing.assert_array_equal(a, b)
    state, m = step(state, _batch(2), jax.random.PRNGKey(2))
    assert not bool(m["skipped"])


def test_schedule_decays_per_step_and_warms_up(tiny_cfg):
    s = learning_rate_schedule(tiny_cfg.train)
    assert np.isclose(float(s(0)), 1.6e-3) and np.isclose(float(s(1000)), 1.6e-3 * 0.9999**1000, rtol=1e-5)
    w = learning_rate_schedule(dataclasses.replace(tiny_cfg.train, warmup_steps=10))
    assert float(w(0)) < float(w(5)) < float(w(10)) and np.isclose(float(w(10)), 1.6e-3)


SHARDED = textwrap.dedent(
    """
    import dataclasses, json, sys
    import jax, numpy as np
    from mednca_jax.config import AugmentConfig, Config, ModelConfig, DataConfig, TrainConfig, validate
    from mednca_jax.networks import init_network_params
    from mednca_jax.train.step import *
    from mednca_jax.machine import backend_for
    cfg = validate(Config(model=ModelConfig(channels=6, hidden=16, steps=(3, 3), scales=(2, 1), patch_size=8),
                          data=DataConfig(image_size=(16, 16)), train=TrainConfig(batch_size=BATCH, EXTRA_TRAIN), augment=AUGMENT))
    tx = make_optimizer(cfg.train)
    rng = np.random.default_rng(0)
    batch = {"image": rng.random((8, 16, 16, 1), dtype=np.float32),
             "label": (rng.random((8, 16, 16, 1)) > 0.8).astype(np.float32)}
    params = init_network_params(cfg, jax.random.PRNGKey(0))
    out = {}
    for name, mesh in [("one", None), ("four", make_mesh())]:
        try:
            step = make_train_step(cfg, tx, mesh, backend=backend_for(cfg))
        except ValueError as e:
            out["error"] = str(e); break
        state = put_replicated(init_train_state(params, tx, ema=cfg.train.ema_decay > 0), mesh)
        for i in range(3):
            state, m = step(state, put_batch(batch, mesh), jax.random.PRNGKey(i))
        out[name] = {"loss": float(m["loss"]),
                     "params": [np.asarray(x).ravel().tolist() for x in jax.tree_util.tree_leaves(state.params)]}
    out["devices"] = len(jax.devices())
    print("RESULT" + json.dumps(out))
    """
)


def _run_sharded(batch_size, augment="AugmentConfig()", extra_train=""):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    code = SHARDED.replace("BATCH", str(batch_size)).replace("AUGMENT", augment).replace(", EXTRA_TRAIN", extra_train)
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    line = [l for l in res.stdout.splitlines() if l.startswith("RESULT")][-1]
    return json.loads(line[len("RESULT") :])


@pytest.mark.slow
def test_data_parallel_with_augmentation_clipping_and_ema_equals_one_device():
    """Each device augments its own rows with the global rows' keys: the same step as one device."""
    out = _run_sharded(8, "AugmentConfig.from_preset('default', p_shift=1.0, p_gamma=1.0, p_spike=1.0)",
                       ", clip_grad_norm=0.5, ema_decay=0.9")
    assert out["devices"] == 4
    assert abs(out["one"]["loss"] - out["four"]["loss"]) <= 1e-5
    for a, b in zip(out["one"]["params"], out["four"]["params"]):
        np.testing.assert_allclose(a, b, atol=1e-5)


@pytest.mark.slow
def test_batch_not_divisible_by_devices_is_a_clear_error():
    out = _run_sharded(6)
    assert "divisible by the number of devices (4)" in out["error"]


# ------------------------------------------------------------------ clipping, EMA, budget schedules, augmentation hook
from mednca_jax.augment import augment_batch, augment_keys  # noqa: E402
from mednca_jax.config import AugmentConfig  # noqa: E402
from mednca_jax.train.step import budget_learning_rate, ema_update, eval_params, with_budget_used  # noqa: E402


def _mu(opt_state):
    """Adam's first moment, wherever the chain put it."""
    found = [s.mu for s in jax.tree_util.tree_leaves(opt_state, is_leaf=lambda s: hasattr(s, "mu")) if hasattr(s, "mu")]
    assert len(found) == 1
    return found[0]


def test_clipping_bounds_what_reaches_adam(tiny_cfg):
    params = {"w": jnp.zeros(5)}
    grads = {"w": jnp.full(5, 100.0)}  # global norm ~224
    b1 = tiny_cfg.train.betas[0]
    for clip, expect in ((0.0, 100.0 * np.sqrt(5)), (1.0, 1.0)):
        tx = make_optimizer(dataclasses.replace(tiny_cfg.train, clip_grad_norm=clip))
        _, state = tx.update(grads, tx.init(params), params)
        np.testing.assert_allclose(float(jnp.linalg.norm(_mu(state)["w"])), (1 - b1) * expect, rtol=1e-5)


@pytest.mark.slow
def test_ema_update_math_and_train_step_keeps_the_average(setup):
    a, p = {"w": jnp.array([1.0, 2.0])}, {"w": jnp.array([3.0, -2.0])}
    np.testing.assert_allclose(ema_update(a, p, 0.9)["w"], [0.9 * 1 + 0.1 * 3, 0.9 * 2 - 0.1 * 2], rtol=1e-6)
    cfg, tx, _ = setup
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, ema_decay=0.75))
    step = make_train_step(cfg, tx, backend=machine_backend(cfg))
    state = init_train_state(init_network_params(cfg, jax.random.PRNGKey(0)), tx, ema=True)
    p0 = jax.tree_util.tree_map(np.array, state.params)
    state, _ = step(state, _batch(0), jax.random.PRNGKey(0))
    for e, a0, a1 in zip(*(jax.tree_util.tree_leaves(t) for t in (state.ema, p0, state.params))):
        np.testing.assert_allclose(e, 0.75 * a0 + 0.25 * np.asarray(a1), rtol=1e-5, atol=1e-7)
    assert eval_params(state) is state.ema
    assert any(not np.allclose(e, a) for e, a in zip(jax.tree_util.tree_leaves(state.ema), jax.tree_util.tree_leaves(state.params)))


@pytest.mark.parametrize("schedule", ["budget_cosine", "budget_exponential"])
def test_budget_schedule_warms_up_and_reaches_its_final_value_at_the_end_of_the_budget(tiny_cfg, schedule):
    t = dataclasses.replace(tiny_cfg.train, schedule=schedule, time_limit_min=10.0, warmup_steps=10, lr_final=0.05)
    lr = lambda step, f: float(budget_learning_rate(t, step, f))  # noqa: E731
    assert lr(0, 0.0) < lr(5, 0.0) < lr(10, 0.0) and np.isclose(lr(10, 0.0), t.lr)
    fs = np.linspace(0, 1, 11)
    values = [lr(100, f) for f in fs]
    assert np.all(np.diff(values) < 0)
    np.testing.assert_allclose(values[-1], t.lr * t.lr_final, rtol=1e-5)
    np.testing.assert_allclose(lr(100, 1.7), t.lr * t.lr_final, rtol=1e-5)  # past the budget: stays there
    mid = t.lr * ((t.lr_final + (1 - t.lr_final) / 2) if schedule == "budget_cosine" else np.sqrt(t.lr_final))
    np.testing.assert_allclose(lr(100, 0.5), mid, rtol=1e-5)
    # the optimiser takes the fraction as an input: the step is scaled by the schedule's ratio
    tx = make_optimizer(t)
    params, grads = {"w": jnp.zeros(3)}, {"w": jnp.array([1.0, -2.0, 0.5])}
    u0, _ = tx.update(grads, tx.init(params), params, budget_used=jnp.float32(0.0))
    u1, _ = tx.update(grads, tx.init(params), params, budget_used=jnp.float32(1.0))
    np.testing.assert_allclose(u1["w"], t.lr_final * u0["w"], rtol=1e-5)
    # the host feeds the elapsed fraction
    state = with_budget_used(init_train_state(params, tx), t, 300.0)
    assert np.isclose(float(state.budget_used), 0.5)


def test_cosine_schedule_is_the_budget_cosine_curve_over_the_steps(tiny_cfg):
    t = dataclasses.replace(tiny_cfg.train, schedule="cosine", num_steps=200, warmup_steps=10, lr_final=0.05)
    budget = dataclasses.replace(t, schedule="budget_cosine", time_limit_min=10.0)
    lr = learning_rate_schedule(t)
    for step in (0, 5, 10, 50, 100, 199, 200, 350):
        want = float(budget_learning_rate(budget, step, step / t.num_steps))
        np.testing.assert_allclose(float(lr(step)), want, rtol=1e-6)
    np.testing.assert_allclose(float(lr(100)), t.lr * (t.lr_final + (1 - t.lr_final) / 2), rtol=1e-5)
    np.testing.assert_allclose(float(lr(200)), t.lr * t.lr_final, rtol=1e-5)
    # the optimiser on it needs no extra argument: the learning rate is a function of the step
    tx = make_optimizer(t)
    params = {"w": jnp.zeros(3)}
    u, _ = tx.update({"w": jnp.ones(3)}, tx.init(params), params)
    assert np.all(np.isfinite(u["w"]))


@pytest.mark.slow
def test_train_step_with_budget_schedule_reads_the_state(setup):
    cfg, _, _ = setup
    t = dataclasses.replace(cfg.train, schedule="budget_cosine", time_limit_min=1.0, lr_final=0.1, clip_grad_norm=1.0)
    cfg = dataclasses.replace(cfg, train=t)
    tx = make_optimizer(t)
    step = make_train_step(cfg, tx, backend=machine_backend(cfg))
    state = init_train_state(init_network_params(cfg, jax.random.PRNGKey(0)), tx)
    for used in (0.0, 0.5, 1.0):
        state, m = step(with_budget_used(state, t, used * 60.0), _batch(0), jax.random.PRNGKey(0))
        np.testing.assert_allclose(float(m["lr"]), float(budget_learning_rate(t, 0, used)), rtol=1e-5)
    assert step._cache_size() == 1


@pytest.mark.slow
def test_augmentation_hook_uses_its_own_key_and_leaves_the_model_keys_alone(setup):
    """A step with [augment] on equals a step without it on the batch augmented outside with
    augment_keys(step key): the hook augments exactly that way, and the model's random
    numbers are the same as without augmentation."""
    cfg, tx, plain = setup
    acfg = AugmentConfig.from_preset("default", p_shift=1.0, p_gamma=1.0)
    aug_step = make_train_step(dataclasses.replace(cfg, augment=acfg), tx, backend=machine_backend(cfg))
    params = init_network_params(cfg, jax.random.PRNGKey(0))
    key, batch = jax.random.PRNGKey(3), _batch(4)
    _, m_aug = aug_step(init_train_state(params, tx), batch, key)
    pre = augment_batch(batch, augment_keys(key, batch["image"].shape[0]), acfg)
    _, m_pre = plain(init_train_state(params, tx), pre, key)
    _, m_raw = plain(init_train_state(params, tx), batch, key)
    np.testing.assert_allclose(float(m_aug["loss"]), float(m_pre["loss"]), rtol=1e-6)
    assert abs(float(m_aug["loss"]) - float(m_raw["loss"])) > 1e-4
