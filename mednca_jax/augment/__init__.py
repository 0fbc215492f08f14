"""On-device training augmentation: a pure function of the batch and the step's key.

``augment_batch(batch, keys, acfg) -> batch`` runs inside the jitted train step, before the
loss: :func:`augment_sample` vmapped over the batch, one key per sample. Sample ``i`` of the
global batch gets ``fold_in(augment_key, i)`` (:func:`sample_keys`), so a data-parallel shard
that augments only its own rows gets the numbers one device would, and a resumed run (whose
step keys are ``fold_in(base_key, step)``) augments exactly as an uninterrupted one.

Each transform fires with its own probability ``acfg.p_*`` and draws its parameters from its
own key (``fold_in(sample_key, transform id)``: adding a transform changes no other's draws).
A transform that does not fire is a ``jnp.where`` back to its input, so shapes stay static and
the result is bit-identical to skipping it; one whose probability is 0 is not traced at all.

Order (image-acquisition order, roughly): the spatial ones on image and label (shift, scale,
rotation, flips and the elastic displacement composed into one resampling), then on the image
only the bias
field, low resolution, blur, ghosting, spike, motion, Gaussian and Rician noise, gamma,
brightness, contrast, and finally a clip to ``[0, 1]`` when any intensity transform fired.

Shapes: ``image (H, W, c)`` float, ``label (H, W, n_out)`` 0/1 float; batches add ``B`` in front.
"""

from __future__ import annotations

import math
from functools import partial

import jax
import jax.numpy as jnp

from ..config import AugmentConfig
from . import intensity, kspace, spatial

Batch = dict[str, jax.Array]  # {"image": (B, H, W, c), "label": (B, H, W, n_out)}

# The augmentation key of a train step is fold_in(step_key, AUGMENT_KEY_TAG): a stream of its
# own, whatever the model does with the step key (split it, fold in other constants).
AUGMENT_KEY_TAG = 0x41756721

# Transform ids for the per-transform keys. Append only: an id must never change meaning.
TRANSFORM_IDS = {
    name: i
    for i, name in enumerate(
        (
            "shift", "scale", "rotate", "flip_h", "flip_w", "elastic", "bias", "lowres", "blur", "ghosting",
            "spike", "motion", "gaussian_noise", "rician_noise", "gamma", "brightness", "contrast",
        )
    )
}
SPATIAL = ("shift", "scale", "rotate", "flip_h", "flip_w", "elastic")
AFFINE = SPATIAL[:-1]


def _keys(key: jax.Array, name: str) -> tuple[jax.Array, jax.Array]:
    """``(fire_key, param_key)`` of one transform for one sample."""
    k = jax.random.fold_in(key, TRANSFORM_IDS[name])
    return jax.random.fold_in(k, 0), jax.random.fold_in(k, 1)


def _fires(key: jax.Array, p: float) -> jax.Array:
    return jax.random.uniform(key) < p


def _u(key: jax.Array, lo: float, hi: float, shape: tuple[int, ...] = ()) -> jax.Array:
    return jax.random.uniform(key, shape, jnp.float32, lo, hi)


def augment_sample(
    image: jax.Array, label: jax.Array, key: jax.Array, acfg: AugmentConfig
) -> tuple[jax.Array, jax.Array]:
    """Augment one sample: ``image (H, W, c)``, ``label (H, W, n_out)`` -> same shapes and dtypes."""
    h, w = image.shape[:2]
    p = lambda name: getattr(acfg, "p_" + name)  # noqa: E731

    # --- spatial: one resampling (each part the identity unless it fires), image and label
    if any(p(n) > 0 for n in SPATIAL):
        draws = {n: _keys(key, n) for n in AFFINE}
        fire = {n: _fires(draws[n][0], p(n)) if p(n) > 0 else jnp.array(False) for n in AFFINE}
        f = acfg.shift_fraction
        shift = jnp.where(fire["shift"], _u(draws["shift"][1], -f, f, (2,)) * jnp.array([h, w], jnp.float32), 0.0)
        lo, hi = math.log(acfg.scale_range[0]), math.log(acfg.scale_range[1])
        scale = jnp.where(fire["scale"], jnp.exp(_u(draws["scale"][1], lo, hi)), 1.0)
        a = math.radians(acfg.rotate_deg)
        angle = jnp.where(fire["rotate"], _u(draws["rotate"][1], -a, a), 0.0)
        flip = jnp.stack([fire["flip_h"], fire["flip_w"]])
        coords = spatial.affine_coords((h, w), spatial.affine_matrix((h, w), shift, scale, angle, flip))
        if p("elastic") > 0:
            fk, pk = draws["elastic"] = _keys(key, "elastic")
            fire["elastic"] = _fires(fk, p("elastic"))
            grid = (-(-h // acfg.elastic_spacing) + 1, -(-w // acfg.elastic_spacing) + 1)
            noise = _u(jax.random.fold_in(pk, 0), -1.0, 1.0, (2, *grid))
            alpha = _u(jax.random.fold_in(pk, 1), 0.0, acfg.elastic_alpha)
            coords = coords + jnp.where(fire["elastic"], spatial.elastic_displacement((h, w), noise, alpha), 0.0)
        warped = spatial.warp(image, label, coords, acfg.label_interp)
        moved = jnp.any(jnp.stack(list(fire.values())))
        image, label = jnp.where(moved, warped[0], image), jnp.where(moved, warped[1], label)

    # --- intensity and acquisition: image only. Each entry draws its parameters from its key.
    steps = {
        "bias": lambda x, k: intensity.bias_field(
            x, _u(jax.random.fold_in(k, 0), -1.0, 1.0, (len(intensity.BIAS_TERMS),)), _u(jax.random.fold_in(k, 1), 0.0, acfg.bias_strength)
        ),
        "lowres": lambda x, k: kspace.low_resolution(x, _u(k, *acfg.lowres_range)),
        "blur": lambda x, k: intensity.blur(x, _u(k, *acfg.blur_sigma), acfg.blur_sigma[1]),
        "ghosting": lambda x, k: kspace.ghosting(
            x, _u(jax.random.fold_in(k, 0), 0.0, acfg.ghosting_strength), jax.random.randint(jax.random.fold_in(k, 1), (), 0, 2)
        ),
        "spike": lambda x, k: _random_spike(x, k, acfg.spike_amplitude),
        "motion": lambda x, k: _random_motion(x, k, acfg),
        "gaussian_noise": lambda x, k: intensity.gaussian_noise(
            x, jax.random.normal(jax.random.fold_in(k, 0), x.shape, x.dtype), _u(jax.random.fold_in(k, 1), 0.0, acfg.noise_std)
        ),
        "rician_noise": lambda x, k: intensity.rician_noise(
            x, jax.random.normal(jax.random.fold_in(k, 0), (2, *x.shape), x.dtype), _u(jax.random.fold_in(k, 1), 0.0, acfg.rician_std)
        ),
        "gamma": lambda x, k: intensity.gamma(x, jnp.exp2(_u(k, -acfg.gamma_log2, acfg.gamma_log2))),
        "brightness": lambda x, k: intensity.brightness(x, _u(k, -acfg.brightness, acfg.brightness)),
        "contrast": lambda x, k: intensity.contrast(x, _u(k, *acfg.contrast_range)),
    }
    changed = jnp.array(False)
    for name, fn in steps.items():
        if p(name) == 0:
            continue
        fk, pk = _keys(key, name)
        fired = _fires(fk, p(name))
        image = jnp.where(fired, fn(image, pk).astype(image.dtype), image)
        changed = changed | fired
    if acfg.clip:
        # Like the robustness suite's perturbations: the model sees its trained range [0, 1].
        image = jnp.where(changed, jnp.clip(image, 0.0, 1.0), image)
    return image, label


def _random_spike(image: jax.Array, key: jax.Array, max_amplitude: float) -> jax.Array:
    """A spike at a random frequency at least 2 lines from DC on one axis (never its own
    mirror), random phase, amplitude uniform in ``[0, max_amplitude]``."""
    h, w = image.shape[:2]
    k = [jax.random.fold_in(key, i) for i in range(4)]
    ky = jax.random.randint(k[0], (), -(h // 2) + 1, (h + 1) // 2)
    kx = jax.random.randint(k[1], (), -(w // 2) + 1, (w + 1) // 2)
    near_dc = jnp.maximum(jnp.abs(ky), jnp.abs(kx)) < 2
    ky = jnp.where(near_dc, jnp.where(ky < 0, -2, 2), ky)  # move away from DC along H
    amp = _u(k[2], 0.0, max_amplitude)
    phase = _u(k[3], 0.0, 2 * math.pi)
    return kspace.spike(image, amp, ky % h, kx % w, phase)


def _random_motion(image: jax.Array, key: jax.Array, acfg: AugmentConfig) -> jax.Array:
    """Motion with a random direction, displacement and rotation up to their maxima, a random
    share of late lines and a random phase-encode axis."""
    h, w = image.shape[:2]
    k = [jax.random.fold_in(key, i) for i in range(5)]
    theta = _u(k[0], 0.0, 2 * math.pi)
    dist = _u(k[1], 0.0, acfg.motion_shift_fraction)
    shift = dist * jnp.stack([h * jnp.sin(theta), w * jnp.cos(theta)])
    a = math.radians(acfg.motion_rotate_deg)
    angle = _u(k[2], -a, a)
    moved = _u(k[3], *acfg.motion_moved_fraction)
    axis = jax.random.randint(k[4], (), 0, 2)
    return kspace.motion(image, shift, angle, moved, axis)


def sample_keys(key: jax.Array, n: int, first: int | jax.Array = 0) -> jax.Array:
    """``(n,)`` keys ``fold_in(key, first + i)``: rows ``first .. first + n - 1`` of a batch."""
    return jax.vmap(lambda i: jax.random.fold_in(key, i))(first + jnp.arange(n))


def augment_keys(step_key: jax.Array, n: int, first: int | jax.Array = 0) -> jax.Array:
    """The per-sample augmentation keys of a train step's rows ``first .. first + n - 1``."""
    return sample_keys(jax.random.fold_in(step_key, AUGMENT_KEY_TAG), n, first)


def augment_batch(batch: Batch, keys: jax.Array, acfg: AugmentConfig) -> Batch:
    """:func:`augment_sample` over the batch: ``keys (B,)``, one per row. Other entries of
    ``batch`` pass through. With nothing enabled, ``batch`` is returned as it is."""
    if not acfg.enabled:
        return batch
    image, label = jax.vmap(partial(augment_sample, acfg=acfg))(batch["image"], batch["label"], keys)
    return {**batch, "image": image, "label": label}


__all__ = ["AUGMENT_KEY_TAG", "augment_batch", "augment_keys", "augment_sample", "sample_keys"]
