"""UNet baseline in 2D and 3D: shapes, parameter count, trainability, input-size errors (tiny
shapes), and the 2D network's frozen numbers."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mednca_jax.config import ModelConfig, load_config
from mednca_jax.baselines.unet import count_params, expected_param_count, init_unet_params, unet_forward
from mednca_jax.named_configs import resolve_config_path

# Written by the 2D-only UNet before it took any spatial rank (width 4, depth 2, n_in 2,
# n_out 3, key 7, 16x24 images): its parameters ("param" + keystr) and logits, which the
# rank-independent network must reproduce exactly.
GOLDEN_2D = Path(__file__).resolve().parent / "golden" / "unet2d_small.npz"


def _cfg(width: int = 4, depth: int = 2, n_in: int = 1, n_out: int = 1) -> ModelConfig:
    return ModelConfig(kind="unet", unet_width=width, unet_depth=depth, n_in=n_in, n_out=n_out, channels=max(16, n_in + n_out))


def test_forward_shape_and_dtype():
    cfg = _cfg(width=4, depth=2, n_in=2, n_out=3)
    params = init_unet_params(cfg, (16, 24), jax.random.key(0))
    out = unet_forward(params, cfg, jnp.ones((2, 16, 24, 2)))
    assert out.shape == (2, 16, 24, 3) and out.dtype == jnp.float32
    assert bool(jnp.all(jnp.isfinite(out)))
    assert isinstance(params, dict) and "params" not in params  # plain dict, no flax wrapper


def test_forward_shape_3d():
    # volumes (B, X, Y, Z, C) with three different sides: a swapped axis would change the shape
    cfg = _cfg(width=4, depth=2, n_in=1, n_out=2)
    params = init_unet_params(cfg, (8, 12, 16), jax.random.key(0))
    assert params["down0"]["Conv_0"]["kernel"].shape == (3, 3, 3, 1, 4)
    assert params["upconv0"]["kernel"].shape == (2, 2, 2, 8, 4) and params["head"]["kernel"].shape == (1, 1, 1, 4, 2)
    x = jax.random.uniform(jax.random.key(1), (2, 8, 12, 16, 1))
    out = unet_forward(params, cfg, x)
    assert out.shape == (2, 8, 12, 16, 2) and out.dtype == jnp.float32
    assert bool(jnp.all(jnp.isfinite(out))) and float(jnp.std(out)) > 0
    # the 2D and 3D networks have the same layers under the same names
    flat = lambda p: {jax.tree_util.keystr(k) for k, _ in jax.tree_util.tree_leaves_with_path(p)}  # noqa: E731
    assert flat(params) == flat(init_unet_params(cfg, (8, 12), jax.random.key(0)))


def test_3d_convolutions_see_the_third_axis():
    # a change in one z-slice reaches its neighbours in z: the 3x3x3 convs mix along Z,
    # not 2D convs applied slice by slice
    cfg = _cfg(width=4, depth=1)
    params = init_unet_params(cfg, (4, 4, 8), jax.random.key(2))
    x = jax.random.uniform(jax.random.key(3), (1, 4, 4, 8, 1))
    delta = unet_forward(params, cfg, x.at[:, :, :, 3].add(1.0)) - unet_forward(params, cfg, x)
    per_z = np.asarray(jnp.abs(delta).max(axis=(0, 1, 2, 4)))
    assert per_z[2] > 1e-4 and per_z[4] > 1e-4


def test_2d_network_is_unchanged_frozen_golden():
    g = np.load(GOLDEN_2D)
    cfg = _cfg(width=4, depth=2, n_in=2, n_out=3)
    params = init_unet_params(cfg, (16, 24), jax.random.key(7))
    flat = {"param" + jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(params)}
    assert set(flat) == {k for k in g.files if k.startswith("param")}
    for k, v in flat.items():
        np.testing.assert_array_equal(v, g[k], err_msg=k)
    logits = np.asarray(unet_forward(params, cfg, jnp.asarray(g["images"])))
    # The weights are bit-identical (above); the logits are float32 sums whose order XLA picks
    # per CPU (vector width, conv algorithm): seen to differ by 1.2e-5 between two x86 hosts,
    # so the bound is relative to the logits' range (3.4), far below any change of the network.
    np.testing.assert_allclose(logits, g["logits"], rtol=0, atol=2e-5 * np.abs(g["logits"]).max())


@pytest.mark.parametrize("width,depth,n_in,n_out,ndim", [(4, 1, 1, 1, 2), (4, 2, 2, 3, 2), (6, 3, 1, 2, 2), (4, 2, 1, 1, 3), (3, 1, 2, 2, 3)])
def test_param_count_formula(width, depth, n_in, n_out, ndim):
    cfg = _cfg(width, depth, n_in, n_out)
    params = init_unet_params(cfg, (2**depth,) * ndim, jax.random.key(0))
    assert count_params(params) == expected_param_count(width, depth, n_in, n_out, ndim)


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
    with pytest.raises(ValueError, match=r"\(B, H, W, n_in=1\) for these 2D params"):
        unet_forward(params, cfg, jnp.zeros((1, 16, 16, 16, 1)))  # a volume for 2D params
    with pytest.raises(ValueError, match=r"every side of the input divisible by 2\*\*depth = 4; got 16x16x10"):
        init_unet_params(cfg, (16, 16, 10), jax.random.key(0))


def test_unet3d_config_is_the_m3d_grid():
    cfg = load_config(resolve_config_path("unet3d_hippocampus"))
    assert cfg.model.kind == "unet" and tuple(cfg.data.image_size) == (64, 64, 52)
    assert 52 % 2**cfg.model.unet_depth == 0  # validated: one pool per level on every axis
    budget = load_config(resolve_config_path("hippocampus_unet")).train
    assert (cfg.train.schedule, cfg.train.time_limit_min, cfg.train.clip_grad_norm, cfg.train.ema_decay) == (
        budget.schedule, budget.time_limit_min, budget.clip_grad_norm, budget.ema_decay)


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


def test_3d_unet_trains_through_the_shared_pipeline():
    # networks.py + the project's train step on random volumes (B, X, Y, Z, C): the 3D UNet
    # needs nothing of its own beyond data.image_size having three entries
    from mednca_jax.config import Config, DataConfig, TrainConfig, validate
    from mednca_jax.nca.backends import REFERENCE
    from mednca_jax.networks import check_network_params, forward, init_network_params
    from mednca_jax.train.step import init_train_state, make_optimizer, make_train_step, put_batch

    model = dataclasses.replace(_cfg(width=4, depth=1), patch_size=0)
    cfg = validate(Config(name="unet3d-tiny", model=model, data=DataConfig(image_size=(8, 8, 4)),
                          train=TrainConfig(batch_size=2, lr=1e-2)))
    params = init_network_params(cfg, jax.random.key(0))
    check_network_params(params, cfg)
    assert params["down0"]["Conv_0"]["kernel"].ndim == 5
    rng = np.random.default_rng(0)
    label = np.zeros((2, 8, 8, 4, 1), np.float32)
    label[:, 2:6, 3:7, 1:3] = 1.0
    batch = put_batch({"image": (0.2 + 0.6 * label + 0.05 * rng.standard_normal(label.shape)).astype(np.float32), "label": label}, None)
    tx = make_optimizer(cfg.train)
    step = make_train_step(cfg, tx, None, backend=REFERENCE)
    state = init_train_state(params, tx)
    losses = []
    for i in range(3):
        state, m = step(state, batch, jax.random.key(i))
        losses.append(float(m["loss"]))
    assert np.isfinite(losses).all() and losses[-1] < losses[0], losses
    logits = forward(state.params, cfg, batch["image"], jax.random.key(0), 0.0, REFERENCE)
    assert logits.shape == (2, 8, 8, 4, 1)


def test_unet_trains_on_crops_placed_like_the_ncas():
    # model.unet_patch_size = P: the loss sees one PxPxP crop per sample, the same window in the
    # image and the label, around foreground when patch_foreground = 1; inference stays whole
    from mednca_jax.config import Config, DataConfig, validate
    from mednca_jax.nca.backends import REFERENCE
    from mednca_jax.networks import forward, forward_train, init_network_params

    model = dataclasses.replace(_cfg(width=4, depth=1), unet_patch_size=4, patch_size=0, patch_foreground=1.0)
    cfg = validate(Config(name="unet3d-crops", model=model, data=DataConfig(image_size=(16, 12, 8))))
    params = init_network_params(cfg, jax.random.key(0))
    label = np.zeros((3, 16, 12, 8, 1), np.float32)
    label[:, 11:13, 1:3, 5:7] = 1.0  # 8 voxels far from the origin: a uniform window rarely sees them
    image = np.random.default_rng(0).uniform(size=label.shape).astype(np.float32)  # every window distinct
    keys = jax.random.split(jax.random.key(1), 3)
    logits, crop_labels = forward_train(params, cfg, jnp.asarray(image), jnp.asarray(label), keys, REFERENCE)
    assert logits.shape == (3, 4, 4, 4, 1) and crop_labels.shape == (3, 4, 4, 4, 1)
    assert bool(jnp.all(crop_labels.sum(axis=(1, 2, 3, 4)) > 0))  # every crop holds foreground
    # the logits are the UNet's on one window of the image, and the label crop is that window
    # of the label: find the window among all of them by its logits
    windows = [(x, y, z) for x in range(13) for y in range(9) for z in range(5)]
    for b in range(3):
        crops = np.stack([image[b, x : x + 4, y : y + 4, z : z + 4] for x, y, z in windows])
        err = np.abs(np.asarray(unet_forward(params, cfg.model, jnp.asarray(crops))) - np.asarray(logits[b])[None]).max(axis=(1, 2, 3, 4))
        x, y, z = windows[int(err.argmin())]
        assert err.min() < 1e-5 and np.sort(err)[1] > 1e-3
        np.testing.assert_array_equal(np.asarray(crop_labels[b]), label[b, x : x + 4, y : y + 4, z : z + 4])
    same = forward_train(params, cfg, jnp.asarray(image), jnp.asarray(label), keys, REFERENCE)[1]
    np.testing.assert_array_equal(np.asarray(same), np.asarray(crop_labels))  # keys decide the window
    whole = forward(params, cfg, jnp.asarray(image), jax.random.key(0), 0.0, REFERENCE)
    assert whole.shape == (3, 16, 12, 8, 1)
    with pytest.raises(ValueError, match="model.unet_patch_size"):
        validate(Config(name="bad", model=dataclasses.replace(model, unet_patch_size=5), data=DataConfig(image_size=(16, 12, 8))))
