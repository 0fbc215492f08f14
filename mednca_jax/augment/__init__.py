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

Shapes: ``image (*S, c)`` float, ``label (*S, n_out)`` 0/1 float, with ``S`` the spatial
shape: ``(H, W)`` for slices, ``(X, Y, Z)`` for volumes (the rank is read from the shapes at
trace time); batches add ``B`` in front, ``(B, *S, c)``. The same code serves every rank; what
a volume adds is drawn from slots that a 2D sample does not use (a third shift, two more
rotation angles, the flip along the third axis ``flip_d``, a third spike index, the motion's
3D direction and rotation), so a 2D sample's numbers do not depend on them.
"""

from __future__ import annotations

import math
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from mednca_jax.nca import prng
from mednca_jax.nca.rule import fold_keys, sample_keys
from mednca_jax.config import AugmentConfig
from mednca_jax.augment import intensity, kspace, spatial

Batch = dict[str, jax.Array]  # {"image": (B, *S, c), "label": (B, *S, n_out)}

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
            "flip_d",
        )
    )
}
SPATIAL = ("shift", "scale", "rotate", "flip_h", "flip_w", "flip_d", "elastic")
FLIPS = ("flip_h", "flip_w", "flip_d")  # mirror along spatial axis 0, 1, 2


# Each transform owns SLOTS uniforms of the sample's draw: slot 0 decides whether it fires,
# the others are its parameters.
SLOTS = 8
# The slots of ids appended after the first FIELDS_AFTER (those the layout began with) lie at
# counter LATE_COUNTER on, far beyond the fields: so no id's numbers depend on which fields
# are drawn (the image's size, the transforms enabled), and appending an id moves nothing.
FIELDS_AFTER = 17
LATE_COUNTER = 2**31


class _Draws:
    """All random numbers of one sample from one elementwise hash
    (:func:`mednca_jax.nca.prng.uniform_at`).

    Why one hash: every ``jax.random`` call (and every ``fold_in``) is a Threefry hash that
    XLA:CPU compiles as a loop of its own; with a dozen transforms drawing two to five numbers
    each, the augmented train step took over 20 s longer to compile. One elementwise hash of
    ``(transforms · SLOTS + noise fields)`` counters costs the same at any count.

    Layout (the counters of ``jax.random.uniform(key, (n,))``): ``[0, FIELDS_AFTER·SLOTS)``
    the slots of the first ids, then the fields in the order given, and from ``LATE_COUNTER``
    the slots of the later ids. Keys without position-wise numbers (not partitionable
    Threefry) draw the first two parts with ``jax.random.uniform`` and the late slots from
    ``fold_in(key, LATE_COUNTER)``.
    """

    def __init__(self, key: jax.Array, fields: dict[str, tuple[int, ...]]):
        sizes = [math.prod(shape) for shape in fields.values()]
        head, late = FIELDS_AFTER * SLOTS, (len(TRANSFORM_IDS) - FIELDS_AFTER) * SLOTS
        n = head + sum(sizes)
        if prng.counter_based(key) and n <= LATE_COUNTER:
            counter = jnp.concatenate([jax.lax.iota(jnp.uint32, n), np.uint32(LATE_COUNTER) + jax.lax.iota(jnp.uint32, late)])
            u = prng.uniform_at(key, counter)
            u, tail = u[:n], u[n:]
        else:
            u = prng.uniform(key, (n,))
            tail = prng.uniform(jax.random.fold_in(key, LATE_COUNTER), (late,))
        self.fields, start = {}, head
        for (name, shape), size in zip(fields.items(), sizes):
            self.fields[name] = u[start : start + size].reshape(shape)
            start += size
        self.scalars = jnp.concatenate([u[:head], tail]).reshape(len(TRANSFORM_IDS), SLOTS)

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
    """Augment one sample: ``image (*S, c)``, ``label (*S, n_out)`` -> same shapes and dtypes.

    ``S`` has two axes (a slice) or three (a volume)."""
    shape = image.shape[:-1]
    n = len(shape)
    if n not in (2, 3) or label.shape[:-1] != shape:
        raise ValueError(f"augment_sample: image (*S, c) and label (*S, n_out) with 2 or 3 spatial axes, got {image.shape} and {label.shape}")
    p = lambda name: getattr(acfg, "p_" + name)  # noqa: E731
    if n < len(FLIPS) and any(p(f) > 0 for f in FLIPS[n:]):
        raise ValueError(f"augment.p_flip_d mirrors the third spatial axis; a {n}D sample has none (image {image.shape})")
    grid = tuple(-(-s // acfg.elastic_spacing) + 1 for s in shape)
    fields = {  # random fields beyond the scalar slots, drawn only for enabled transforms
        "elastic": (n, *grid),
        "bias": (len(intensity.bias_terms(n)),),
        "gaussian_noise": (2, *image.shape),
        "rician_noise": (2, 2, *image.shape),
    }
    if n == 3:  # motion's 3D direction and two more angles: its eight slots are taken
        fields["motion"] = (3,)
    d = _Draws(key, {k: v for k, v in fields.items() if p(k) > 0})

    # --- spatial: one resampling (each part the identity unless it fires), image and label
    if any(p(name) > 0 for name in SPATIAL):
        fire = {name: d.fires(name, p(name)) if p(name) > 0 else jnp.array(False) for name in SPATIAL}
        f = acfg.shift_fraction
        shift = jnp.stack([d.u("shift", 1 + a, -f, f) * s for a, s in enumerate(shape)])  # slots 1, 2 (, 3)
        shift = jnp.where(fire["shift"], shift, 0.0)
        lo, hi = math.log(acfg.scale_range[0]), math.log(acfg.scale_range[1])
        scale = jnp.where(fire["scale"], jnp.exp(d.u("scale", 1, lo, hi)), 1.0)
        a = math.radians(acfg.rotate_deg)
        if n == 2:
            angle = jnp.where(fire["rotate"], d.u("rotate", 1, -a, a), 0.0)
        else:
            # One angle about each axis from the same range; slot 1 (the 2D angle) turns about
            # the last axis, i.e. within the (X, Y) planes, like the 2D rotation of a slice.
            angle = jnp.where(fire["rotate"], jnp.stack([d.u("rotate", slot, -a, a) for slot in (2, 3, 1)]), 0.0)
        flip = jnp.stack([fire[name] for name in FLIPS[:n]])

        def move(pair: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
            coords = spatial.affine_coords(shape, spatial.affine_matrix(shape, shift, scale, angle, flip))
            if p("elastic") > 0:
                noise = 2.0 * d.fields["elastic"] - 1.0
                alpha = d.u("elastic", 1, 0.0, acfg.elastic_alpha)
                coords = coords + jnp.where(fire["elastic"], spatial.elastic_displacement(shape, noise, alpha), 0.0)
            return spatial.warp(*pair, coords, acfg.label_interp)

        moved = jnp.any(jnp.stack(list(fire.values())))
        image, label = jax.lax.cond(moved, move, lambda pair: pair, (image, label))

    # --- intensity and acquisition: image only, in this order.
    steps = {
        "bias": lambda x: intensity.bias_field(x, 2.0 * d.fields["bias"] - 1.0, d.u("bias", 1, 0.0, acfg.bias_strength)),
        "lowres": lambda x: kspace.low_resolution(x, d.u("lowres", 1, *acfg.lowres_range)),
        "blur": lambda x: intensity.blur(x, d.u("blur", 1, *acfg.blur_sigma), acfg.blur_sigma[1]),
        "ghosting": lambda x: kspace.ghosting(x, d.u("ghosting", 1, 0.0, acfg.ghosting_strength), d.integer("ghosting", 2, 0, n)),
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
    mirror), random phase, amplitude uniform in ``[0, max_amplitude]``. Indices: slots 1, 2
    (and 5 for the third axis), amplitude 3, phase 4."""
    shape = image.shape[:-1]
    slots = (1, 2, 5)
    k = [d.integer("spike", slot, -(s // 2) + 1, (s + 1) // 2) for slot, s in zip(slots, shape)]
    near_dc = jnp.max(jnp.stack([jnp.abs(ki) for ki in k])) < 2
    k[0] = jnp.where(near_dc, jnp.where(k[0] < 0, -2, 2), k[0])  # move away from DC along axis 0
    idx = [ki % s for ki, s in zip(k, shape)]
    return kspace.spike(image, d.u("spike", 3, 0.0, max_amplitude), *idx, d.u("spike", 4, 0.0, 2 * math.pi))


def _random_motion(image: jax.Array, d: _Draws, acfg: AugmentConfig) -> jax.Array:
    """Motion with a random direction, displacement and rotation up to their maxima, a random
    share of late lines and a random phase-encode axis.

    2D: direction ``theta`` (slot 1), rotation (slot 3). 3D: a direction uniform on the sphere
    (azimuth ``theta`` from slot 1, height from the motion field) and one angle about each axis
    (slot 3 about the last axis, as in 2D; the field's two others)."""
    shape = image.shape[:-1]
    n = len(shape)
    theta = d.u("motion", 1, 0.0, 2 * math.pi)
    a = math.radians(acfg.motion_rotate_deg)
    if n == 2:
        direction = jnp.stack([jnp.sin(theta), jnp.cos(theta)])
        angle = d.u("motion", 3, -a, a)
    else:
        extra = d.fields["motion"]
        z = 2.0 * extra[0] - 1.0  # a uniform height gives a uniform direction on the sphere
        r = jnp.sqrt(jnp.maximum(1.0 - z * z, 0.0))
        direction = jnp.stack([r * jnp.sin(theta), r * jnp.cos(theta), z])
        angle = jnp.stack([-a + 2 * a * extra[1], -a + 2 * a * extra[2], d.u("motion", 3, -a, a)])
    shift = d.u("motion", 2, 0.0, acfg.motion_shift_fraction) * (direction * jnp.array(shape, jnp.float32))
    moved = d.u("motion", 4, *acfg.motion_moved_fraction)
    return kspace.motion(image, shift, angle, moved, d.integer("motion", 5, 0, n))


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
