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
from mednca_jax.training import (
    init_train_state,
    learning_rate_schedule,
    make_optimizer,
    make_train_step,
)
from conftest import REPO


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
    step = make_train_step(cfg, tx)
    return cfg, tx, step


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
    from mednca_jax.config import Config, ModelConfig, DataConfig, TrainConfig, validate
    from mednca_jax.networks import init_network_params
    from mednca_jax.training import *
    cfg = validate(Config(model=ModelConfig(channels=6, hidden=16, steps=(3, 3), scales=(2, 1), patch_size=8),
                          data=DataConfig(image_size=(16, 16)), train=TrainConfig(batch_size=BATCH)))
    tx = make_optimizer(cfg.train)
    rng = np.random.default_rng(0)
    batch = {"image": rng.random((8, 16, 16, 1), dtype=np.float32),
             "label": (rng.random((8, 16, 16, 1)) > 0.8).astype(np.float32)}
    params = init_network_params(cfg, jax.random.PRNGKey(0))
    out = {}
    for name, mesh in [("one", None), ("four", make_mesh())]:
        try:
            step = make_train_step(cfg, tx, mesh)
        except ValueError as e:
            out["error"] = str(e); break
        state = put_replicated(init_train_state(params, tx), mesh)
        for i in range(3):
            state, m = step(state, put_batch(batch, mesh), jax.random.PRNGKey(i))
        out[name] = {"loss": float(m["loss"]),
                     "params": [np.asarray(x).ravel().tolist() for x in jax.tree_util.tree_leaves(state.params)]}
    out["devices"] = len(jax.devices())
    print("RESULT" + json.dumps(out))
    """
)


def _run_sharded(batch_size):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    code = SHARDED.replace("BATCH", str(batch_size))
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    line = [l for l in res.stdout.splitlines() if l.startswith("RESULT")][-1]
    return json.loads(line[len("RESULT") :])


@pytest.mark.slow
def test_batch_not_divisible_by_devices_is_a_clear_error():
    out = _run_sharded(6)
    assert "divisible by the number of devices (4)" in out["error"]
