"""Multi-level NCA: coarse levels spread global context, the finest level refines.

For levels ``i = 0 .. L-1`` (coarse to fine) with downscale factors ``scales[i]`` (Med-NCA:
``[4, 1]``; M3D-NCA: ``[2, 1]``), in any spatial rank:

    level 0   seed = [image / scales[0] | zeros]            run NCA_0 for steps[0]
    level i   x = nearest-upsample(x, scales[i-1] / scales[i]); x[..., :n_in] = image / scales[i]
              run NCA_i for steps[i]
    logits = x[..., n_in : n_in + n_out]

Training (:func:`forward_train`) runs the finest level only on one random ``P x P (x P)`` crop
per sample (``model.patch_size``), which keeps memory small; inference (:func:`forward`)
runs it on the whole image. Every function takes per-sample keys or one key, the resolved
fire rate and the resolved backend from its caller: nothing here reads the config's defaults
or the machine (:func:`segment` is the one entry that does, for a user's call).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mednca_jax.config import Config, ModelConfig
from mednca_jax.errors import MedNCAError
from mednca_jax.nca.backends import REFERENCE, Backend
from mednca_jax.nca.rollout import rollout
from mednca_jax.nca.rule import (  # noqa: F401  (level_rule(s): part of this module's API)
    Params, fold_keys, init_level, level_rule, level_rules, reset_inputs, sample_keys,
)


class InputError(MedNCAError, ValueError):
    """Images handed to the model have the wrong shape or hold non-finite values."""


# --------------------------------------------------------------------------- rules and params
def level_names(model_cfg: ModelConfig) -> list[str]:
    return [f"level{i}" for i in range(model_cfg.n_levels)]


def init_params(model_cfg: ModelConfig, key: jax.Array, ndim: int = 2) -> Params:
    """Fresh params ``{"level0": ..., "level1": ...}`` with the original initialisation."""
    keys = jax.random.split(key, model_cfg.n_levels)
    return {name: init_level(k, rule) for name, k, rule in zip(level_names(model_cfg), keys, level_rules(model_cfg, ndim))}


def check_params(params: Params, model_cfg: ModelConfig, source: str = "params", ndim: int = 2) -> None:
    """Raise ``ValueError`` naming the first key or shape that does not fit ``model_cfg``."""
    expected = jax.eval_shape(lambda: init_params(model_cfg, jax.random.PRNGKey(0), ndim))
    exp_flat = {jax.tree_util.keystr(p): v.shape for p, v in jax.tree_util.tree_leaves_with_path(expected)}
    got_flat = {jax.tree_util.keystr(p): np.shape(v) for p, v in jax.tree_util.tree_leaves_with_path(params)}
    missing = sorted(set(exp_flat) - set(got_flat))
    extra = sorted(set(got_flat) - set(exp_flat))
    m = model_cfg
    what = f"channels={m.channels}, hidden={m.hidden}, perception={m.perception!r}, update={m.update!r}, norm={m.norm!r}"
    if missing or extra:
        raise ValueError(
            f"{source} does not fit the config ({what}, {m.n_levels} levels): missing {missing or 'nothing'}, unexpected {extra or 'nothing'}"
        )
    for k, shape in exp_flat.items():
        if tuple(got_flat[k]) != tuple(shape):
            raise ValueError(f"{source}{k} has shape {tuple(got_flat[k])} but the config ({what}) expects {tuple(shape)}")


# --------------------------------------------------------------------------- resampling
def _blocks(images: jax.Array, factor: int) -> jax.Array:
    """``(B, *S, c) -> (B, s0/f, f, s1/f, f, ..., c)``."""
    spatial = images.shape[1:-1]
    shape = [images.shape[0]]
    for s in spatial:
        shape += [s // factor, factor]
    return images.reshape(shape + [images.shape[-1]])


def downscale(images: jax.Array, factor: int, method: str = "bilinear") -> jax.Array:
    """Downscale ``(B, *S, c)`` by an integer factor along every spatial axis.

    ``bilinear`` is the original Med-NCA's (torchio linear resize): half-pixel centres and no
    anti-aliasing, so for an even factor each output pixel is the mean of the centre 2x2
    (2x2x2) pixels of its block. ``area`` averages whole blocks; ``max`` takes their maximum
    (M3D-NCA's ``MaxPool``); ``antialias`` is a filtered (triangle-kernel) resize.
    """
    if factor == 1:
        return images
    ndim = images.ndim - 2
    block_axes = tuple(2 + 2 * a for a in range(ndim))
    if method == "area":
        return _blocks(images, factor).mean(axis=block_axes)
    if method == "max":
        return _blocks(images, factor).max(axis=block_axes)
    if method not in ("bilinear", "antialias"):
        raise ValueError(f"unknown downscale method {method!r}; use bilinear, area, max or antialias")
    if method == "bilinear" and factor % 2 == 0:
        # Sample points (i + 0.5) * f - 0.5 fall exactly between pixels f*i + f/2 - 1 and f*i + f/2.
        lo = factor // 2 - 1
        blocks = _blocks(images, factor)
        centre = (slice(None),) + sum(((slice(None), slice(lo, lo + 2)) for _ in range(ndim)), ())
        return blocks[centre].mean(axis=block_axes)
    out = (images.shape[0],) + tuple(s // factor for s in images.shape[1:-1]) + (images.shape[-1],)
    return jax.image.resize(images, out, method="linear", antialias=(method == "antialias"))


def upsample_nearest(x: jax.Array, factor: int) -> jax.Array:
    """Nearest-neighbour upsampling ``(B, *s, C) -> (B, *(s * f), C)``."""
    for axis in range(1, x.ndim - 1) if factor > 1 else ():
        x = jnp.repeat(x, factor, axis=axis)
    return x


def seed_state(image: jax.Array, channels: int) -> jax.Array:
    """Initial state ``(B, *S, C)``: the image in the input channels, zeros elsewhere."""
    return jnp.concatenate([image, jnp.zeros(image.shape[:-1] + (channels - image.shape[-1],), image.dtype)], axis=-1)


# --------------------------------------------------------------------------- input checks
def check_images(images: Any, model_cfg: ModelConfig, ndim: int = 2) -> None:
    """Raise :class:`InputError` unless ``images`` is a finite ``(B, *S, n_in)`` array of
    ``ndim`` spatial axes whose size divides by the coarsest scale. Concrete arrays only."""
    shape = np.shape(images)
    axes = ", ".join("HWD"[i] if ndim <= 3 else f"S{i}" for i in range(ndim))
    if len(shape) != ndim + 2:
        raise InputError(f"images must have shape (B, {axes}, n_in={model_cfg.n_in}), got rank {len(shape)} shape {shape}")
    if shape[-1] != model_cfg.n_in:
        raise InputError(f"images have {shape[-1]} channels, the config expects n_in={model_cfg.n_in}: shape {shape}")
    s = model_cfg.scales[0]
    if any(n % s for n in shape[1:-1]):
        raise InputError(f"image size {'x'.join(map(str, shape[1:-1]))} is not divisible by the level scale factor {s}")
    if not isinstance(images, jax.core.Tracer) and not bool(jnp.all(jnp.isfinite(jnp.asarray(images)))):
        raise InputError("images contain NaN or inf values; clean or re-preprocess the input")


def check_fire_rate(fire_rate: float) -> None:
    if not 0.0 <= float(fire_rate) < 1.0:
        raise InputError(f"fire_rate must be in [0, 1), got {fire_rate}")


# --------------------------------------------------------------------------- one level
def level_input(x: jax.Array | None, images: jax.Array, model_cfg: ModelConfig, i: int) -> tuple[jax.Array, jax.Array]:
    """Start state and image of level ``i``: the seed for level 0, else the previous level's
    state ``x`` upsampled (nearest) with the image of this level written back.

    Returns ``(state (B, *s, C), image (B, *s, n_in))`` at this level's resolution.
    """
    scales = model_cfg.scales
    img = downscale(images, scales[i], model_cfg.downscale)
    if x is None:
        return seed_state(img, model_cfg.channels), img
    return reset_inputs(upsample_nearest(x, scales[i - 1] // scales[i]), img), img


def run_level(
    params: Params, model_cfg: ModelConfig, i: int, x: jax.Array, image: jax.Array, keys: jax.Array, fire_rate: float | jax.Array,
    backend: Backend, remat: str = "none", masks: jax.Array | None = None, trajectory: bool = False,
) -> tuple[jax.Array, jax.Array | None]:
    """Level ``i``'s rollout from state ``x (B, *s, C)``: its rule, steps and parameters, its
    masks drawn from ``fold_in(keys[b], i)`` for sample ``b`` (or given as ``masks``)."""
    return rollout(
        params[f"level{i}"], x, image, fold_keys(keys, i), model_cfg.steps[i], fire_rate,
        rule=level_rule(model_cfg, i, x.ndim - 2), backend=backend, remat=remat, masks=masks, trajectory=trajectory,
    )


def _coarse_levels(
    params: Params, model_cfg: ModelConfig, images: jax.Array, keys: jax.Array, fire_rate, backend: Backend, remat: str,
    masks: Any = None,
) -> tuple[jax.Array, list[jax.Array]]:
    """Run levels ``0 .. L-2`` on whole images; return the start state of the finest level
    ``(B, *S, C)`` and the per-level final states."""
    x = None
    states = []
    for i in range(model_cfg.n_levels - 1):
        x, img = level_input(x, images, model_cfg, i)
        x, _ = run_level(params, model_cfg, i, x, img, keys, fire_rate, backend, remat, None if masks is None else masks[i])
        states.append(x)
    return level_input(x, images, model_cfg, model_cfg.n_levels - 1)[0], states


def _logits(x: jax.Array, model_cfg: ModelConfig) -> jax.Array:
    return x[..., model_cfg.n_in : model_cfg.n_in + model_cfg.n_out]


# --------------------------------------------------------------------------- forward passes
def forward(
    params: Params,
    model_cfg: ModelConfig,
    images: jax.Array,
    key: jax.Array,
    fire_rate: float | jax.Array,
    *,
    backend: Backend = REFERENCE,
    remat: str = "none",
    return_states: bool = False,
    masks: Any = None,
) -> jax.Array | tuple[jax.Array, list[jax.Array]]:
    """Inference on whole images: ``(B, *S, n_in) -> logits (B, *S, n_out)``.

    ``key``: one key or per-sample keys ``(B,)``. ``fire_rate``: the original also fires
    stochastically at inference (``model.fire_rate``); 0.0 is deterministic. ``backend``: see
    :mod:`mednca_jax.nca.backends` (resolve one with :func:`mednca_jax.machine.backend_for`).
    ``masks``: one ``(steps_i, B, *s_i)`` bool array per level instead of drawing from
    ``key``. With ``return_states`` also returns the final state of every level, coarse to fine.
    """
    keys = sample_keys(key, images.shape[0])
    groups = batch_groups(images.shape[0], int(np.prod(images.shape[1:-1])), backend.group_cells)
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
    x, _ = run_level(params, model_cfg, last, x, images, keys, fire_rate, backend, remat, None if masks is None else masks[last])
    return (_logits(x, model_cfg), states + [x]) if return_states else _logits(x, model_cfg)


def forward_trajectory(
    params: Params, model_cfg: ModelConfig, images: jax.Array, key: jax.Array, fire_rate: float,
    *, backend: Backend = REFERENCE,
) -> jax.Array:
    """Every state of an inference rollout, all levels, at full resolution (for GIFs).

    images ``(B, *S, n_in)`` -> ``(sum(steps), B, *S, C)``; coarse levels are shown
    nearest-upsampled. Uses the same keys as :func:`forward`, so its last state is the one
    :func:`forward` returns.
    """
    keys = sample_keys(key, images.shape[0])
    x, frames = None, []
    for i in range(model_cfg.n_levels):
        x, img = level_input(x, images, model_cfg, i)
        x, traj = run_level(params, model_cfg, i, x, img, keys, fire_rate, backend, trajectory=True)
        frames.append(jax.vmap(lambda t: upsample_nearest(t, model_cfg.scales[i]))(traj))
    return jnp.concatenate(frames, axis=0)


def random_crops(
    keys: jax.Array, arrays: tuple[jax.Array, ...], size: int, labels: jax.Array | None = None, foreground: float = 0.0,
) -> tuple[jax.Array, ...]:
    """One ``size x size (x size)`` crop per sample, the same window in every array.

    ``keys (B,)``: one key per sample (its window depends on nothing else, so a shard of the
    batch crops exactly its own samples). Each array is ``(B, *S, *)`` with the spatial axes
    of the first; crops are taken with ``vmap`` of ``lax.dynamic_slice``. Windows are placed
    uniformly; with ``foreground > 0`` and ``labels (B, *S, n_out)``, a sample's window is,
    with that probability, one that contains a voxel drawn uniformly among its foreground
    voxels (at a uniform place in the window): small structures in large volumes (the
    hippocampus fills ~1% of a 64x64x52 grid) then reach the loss in most patches. A sample
    without foreground keeps its uniform window. Returns arrays ``(B, size, ..., *)``.
    """
    spatial = arrays[0].shape[1 : arrays[0].ndim - 1]
    ndim = len(spatial)

    def uniform_corner(k):
        ks = jax.random.split(k, ndim)
        return jnp.stack([jax.random.randint(ks[a], (), 0, spatial[a] - size + 1) for a in range(ndim)])

    def foreground_corner(k, label):
        # A stream of its own (fold_in), so the uniform windows are those of foreground = 0.
        k_voxel, k_offset, k_use = jax.random.split(jax.random.fold_in(k, FOREGROUND_CROP_TAG), 3)
        fg = label.max(axis=-1).reshape(-1) > 0
        voxel = jnp.stack(jnp.unravel_index(jax.random.categorical(k_voxel, jnp.where(fg, 0.0, -jnp.inf)), spatial))
        corner = jnp.clip(voxel - jax.random.randint(k_offset, (ndim,), 0, size), 0, jnp.asarray(spatial) - size)
        use = jnp.logical_and(jax.random.uniform(k_use) < foreground, fg.any())
        return jnp.where(use, corner, uniform_corner(k))

    if foreground > 0 and labels is not None:
        starts = jax.vmap(foreground_corner)(keys, labels)
    else:
        starts = jax.vmap(uniform_corner)(keys)

    def crop_one(a, start):
        return jax.lax.dynamic_slice(a, tuple(start[i] for i in range(ndim)) + (0,) * (a.ndim - ndim), (size,) * ndim + a.shape[ndim:])

    return tuple(jax.vmap(crop_one)(a, starts) for a in arrays)


# Folded into a sample's crop key for the foreground-centred windows (model.patch_foreground).
FOREGROUND_CROP_TAG = 0x66677263


def forward_train(
    params: Params,
    model_cfg: ModelConfig,
    images: jax.Array,
    labels: jax.Array,
    key: jax.Array,
    fire_rate: float | jax.Array,
    *,
    backend: Backend = REFERENCE,
    remat: str = "none",
) -> tuple[jax.Array, jax.Array]:
    """Training forward pass: ``(logits, labels)`` on the finest level's random crops.

    images ``(B, *S, n_in)``, labels ``(B, *S, n_out)`` -> both ``(B, P, ..., *)`` with
    ``P = model.patch_size`` (whole images when it is 0 or the image size), a share
    ``model.patch_foreground`` of them around foreground (:func:`random_crops`). ``key``: one key
    or per-sample keys ``(B,)`` (a data-parallel shard passes its samples' keys).
    """
    keys = sample_keys(key, images.shape[0])
    last = model_cfg.n_levels - 1
    x, _ = _coarse_levels(params, model_cfg, images, keys, fire_rate, backend, remat)
    p = model_cfg.patch_size
    if 0 < p < min(images.shape[1:-1]):
        # The crop's window of sample b is drawn from fold_in(keys[b], L).
        x, images, labels = random_crops(
            fold_keys(keys, model_cfg.n_levels), (x, images, labels), p, labels, model_cfg.patch_foreground
        )
    x, _ = run_level(params, model_cfg, last, x, images, keys, fire_rate, backend, remat)
    return _logits(x, model_cfg), labels


def segment(
    params: Params, cfg: Config | ModelConfig, images: Any, key: jax.Array, fire_rate: float | None = None,
    backend: Backend = REFERENCE,
) -> jax.Array:
    """Foreground probabilities for preprocessed 2D slices, checked first: a user's entry.

    images: ``(H, W)``, ``(B, H, W)`` or ``(B, H, W, n_in)`` -> sigmoid of the logits
    ``(B, H, W, n_out)``. Compiled once per shape. ``fire_rate``: the config's when not given.
    ``backend``: pass :func:`mednca_jax.machine.backend_for` of the config for the fast CPU
    path (the default, ``reference``, runs anywhere).
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
    # The fire rate is static: with a known rate only the fired cells are computed.
    logits = _jit_forward(params, model_cfg, jnp.asarray(images), key, float(fire_rate), backend=backend)
    return jax.nn.sigmoid(logits)


_jit_forward = jax.jit(forward, static_argnums=(1, 4), static_argnames=("backend", "remat", "return_states"))
