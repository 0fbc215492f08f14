"""On-device training augmentation: a pure function of the batch and the step's key.

``augment_batch(batch, keys, acfg) -> batch`` runs inside the jitted train step, before the
loss: :func:`augment_sample` vmapped over the batch, one key per sample. Sample ``i`` of the
global batch gets ``fold_in(fold_in(step_key, i), AUGMENT_KEY_TAG)`` (:func:`augment_keys`:
the per-sample key, folded with a constant the model does not use), so a data-parallel shard
that augments only its own rows gets the numbers one device would, and a resumed run (whose
step keys are ``fold_in(base_key, step)``) augments exactly as an uninterrupted one.

Each transform fires with its own probability ``acfg.p_*`` and draws its parameters from its
own slots of the sample's random numbers (:class:`_Draws`; a transform id never changes).
A transform that does not fire is skipped by ``lax.cond`` (shapes stay static, the result is
bit-identical to not having it); one whose probability is 0 is not traced at all.

Order (image-acquisition order, roughly): the spatial ones on image and label (shift, scale,
rotation, flips and the elastic displacement composed into one resampling), then on the image
only the bias field, low resolution, blur, ghosting, spike, motion, Gaussian and Rician noise,
gamma, brightness, contrast, and finally a clip to ``[0, 1]`` when any intensity transform fired.

Shapes: ``image (H, W, c)`` float, ``label (H, W, n_out)`` 0/1 float; batches add ``B`` in front.
"""

from __future__ import annotations

import math
from functools import partial

import jax
import jax.numpy as jnp

from mednca_jax.nca import prng
from mednca_jax.nca.rule import fold_keys, sample_keys
from mednca_jax.config import AugmentConfig
from mednca_jax.augment import intensity, kspace, spatial

Batch = dict[str, jax.Array]  # {"image": (B, H, W, c), "label": (B, H, W, n_out)}

# A sample's augmentation key is fold_in(sample_key, AUGMENT_KEY_TAG): a stream of its own; the
# model folds small integers (level, crop) into the same per-sample key, never this one.
AUGMENT_KEY_TAG = 0x41756721

# Transform ids: which slots of a sample's random numbers are whose. Append only: an id must
# never change meaning (the same seed must keep giving the same augmentation).
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


# Each transform owns SLOTS uniforms of the sample's draw: slot 0 decides whether it fires,
# the others are its parameters.
SLOTS = 8


class _Draws:
    """All random numbers of one sample from one call of :func:`mednca_jax.nca.prng.uniform`.

    Why one call: every ``jax.random`` call (and every ``fold_in``) is a Threefry hash that
    XLA:CPU compiles as a loop of its own; with a dozen transforms drawing two to five numbers
    each, the augmented train step took over 20 s longer to compile. One elementwise hash of
    ``(transforms · SLOTS + noise fields)`` counters costs the same at any count.
    """

    def __init__(self, key: jax.Array, fields: dict[str, tuple[int, ...]]):
        sizes = [math.prod(shape) for shape in fields.values()]
        u = prng.uniform(key, (len(TRANSFORM_IDS) * SLOTS + sum(sizes),))
        self.scalars = u[: len(TRANSFORM_IDS) * SLOTS].reshape(len(TRANSFORM_IDS), SLOTS)
        self.fields, start = {}, len(TRANSFORM_IDS) * SLOTS
        for (name, shape), n in zip(fields.items(), sizes):
            self.fields[name] = u[start : start + n].reshape(shape)
            start += n

    def fires(self, name: str, p: float) -> jax.Array:
        return self.scalars[TRANSFORM_IDS[name], 0] < p

    def u(self, name: str, slot: int, lo: float = 0.0, hi: float = 1.0) -> jax.Array:
        """Uniform in ``[lo, hi)`` from parameter slot ``slot`` (1 .. SLOTS-1) of ``name``."""
        return lo + (hi - lo) * self.scalars[TRANSFORM_IDS[name], slot]

    def integer(self, name: str, slot: int, lo: int, hi: int) -> jax.Array:
        """Integer uniform in ``[lo, hi)``."""
        return jnp.minimum(lo + jnp.floor(self.u(name, slot) * (hi - lo)).astype(jnp.int32), hi - 1)

    def normal(self, name: str) -> jax.Array:
        """Standard normal field (Box-Muller on a ``(2, ...)`` uniform field)."""
        u = self.fields[name]
        return jnp.sqrt(-2.0 * jnp.log1p(-u[0])) * jnp.cos(2.0 * jnp.pi * u[1])


def augment_sample(
    image: jax.Array, label: jax.Array, key: jax.Array, acfg: AugmentConfig
) -> tuple[jax.Array, jax.Array]:
    """Augment one sample: ``image (H, W, c)``, ``label (H, W, n_out)`` -> same shapes and dtypes."""
    h, w = image.shape[:2]
    p = lambda name: getattr(acfg, "p_" + name)  # noqa: E731
    grid = (-(-h // acfg.elastic_spacing) + 1, -(-w // acfg.elastic_spacing) + 1)
    fields = {  # random fields beyond the scalar slots, drawn only for enabled transforms
        "elastic": (2, *grid),
        "bias": (len(intensity.BIAS_TERMS),),
        "gaussian_noise": (2, *image.shape),
        "rician_noise": (2, 2, *image.shape),
    }
    d = _Draws(key, {k: v for k, v in fields.items() if p(k) > 0})

    # --- spatial: one resampling (each part the identity unless it fires), image and label
    if any(p(n) > 0 for n in SPATIAL):
        fire = {n: d.fires(n, p(n)) if p(n) > 0 else jnp.array(False) for n in SPATIAL}
        f = acfg.shift_fraction
        shift = jnp.stack([d.u("shift", 1, -f, f) * h, d.u("shift", 2, -f, f) * w])
        shift = jnp.where(fire["shift"], shift, 0.0)
        lo, hi = math.log(acfg.scale_range[0]), math.log(acfg.scale_range[1])
        scale = jnp.where(fire["scale"], jnp.exp(d.u("scale", 1, lo, hi)), 1.0)
        a = math.radians(acfg.rotate_deg)
        angle = jnp.where(fire["rotate"], d.u("rotate", 1, -a, a), 0.0)
        flip = jnp.stack([fire["flip_h"], fire["flip_w"]])

        def move(pair: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
            coords = spatial.affine_coords((h, w), spatial.affine_matrix((h, w), shift, scale, angle, flip))
            if p("elastic") > 0:
                noise = 2.0 * d.fields["elastic"] - 1.0
                alpha = d.u("elastic", 1, 0.0, acfg.elastic_alpha)
                coords = coords + jnp.where(fire["elastic"], spatial.elastic_displacement((h, w), noise, alpha), 0.0)
            return spatial.warp(*pair, coords, acfg.label_interp)

        moved = jnp.any(jnp.stack(list(fire.values())))
        image, label = jax.lax.cond(moved, move, lambda pair: pair, (image, label))

    # --- intensity and acquisition: image only, in this order.
    steps = {
        "bias": lambda x: intensity.bias_field(x, 2.0 * d.fields["bias"] - 1.0, d.u("bias", 1, 0.0, acfg.bias_strength)),
        "lowres": lambda x: kspace.low_resolution(x, d.u("lowres", 1, *acfg.lowres_range)),
        "blur": lambda x: intensity.blur(x, d.u("blur", 1, *acfg.blur_sigma), acfg.blur_sigma[1]),
        "ghosting": lambda x: kspace.ghosting(x, d.u("ghosting", 1, 0.0, acfg.ghosting_strength), d.integer("ghosting", 2, 0, 2)),
        "spike": lambda x: _random_spike(x, d, acfg.spike_amplitude),
        "motion": lambda x: _random_motion(x, d, acfg),
        "gaussian_noise": lambda x: intensity.gaussian_noise(x, d.normal("gaussian_noise"), d.u("gaussian_noise", 1, 0.0, acfg.noise_std)),
        "rician_noise": lambda x: intensity.rician_noise(x, d.normal("rician_noise"), d.u("rician_noise", 1, 0.0, acfg.rician_std)),
        "gamma": lambda x: intensity.gamma(x, jnp.exp2(d.u("gamma", 1, -acfg.gamma_log2, acfg.gamma_log2))),
        "brightness": lambda x: intensity.brightness(x, d.u("brightness", 1, -acfg.brightness, acfg.brightness)),
        "contrast": lambda x: intensity.contrast(x, d.u("contrast", 1, *acfg.contrast_range)),
    }
    changed = jnp.array(False)
    for name, fn in steps.items():
        if p(name) == 0:
            continue
        fired = d.fires(name, p(name))
        image = jax.lax.cond(fired, lambda x, fn=fn: fn(x).astype(x.dtype), lambda x: x, image)
        changed = changed | fired
    if acfg.clip:
        # Like the robustness suite's perturbations: the model sees its trained range [0, 1].
        image = jnp.where(changed, jnp.clip(image, 0.0, 1.0), image)
    return image, label


def _random_spike(image: jax.Array, d: _Draws, max_amplitude: float) -> jax.Array:
    """A spike at a random frequency at least 2 lines from DC on one axis (never its own
    mirror), random phase, amplitude uniform in ``[0, max_amplitude]``."""
    h, w = image.shape[:2]
    ky = d.integer("spike", 1, -(h // 2) + 1, (h + 1) // 2)
    kx = d.integer("spike", 2, -(w // 2) + 1, (w + 1) // 2)
    near_dc = jnp.maximum(jnp.abs(ky), jnp.abs(kx)) < 2
    ky = jnp.where(near_dc, jnp.where(ky < 0, -2, 2), ky)  # move away from DC along H
    return kspace.spike(image, d.u("spike", 3, 0.0, max_amplitude), ky % h, kx % w, d.u("spike", 4, 0.0, 2 * math.pi))


def _random_motion(image: jax.Array, d: _Draws, acfg: AugmentConfig) -> jax.Array:
    """Motion with a random direction, displacement and rotation up to their maxima, a random
    share of late lines and a random phase-encode axis."""
    h, w = image.shape[:2]
    theta = d.u("motion", 1, 0.0, 2 * math.pi)
    shift = d.u("motion", 2, 0.0, acfg.motion_shift_fraction) * jnp.stack([h * jnp.sin(theta), w * jnp.cos(theta)])
    a = math.radians(acfg.motion_rotate_deg)
    moved = d.u("motion", 4, *acfg.motion_moved_fraction)
    return kspace.motion(image, shift, d.u("motion", 3, -a, a), moved, d.integer("motion", 5, 0, 2))


def augment_keys_of(keys: jax.Array) -> jax.Array:
    """The augmentation keys ``fold_in(k, AUGMENT_KEY_TAG)`` of per-sample keys ``keys (B,)``."""
    return fold_keys(keys, AUGMENT_KEY_TAG)


def augment_keys(step_key: jax.Array, n: int) -> jax.Array:
    """The augmentation keys of a train step's ``n`` rows: those of the model's per-sample
    keys :func:`mednca_jax.nca.rule.sample_keys` (``fold_in(step_key, row)``)."""
    return augment_keys_of(sample_keys(step_key, n))


def augment_batch(batch: Batch, keys: jax.Array, acfg: AugmentConfig) -> Batch:
    """:func:`augment_sample` over the batch: ``keys (B,)``, one per row. Other entries of
    ``batch`` pass through. With nothing enabled, ``batch`` is returned as it is.

    A loop over the samples (``lax.map``), not a ``vmap``: under ``vmap`` every ``lax.cond``
    becomes a select that computes every transform for every sample; in the loop a sample
    pays only for the transforms that fire (with the default preset about a fifth of the
    work; measured in ``benchmarks/augment_cost.py``).
    """
    if not acfg.enabled:
        return batch
    one = partial(augment_sample, acfg=acfg)
    image, label = jax.lax.map(lambda a: one(*a), (batch["image"], batch["label"], keys))
    return {**batch, "image": image, "label": label}


__all__ = ["AUGMENT_KEY_TAG", "augment_batch", "augment_keys", "augment_keys_of", "augment_sample"]
