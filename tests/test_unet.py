"""UNet baseline: shapes, parameter count, trainability, input-size errors (tiny shapes)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mednca_jax.config import ModelConfig
from mednca_jax.baselines.unet import count_params, expected_param_count, init_unet_params, unet_forward


def _cfg(width: int = 4, depth: int = 2, n_in: int = 1, n_out: int = 1) -> ModelConfig:
    return ModelConfig(kind="unet", unet_width=width, unet_depth=depth, n_in=n_in, n_out=n_out, channels=max(16, n_in + n_out))


def test_forward_shape_and_dtype():
    cfg = _cfg(width=4, depth=2, n_in=2, n_out=3)
    params = init_unet_params(cfg, (16, 24), jax.random.key(0))
    out = unet_forward(params, cfg, jnp.ones((2, 16, 24, 2)))
    assert out.shape == (2, 16, 24, 3) and out.dtype == jnp.float32
    assert bool(jnp.all(jnp.isfinite(out)))
    assert isinstance(params, dict) and "params" not in params  # plain dict, no flax wrapper


@pytest.mark.parametrize("width,depth,n_in,n_out", [(4, 1, 1, 1), (4, 2, 2, 3), (6, 3, 1, 2)])
def test_param_count_formula(width, depth, n_in, n_out):
    cfg = _cfg(width, depth, n_in, n_out)
    params = init_unet_params(cfg, (2**depth, 2**depth), jax.random.key(0))
    assert count_params(params) == expected_param_count(width, depth, n_in, n_out)


def test_init_is_seeded_and_scaled():
    cfg = _cfg(width=8, depth=2)
    a = init_unet_params(cfg, (8, 8), jax.random.key(3))
    b = init_unet_params(cfg, (8, 8), jax.random.key(3))
    c = init_unet_params(cfg, (8, 8), jax.random.key(4))
    k = np.asarray(a["bottleneck"]["Conv_1"]["kernel"])  # fan_in = 9 * 32
    np.testing.assert_array_equal(k, np.asarray(b["bottleneck"]["Conv_1"]["kernel"]))
    assert not np.allclose(k, np.asarray(c["bottleneck"]["Conv_1"]["kernel"]))
    assert abs(k.std() * np.sqrt(9 * 32) - 1.0) < 0.05  # LeCun normal
    assert np.all(np.asarray(a["head"]["bias"]) == 0) and np.all(np.asarray(a["down0"]["GroupNorm_0"]["scale"]) == 1)


def test_classic_unet_size_and_monotonic_in_width():
    # the classic configuration (width 64, 4 levels) is the ~31M-parameter UNet
    assert expected_param_count(64, 4) == 31_036_481
    counts = [expected_param_count(w, 4) for w in (8, 16, 32, 64)]
    assert counts == sorted(counts) and len(set(counts)) == 4


def test_indivisible_size_raises():
    cfg = _cfg(width=4, depth=2)
    with pytest.raises(ValueError, match=r"divisible by 2\*\*depth = 4"):
        init_unet_params(cfg, (18, 16), jax.random.key(0))
    params = init_unet_params(cfg, (16, 16), jax.random.key(0))
    with pytest.raises(ValueError, match="divisible"):
        unet_forward(params, cfg, jnp.zeros((1, 16, 10, 1)))
    with pytest.raises(ValueError, match="n_in=1"):
        unet_forward(params, cfg, jnp.zeros((1, 16, 16, 2)))


def test_batch_independent():
    # GroupNorm, not BatchNorm: a sample's logits do not depend on the rest of the batch
    cfg = _cfg(width=4, depth=2)
    params = init_unet_params(cfg, (16, 16), jax.random.key(1))
    x = jax.random.uniform(jax.random.key(2), (3, 16, 16, 1))
    full = unet_forward(params, cfg, x)
    single = unet_forward(params, cfg, x[1:2])
    np.testing.assert_allclose(np.asarray(full[1:2]), np.asarray(single), atol=1e-5)


@pytest.mark.slow
def test_adam_reduces_loss_on_toy_blob():
    cfg = _cfg(width=4, depth=2)
    yy, xx = np.mgrid[:16, :16]
    label = (((yy - 7.5) ** 2 + (xx - 9.5) ** 2) < 16).astype(np.float32)
    rng = np.random.default_rng(0)
    images = jnp.asarray((0.2 + 0.6 * label + 0.05 * rng.standard_normal((4, 16, 16)))[..., None], jnp.float32)
    labels = jnp.asarray(np.broadcast_to(label, (4, 16, 16))[..., None])
    params = init_unet_params(cfg, (16, 16), jax.random.key(0))
    opt = optax.adam(1e-2)
    opt_state = opt.init(params)

    def loss_fn(p):
        return optax.sigmoid_binary_cross_entropy(unet_forward(p, cfg, images), labels).mean()

    @jax.jit
    def step(p, s):
        loss, g = jax.value_and_grad(loss_fn)(p)
        upd, s = opt.update(g, s, p)
        return optax.apply_updates(p, upd), s, loss, g

    losses = []
    for i in range(15):
        params, opt_state, loss, grads = step(params, opt_state)
        losses.append(float(loss))
        if i == 0:  # gradient reaches every parameter (first encoder conv included)
            assert float(jnp.abs(grads["down0"]["Conv_0"]["kernel"]).sum()) > 0
    assert np.isfinite(losses).all()
    assert losses[-1] < 0.7 * losses[0], losses
