"""Multi-level Med-NCA: coarse levels spread global context, the finest level refines.

For levels ``i = 0 .. L-1`` (coarse to fine) with downscale factors ``scales[i]``
(the original: ``[4, 1]``):

    level 0   seed = [image / scales[0] | zeros]            run NCA_0 for steps[0]
    level i   x = nearest-upsample(x, scales[i-1] / scales[i]); x[..., :n_in] = image / scales[i]
              run NCA_i for steps[i]
    logits = x[..., n_in : n_in + n_out]

Training (:func:`forward_train`) runs the finest level only on one random ``P x P`` crop per
sample (``model.patch_size``), which keeps memory small; inference (:func:`forward`) runs it
on the whole image.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mednca_jax.config import Config, ModelConfig
from mednca_jax.errors import MedNCAError
from mednca_jax.nca.rollout import REFERENCE, Backend, Params, init_level_params, rollout
from mednca_jax.nca.rule import Rule, fold_keys, reset_inputs, sample_keys


class InputError(MedNCAError, ValueError):
    """Images handed to the model have the wrong shape or hold non-finite values."""


# --------------------------------------------------------------------------- params
def level_names(model_cfg: ModelConfig) -> list[str]:
    return [f"level{i}" for i in range(model_cfg.n_levels)]


def rule_of(model_cfg: ModelConfig) -> Rule:
    """The static rule of a config (``model.perception``, ``model.precision``)."""
    return Rule(model_cfg.perception, model_cfg.precision)


def init_params(model_cfg: ModelConfig, key: jax.Array) -> Params:
    """Fresh params ``{"level0": ..., "level1": ...}`` with the original initialisation."""
    keys = jax.random.split(key, model_cfg.n_levels)
    return {
        name: init_level_params(k, model_cfg.channels, model_cfg.hidden, model_cfg.perception)
        for name, k in zip(level_names(model_cfg), keys)
    }


def check_params(params: Params, model_cfg: ModelConfig, source: str = "params") -> None:
    """Raise ``ValueError`` naming the first key or shape that does not fit ``model_cfg``."""
    expected = jax.eval_shape(lambda: init_params(model_cfg, jax.random.PRNGKey(0)))
    exp_flat = {jax.tree_util.keystr(p): v.shape for p, v in jax.tree_util.tree_leaves_with_path(expected)}
    got_flat = {jax.tree_util.keystr(p): np.shape(v) for p, v in jax.tree_util.tree_leaves_with_path(params)}
    missing = sorted(set(exp_flat) - set(got_flat))
    extra = sorted(set(got_flat) - set(exp_flat))
    if missing or extra:
        raise ValueError(
            f"{source} does not fit the config (channels={model_cfg.channels}, hidden={model_cfg.hidden}, "
            f"perception={model_cfg.perception!r}, {model_cfg.n_levels} levels): missing {missing or 'nothing'}, unexpected {extra or 'nothing'}"
        )
    for k, shape in exp_flat.items():
        if tuple(got_flat[k]) != tuple(shape):
            raise ValueError(
                f"{source}{k} has shape {tuple(got_flat[k])} but the config (channels={model_cfg.channels}, "
                f"hidden={model_cfg.hidden}) expects {tuple(shape)}"
            )


# --------------------------------------------------------------------------- resampling
def downscale(images: jax.Array, factor: int, method: str = "bilinear") -> jax.Array:
    """Downscale ``(B, H, W, c)`` by an integer factor.

    ``bilinear`` is the original's (torchio linear resize): half-pixel centres and no
    anti-aliasing, so for factor 4 each output pixel is the mean of the centre 2x2 pixels
    of its 4x4 block. ``area`` averages whole blocks; ``antialias`` is a filtered
    (triangle-kernel) resize.
    """
    if factor == 1:
        return images
    b, h, w, c = images.shape
    if method == "area":
        return images.reshape(b, h // factor, factor, w // factor, factor, c).mean(axis=(2, 4))
    if method not in ("bilinear", "antialias"):
        raise ValueError(f"unknown downscale method {method!r}; use bilinear, area or antialias")
    if method == "bilinear" and factor % 2 == 0:
        # Sample points (i + 0.5) * f - 0.5 fall exactly between pixels f*i + f/2 - 1 and f*i + f/2.
        lo = factor // 2 - 1
        blocks = images.reshape(b, h // factor, factor, w // factor, factor, c)
        return blocks[:, :, lo : lo + 2, :, lo : lo + 2, :].mean(axis=(2, 4))
    return jax.image.resize(
        images, (b, h // factor, w // factor, c), method="linear", antialias=(method == "antialias")
    )


def upsample_nearest(x: jax.Array, factor: int) -> jax.Array:
    """Nearest-neighbour upsampling ``(B, h, w, C) -> (B, h*f, w*f, C)``."""
    if factor == 1:
        return x
    return jnp.repeat(jnp.repeat(x, factor, axis=1), factor, axis=2)


def seed_state(image: jax.Array, channels: int) -> jax.Array:
    """Initial state ``(B, H, W, C)``: the image in the input channels, zeros elsewhere."""
    b, h, w, n_in = image.shape
    return jnp.concatenate([image, jnp.zeros((b, h, w, channels - n_in), image.dtype)], axis=-1)


# --------------------------------------------------------------------------- input checks
def check_images(images: Any, model_cfg: ModelConfig) -> None:
    """Raise :class:`InputError` unless ``images`` is a finite ``(B, H, W, n_in)`` array whose
    size divides by the coarsest scale. Runs on concrete arrays only (outside jit)."""
    shape = np.shape(images)
    if len(shape) != 4:
        raise InputError(f"images must have shape (B, H, W, n_in={model_cfg.n_in}), got rank {len(shape)} shape {shape}")
    if shape[-1] != model_cfg.n_in:
        raise InputError(f"images have {shape[-1]} channels, the config expects n_in={model_cfg.n_in}: shape {shape}")
    s = model_cfg.scales[0]
    if shape[1] % s or shape[2] % s:
        raise InputError(f"image size {shape[1]}x{shape[2]} is not divisible by the level scale factor {s}")
    if not isinstance(images, jax.core.Tracer) and not bool(jnp.all(jnp.isfinite(jnp.asarray(images)))):
        raise InputError("images contain NaN or inf values; clean or re-preprocess the input")


def check_fire_rate(fire_rate: float) -> None:
    if not 0.0 <= float(fire_rate) < 1.0:
        raise InputError(f"fire_rate must be in [0, 1), got {fire_rate}")


# --------------------------------------------------------------------------- forward passes
def level_input(x: jax.Array | None, images: jax.Array, model_cfg: ModelConfig, i: int) -> tuple[jax.Array, jax.Array]:
    """Start state and image of level ``i``: the seed for level 0, else the previous level's
    state ``x`` upsampled (nearest) with the image of this level written back.

    Returns ``(state (B, h, w, C), image (B, h, w, n_in))`` at this level's resolution.
    """
    scales = model_cfg.scales
    img = downscale(images, scales[i], model_cfg.downscale)
    if x is None:
        return seed_state(img, model_cfg.channels), img
    return reset_inputs(upsample_nearest(x, scales[i - 1] // scales[i]), img), img


def _level_keys(keys: jax.Array, i: int) -> jax.Array:
    # Level i of sample b draws from fold_in(keys[b], i); the crop from fold_in(keys[b], L).
    return fold_keys(keys, i)


def _coarse_levels(
    params: Params, model_cfg: ModelConfig, images: jax.Array, keys: jax.Array, fire_rate, backend: Backend, remat: str,
    masks: Any = None,
) -> tuple[jax.Array, list[jax.Array]]:
    """Run levels ``0 .. L-2`` on whole images; return the start state of the finest level
    ``(B, H, W, C)`` and the per-level final states."""
    names = level_names(model_cfg)
    x = None
    states = []
    for i in range(model_cfg.n_levels - 1):
        x, img = level_input(x, images, model_cfg, i)
        x, _ = rollout(
            params[names[i]], x, img, _level_keys(keys, i), model_cfg.steps[i], fire_rate,
            rule=rule_of(model_cfg), backend=backend, remat=remat, masks=None if masks is None else masks[i],
        )
        states.append(x)
    return level_input(x, images, model_cfg, model_cfg.n_levels - 1)[0], states


def forward(
    params: Params,
    model_cfg: ModelConfig,
    images: jax.Array,
    key: jax.Array,
    fire_rate: float | jax.Array | None = None,
    *,
    backend: Backend = REFERENCE,
    remat: str = "none",
    return_states: bool = False,
    masks: Any = None,
) -> jax.Array | tuple[jax.Array, list[jax.Array]]:
    """Inference on whole images: ``(B, H, W, n_in) -> logits (B, H, W, n_out)``.

    ``key``: one key or per-sample keys ``(B,)``. ``fire_rate`` defaults to the config's (the
    original also fires stochastically at inference); pass 0.0 for a deterministic result.
    ``backend``: see :mod:`mednca_jax.nca.rollout` (resolve one with
    :func:`mednca_jax.train.launch.backend_for`). ``masks``: one ``(steps_i, B, h_i, w_i)`` bool
    array per level instead of drawing from ``key``. With ``return_states`` also returns the
    final state of every level, coarse to fine.
    """
    fire_rate = model_cfg.fire_rate if fire_rate is None else fire_rate
    keys = sample_keys(key, images.shape[0])
    groups = batch_groups(images.shape[0], images.shape[1] * images.shape[2], backend.group_cells)
    if groups > 1 and masks is None:
        # One group of samples after the other, each with its own samples' keys: the same
        # result as the whole batch at once, with a working set that fits the caches.
        split = lambda t: t.reshape((groups, -1) + t.shape[1:])  # noqa: E731
        out = jax.lax.map(
            lambda a: _forward(params, model_cfg, a[0], a[1], fire_rate, backend, remat, return_states), (split(images), split(keys))
        )
        return jax.tree_util.tree_map(lambda t: t.reshape((-1,) + t.shape[2:]), out)
    return _forward(params, model_cfg, images, keys, fire_rate, backend, remat, return_states, masks)


def batch_groups(batch: int, cells_per_sample: int, group_cells: int) -> int:
    """Into how many equal groups of samples :func:`forward` splits a batch: the fewest whose
    groups hold at most ``group_cells`` cells. 1 (no split) when ``group_cells`` is 0, when
    the batch fits, or when only groups of single samples would do although two fit (a
    prime batch size): one sample at a time measured no faster than the whole batch."""
    if not group_cells or batch * cells_per_sample <= group_cells:
        return 1
    per_group = max(1, group_cells // cells_per_sample)
    size = max(d for d in range(1, per_group + 1) if batch % d == 0)
    return 1 if size == 1 and per_group > 1 else batch // size


def _forward(
    params: Params, model_cfg: ModelConfig, images: jax.Array, keys: jax.Array, fire_rate: float | jax.Array, backend: Backend,
    remat: str, return_states: bool, masks: Any = None,
) -> jax.Array | tuple[jax.Array, list[jax.Array]]:
    """:func:`forward` of one group, with per-sample ``keys (B,)``."""
    x, states = _coarse_levels(params, model_cfg, images, keys, fire_rate, backend, remat, masks)
    last = model_cfg.n_levels - 1
    x, _ = rollout(
        params[level_names(model_cfg)[last]], x, images, _level_keys(keys, last), model_cfg.steps[last], fire_rate,
        rule=rule_of(model_cfg), backend=backend, remat=remat, masks=None if masks is None else masks[last],
    )
    logits = x[..., model_cfg.n_in : model_cfg.n_in + model_cfg.n_out]
    return (logits, states + [x]) if return_states else logits


def forward_trajectory(
    params: Params, model_cfg: ModelConfig, images: jax.Array, key: jax.Array, fire_rate: float | None = None,
    *, backend: Backend = REFERENCE,
) -> jax.Array:
    """Every state of an inference rollout, all levels, at full resolution (for GIFs).

    images ``(B, H, W, n_in)`` -> ``(sum(steps), B, H, W, C)``; coarse levels are shown
    nearest-upsampled. Uses the same keys as :func:`forward`, so its last state is the one
    :func:`forward` returns.
    """
    fire_rate = model_cfg.fire_rate if fire_rate is None else fire_rate
    keys = sample_keys(key, images.shape[0])
    names, scales = level_names(model_cfg), model_cfg.scales
    x, frames = None, []
    for i in range(model_cfg.n_levels):
        x, img = level_input(x, images, model_cfg, i)
        x, traj = rollout(
            params[names[i]], x, img, _level_keys(keys, i), model_cfg.steps[i], fire_rate,
            rule=rule_of(model_cfg), backend=backend, trajectory=True,
        )
        frames.append(jnp.repeat(jnp.repeat(traj, scales[i], axis=2), scales[i], axis=3))
    return jnp.concatenate(frames, axis=0)


def random_crops(keys: jax.Array, arrays: tuple[jax.Array, ...], size: int) -> tuple[jax.Array, ...]:
    """One uniformly placed ``size x size`` crop per sample, the same window in every array.

    ``keys (B,)``: one key per sample (its window depends on nothing else, so a shard of the
    batch crops exactly its own samples). Each array is ``(B, H, W, *)``; crops are taken
    with ``vmap`` of ``lax.dynamic_slice``. Returns arrays ``(B, size, size, *)``.
    """
    h, w = arrays[0].shape[1:3]

    def corner(k):
        ky, kx = jax.random.split(k)
        return jax.random.randint(ky, (), 0, h - size + 1), jax.random.randint(kx, (), 0, w - size + 1)

    ys, xs = jax.vmap(corner)(keys)

    def crop_one(a, y, x):
        return jax.lax.dynamic_slice(a, (y, x) + (0,) * (a.ndim - 2), (size, size) + a.shape[2:])

    return tuple(jax.vmap(crop_one)(a, ys, xs) for a in arrays)


def forward_train(
    params: Params,
    model_cfg: ModelConfig,
    images: jax.Array,
    labels: jax.Array,
    key: jax.Array,
    fire_rate: float | jax.Array | None = None,
    *,
    backend: Backend = REFERENCE,
    remat: str | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Training forward pass: ``(logits, labels)`` on the finest level's random crops.

    images ``(B, H, W, n_in)``, labels ``(B, H, W, n_out)`` -> both ``(B, P, P, *)`` with
    ``P = model.patch_size`` (whole images when it is 0 or the image size). ``key``: one key
    or per-sample keys ``(B,)`` (a data-parallel shard passes its samples' keys).
    """
    fire_rate = model_cfg.fire_rate if fire_rate is None else fire_rate
    remat = model_cfg.remat if remat is None else remat
    keys = sample_keys(key, images.shape[0])
    last = model_cfg.n_levels - 1
    x, _ = _coarse_levels(params, model_cfg, images, keys, fire_rate, backend, remat)
    p = model_cfg.patch_size
    if 0 < p < min(images.shape[1], images.shape[2]):
        x, images, labels = random_crops(_level_keys(keys, model_cfg.n_levels), (x, images, labels), p)
    x, _ = rollout(
        params[level_names(model_cfg)[last]], x, images, _level_keys(keys, last), model_cfg.steps[last], fire_rate,
        rule=rule_of(model_cfg), backend=backend, remat=remat,
    )
    return x[..., model_cfg.n_in : model_cfg.n_in + model_cfg.n_out], labels


def segment(
    params: Params, cfg: Config | ModelConfig, images: Any, key: jax.Array, fire_rate: float | None = None,
    backend: Backend | None = None,
) -> jax.Array:
    """Foreground probabilities for preprocessed slices, checked first.

    images: ``(H, W)``, ``(B, H, W)`` or ``(B, H, W, n_in)`` -> sigmoid of the logits
    ``(B, H, W, n_out)``. Compiled once per shape. ``backend``: resolved from
    ``model.backend`` for this machine when not given.
    """
    model_cfg = cfg.model if isinstance(cfg, Config) else cfg
    images = np.asarray(images, np.float32)
    if images.ndim == 2:
        images = images[None]
    if images.ndim == 3 and model_cfg.n_in == 1:
        images = images[..., None]
    check_images(images, model_cfg)
    fire_rate = model_cfg.fire_rate if fire_rate is None else fire_rate
    check_fire_rate(fire_rate)
    if backend is None:
        from mednca_jax.train.launch import backend_for

        backend = backend_for(model_cfg)
    # The fire rate is static: with a known rate only the fired cells are computed.
    logits = _jit_forward(params, model_cfg, jnp.asarray(images), key, float(fire_rate), backend=backend)
    return jax.nn.sigmoid(logits)


_jit_forward = jax.jit(forward, static_argnums=(1, 4), static_argnames=("backend", "remat", "return_states"))
