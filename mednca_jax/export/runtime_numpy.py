"""Med-NCA inference in plain NumPy: a self-contained runtime for CPUs without JAX or torch.

This file is written next to ``weights.npz`` and ``config.json`` as ``mednca_numpy.py`` by
``python -m mednca_jax.export to-numpy``. It imports only numpy (and nibabel, lazily, when it
reads or writes NIfTI), so it runs wherever numpy does.

As a module::

    from mednca_numpy import MedNCA
    model = MedNCA.load("DIR")                    # DIR holds weights.npz + config.json
    labels = model.segment(slices, seed=0)        # (H, W) | (B, H, W) | (B, H, W, n_in) -> uint8
    logits = model.segment(slices, return_logits=True)           # (..., H, W, n_out) float32
    q = model.segment(slices, seed=0, runs=10)    # Uncertainty(labels, probability, variance, nqm)

A model trained on volumes (``data.image_size`` of length 3) takes ``(X, Y, Z)``,
``(B, X, Y, Z)`` or ``(B, X, Y, Z, n_in)`` the same way (the NIfTI command line is 2D-slice
based: for such a model pass a ``.npy`` of preprocessed volumes).

As a program::

    python mednca_numpy.py DIR IN.nii.gz OUT.nii.gz [--channel K] [--seed S] [--runs N]
    python mednca_numpy.py DIR IN.npy OUT.npy [--logits] [--fire-rate F] [--seed S] [--runs N]
    add --max-memory-mb MB to bound the peak memory (large images on small devices)

What it computes. ``config.json`` describes each level's rule (``rules[i]``: perception,
kernel_size k, update, norm, channels C, hidden, n_in, ndim, features F); this file
interprets every rule whose perception is linear (one reflect-padded k x k (x k) conv
``K (k,)*ndim + (C, F)`` with bias, whatever the perception was called in training) and whose
update is ``mlp``, in rank 2 or 3. States are channels-last ``(B, *S, C)``; level ``i`` runs
on the image downscaled by ``scales[i]``; each step is

    y = [x | conv_reflect(x; K) + b]                      (C + F per cell)
    h = fc0(y); h = batchnorm(h) when norm == "batch"    (statistics over batch and space)
    x += fc1(relu(h)) * mask,   mask = u > fire_rate      (u drawn per cell and step)

after which the input channels are reset to the image; between levels the state is
upsampled by nearest neighbour. Logits are channels ``[n_in, n_in + n_out)`` of the final
state. Each step runs in chunks of cells, updating the state in place, so memory is the
state plus a fixed working set (``--max-memory-mb`` shrinks it further). A rule it cannot
interpret (a non-linear perception, another update) is refused by name when the folder loads.

Batch norm and memory: the statistics of a step need ``fc0`` of every cell of the batch
before any cell changes, so such a step runs twice over the chunks (statistics, then the
update): the working set stays bounded, the perception and ``fc0`` cost twice, and the whole
batch is one group (the statistics couple its samples, as in training), so its state must fit.

``weights.npz`` keys per level: ``level{i}.perception.kernel (k,)*ndim + (C, F)``,
``.perception.bias (F,)``, ``.fc0.kernel (C + F, hidden)``, ``.fc0.bias``, ``.bn.scale`` and
``.bn.bias (hidden,)`` when norm is batch, ``.fc1.kernel (hidden, C)``. Older exports
(format 1: ``level{i}.p0.*``/``p1.*``; formats 1-2 have no ``rules``: 2D, the model's
perception, kernel, update and norm) are read too.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, NamedTuple, Optional, Sequence

import numpy as np

FORMAT = "mednca-export"
FORMAT_VERSION = 3  # 3: per-level rule descriptions ("rules"); 1 and 2 are read too
WEIGHTS_FILE = "weights.npz"
CONFIG_FILE = "config.json"
DOWNSCALE_METHODS = ("bilinear", "area", "antialias", "max")
UPDATES = ("mlp",)
NORMS = ("none", "batch")
RANKS = (2, 3)
BN_EPS = 1e-5
# Cells per chunk: bounds a step's temporaries so peak memory does not grow with the image,
# while keeping each matmul large enough for BLAS.
CHUNK_PIXELS = 8192
# Floats per cell of one im2col block: k x k x k kernels are gathered and multiplied in blocks
# of kernel rows, so the temporary stays this wide whatever k and the rank (one block for the
# original 3x3 with C <= 56, i.e. a single matmul).
COLS_FLOATS = 512
# Cells segmented together; bounds the state memory of a whole volume.
BATCH_PIXELS = 1 << 18
# Peak RSS of the interpreter with numpy loaded and this module imported, before any image
# (measured ~30 MiB with OpenBLAS; a margin for the allocator): the floor of --max-memory-mb.
BASE_MB = 40


class ExportFormatError(ValueError):
    """The runtime folder (config.json / weights.npz) is missing, malformed or inconsistent,
    or describes a rule this runtime cannot interpret."""


class InputError(ValueError):
    """An image handed to the runtime has the wrong rank, shape or values."""


# --------------------------------------------------------------------------- configuration
@dataclass(frozen=True)
class Spec:
    """What the runtime needs from the training config (``config.json``: ``model``/``data``/``rules``).

    ``rules[i]`` is level ``i``'s rule description (a dict, see the module docstring);
    ``ndim`` the spatial rank, ``len(image_size)``.
    """

    channels: int
    hidden: int
    n_in: int
    n_out: int
    fire_rate: float
    steps: tuple[int, ...]
    scales: tuple[int, ...]
    downscale: str = "bilinear"
    image_size: tuple[int, ...] = (64, 64)
    slice_axis: int = 2
    channel: int = 0
    rules: tuple[dict, ...] = ()

    @property
    def n_levels(self) -> int:
        return len(self.steps)

    @property
    def ndim(self) -> int:
        return len(self.image_size)

    @property
    def batch_norm(self) -> bool:
        return any(r["norm"] == "batch" for r in self.rules)


def legacy_rules(model: dict, n_levels: int, ndim: int) -> list[dict]:
    """Rule descriptions of an export without ``rules`` (formats 1-2): the model section's
    perception, kernel size, update and norm (defaults: the original's); ``features`` None
    (taken from the weights)."""
    ks = model.get("kernel_size", [3])
    ks = [int(ks)] if isinstance(ks, (int, float)) else [int(k) for k in ks]
    return [{"perception": str(model.get("perception", "learned")), "kernel_size": ks[i if len(ks) > 1 else 0],
             "update": str(model.get("update", "mlp")), "norm": str(model.get("norm", "none")),
             "channels": int(model["channels"]), "hidden": int(model["hidden"]), "n_in": int(model["n_in"]),
             "ndim": ndim, "features": None, "linear": True} for i in range(n_levels)]


def rule_problem(rule: dict) -> Optional[str]:
    """Why this runtime cannot interpret ``rule`` (a level's description), or None."""
    if not rule.get("linear", True):
        return (f"perception {rule.get('perception')!r} is not linear (it has no filters); this runtime cannot "
                f"interpret it: it runs linear perceptions and the 'mlp' update")
    if rule.get("update") not in UPDATES:
        return (f"update {rule.get('update')!r}: this runtime cannot interpret it: it runs linear perceptions and "
                f"the 'mlp' update")
    if rule.get("norm") not in NORMS:
        return f"norm {rule.get('norm')!r}: this runtime cannot interpret it (it runs {list(NORMS)})"
    if rule.get("ndim") not in RANKS:
        return f"rank {rule.get('ndim')}: this runtime cannot interpret it (it runs ranks {list(RANKS)})"
    k = rule.get("kernel_size")
    if not isinstance(k, int) or k < 1 or k % 2 == 0:
        return f"kernel_size {k!r}: this runtime cannot interpret it (odd sizes >= 1)"
    return None


def spec_from_config(cfg: dict, source: str = CONFIG_FILE) -> Spec:
    """Validate the parts of a config dict the runtime uses; errors name ``source`` and the key."""
    model, data = cfg.get("model"), cfg.get("data", {})
    if not isinstance(model, dict):
        raise ExportFormatError(f"{source}: expected a 'model' section with the NCA settings")
    if model.get("kind", "nca") != "nca":
        raise ExportFormatError(f"{source}: model.kind is {model.get('kind')!r}; only 'nca' models can run here")
    try:
        size = tuple(int(s) for s in data.get("image_size", (64, 64)))
        steps = tuple(int(s) for s in model["steps"])
        rules = cfg.get("rules")
        if rules is None:
            rules = legacy_rules(model, len(steps), len(size))
        spec = Spec(
            channels=int(model["channels"]),
            hidden=int(model["hidden"]),
            n_in=int(model["n_in"]),
            n_out=int(model["n_out"]),
            fire_rate=float(model["fire_rate"]),
            steps=steps,
            scales=tuple(int(s) for s in model["scales"]),
            downscale=str(model.get("downscale", "bilinear")),
            image_size=size,
            slice_axis=int(data.get("slice_axis", 2)),
            channel=int(data.get("channel", 0)),
            rules=tuple(dict(r) for r in rules),
        )
    except KeyError as e:
        raise ExportFormatError(f"{source}: missing key model.{e.args[0]}") from None
    except (TypeError, ValueError) as e:
        raise ExportFormatError(f"{source}: malformed model settings ({e})") from None
    problems = []
    if spec.n_in < 1 or spec.n_out < 1 or spec.channels < spec.n_in + spec.n_out or spec.hidden < 1:
        problems.append(f"channels={spec.channels}, hidden={spec.hidden}, n_in={spec.n_in}, n_out={spec.n_out} are inconsistent")
    if len(spec.steps) != len(spec.scales) or not spec.steps:
        problems.append(f"steps {list(spec.steps)} and scales {list(spec.scales)} need one entry per level")
    elif spec.scales[-1] != 1 or any(a % b or a <= b for a, b in zip(spec.scales, spec.scales[1:])):
        problems.append(f"scales {list(spec.scales)} must decrease to 1, each a multiple of the next")
    if spec.downscale not in DOWNSCALE_METHODS:
        problems.append(f"model.downscale {spec.downscale!r} is not one of {DOWNSCALE_METHODS}")
    if not 0.0 <= spec.fire_rate < 1.0:
        problems.append(f"model.fire_rate {spec.fire_rate} is not in [0, 1)")
    if len(spec.rules) != len(spec.steps):
        problems.append(f"rules describe {len(spec.rules)} levels, steps {len(spec.steps)}")
    if problems:
        raise ExportFormatError(f"{source}: " + "; ".join(problems))
    for i, rule in enumerate(spec.rules):
        why = rule_problem(rule)
        if why:
            raise ExportFormatError(f"{source}: level {i}: {why}; use the JAX checkpoint instead")
        for key, want in (("channels", spec.channels), ("hidden", spec.hidden), ("n_in", spec.n_in), ("ndim", spec.ndim)):
            if rule.get(key) != want:
                raise ExportFormatError(f"{source}: rules[{i}].{key} = {rule.get(key)!r} but the model has {key} = {want}")
    return spec


def level_shapes(rule: dict, features: int, prefix: str = "") -> dict[str, tuple[int, ...]]:
    """Keys (``prefix`` + name) and shapes of one level's arrays for ``features`` filters F."""
    c, h, k, nd = rule["channels"], rule["hidden"], rule["kernel_size"], rule["ndim"]
    shapes = {f"{prefix}perception.kernel": (k,) * nd + (c, features), f"{prefix}perception.bias": (features,),
              f"{prefix}fc0.kernel": (c + features, h), f"{prefix}fc0.bias": (h,), f"{prefix}fc1.kernel": (h, c)}
    if rule["norm"] == "batch":
        shapes.update({f"{prefix}bn.scale": (h,), f"{prefix}bn.bias": (h,)})
    return shapes


def level_features(arrays: dict[str, np.ndarray], rule: dict, prefix: str, source: str) -> int:
    """F of a level: its description's, else (older exports) its kernel's last axis."""
    if rule.get("features") is not None:
        return int(rule["features"])
    key = f"{prefix}perception.kernel"
    if key not in arrays or np.ndim(arrays[key]) != rule["ndim"] + 2:
        raise ExportFormatError(f"{source}: missing {key} {('k',) * rule['ndim'] + ('C', 'F')} (or {prefix}p0.kernel "
                                f"in the older layout); re-export the model")
    return int(arrays[key].shape[-1])


def expected_shapes(spec: Spec, features: Sequence[int]) -> dict[str, tuple[int, ...]]:
    """Keys and shapes of ``weights.npz`` (channels-last) with ``features[i]`` filters at level ``i``."""
    shapes: dict[str, tuple[int, ...]] = {}
    for i, rule in enumerate(spec.rules):
        shapes.update(level_shapes(rule, features[i], f"level{i}."))
    return shapes


def legacy_shapes(spec: Spec, i: int) -> dict[str, tuple[int, ...]]:
    """Level ``i``'s keys in format-1 exports (two learned convs ``p0``/``p1``)."""
    c, k, nd = spec.channels, spec.rules[i]["kernel_size"], spec.rules[i]["ndim"]
    return {f"level{i}.p0.kernel": (k,) * nd + (c, c), f"level{i}.p0.bias": (c,),
            f"level{i}.p1.kernel": (k,) * nd + (c, c), f"level{i}.p1.bias": (c,)}


def upgrade_legacy(arrays: dict[str, np.ndarray], spec: Spec, source: str = WEIGHTS_FILE) -> dict[str, np.ndarray]:
    """Convert format-1 levels (``p0.*``/``p1.*``) to one perception kernel ``(k, k, C, 2C)``:
    ``concat([p0, p1], -1)``, the order fc0 reads ``[x | p0(x) | p1(x)]``. Other keys pass."""
    out = dict(arrays)
    for i in range(spec.n_levels):
        old = legacy_shapes(spec, i)
        if not any(k in arrays for k in old):
            continue
        _check_shapes(arrays, old, spec, source)
        for k in old:
            del out[k]
        g = lambda k: np.asarray(arrays[f"level{i}.{k}"], np.float32)  # noqa: E731
        out[f"level{i}.perception.kernel"] = np.concatenate([g("p0.kernel"), g("p1.kernel")], axis=-1)
        out[f"level{i}.perception.bias"] = np.concatenate([g("p0.bias"), g("p1.bias")])
    return out


def _what(spec: Spec) -> str:
    return f"config.json (channels={spec.channels}, hidden={spec.hidden}, {spec.n_levels} levels)"


def _check_shapes(arrays: dict[str, np.ndarray], exp: dict[str, tuple[int, ...]], spec: Optional[Spec], source: str) -> None:
    what = _what(spec) if spec is not None else "the rule"
    for k, shape in exp.items():
        if k not in arrays:
            raise ExportFormatError(f"{source} does not match {what}: missing {k}")
        if tuple(np.shape(arrays[k])) != shape:
            raise ExportFormatError(f"{source}: {k} has shape {tuple(np.shape(arrays[k]))}, {what} expects {shape}")
        a = np.asarray(arrays[k])
        if not np.issubdtype(a.dtype, np.floating) or not np.all(np.isfinite(a)):
            raise ExportFormatError(f"{source}: {k} must hold finite floats, got dtype {a.dtype}")


def check_weights(arrays: dict[str, np.ndarray], spec: Spec, source: str = WEIGHTS_FILE) -> list[int]:
    """Raise :class:`ExportFormatError` naming ``source`` unless ``arrays`` (current format)
    fit ``spec``; returns the number of perception filters F of each level."""
    features = [level_features(arrays, rule, f"level{i}.", source) for i, rule in enumerate(spec.rules)]
    exp = expected_shapes(spec, features)
    missing, extra = sorted(set(exp) - set(arrays)), sorted(set(arrays) - set(exp))
    if missing or extra:
        raise ExportFormatError(
            f"{source} does not match {_what(spec)}: missing {missing or 'nothing'}, unexpected {extra or 'nothing'}")
    _check_shapes(arrays, exp, spec, source)
    return features


# --------------------------------------------------------------------------- resampling
def _resize_matrix(n: int, factor: int, method: str) -> np.ndarray:
    """Row-normalised weights ``(n // factor, n)`` of a downscale by ``factor`` (half-pixel centres).

    bilinear: triangle kernel of width 1 (no anti-aliasing, the original's torchio resize);
    antialias: triangle stretched by ``factor`` (as ``jax.image.resize(antialias=True)``).
    """
    m = n // factor
    centre = (np.arange(m) + 0.5) * factor - 0.5
    width = float(factor) if method == "antialias" else 1.0
    w = np.maximum(0.0, 1.0 - np.abs(centre[:, None] - np.arange(n)[None, :]) / width)
    return (w / w.sum(axis=1, keepdims=True)).astype(np.float32)


def downscale(images: np.ndarray, factor: int, method: str = "bilinear") -> np.ndarray:
    """Downscale ``(B, *S, c)`` by an integer factor along every spatial axis -> ``(B, *S/f, c)``
    float32: ``area`` block mean, ``max`` block maximum, ``bilinear`` (no anti-aliasing) and
    ``antialias`` as ``mednca_jax.nca.levels.downscale``."""
    if factor == 1:
        return images
    b, spatial, c = images.shape[0], images.shape[1:-1], images.shape[-1]
    nd = len(spatial)
    axes = tuple(2 + 2 * a for a in range(nd))
    if method in ("area", "max") or (method == "bilinear" and factor % 2 == 0):
        blocks = images.reshape((b,) + sum(((s // factor, factor) for s in spatial), ()) + (c,))
        if method == "area":
            return blocks.mean(axis=axes, dtype=np.float32)
        if method == "max":
            return blocks.max(axis=axes)
        # Samples at (i + 0.5) f - 0.5 fall midway between pixels f*i + f/2 - 1 and f*i + f/2:
        # the mean of the centre 2x2 (2x2x2) of each block (computed like the JAX core).
        lo = factor // 2 - 1
        centre = (slice(None),) + sum(((slice(None), slice(lo, lo + 2)) for _ in spatial), ())
        return blocks[centre].mean(axis=axes, dtype=np.float32)
    out = np.asarray(images, np.float32)
    for a, s in enumerate(spatial):  # separable: one axis at a time
        out = np.moveaxis(np.tensordot(_resize_matrix(s, factor, method), out, axes=([1], [1 + a])), 0, 1 + a)
    return np.ascontiguousarray(out, np.float32)


def upsample_nearest(x: np.ndarray, factor: int) -> np.ndarray:
    """``(B, *s, C) -> (B, *(s*f), C)`` by repeating each cell."""
    for axis in range(1, x.ndim - 1) if factor > 1 else ():
        x = np.repeat(x, factor, axis=axis)
    return x


# --------------------------------------------------------------------------- one NCA level
class LevelWeights(NamedTuple):
    """One level's weights rearranged for matmuls (C channels, F filters, ``hid`` hidden units).

    The kernel ``K (k,)*nd + (C, F)`` is cut along its leading ``nd - 1`` axes into
    ``k**(nd-1)`` rows of ``k*C`` taps (one run of consecutive cells along the last axis);
    ``blocks[j]`` stacks the rows listed in ``block_rows[j]`` (each a tuple of leading
    offsets), ``(len(rows) * k * C, F)``.
    """

    blocks: tuple[np.ndarray, ...]
    block_rows: tuple[tuple[tuple[int, ...], ...], ...]
    kernel_size: int
    ndim: int
    conv_bias: np.ndarray  # (F,)
    fc0: np.ndarray  # (C + F, hid): rows read [x | conv(x)]
    fc0_bias: np.ndarray  # (hid,)
    fc1: np.ndarray  # (hid, C)
    bn_scale: Optional[np.ndarray] = None  # (hid,) when norm == "batch"
    bn_bias: Optional[np.ndarray] = None

    @property
    def radius(self) -> int:
        return self.kernel_size // 2

    @property
    def features(self) -> int:
        return int(self.conv_bias.shape[0])

    @property
    def cols_width(self) -> int:
        return max(b.shape[0] for b in self.blocks)


def weights_of_level(arrays: dict[str, np.ndarray], rule: dict, source: str = WEIGHTS_FILE) -> LevelWeights:
    """One level's arrays (keys without the ``level{i}.`` prefix: ``perception.kernel``, ...)
    and its rule description -> :class:`LevelWeights`, checked against the description.

    (Folding the conv bias into fc0's bias would save a pass per step, but moves the logits
    further from the JAX/original round-off: the operation order here is theirs.)
    """
    why = rule_problem(rule)
    if why:
        raise ExportFormatError(f"{source}: {why}")
    _check_shapes(arrays, level_shapes(rule, level_features(arrays, rule, "", source)), None, source)
    g = lambda k: np.ascontiguousarray(arrays[k], dtype=np.float32)  # noqa: E731
    kernel, k, nd = g("perception.kernel"), int(rule["kernel_size"]), int(rule["ndim"])
    c, f = kernel.shape[-2:]
    rows = kernel.reshape((k ** (nd - 1), k * c, f))
    offsets = list(itertools.product(range(k), repeat=nd - 1))
    per = max(1, min(len(offsets), COLS_FLOATS // (k * c)))
    groups = [list(range(j, min(len(offsets), j + per))) for j in range(0, len(offsets), per)]
    bn = rule["norm"] == "batch"
    return LevelWeights(
        blocks=tuple(np.ascontiguousarray(rows[grp].reshape(len(grp) * k * c, f)) for grp in groups),
        block_rows=tuple(tuple(offsets[j] for j in grp) for grp in groups),
        kernel_size=k, ndim=nd, conv_bias=g("perception.bias"), fc0=g("fc0.kernel"), fc0_bias=g("fc0.bias"),
        fc1=g("fc1.kernel"), bn_scale=g("bn.scale") if bn else None, bn_bias=g("bn.bias") if bn else None,
    )


def level_weights(arrays: dict[str, np.ndarray], i: int, rule: dict) -> LevelWeights:
    """:func:`weights_of_level` of level ``i`` of ``weights.npz``-style arrays."""
    p = f"level{i}."
    return weights_of_level({k[len(p):]: v for k, v in arrays.items() if k.startswith(p)}, rule, f"{WEIGHTS_FILE} level {i}")


def _index(ndim: int, axis: int, at: Any) -> tuple:
    return (slice(None),) * axis + (at,) + (slice(None),) * (ndim - axis - 1)


def reflect_border_(xp: np.ndarray, r: int, axes: Sequence[int]) -> None:
    """Refill the ``r``-wide border of ``xp`` along ``axes`` from its interior, in place,
    mirroring without repeating the edge (torch/numpy 'reflect'). Axis after axis over the
    whole extent of the others, so the corners come out as a joint reflect pad."""
    for a in axes:
        n = xp.shape[a] - 2 * r
        for j in range(1, r + 1):
            xp[_index(xp.ndim, a, r - j)] = xp[_index(xp.ndim, a, r + j)]
            xp[_index(xp.ndim, a, r + n - 1 + j)] = xp[_index(xp.ndim, a, r + n - 1 - j)]


def _chunks(b: int, s0: int, slab: int, pixels: int, r: int) -> list[tuple[int, int, int, int]]:
    """Split ``(B, S0, slab)`` cells into ``(b0, b1, r0, r1)`` blocks of at most ~``pixels``,
    in C order: groups of whole images when they are small, else bands of at least ``r``
    rows of one image (so a band's taps reach only its neighbouring bands, see
    :func:`run_level_padded`)."""
    if s0 * slab <= pixels:
        g = max(1, pixels // (s0 * slab))
        return [(b0, min(b, b0 + g), 0, s0) for b0 in range(0, b, g)]
    rows = max(1, r, pixels // slab)
    return [(i, i + 1, r0, min(s0, r0 + rows)) for i in range(b) for r0 in range(0, s0, rows)]


def working_bytes_per_pixel(channels: int, features: int, hidden: int, kernel_size: int = 3, ndim: int = 2,
                            batch_norm: bool = False) -> int:
    """Bytes per cell of a chunk's temporaries in :func:`run_level_padded`: the im2col block,
    ``[x | conv]`` (C+F), a product slot (F) when the kernel takes several blocks, the hidden
    layer, two delta slots (2C), the fire draw and, with batch norm, the squares of the
    statistics pass."""
    kc = kernel_size * channels
    rows = kernel_size ** (ndim - 1)
    per = max(1, min(rows, COLS_FLOATS // kc))
    extra = features if per < rows else 0
    return 4 * (per * kc + channels + features + extra + hidden * (2 if batch_norm else 1) + 2 * channels) + 8


class PaddedState(NamedTuple):
    """A level's state kept reflect-padded (width ``r = k // 2``) in one flat buffer, so that
    the ``k`` taps of a kernel row along the last axis are one contiguous run of memory.

    ``buf (slack + B * prod(S + 2r) + slack, C)`` with ``xp = buf[slack:-slack]`` viewed as
    ``(B, *(S + 2r), C)``. Outputs are computed for every position of the interior rows of
    axis 0 (flat positions, pad positions of the other axes included), so the taps of a
    position ``q`` are at ``q + sum_a (d_a - r) stride_a``; pad positions get meaningless
    values that are never used, and ``slack = r * sum(strides[1:])`` keeps the taps of the
    first and last rows inside the buffer.
    """

    buf: np.ndarray
    xp: np.ndarray
    r: int
    slack: int

    @classmethod
    def empty(cls, b: int, spatial: Sequence[int], c: int, r: int) -> "PaddedState":
        """A zero state ``(B, *S, C)`` (its border is consistent: all zeros)."""
        padded = tuple(int(s) + 2 * r for s in spatial)
        if any(s <= r for s in spatial):
            raise InputError(f"a level of size {'x'.join(map(str, spatial))} is too small for a {2 * r + 1}-wide "
                             f"reflect-padded kernel (each side needs more than {r} cells)")
        strides = [int(np.prod(padded[a + 1:])) for a in range(len(padded))]
        slack = max(1, r * sum(strides[1:]))
        buf = np.zeros((b * int(np.prod(padded)) + 2 * slack, c), np.float32)
        return cls(buf, buf[slack:-slack].reshape((b,) + padded + (c,)), r, slack)

    @classmethod
    def from_state(cls, x: np.ndarray, r: int) -> "PaddedState":
        st = cls.empty(x.shape[0], x.shape[1:-1], x.shape[-1], r)
        st.inner[...] = x
        reflect_border_(st.xp, r, range(1, x.ndim - 1))
        return st

    @property
    def spatial(self) -> tuple[int, ...]:
        return tuple(s - 2 * self.r for s in self.xp.shape[1:-1])

    @property
    def inner(self) -> np.ndarray:
        """The state ``(B, *S, C)`` (a view)."""
        return self.xp[(slice(None),) + tuple(slice(self.r, self.r + s) for s in self.spatial)]


def upsampled_state(coarse: np.ndarray, factor: int, image: np.ndarray, channels: int, r: int) -> PaddedState:
    """Nearest-neighbour upsampling of ``coarse (B, *s, C)`` by ``factor`` written straight
    into a new padded state of width ``r`` (no full-size temporary), with ``image (B, *s*f,
    n_in)`` put back into the input channels."""
    spatial = image.shape[1:-1]
    st = PaddedState.empty(image.shape[0], spatial, channels, r)
    for offs in itertools.product(range(factor), repeat=len(spatial)):
        st.xp[(slice(None),) + tuple(slice(r + o, r + s, factor) for o, s in zip(offs, spatial))] = coarse
    st.inner[..., :image.shape[-1]] = image
    reflect_border_(st.xp, r, range(1, image.ndim - 1))
    return st


class _Work(NamedTuple):
    """A level's chunk temporaries, allocated once per rollout."""

    cols: np.ndarray  # (n_max * cols_width,) im2col block, reshaped per block
    y: np.ndarray  # (n_max, C + F)
    prod: np.ndarray  # (n_max, F) one block's product (several blocks only)
    hid: np.ndarray  # (span_max, hid): laid out like a delta slot (see run_level_padded)
    slots: tuple[np.ndarray, np.ndarray]  # two (span_max, C) delta slots


def _hidden(lw: LevelWeights, st: PaddedState, strides: Sequence[int], q0: int, n: int, work: _Work, hid: np.ndarray) -> None:
    """``fc0([x | conv(x) + b])`` at the ``n`` flat positions of ``st.xp`` from ``q0`` into
    ``hid (n, hidden)``.

    im2col per block: for each kernel row (leading offsets ``d``) the ``k`` taps of a position
    along the last axis are ``k*C`` consecutive floats of ``buf``, copied through one
    overlapping strided view; the blocks' products are summed.
    """
    buf, c, r, k = st.buf, st.buf.shape[1], lw.radius, lw.kernel_size
    y = work.y[:n]
    base = st.slack + q0 - r  # buf index of tap (r, .., r, 0) of position q0
    for j, (block, rows) in enumerate(zip(lw.blocks, lw.block_rows)):
        cols = work.cols[:n * block.shape[0]].reshape(n, len(rows), k * c)
        for t, offs in enumerate(rows):
            s = base + sum((d - r) * strides[a] for a, d in enumerate(offs))
            cols[:, t, :] = np.lib.stride_tricks.as_strided(buf[s:], shape=(n, k * c), strides=buf.strides)
        flat = cols.reshape(n, block.shape[0])
        if j == 0:
            np.matmul(flat, block, out=y[:, c:])
        else:
            y[:, c:] += np.matmul(flat, block, out=work.prod[:n])
    y[:, c:] += lw.conv_bias
    y[:, :c] = buf[st.slack + q0:st.slack + q0 + n]  # the centre tap is x itself
    np.matmul(y, lw.fc0, out=hid)
    hid += lw.fc0_bias


def run_level_padded(
    lw: LevelWeights, st: PaddedState, image: np.ndarray, steps: int, fire_rate: float,
    rng: Optional[np.random.Generator], masks: Optional[np.ndarray] = None, chunk_pixels: int = CHUNK_PIXELS,
) -> None:
    """``steps`` NCA steps on the padded state ``st`` (``(B, *S, C)`` inside), in place, with
    ``image (B, *S, n_in)`` held fixed.

    Fire mask ``u > fire_rate`` with ``u = 1 - rng.random`` uniform in (0, 1], one per cell,
    drawn fresh every step, chunk by chunk in C order: the same numbers as one
    ``rng.random((B, *S, 1))`` per step. ``masks (steps, B, *S)`` bool replaces the draw;
    ``fire_rate = 0`` (and no masks) updates every cell and draws nothing.

    Memory: besides the state only two delta slots of one chunk (+2r rows) and the chunk's
    temporaries. A step reads the old state of every neighbour, so the delta of chunk j is
    added only after chunk j+1 has been computed (bands of at least r rows: j+1 reads j's
    last rows, never j-1's); the pad of the other axes is refreshed in a chunk's rows when it
    is written, the pad rows of axis 0 at the end of the step. With batch norm every step
    first runs ``fc0`` over all chunks for the statistics (float64 sums over the interior
    cells of the whole batch), then the update pass recomputes it.
    """
    b, nd, r, c = st.xp.shape[0], st.xp.ndim - 2, st.r, st.xp.shape[-1]
    spatial, padded = st.spatial, st.xp.shape[1:-1]
    if r != lw.radius:
        raise ValueError(f"state padded by {r}, kernel {lw.kernel_size} needs {lw.radius}")
    n_in = image.shape[-1]
    strides = [int(np.prod(padded[a + 1:])) for a in range(nd)]
    slab = strides[0]
    chunks = _chunks(b, spatial[0], slab, chunk_pixels, r)
    spans = [(b1 - b0) * (r1 - r0 + 2 * r) * slab for b0, b1, r0, r1 in chunks]
    span_max = max(spans)
    n_hid = lw.fc1.shape[0]
    work = _Work(cols=np.empty(span_max * lw.cols_width, np.float32), y=np.empty((span_max, c + lw.features), np.float32),
                 prod=np.empty((span_max if len(lw.blocks) > 1 else 0, lw.features), np.float32),
                 hid=np.empty((span_max, n_hid), np.float32),
                 slots=(np.empty((span_max, c), np.float32), np.empty((span_max, c), np.float32)))
    thr = np.float32(fire_rate)
    rest = tuple(slice(r, r + s) for s in spatial[1:])  # the interior of axes 1..nd-1

    def interior(a: np.ndarray, k: int) -> np.ndarray:
        """The chunk's interior cells in a slot-laid-out buffer: ``(nb, rows, *S[1:], -1)``."""
        b0, b1, r0, r1 = chunks[k]
        v = a[:spans[k]].reshape((b1 - b0, r1 - r0 + 2 * r) + tuple(padded[1:]) + (a.shape[-1],))
        return v[(slice(None), slice(r, r + r1 - r0)) + rest]

    def chunk_hidden(k: int) -> np.ndarray:
        """fc0 of chunk k into work.hid, slot index j <-> xp flat position of (b0, r0, 0..) + j."""
        b0, _, r0, _ = chunks[k]
        q0 = b0 * int(np.prod(padded)) + (r0 + r) * slab  # flat position of the chunk's first output
        n = spans[k] - 2 * r * slab  # spans the pad rows between images: computed, never used
        hid = work.hid[r * slab:r * slab + n]
        _hidden(lw, st, strides, q0, n, work, hid)
        return hid

    def write(k: int, step: int) -> None:
        b0, b1, r0, r1 = chunks[k]
        d = interior(work.slots[k % 2], k)
        if masks is not None:
            d *= masks[step, b0:b1, r0:r1, ..., None]
        elif fire_rate > 0.0:
            assert rng is not None
            u = 1.0 - rng.random((b1 - b0, r1 - r0) + tuple(spatial[1:]) + (1,), dtype=np.float32)
            d *= u > thr
        band = st.xp[b0:b1, r0 + r:r1 + r]
        inner = band[(slice(None), slice(None)) + rest]
        inner += d
        inner[..., :n_in] = image[b0:b1, r0:r1]
        reflect_border_(band, r, range(2, nd + 1))

    for step in range(steps):
        norm = None
        if lw.bn_scale is not None:
            s1, s2 = np.zeros(n_hid, np.float64), np.zeros(n_hid, np.float64)
            for k in range(len(chunks)):
                chunk_hidden(k)
                h = interior(work.hid, k)
                axes = tuple(range(h.ndim - 1))
                s1 += h.sum(axis=axes, dtype=np.float64)
                s2 += np.square(h).sum(axis=axes, dtype=np.float64)
            count = float(b * np.prod(spatial))
            mean = s1 / count
            var = np.maximum(s2 / count - mean * mean, 0.0)
            norm = (mean.astype(np.float32), (lw.bn_scale / np.sqrt(var + BN_EPS)).astype(np.float32), lw.bn_bias)
        for k in range(len(chunks)):
            hid = chunk_hidden(k)
            if norm is not None:
                hid -= norm[0]
                hid *= norm[1]
                hid += norm[2]
            np.maximum(hid, 0.0, out=hid)
            n = hid.shape[0]
            np.matmul(hid, lw.fc1, out=work.slots[k % 2][r * slab:r * slab + n])
            if k:
                write(k - 1, step)
        write(len(chunks) - 1, step)
        reflect_border_(st.xp, r, (1,))


def run_level(
    lw: LevelWeights, x: np.ndarray, image: np.ndarray, steps: int, fire_rate: float,
    rng: Optional[np.random.Generator], masks: Optional[np.ndarray] = None, chunk_pixels: int = CHUNK_PIXELS,
) -> np.ndarray:
    """``steps`` NCA steps on ``x (B, *S, C)`` with ``image (B, *S, n_in)`` held fixed
    -> the new state (a copy). See :func:`run_level_padded` for the masks and the draws."""
    st = PaddedState.from_state(np.asarray(x, np.float32), lw.radius)
    run_level_padded(lw, st, image, steps, fire_rate, rng, _check_masks(masks, steps, image.shape[:-1], 0),
                     chunk_pixels)
    return np.ascontiguousarray(st.inner)


def rollout_level(weights: dict[str, np.ndarray], rule: dict, x: np.ndarray, image: np.ndarray, masks: np.ndarray,
                  chunk_pixels: int = CHUNK_PIXELS) -> np.ndarray:
    """One level's rollout on given fire masks, as ``mednca_jax.nca.rollout.rollout`` with
    ``masks``: the image is written into the input channels first, then one step per mask.

    Args:
        weights: the level's arrays without the ``level{i}.`` prefix (``perception.kernel
            (k,)*nd + (C, F)``, ``perception.bias``, ``fc0.kernel``, ``fc0.bias``, ``bn.scale``
            and ``bn.bias`` for norm batch, ``fc1.kernel``).
        rule: the level's description (``config.json`` ``rules[i]``, ``Rule.describe()``).
        x: start state ``(B, *S, C)`` float32; image: ``(B, *S, n_in)``.
        masks: ``(steps, B, *S)`` bool.
        chunk_pixels: cells per chunk (results do not depend on it beyond round-off).

    Returns:
        the final state ``(B, *S, C)`` float32.
    """
    lw = weights_of_level(weights, rule, "weights")
    x = np.array(x, np.float32)
    image = np.asarray(image, np.float32)
    masks = np.asarray(masks)
    if x.ndim != lw.ndim + 2 or x.shape[-1] != rule["channels"] or image.shape != x.shape[:-1] + (rule["n_in"],):
        raise InputError(f"x (B, *S, C={rule['channels']}) and image (B, *S, n_in={rule['n_in']}) of rank {lw.ndim} "
                         f"expected, got {x.shape} and {image.shape}")
    x[..., :image.shape[-1]] = image
    return run_level(lw, x, image, int(masks.shape[0]), 0.0, None, masks, chunk_pixels)


def _check_masks(m: Any, steps: int, shape: tuple[int, ...], level: int) -> Optional[np.ndarray]:
    if m is None:
        return None
    m = np.asarray(m)
    want = (steps,) + tuple(shape)
    if m.dtype != np.bool_ or m.shape != want:
        raise InputError(f"masks[{level}] must be a bool array (steps, B, *S) = {want}, got {m.dtype} {m.shape}")
    return m


def forward(
    levels: Sequence[LevelWeights], spec: Spec, images: np.ndarray, fire_rate: float,
    rng: Optional[np.random.Generator], masks: Optional[Sequence[np.ndarray]] = None,
    chunk_pixels: int = CHUNK_PIXELS,
) -> np.ndarray:
    """Multi-level inference: ``images (B, *S, n_in)`` float32 -> logits ``(B, *S, n_out)``.

    ``masks``: optional explicit fire masks, one bool array ``(steps_i, B, *S_i)`` per level
    (``S_i = S / scales[i]``), used instead of drawing (``fire_rate``/``rng`` unused).
    ``chunk_pixels`` bounds the per-step temporaries (see :func:`run_level_padded`).
    """
    if masks is not None and len(masks) != spec.n_levels:
        raise InputError(f"masks must hold one array per level ({spec.n_levels}), got {len(masks)}")
    st: Optional[PaddedState] = None
    for i, lw in enumerate(levels):
        img = downscale(images, spec.scales[i], spec.downscale)
        if st is None:
            st = PaddedState.empty(img.shape[0], img.shape[1:-1], spec.channels, lw.radius)
            st.inner[..., :spec.n_in] = img
            reflect_border_(st.xp, lw.radius, range(1, img.ndim - 1))
        else:
            st = upsampled_state(st.inner, spec.scales[i - 1] // spec.scales[i], img, spec.channels, lw.radius)
        m = None if masks is None else _check_masks(masks[i], spec.steps[i], img.shape[:-1], i)
        run_level_padded(lw, st, img, spec.steps[i], fire_rate, rng, m, chunk_pixels)
    assert st is not None
    return np.ascontiguousarray(st.inner[..., spec.n_in:spec.n_in + spec.n_out])


def sigmoid(z: np.ndarray) -> np.ndarray:
    """Numerically safe logistic function (logits reach +-300)."""
    z = np.asarray(z, np.float32)
    e = np.exp(-np.abs(z))
    return np.where(z >= 0, 1.0 / (1.0 + e), e / (1.0 + e)).astype(np.float32)


def labels_from_probability(p: np.ndarray) -> np.ndarray:
    """``(..., n_out)`` probabilities -> uint8 labels ``(...)``: one output channel gives
    ``p > 0.5``; several give ``1 + argmax`` where the largest exceeds 0.5, else 0."""
    if p.shape[-1] == 1:
        return (p[..., 0] > 0.5).astype(np.uint8)
    best = p.argmax(axis=-1)
    return np.where(p.max(axis=-1) > 0.5, best + 1, 0).astype(np.uint8)


class Uncertainty(NamedTuple):
    """Result of ``segment(..., runs=N)`` with N > 1 (shapes follow the input's leading dims)."""

    labels: np.ndarray  # (B, *S) uint8, from the mean probability
    probability: np.ndarray  # (B, *S, n_out) mean sigmoid over the runs
    variance: np.ndarray  # (B, *S, n_out) variance of the sigmoid over the runs (ddof 1)
    nqm: float  # sum of per-pixel std (ddof 1) / sum of mean probability (M3D-NCA quality metric)
    logits: Optional[np.ndarray]  # (N, B, *S, n_out) every run's logits if return_logits


def nqm_from_runs(probs: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """``probs (N, ...)`` sigmoid outputs of N >= 2 runs -> (mean, variance, NQM = Σ std / Σ mean).

    Variance and std are the unbiased ones (ddof 1), as ``torch.std`` in the original M3D-NCA
    code and ``mednca_jax.evaluate.quality.nqm``.
    """
    probs = np.asarray(probs, np.float64)  # identical runs then give exactly zero variance
    mean = probs.mean(axis=0)
    var = probs.var(axis=0, ddof=1)
    total = float(mean.sum(dtype=np.float64))
    nqm = float(np.sqrt(var).sum(dtype=np.float64)) / total if total > 0 else 0.0
    return mean.astype(np.float32), var.astype(np.float32), nqm


# --------------------------------------------------------------------------- the model
class MedNCA:
    """A loaded Med-NCA: ``MedNCA.load(DIR).segment(images, seed=...)``."""

    def __init__(self, arrays: dict[str, np.ndarray], spec: Spec, source: str = WEIGHTS_FILE,
                 max_memory_mb: Optional[float] = None):
        arrays = upgrade_legacy(arrays, spec, source)
        self.features = check_weights(arrays, spec, source)
        spec = replace(spec, rules=tuple({**r, "features": f} for r, f in zip(spec.rules, self.features)))
        self.spec = spec
        self.levels = [level_weights(arrays, i, spec.rules[i]) for i in range(spec.n_levels)]
        self.max_memory_mb = max_memory_mb

    @classmethod
    def load(cls, directory: "str | Path", max_memory_mb: Optional[float] = None) -> "MedNCA":
        """Read ``DIR/config.json`` and ``DIR/weights.npz`` (written by the exporter);
        ``max_memory_mb`` is the default budget of :meth:`segment` (see :meth:`plan`)."""
        d = Path(directory)
        cfg_path, w_path = d / CONFIG_FILE, d / WEIGHTS_FILE
        if not d.is_dir():
            raise ExportFormatError(f"runtime folder {d} does not exist (expected {CONFIG_FILE} and {WEIGHTS_FILE} in it)")
        if not cfg_path.is_file():
            raise ExportFormatError(f"{cfg_path} is missing: expected the model config written by the exporter")
        try:
            cfg = json.loads(cfg_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ExportFormatError(f"{cfg_path} is not valid JSON: {e}") from None
        if not isinstance(cfg, dict):
            raise ExportFormatError(f"{cfg_path}: expected a JSON object with 'model' and 'data' sections")
        spec = spec_from_config(cfg, str(cfg_path))
        if not w_path.is_file():
            raise ExportFormatError(f"{w_path} is missing: expected the weights of {spec.n_levels} levels "
                                    f"(keys like level0.perception.kernel), written by the exporter")
        try:
            with np.load(w_path, allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
        except Exception as e:  # zip/npy errors come in many types
            raise ExportFormatError(f"{w_path} is not a readable .npz file: {e}") from None
        return cls(arrays, spec, str(w_path), max_memory_mb)

    # ---------------------------------------------------------------- input handling
    def _as_batch(self, images: Any) -> tuple[np.ndarray, bool]:
        """-> ``(B, *S, n_in)`` float32 and whether the input was a single image."""
        s = self.spec
        nd = s.ndim
        a = np.asarray(images)
        if a.ndim == nd and s.n_in == 1:
            a, single = a[None, ..., None], True
        elif a.ndim == nd + 1 and s.n_in == 1:
            a, single = a[..., None], False
        elif a.ndim == nd + 2 and a.shape[-1] == s.n_in:
            single = False
        else:
            axes = "H, W" if nd == 2 else "X, Y, Z"
            want = f"({axes}), (B, {axes}) or (B, {axes}, 1)" if s.n_in == 1 else f"(B, {axes}, {s.n_in})"
            raise InputError(f"images must have shape {want} (n_in={s.n_in}), got rank {a.ndim} shape {a.shape}")
        if not np.issubdtype(a.dtype, np.number):
            raise InputError(f"images must be numeric, got dtype {a.dtype}")
        f = s.scales[0]
        if any(n % f for n in a.shape[1:-1]) or a.shape[0] == 0:
            raise InputError(f"image size {'x'.join(map(str, a.shape[1:-1]))} (batch {a.shape[0]}) must be non-empty "
                             f"and divisible by the coarsest scale {f}")
        a = np.ascontiguousarray(a, np.float32)
        if not np.all(np.isfinite(a)):
            raise InputError("images contain NaN or inf values")
        return a, single

    def logits(self, images: Any, seed: Optional[int] = None, fire_rate: Optional[float] = None,
               masks: Optional[Sequence[np.ndarray]] = None, max_memory_mb: Optional[float] = None) -> np.ndarray:
        """One inference run: ``(B, *S, n_in)`` (or see :meth:`segment`) -> ``(B, *S, n_out)``.
        ``masks``: explicit fire masks, one bool ``(steps_i, B, *S_i)`` per level."""
        x, _ = self._as_batch(images)
        rate = self._fire_rate(fire_rate)
        return self._run(x, rate, np.random.default_rng(seed), masks, max_memory_mb)

    def _fire_rate(self, fire_rate: Optional[float]) -> float:
        rate = self.spec.fire_rate if fire_rate is None else float(fire_rate)
        if not 0.0 <= rate < 1.0:
            raise InputError(f"fire_rate must be in [0, 1), got {rate}")
        return rate

    def plan(self, shape: Sequence[int], max_memory_mb: Optional[float] = None) -> tuple[int, int]:
        """``(images per group, chunk cells)`` for a batch ``(B, *S, ...)`` within
        ``max_memory_mb`` MiB of peak memory (None: this model's default, else unbounded:
        groups of ``BATCH_PIXELS`` cells, ``CHUNK_PIXELS`` per chunk).

        The budget covers the interpreter and numpy (``BASE_MB``), the input and output
        arrays, the finest level's padded state plus the next-coarser one (both live while
        upsampling) and the chunk temporaries; the chunk gets what is left, at most
        ``CHUNK_PIXELS`` (larger chunks are not faster) and at least one band of padded rows.
        Groups shrink only when the default one does not fit: a group's fire masks are drawn
        together, so a smaller group changes the draws (fire 0 and explicit masks stay
        identical). With batch norm the whole batch is one group (its statistics couple the
        samples), so only the chunks shrink.
        """
        s = self.spec
        b, spatial = int(shape[0]), tuple(int(n) for n in shape[1:1 + s.ndim])
        cells = int(np.prod(spatial))
        per = b if s.batch_norm else max(1, BATCH_PIXELS // cells)
        budget = self.max_memory_mb if max_memory_mb is None else max_memory_mb
        if budget is None:
            return min(per, b), CHUNK_PIXELS
        fine = self.levels[-1]
        per_px = max(working_bytes_per_pixel(s.channels, lw.features, s.hidden, lw.kernel_size, s.ndim,
                                             lw.bn_scale is not None) for lw in self.levels)
        io = b * cells * 4 * (s.n_in + 2 * s.n_out)  # input, output, one group's logits
        r = fine.radius
        slab = int(np.prod([n + 2 * r for n in spatial[1:]]))

        def padded_cells(lw: LevelWeights, f: int) -> int:
            return int(np.prod([n // f + 2 * lw.radius for n in spatial]))

        def state(g: int) -> int:  # padded states of the two finest levels for g images
            size = g * padded_cells(fine, 1) * s.channels * 4
            if s.n_levels < 2:
                return size
            return size + g * padded_cells(self.levels[-2], s.scales[-2]) * s.channels * 4 + g * cells * 4 * s.n_in

        free = float(budget) * 2 ** 20 - BASE_MB * 2 ** 20 - io
        band = max(1, r)
        row = (band + 2 * r) * slab * per_px  # the smallest chunk: one band (+ the halo rows of a slot)
        g = min(per, b)
        while g > 1 and state(g) + row > free and not s.batch_norm:
            g = max(1, g // 2)
        if state(g) + row > free:
            need = (BASE_MB * 2 ** 20 + io + state(g) + row) / 2 ** 20
            # With batch norm the whole batch is one group (its statistics couple the samples).
            what = f"a batch of {g}" if s.batch_norm else "groups of 1"
            raise InputError(f"max_memory_mb={budget:g} is too small for {what} {'x'.join(map(str, spatial))} images "
                             f"with C={s.channels}: the state alone needs {state(g) / 2 ** 20:.0f} MiB; allow at least "
                             f"{need:.0f} MiB")
        chunk = int((free - state(g)) // per_px) - 2 * r * slab
        return g, max(band * slab, min(CHUNK_PIXELS, chunk))

    def _run(self, x: np.ndarray, rate: float, rng: np.random.Generator,
             masks: Optional[Sequence[np.ndarray]] = None, max_memory_mb: Optional[float] = None) -> np.ndarray:
        # Bounded groups of images keep memory flat for whole volumes; the output is filled in
        # place (no list of pieces + concatenate, which would hold the logits twice).
        per, chunk = self.plan(x.shape, max_memory_mb)
        s = self.spec
        if masks is not None:
            if len(masks) != s.n_levels:
                raise InputError(f"masks must hold one array per level ({s.n_levels}), got {len(masks)}")
            masks = [np.asarray(m) for m in masks]
            for i, m in enumerate(masks):
                _check_masks(m, s.steps[i], (len(x),) + tuple(n // s.scales[i] for n in x.shape[1:-1]), i)
        out = np.empty(x.shape[:-1] + (s.n_out,), np.float32)
        for i in range(0, len(x), per):
            m = None if masks is None else [a[:, i:i + per] for a in masks]
            out[i:i + per] = forward(self.levels, s, x[i:i + per], rate, rng, m, chunk)
        return out

    def segment(
        self, images: Any, seed: Optional[int] = None, fire_rate: Optional[float] = None, runs: int = 1,
        return_logits: bool = False, max_memory_mb: Optional[float] = None,
    ) -> "np.ndarray | Uncertainty":
        """Segment preprocessed images.

        Args:
            images: ``(H, W)``, ``(B, H, W)`` or ``(B, H, W, n_in)`` preprocessed slices (for a
                3D model ``(X, Y, Z)``, ``(B, X, Y, Z)`` or ``(B, X, Y, Z, n_in)``).
            seed: seeds the fire masks (numpy Generator); None draws fresh entropy.
            fire_rate: defaults to the config's; 0 is deterministic.
            runs: N > 1 runs N times and returns an :class:`Uncertainty`.
            return_logits: for runs == 1 return logits instead of labels.
            max_memory_mb: bound on the peak memory (MiB, whole process) that picks the group
                and chunk sizes (:meth:`plan`); results are identical whatever it is.

        Returns:
            runs == 1: labels ``(B, *S)`` uint8, or logits ``(B, *S, n_out)`` float32
            (without the leading B for a single image); runs > 1: :class:`Uncertainty`.
        """
        x, single = self._as_batch(images)
        rate = self._fire_rate(fire_rate)
        if int(runs) < 1:
            raise InputError(f"runs must be >= 1, got {runs}")
        rng = np.random.default_rng(seed)
        sq = (lambda a: a[0]) if single else (lambda a: a)  # noqa: E731
        if runs == 1:
            z = self._run(x, rate, rng, max_memory_mb=max_memory_mb)
            return sq(z) if return_logits else sq(labels_from_probability(sigmoid(z)))
        all_logits = np.stack([self._run(x, rate, rng, max_memory_mb=max_memory_mb) for _ in range(int(runs))])
        mean, var, nqm = nqm_from_runs(sigmoid(all_logits))
        return Uncertainty(
            labels=sq(labels_from_probability(mean)), probability=sq(mean), variance=sq(var), nqm=nqm,
            logits=(all_logits[:, 0] if single else all_logits) if return_logits else None,
        )


# --------------------------------------------------------------------------- preprocessing
# A self-contained copy of the training pipeline (mednca_jax/data/preprocess.py; a test checks
# that both agree): OpenCV-like bicubic resize, per-slice min-max, z-norm, percentile rescale.
def _cubic_matrix(n_in: int, n_out: int, a: float = -0.75) -> np.ndarray:
    """Bicubic resize weights ``(n_out, n_in)`` float64 as OpenCV's INTER_CUBIC: Keys kernel
    with ``a = -0.75``, half-pixel centres, no anti-aliasing, replicated borders (taps
    clamped to the edge)."""
    pos = (np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5
    base = np.floor(pos)
    t = pos - base
    m = np.zeros((n_out, n_in), np.float64)
    rows = np.arange(n_out)
    for k in (-1, 0, 1, 2):
        x = np.abs(t - k)
        w = np.where(x <= 1, ((a + 2) * x - (a + 3)) * x * x + 1,
                     np.where(x < 2, ((a * x - 5 * a) * x + 8 * a) * x - 4 * a, 0.0))
        np.add.at(m, (rows, np.clip(base.astype(np.int64) + k, 0, n_in - 1)), w)
    return m


def resize_bicubic(slices: np.ndarray, size: Sequence[int]) -> np.ndarray:
    """``(S, h, w) -> (S, H, W)`` float64 bicubic resize of each slice."""
    s = np.asarray(slices, np.float64)
    rows, cols = _cubic_matrix(s.shape[1], int(size[0])), _cubic_matrix(s.shape[2], int(size[1]))
    return np.einsum("Hh,shw,Ww->sHW", rows, s, cols, optimize=True)


def normalise_slices(slices: np.ndarray) -> np.ndarray:
    """The training intensity pipeline per slice, ``(S, H, W) -> (S, H, W)`` float32 in [0, 1]:
    min-max to [0, 1]; z-normalisation unless the slice sums to 0 (or is constant); rescale
    by the 0.5 / 99.5 percentiles with clipping. Where that would divide by zero: a constant
    slice becomes 0, coinciding percentiles give 0 at or below and 1 above."""
    x = np.asarray(slices, np.float64)
    flat = x.reshape(x.shape[0], -1)
    lo, hi = flat.min(axis=1, keepdims=True), flat.max(axis=1, keepdims=True)
    flat = (flat - lo) / np.where(hi > lo, hi - lo, 1.0)
    sd = flat.std(axis=1, keepdims=True)
    z = (flat.sum(axis=1, keepdims=True) != 0) & (sd > 0)
    flat = np.where(z, (flat - flat.mean(axis=1, keepdims=True)) / np.where(z, sd, 1.0), flat)
    p_lo, p_hi = np.percentile(flat, [0.5, 99.5], axis=1, keepdims=True)
    width = p_hi - p_lo
    out = np.where(width > 0, (flat - p_lo) / np.where(width > 0, width, 1.0), (flat > p_hi).astype(np.float64))
    return np.clip(out, 0.0, 1.0).astype(np.float32).reshape(x.shape)


def preprocess_slices(slices: np.ndarray, size: Sequence[int]) -> np.ndarray:
    """Native slices ``(S, h, w)`` -> network input ``(S, H, W)`` float32, as in training."""
    return normalise_slices(resize_bicubic(np.asarray(slices, np.float32), size))


def _nearest_index(n_in: int, n_out: int) -> np.ndarray:
    """Source indices of OpenCV's INTER_NEAREST resize ``n_in -> n_out``: ``floor(i * n_in / n_out)``."""
    return np.minimum(np.floor(np.arange(n_out) * (n_in / n_out)).astype(np.int64), n_in - 1)


def _nearest_inverse_index(n_native: int, n_model: int) -> np.ndarray:
    """Model-grid index for each native index: the pixel whose forward (training label) source
    is nearest (first on ties), so labels resized up and back come back unchanged."""
    fwd = _nearest_index(n_native, n_model)
    j = np.arange(n_native)
    after = np.minimum(np.searchsorted(fwd, j, side="left"), n_model - 1)
    before = np.maximum(after - 1, 0)
    return np.where(np.abs(fwd[before] - j) < np.abs(fwd[after] - j), before, after)


def resize_to_native(pred: np.ndarray, native: Sequence[int]) -> np.ndarray:
    """Predictions ``(S, H, W, ...)`` back onto native slices ``(S, h, w, ...)`` (nearest)."""
    ri = _nearest_inverse_index(int(native[0]), pred.shape[1])
    ci = _nearest_inverse_index(int(native[1]), pred.shape[2])
    return pred[:, ri][:, :, ci]


def _nibabel():
    try:
        import nibabel  # only the NIfTI path needs it
    except ImportError as e:
        raise InputError(f"reading NIfTI needs nibabel ({e}): pip install nibabel, or pass a .npy of preprocessed slices") from None
    return nibabel


def volume_slices(data: np.ndarray, spec: Spec, path: str, channel: Optional[int]) -> np.ndarray:
    """Image volume -> native slices ``(S, h, w)`` float32 along ``spec.slice_axis``; a 4D
    volume with several channels needs an explicit ``channel``."""
    if data.ndim == 4 and data.shape[3] == 1 and channel in (None, 0):
        data = data[..., 0]  # a 3D image stored as 4D
    elif data.ndim == 4:
        if channel is None:
            raise InputError(
                f"{path} is a 4D image of shape {data.shape}: choose a channel with --channel K "
                f"(0..{data.shape[3] - 1}); the model was trained on channel {spec.channel}")
        if not 0 <= channel < data.shape[3]:
            raise InputError(f"{path}: --channel {channel} is out of range 0..{data.shape[3] - 1}")
        data = data[..., channel]
    elif data.ndim != 3:
        raise InputError(f"{path} has shape {data.shape}: expected a 3D volume (X, Y, Z), or 4D with --channel")
    elif channel not in (None, 0):
        raise InputError(f"{path} is 3D: --channel {channel} does not apply")
    if min(data.shape) == 0:
        raise InputError(f"{path} is empty (shape {data.shape})")
    vol = np.asarray(data, np.float32)
    if not np.all(np.isfinite(vol)):
        raise InputError(f"{path} has NaN/inf voxels")
    return np.moveaxis(vol, spec.slice_axis, 0)


def segment_nifti(
    model: MedNCA, in_path: str, out_path: str, channel: Optional[int] = None, seed: Optional[int] = None,
    fire_rate: Optional[float] = None, runs: int = 1, variance_path: Optional[str] = None,
) -> Optional[float]:
    """Segment a NIfTI volume and write a uint8 label volume on the input's grid, with its
    affine and header. Returns the NQM when ``runs > 1``."""
    if model.spec.ndim != 2:
        raise InputError(f"{in_path}: this model segments {model.spec.ndim}D volumes, and the NIfTI path of this runtime "
                         "is slice based; pass a .npy of preprocessed volumes (B, X, Y, Z) instead")
    nib = _nibabel()
    try:
        img = nib.load(in_path)
    except Exception as e:
        raise InputError(f"cannot read {in_path} as NIfTI: {e}") from None
    spec = model.spec
    try:
        raw = np.asarray(img.dataobj)  # applies scl_slope/inter, reads the whole stream
    except Exception as e:
        raise InputError(f"cannot read the voxels of {in_path}: {e}") from None
    slices = volume_slices(raw, spec, in_path, channel)
    pre = preprocess_slices(slices, spec.image_size)
    res = model.segment(pre, seed=seed, fire_rate=fire_rate, runs=runs)
    labels = res.labels if isinstance(res, Uncertainty) else res
    native = slices.shape[1:]
    vol = np.moveaxis(resize_to_native(labels, native), 0, spec.slice_axis)
    _save_like(nib, img, vol.astype(np.uint8), out_path)
    if isinstance(res, Uncertainty):
        if variance_path:
            var = res.variance.max(axis=-1)
            back = np.moveaxis(resize_to_native(var, native), 0, spec.slice_axis)
            _save_like(nib, img, back.astype(np.float32), variance_path)
        return res.nqm
    return None


def _save_like(nib: Any, ref: Any, data: np.ndarray, path: str) -> None:
    """Write ``data (X, Y, Z)`` as NIfTI with ``ref``'s affine and header (dtype/shape updated,
    no intensity scaling: the stored values are the labels themselves)."""
    hdr = ref.header.copy()
    hdr.set_data_dtype(data.dtype)
    hdr.set_data_shape(data.shape)
    hdr["scl_slope"], hdr["scl_inter"] = 1.0, 0.0
    try:
        nib.save(nib.Nifti1Image(data, ref.affine, hdr), path)
    except Exception as e:
        raise InputError(f"cannot write {path}: {e}") from None


# --------------------------------------------------------------------------- CLI
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mednca_numpy.py",
        description="Med-NCA segmentation with NumPy only. IN/OUT are either NIfTI volumes (.nii/.nii.gz: "
                    "sliced, preprocessed as in training, labels written on the input grid) or .npy arrays of "
                    "already preprocessed slices (H,W), (B,H,W) or (B,H,W,n_in) (labels (B,H,W) uint8 or, with "
                    "--logits, logits (B,H,W,n_out) float32).")
    p.add_argument("model_dir", help="folder with config.json and weights.npz (from `python -m mednca_jax.export to-numpy`)")
    p.add_argument("input", help="input .nii/.nii.gz volume or .npy array of preprocessed slices")
    p.add_argument("output", help="output path (.nii/.nii.gz label volume for NIfTI input, .npy otherwise)")
    p.add_argument("--logits", action="store_true", help=".npy mode: write logits (B,H,W,n_out) instead of labels")
    p.add_argument("--fire-rate", type=float, default=None,
                   help="cell fire rate in [0,1) (default: the training config's); 0 is deterministic")
    p.add_argument("--seed", type=int, default=None, help="seed of the stochastic fire masks (default: random)")
    p.add_argument("--runs", type=int, default=1,
                   help="run N times; labels come from the mean probability and the NQM quality score is printed")
    p.add_argument("--variance", default=None, metavar="PATH",
                   help="with --runs N>1: also write the per-pixel variance of the probability to PATH")
    p.add_argument("--channel", type=int, default=None, help="NIfTI mode: channel of a 4D image to segment")
    p.add_argument("--max-memory-mb", type=float, default=None, metavar="MB",
                   help="bound the peak memory (MiB, whole process) by processing each step in smaller chunks of "
                        "cells and fewer slices at a time; results are identical (default: ~20 MiB of temporaries "
                        "beyond the state)")
    return p


def _is_nifti(path: str) -> bool:
    return path.endswith(".nii") or path.endswith(".nii.gz")


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parser().parse_args(argv)
    try:
        model = MedNCA.load(args.model_dir, max_memory_mb=args.max_memory_mb)
        if args.runs > 1 and args.logits:
            raise InputError("--logits writes one run's logits; use it without --runs")
        if _is_nifti(args.input):
            if args.logits:
                raise InputError("--logits applies to .npy input only")
            nqm = segment_nifti(model, args.input, args.output, args.channel, args.seed, args.fire_rate,
                                args.runs, args.variance)
        else:
            if not args.input.endswith(".npy"):
                raise InputError(f"{args.input}: expected a .nii, .nii.gz or .npy file")
            if args.channel is not None:
                raise InputError("--channel applies to NIfTI input only")
            try:
                arr = np.load(args.input, allow_pickle=False)
            except (OSError, ValueError) as e:
                raise InputError(f"cannot read {args.input} as .npy: {e}") from None
            try:
                res = model.segment(arr, seed=args.seed, fire_rate=args.fire_rate, runs=args.runs,
                                    return_logits=args.logits)
            except InputError as e:
                raise InputError(f"{args.input}: {e}") from None
            nqm = None
            if isinstance(res, Uncertainty):
                np.save(args.output, res.labels)
                if args.variance:
                    np.save(args.variance, res.variance)
                nqm = res.nqm
            else:
                np.save(args.output, res)
        if nqm is not None:
            print(f"NQM {nqm:.6f}")
    except (ExportFormatError, InputError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
