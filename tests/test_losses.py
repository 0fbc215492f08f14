"""DiceBCE against a NumPy re-computation of the original, and the Dice metrics."""

import jax
import jax.numpy as jnp
import numpy as np

from mednca_jax.losses import dice_bce_loss, dice_hard, dice_soft, volume_dice


def _numpy_dice_bce(z, t):
    """The original's DiceBCE in float64 NumPy: per channel over the flattened batch, summed
    over the channels with foreground (the original), divided by the channel count (ours)."""
    total = 0.0
    for c in range(z.shape[-1]):
        zc, tc = z[..., c].ravel().astype(np.float64), t[..., c].ravel().astype(np.float64)
        if tc.sum() == 0:
            continue
        p = 1 / (1 + np.exp(-zc))
        bce = -(tc * np.log(p) + (1 - tc) * np.log(1 - p)).mean()
        dice = 1 - (2 * (p * tc).sum() + 1) / (p.sum() + tc.sum() + 1)
        total += bce + dice
    return total / z.shape[-1]


def test_loss_equals_numpy_recomputation(rng):
    z = rng.normal(0, 3, (4, 8, 8, 3)).astype(np.float32)
    t = (rng.random((4, 8, 8, 3)) > 0.7).astype(np.float32)
    t[..., 1] = 0  # an empty channel is skipped
    got = float(dice_bce_loss(jnp.asarray(z), jnp.asarray(t)))
    np.testing.assert_allclose(got, _numpy_dice_bce(z, t), rtol=1e-5)
    no_skip = _numpy_dice_bce(z, np.where(np.arange(3) == 1, 1.0, t).astype(np.float32))
    assert abs(got - no_skip) > 0.1


def test_loss_is_zero_without_foreground_and_differentiable(rng):
    z = jnp.asarray(rng.normal(size=(2, 4, 4, 1)), jnp.float32)
    assert float(dice_bce_loss(z, jnp.zeros_like(z))) == 0.0
    g = jax.grad(dice_bce_loss)(z, (z > 0).astype(jnp.float32))
    assert np.all(np.isfinite(g)) and np.abs(g).sum() > 0


def test_dice_metrics():
    t = np.zeros((4, 4))
    t[:2] = 1
    assert dice_hard(t, t) == 1.0
    assert dice_hard(1 - t, t) == 0.0
    p = np.zeros((4, 4))
    p[:1] = 0.9
    assert np.isclose(dice_hard(p, t), 2 * 4 / (4 + 8))
    assert np.isclose(dice_soft(p, t), 2 * 0.9 * 4 / (0.9 * 4 + 8))
    assert dice_hard(np.zeros((3, 3)), np.zeros((3, 3))) == 1.0
    assert dice_soft(np.zeros((3, 3)), np.zeros((3, 3))) == 1.0
    v = volume_dice(np.stack([p, p])[..., None], np.stack([t, t])[..., None])
    assert np.isclose(v["dice"], dice_hard(p, t)) and np.isclose(v["dice_soft"], dice_soft(p, t))
