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

As a program::

    python mednca_numpy.py DIR IN.nii.gz OUT.nii.gz [--channel K] [--seed S] [--runs N]
    python mednca_numpy.py DIR IN.npy OUT.npy [--logits] [--fire-rate F] [--seed S] [--runs N]
    add --max-memory-mb MB to bound the peak memory (large images on small devices)

What it computes (channels-last states ``(B, H, W, C)``): level ``i`` runs on the image
downscaled by ``scales[i]``; each step is ``x += fc1(relu(fc0([x | conv(x; K) + b]))) * mask``
with the level's perception: a 3x3 reflect-padded conv ``K (3, 3, C, F)`` (the original's
learned ``p0``/``p1`` side by side, F = 2C, or a fixed filter bank), and ``mask = u > fire_rate``
drawn per cell and step, after which the input channels are reset to the image; between levels
the state is upsampled by nearest neighbour. Logits are channels ``[n_in, n_in + n_out)`` of the
final state. Each step runs in chunks of cells, updating the state in place, so memory is the
state plus a fixed working set (``--max-memory-mb`` shrinks it further).

``weights.npz`` keys per level: ``level{i}.perception.kernel (3, 3, C, F)``, ``.perception.bias
(F,)``, ``.fc0.kernel (C + F, hidden)``, ``.fc0.bias``, ``.fc1.kernel (hidden, C)``; older
exports with ``level{i}.p0.*``/``p1.*`` are converted on load.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, Optional, Sequence

import numpy as np

FORMAT = "mednca-export"
FORMAT_VERSION = 1
WEIGHTS_FILE = "weights.npz"
CONFIG_FILE = "config.json"
DOWNSCALE_METHODS = ("bilinear", "area", "antialias")
# Pixels per im2col chunk: bounds the temporary (chunk, 9C) matrix (~9 MB for C=32) so peak
# memory does not grow with the image, while keeping each matmul large enough for BLAS.
CHUNK_PIXELS = 8192
# Slices segmented together; bounds the state memory of a whole volume.
BATCH_PIXELS = 1 << 18
# Peak RSS of the interpreter with numpy loaded and this module imported, before any image
# (measured ~30 MiB with OpenBLAS; a margin for the allocator): the floor of --max-memory-mb.
BASE_MB = 40


class ExportFormatError(ValueError):
    """The runtime folder (config.json / weights.npz) is missing, malformed or inconsistent."""


class InputError(ValueError):
    """An image handed to the runtime has the wrong rank, shape or values."""


# --------------------------------------------------------------------------- configuration
@dataclass(frozen=True)
class Spec:
    """What the runtime needs from the training config (``config.json``: ``model``/``data``)."""

    channels: int
    hidden: int
    n_in: int
    n_out: int
    fire_rate: float
    steps: tuple[int, ...]
    scales: tuple[int, ...]
    downscale: str = "bilinear"
    image_size: tuple[int, int] = (64, 64)
    slice_axis: int = 2
    channel: int = 0

    @property
    def n_levels(self) -> int:
        return len(self.steps)


def spec_from_config(cfg: dict, source: str = CONFIG_FILE) -> Spec:
    """Validate the parts of a config dict the runtime uses; errors name ``source`` and the key."""
    model, data = cfg.get("model"), cfg.get("data", {})
    if not isinstance(model, dict):
        raise ExportFormatError(f"{source}: expected a 'model' section with the NCA settings")
    if model.get("kind", "nca") != "nca":
        raise ExportFormatError(f"{source}: model.kind is {model.get('kind')!r}; only 'nca' models can run here")
    try:
        spec = Spec(
            channels=int(model["channels"]),
            hidden=int(model["hidden"]),
            n_in=int(model["n_in"]),
            n_out=int(model["n_out"]),
            fire_rate=float(model["fire_rate"]),
            steps=tuple(int(s) for s in model["steps"]),
            scales=tuple(int(s) for s in model["scales"]),
            downscale=str(model.get("downscale", "bilinear")),
            image_size=tuple(int(s) for s in data.get("image_size", (64, 64))),  # type: ignore[arg-type]
            slice_axis=int(data.get("slice_axis", 2)),
            channel=int(data.get("channel", 0)),
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
    if problems:
        raise ExportFormatError(f"{source}: " + "; ".join(problems))
    return spec


def expected_shapes(spec: Spec, features: int) -> dict[str, tuple[int, ...]]:
    """Keys and shapes of ``weights.npz`` (channels-last) for ``features`` perception filters F.

    Every supported perception is ``y = [x | conv3x3_reflect(x, K) + b]``: the learned one
    (the original's p0/p1, F = 2C) and fixed filter banks alike, so one kernel describes it.
    """
    c, h = spec.channels, spec.hidden
    shapes: dict[str, tuple[int, ...]] = {}
    for i in range(spec.n_levels):
        shapes.update({
            f"level{i}.perception.kernel": (3, 3, c, features), f"level{i}.perception.bias": (features,),
            f"level{i}.fc0.kernel": (c + features, h), f"level{i}.fc0.bias": (h,),
            f"level{i}.fc1.kernel": (h, c),
        })
    return shapes


def legacy_shapes(spec: Spec, i: int) -> dict[str, tuple[int, ...]]:
    """Level ``i``'s keys in format-1 exports (two learned convs ``p0``/``p1``)."""
    c = spec.channels
    return {f"level{i}.p0.kernel": (3, 3, c, c), f"level{i}.p0.bias": (c,),
            f"level{i}.p1.kernel": (3, 3, c, c), f"level{i}.p1.bias": (c,)}


def upgrade_legacy(arrays: dict[str, np.ndarray], spec: Spec, source: str = WEIGHTS_FILE) -> dict[str, np.ndarray]:
    """Convert format-1 levels (``p0.*``/``p1.*``) to one perception kernel ``(3, 3, C, 2C)``:
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


def _check_shapes(arrays: dict[str, np.ndarray], exp: dict[str, tuple[int, ...]], spec: Spec, source: str) -> None:
    for k, shape in exp.items():
        if k not in arrays:
            raise ExportFormatError(f"{source} does not match {_what(spec)}: missing {k}")
        if tuple(arrays[k].shape) != shape:
            raise ExportFormatError(f"{source}: {k} has shape {tuple(arrays[k].shape)}, {_what(spec)} expects {shape}")
        if not np.issubdtype(arrays[k].dtype, np.floating) or not np.all(np.isfinite(arrays[k])):
            raise ExportFormatError(f"{source}: {k} must hold finite floats, got dtype {arrays[k].dtype}")


def check_weights(arrays: dict[str, np.ndarray], spec: Spec, source: str = WEIGHTS_FILE) -> int:
    """Raise :class:`ExportFormatError` naming ``source`` unless ``arrays`` (current format)
    fit ``spec``; returns the number of perception filters F."""
    k0 = "level0.perception.kernel"
    if k0 not in arrays or np.ndim(arrays[k0]) != 4:
        raise ExportFormatError(f"{source} does not match {_what(spec)}: missing {k0} (3, 3, C, F) "
                                f"(or level0.p0.kernel in the older layout); re-export the model")
    features = int(arrays[k0].shape[-1])
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
    antialias: triangle stretched by ``factor`` (as ``jax.image.resize(antialias=True)``);
    area: box average of each block.
    """
    m = n // factor
    if method == "area":
        return np.kron(np.eye(m), np.full((1, factor), 1.0 / factor)).astype(np.float32)
    centre = (np.arange(m) + 0.5) * factor - 0.5
    width = float(factor) if method == "antialias" else 1.0
    w = np.maximum(0.0, 1.0 - np.abs(centre[:, None] - np.arange(n)[None, :]) / width)
    return (w / w.sum(axis=1, keepdims=True)).astype(np.float32)


def downscale(images: np.ndarray, factor: int, method: str = "bilinear") -> np.ndarray:
    """Downscale ``(B, H, W, c)`` by an integer factor -> ``(B, H/f, W/f, c)`` float32."""
    if factor == 1:
        return images
    b, h, w, c = images.shape
    if method == "bilinear" and factor % 2 == 0:
        # Samples at (i + 0.5) f - 0.5 fall midway between pixels f*i + f/2 - 1 and f*i + f/2:
        # the mean of the centre 2x2 of each block (computed like the JAX core, same round-off).
        lo = factor // 2 - 1
        blocks = images.reshape(b, h // factor, factor, w // factor, factor, c)
        return blocks[:, :, lo:lo + 2, :, lo:lo + 2, :].mean(axis=(2, 4), dtype=np.float32)
    rows, cols = _resize_matrix(h, factor, method), _resize_matrix(w, factor, method)
    return np.einsum("ih,bhwc,jw->bijc", rows, images, cols, optimize=True).astype(np.float32)


def upsample_nearest(x: np.ndarray, factor: int) -> np.ndarray:
    """``(B, h, w, C) -> (B, h*f, w*f, C)`` by repeating each pixel."""
    if factor == 1:
        return x
    return np.repeat(np.repeat(x, factor, axis=1), factor, axis=2)


# --------------------------------------------------------------------------- one NCA level
class LevelWeights(NamedTuple):
    """One level's weights rearranged for matmuls (C channels, F filters, ``hid`` hidden units)."""

    conv: np.ndarray  # (9C, F): the perception kernel, rows ordered (dh, dw, c_in)
    conv_bias: np.ndarray  # (F,)
    fc0: np.ndarray  # (C + F, hid): rows read [x | conv(x)]
    fc0_bias: np.ndarray  # (hid,)
    fc1: np.ndarray  # (hid, C)


def level_weights(arrays: dict[str, np.ndarray], i: int) -> LevelWeights:
    """Rearrange ``level{i}.*`` arrays of ``weights.npz`` (current format) into :class:`LevelWeights`.

    (Folding the conv bias into fc0's bias would save a pass per step, but moves the logits
    further from the JAX/original round-off: the operation order here is theirs.)
    """
    g = lambda k: np.ascontiguousarray(arrays[f"level{i}.{k}"], dtype=np.float32)  # noqa: E731
    k = g("perception.kernel")
    return LevelWeights(
        conv=np.ascontiguousarray(k.reshape(9 * k.shape[2], k.shape[3])),
        conv_bias=g("perception.bias"),
        fc0=g("fc0.kernel"),
        fc0_bias=g("fc0.bias"),
        fc1=g("fc1.kernel"),
    )


def reflect_border_(xp: np.ndarray) -> None:
    """Refill the 1-pixel border of ``xp (B, H+2, W+2, C)`` from its interior, in place,
    mirroring without repeating the edge (torch/numpy 'reflect')."""
    xp[:, 0] = xp[:, 2]
    xp[:, -1] = xp[:, -3]
    xp[:, :, 0] = xp[:, :, 2]  # after the rows, so the corners come out right too
    xp[:, :, -1] = xp[:, :, -3]


def _chunks(b: int, h: int, w: int, pixels: int) -> list[tuple[int, int, int, int]]:
    """Split ``(B, H, W)`` into ``(b0, b1, r0, r1)`` blocks of at most ~``pixels`` pixels, in
    C order: groups of whole images when they are small, else row bands of one image."""
    if h * w <= pixels:
        g = max(1, pixels // (h * w))
        return [(b0, min(b, b0 + g), 0, h) for b0 in range(0, b, g)]
    rows = max(1, pixels // w)
    return [(i, i + 1, r0, min(h, r0 + rows)) for i in range(b) for r0 in range(0, h, rows)]


def working_bytes_per_pixel(channels: int, features: int, hidden: int) -> int:
    """Bytes per pixel of a chunk's temporaries in :func:`run_level_padded`: the im2col matrix
    (9C), ``[x | conv]`` (C+F), the hidden layer, two delta slots (2C) and the fire draw."""
    return 4 * (9 * channels + channels + features + hidden + 2 * channels) + 8


class PaddedState(NamedTuple):
    """A level's state kept reflect-padded in one flat buffer, so that every 3x3 neighbourhood
    row is a contiguous run of memory.

    ``buf (1 + B*(H+2)*(W+2) + 1, C)``: one slack row at each end; ``xp = buf[1:-1]`` viewed
    as ``(B, H+2, W+2, C)``. Outputs are computed for all ``W+2`` columns of rows ``1..H``
    (flat positions), so the taps of a position ``q`` are at ``q + (dh-1)(W+2) + (dw-1)``;
    the two border columns get meaningless values that are never used.
    """

    buf: np.ndarray
    xp: np.ndarray

    @classmethod
    def empty(cls, b: int, h: int, w: int, c: int) -> "PaddedState":
        """A zero state ``(B, H, W, C)`` (its border is consistent: all zeros)."""
        buf = np.zeros((b * (h + 2) * (w + 2) + 2, c), np.float32)
        return cls(buf, buf[1:-1].reshape(b, h + 2, w + 2, c))

    @classmethod
    def from_state(cls, x: np.ndarray) -> "PaddedState":
        st = cls.empty(*x.shape)
        st.xp[:, 1:-1, 1:-1] = x
        reflect_border_(st.xp)
        return st

    @property
    def inner(self) -> np.ndarray:
        """The state ``(B, H, W, C)`` (a view)."""
        return self.xp[:, 1:-1, 1:-1]


def upsampled_state(coarse: np.ndarray, factor: int, image: np.ndarray, channels: int) -> PaddedState:
    """Nearest-neighbour upsampling of ``coarse (B, h, w, C)`` by ``factor`` written straight
    into a new padded state (no full-size temporary), with ``image (B, h*f, w*f, n_in)`` put
    back into the input channels."""
    b, h, w, _ = image.shape
    st = PaddedState.empty(b, h, w, channels)
    for i in range(factor):
        for j in range(factor):
            st.xp[:, 1 + i:h + 1:factor, 1 + j:w + 1:factor] = coarse
    st.inner[..., :image.shape[-1]] = image
    reflect_border_(st.xp)
    return st


def _chunk_update(lw: LevelWeights, buf: np.ndarray, wp: int, q0: int, n: int, out: np.ndarray,
                  cols_buf: np.ndarray, y_buf: np.ndarray, hid_buf: np.ndarray) -> None:
    """Residual ``fc1(relu(fc0([x | conv(x) + b])))`` at the ``n`` flat positions from ``q0``
    of the padded state (``buf``, row width ``wp = W+2``) into ``out (n, C)``.

    im2col: for each kernel row ``dh`` the three taps ``dw = 0, 1, 2`` of a position are
    ``3C`` consecutive floats of ``buf``, copied through one overlapping strided view.
    """
    c = buf.shape[1]
    cols = cols_buf[:n].reshape(n, 3, 3 * c)
    for dh in range(3):
        s = q0 + (dh - 1) * wp  # buf index of tap (dh, dw=0) = xp index + 1 - 1
        cols[:, dh, :] = np.lib.stride_tricks.as_strided(buf[s:], shape=(n, 3 * c), strides=(buf.strides[0], buf.strides[1]))
    y = y_buf[:n]
    np.matmul(cols_buf[:n], lw.conv, out=y[:, c:])
    y[:, c:] += lw.conv_bias
    y[:, :c] = buf[q0 + 1:q0 + 1 + n]  # the centre tap is x itself
    hid = np.matmul(y, lw.fc0, out=hid_buf[:n])
    hid += lw.fc0_bias
    np.maximum(hid, 0.0, out=hid)
    np.matmul(hid, lw.fc1, out=out)


def run_level_padded(
    lw: LevelWeights, st: PaddedState, image: np.ndarray, steps: int, fire_rate: float,
    rng: Optional[np.random.Generator], masks: Optional[np.ndarray] = None, chunk_pixels: int = CHUNK_PIXELS,
) -> None:
    """``steps`` NCA steps on the padded state ``st`` (``(B, H, W, C)`` inside), in place,
    with ``image (B, H, W, n_in)`` held fixed.

    Fire mask ``u > fire_rate`` with ``u = 1 - rng.random`` uniform in (0, 1], one per cell,
    drawn fresh every step, chunk by chunk in C order: the same numbers as one
    ``rng.random((B, H, W, 1))`` per step. ``masks (steps, B, H, W)`` bool replaces the draw;
    ``fire_rate = 0`` (and no masks) updates every cell and draws nothing.

    Memory: besides the state only two delta slots of one chunk (+2 rows) and the chunk's
    temporaries. A step reads the old state of every neighbour, so the delta of chunk k is
    added only after chunk k+1 has been computed (k+1 reads k's last row, k-1 is not read by
    k+1); the pad columns of a chunk's rows are refreshed when it is written, the pad rows
    at the end of the step.
    """
    b, hp, wp, c = st.xp.shape
    h, w = hp - 2, wp - 2
    n_in = image.shape[-1]
    buf = st.buf
    chunks = _chunks(b, h, wp, chunk_pixels)
    spans = [(b1 - b0) * (r1 - r0 + 2) * wp for b0, b1, r0, r1 in chunks]
    n_max = max(spans)
    cols_buf = np.empty((n_max, 9 * c), np.float32)
    y_buf = np.empty((n_max, c + lw.conv.shape[1]), np.float32)  # [x | conv(x)]
    hid_buf = np.empty((n_max, lw.fc1.shape[0]), np.float32)
    slots = [np.empty((n_max, c), np.float32), np.empty((n_max, c), np.float32)]
    thr = np.float32(fire_rate)

    def write(k: int, step: int) -> None:
        b0, b1, r0, r1 = chunks[k]
        # slot row j <-> xp flat position of (b0, r0, 0) + j: whole rows, the pad rows unused.
        d = slots[k % 2][:spans[k]].reshape(b1 - b0, r1 - r0 + 2, wp, c)[:, 1:-1, 1:-1]
        if masks is not None:
            d *= masks[step, b0:b1, r0:r1, :, None]
        elif fire_rate > 0.0:
            assert rng is not None
            u = 1.0 - rng.random((b1 - b0, r1 - r0, w, 1), dtype=np.float32)
            d *= u > thr
        rows = st.xp[b0:b1, r0 + 1:r1 + 1]
        rows[:, :, 1:-1] += d
        rows[:, :, 1:-1, :n_in] = image[b0:b1, r0:r1]
        rows[:, :, 0] = rows[:, :, 2]
        rows[:, :, -1] = rows[:, :, -3]

    for step in range(steps):
        for k, (b0, b1, r0, r1) in enumerate(chunks):
            q0 = b0 * hp * wp + (r0 + 1) * wp  # flat (xp) position of the chunk's first output
            n = spans[k] - 2 * wp  # spans the pad rows between images: computed, never used
            _chunk_update(lw, buf, wp, q0, n, slots[k % 2][wp:wp + n], cols_buf, y_buf, hid_buf)
            if k:
                write(k - 1, step)
        write(len(chunks) - 1, step)
        st.xp[:, 0] = st.xp[:, 2]
        st.xp[:, -1] = st.xp[:, -3]


def run_level(
    lw: LevelWeights, x: np.ndarray, image: np.ndarray, steps: int, fire_rate: float,
    rng: Optional[np.random.Generator], masks: Optional[np.ndarray] = None, chunk_pixels: int = CHUNK_PIXELS,
) -> np.ndarray:
    """``steps`` NCA steps on ``x (B, H, W, C)`` with ``image (B, H, W, n_in)`` held fixed
    -> the new state (a copy). See :func:`run_level_padded` for the masks and the draws."""
    st = PaddedState.from_state(np.asarray(x, np.float32))
    run_level_padded(lw, st, image, steps, fire_rate, rng, _check_masks(masks, steps, image.shape[:3], 0),
                     chunk_pixels)
    return np.ascontiguousarray(st.inner)


def _check_masks(m: Any, steps: int, shape: tuple[int, ...], level: int) -> Optional[np.ndarray]:
    if m is None:
        return None
    m = np.asarray(m)
    want = (steps,) + tuple(shape)
    if m.dtype != np.bool_ or m.shape != want:
        raise InputError(f"masks[{level}] must be a bool array (steps, B, h, w) = {want}, got {m.dtype} {m.shape}")
    return m


def forward(
    levels: Sequence[LevelWeights], spec: Spec, images: np.ndarray, fire_rate: float,
    rng: Optional[np.random.Generator], masks: Optional[Sequence[np.ndarray]] = None,
    chunk_pixels: int = CHUNK_PIXELS,
) -> np.ndarray:
    """Multi-level inference: ``images (B, H, W, n_in)`` float32 -> logits ``(B, H, W, n_out)``.

    ``masks``: optional explicit fire masks, one bool array ``(steps_i, B, h_i, w_i)`` per
    level (``h_i = H / scales[i]``), used instead of drawing (``fire_rate``/``rng`` unused).
    ``chunk_pixels`` bounds the per-step temporaries (see :func:`run_level_padded`).
    """
    if masks is not None and len(masks) != spec.n_levels:
        raise InputError(f"masks must hold one array per level ({spec.n_levels}), got {len(masks)}")
    st: Optional[PaddedState] = None
    for i, lw in enumerate(levels):
        img = downscale(images, spec.scales[i], spec.downscale)
        if st is None:
            st = PaddedState.empty(*img.shape[:3], spec.channels)
            st.inner[..., :spec.n_in] = img
            reflect_border_(st.xp)
        else:
            st = upsampled_state(st.inner, spec.scales[i - 1] // spec.scales[i], img, spec.channels)
        m = None if masks is None else _check_masks(masks[i], spec.steps[i], img.shape[:3], i)
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

    labels: np.ndarray  # (B, H, W) uint8, from the mean probability
    probability: np.ndarray  # (B, H, W, n_out) mean sigmoid over the runs
    variance: np.ndarray  # (B, H, W, n_out) variance of the sigmoid over the runs (ddof 1)
    nqm: float  # sum of per-pixel std (ddof 1) / sum of mean probability (M3D-NCA quality metric)
    logits: Optional[np.ndarray]  # (N, B, H, W, n_out) every run's logits if return_logits


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
        self.spec = spec
        self.levels = [level_weights(arrays, i) for i in range(spec.n_levels)]
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
        """-> ``(B, H, W, n_in)`` float32 and whether the input was a single 2D slice."""
        s = self.spec
        a = np.asarray(images)
        if a.ndim == 2 and s.n_in == 1:
            a, single = a[None, :, :, None], True
        elif a.ndim == 3 and s.n_in == 1:
            a, single = a[..., None], False
        elif a.ndim == 4 and a.shape[-1] == s.n_in:
            single = False
        else:
            want = "(H, W), (B, H, W) or (B, H, W, 1)" if s.n_in == 1 else f"(B, H, W, {s.n_in})"
            raise InputError(f"images must have shape {want} (n_in={s.n_in}), got rank {a.ndim} shape {a.shape}")
        if not np.issubdtype(a.dtype, np.number):
            raise InputError(f"images must be numeric, got dtype {a.dtype}")
        f = s.scales[0]
        if a.shape[1] % f or a.shape[2] % f or a.shape[0] == 0:
            raise InputError(f"image size {a.shape[1]}x{a.shape[2]} (batch {a.shape[0]}) must be non-empty and "
                             f"divisible by the coarsest scale {f}")
        a = np.ascontiguousarray(a, np.float32)
        if not np.all(np.isfinite(a)):
            raise InputError("images contain NaN or inf values")
        return a, single

    def logits(self, images: Any, seed: Optional[int] = None, fire_rate: Optional[float] = None,
               masks: Optional[Sequence[np.ndarray]] = None, max_memory_mb: Optional[float] = None) -> np.ndarray:
        """One inference run: ``(B, H, W, n_in)`` (or see :meth:`segment`) -> ``(B, H, W, n_out)``.
        ``masks``: explicit fire masks, one bool ``(steps_i, B, h_i, w_i)`` per level."""
        x, _ = self._as_batch(images)
        rate = self._fire_rate(fire_rate)
        return self._run(x, rate, np.random.default_rng(seed), masks, max_memory_mb)

    def _fire_rate(self, fire_rate: Optional[float]) -> float:
        rate = self.spec.fire_rate if fire_rate is None else float(fire_rate)
        if not 0.0 <= rate < 1.0:
            raise InputError(f"fire_rate must be in [0, 1), got {rate}")
        return rate

    def plan(self, shape: Sequence[int], max_memory_mb: Optional[float] = None) -> tuple[int, int]:
        """``(slices per group, chunk pixels)`` for a batch ``(B, H, W, ...)`` within
        ``max_memory_mb`` MiB of peak memory (None: this model's default, else unbounded:
        groups of ``BATCH_PIXELS`` pixels, ``CHUNK_PIXELS`` per chunk).

        The budget covers the interpreter and numpy (``BASE_MB``), the input and output
        arrays, the finest level's padded state plus the next-coarser one (both live while
        upsampling) and the chunk temporaries; the chunk gets what is left, at most
        ``CHUNK_PIXELS`` (larger chunks are not faster) and at least one padded row. Groups
        shrink only when the default one does not fit: a group's fire masks are drawn together,
        so a smaller group changes the draws (fire 0 and explicit masks stay identical).
        """
        budget = self.max_memory_mb if max_memory_mb is None else max_memory_mb
        b, h, w = int(shape[0]), int(shape[1]), int(shape[2])
        per = max(1, BATCH_PIXELS // (h * w))
        if budget is None:
            return min(per, b), CHUNK_PIXELS
        s = self.spec
        per_px = working_bytes_per_pixel(s.channels, self.features, s.hidden)
        io = b * h * w * 4 * (s.n_in + 2 * s.n_out)  # input, output, one group's logits

        def state(g: int) -> int:  # padded states of the two finest levels for g slices
            fine = g * (h + 2) * (w + 2) * s.channels * 4
            if s.n_levels < 2:
                return fine
            f = s.scales[-2]
            return fine + g * (h // f + 2) * (w // f + 2) * s.channels * 4 + g * h * w * 4 * s.n_in

        free = float(budget) * 2 ** 20 - BASE_MB * 2 ** 20 - io
        row = (w + 2) * per_px * 3  # the smallest chunk: one row (+ the two halo rows of a slot)
        g = min(per, b)
        while g > 1 and state(g) + row > free:
            g = max(1, g // 2)
        if state(g) + row > free:
            need = (BASE_MB * 2 ** 20 + io + state(1) + row) / 2 ** 20
            raise InputError(f"max_memory_mb={budget:g} is too small for {h}x{w} slices with C={s.channels}: the "
                             f"state alone needs {state(1) / 2 ** 20:.0f} MiB; allow at least {need:.0f} MiB")
        chunk = int((free - state(g)) // per_px) - 2 * (w + 2)
        return g, max(w + 2, min(CHUNK_PIXELS, chunk))

    def _run(self, x: np.ndarray, rate: float, rng: np.random.Generator,
             masks: Optional[Sequence[np.ndarray]] = None, max_memory_mb: Optional[float] = None) -> np.ndarray:
        # Bounded groups of slices keep memory flat for whole volumes; the output is filled in
        # place (no list of pieces + concatenate, which would hold the logits twice).
        per, chunk = self.plan(x.shape, max_memory_mb)
        s = self.spec
        if masks is not None:
            if len(masks) != s.n_levels:
                raise InputError(f"masks must hold one array per level ({s.n_levels}), got {len(masks)}")
            masks = [np.asarray(m) for m in masks]
            for i, m in enumerate(masks):
                _check_masks(m, s.steps[i], (len(x), x.shape[1] // s.scales[i], x.shape[2] // s.scales[i]), i)
        out = np.empty(x.shape[:3] + (s.n_out,), np.float32)
        for i in range(0, len(x), per):
            m = None if masks is None else [a[:, i:i + per] for a in masks]
            out[i:i + per] = forward(self.levels, s, x[i:i + per], rate, rng, m, chunk)
        return out

    def segment(
        self, images: Any, seed: Optional[int] = None, fire_rate: Optional[float] = None, runs: int = 1,
        return_logits: bool = False, max_memory_mb: Optional[float] = None,
    ) -> "np.ndarray | Uncertainty":
        """Segment preprocessed slices.

        Args:
            images: ``(H, W)``, ``(B, H, W)`` or ``(B, H, W, n_in)`` preprocessed slices.
            seed: seeds the fire masks (numpy Generator); None draws fresh entropy.
            fire_rate: defaults to the config's; 0 is deterministic.
            runs: N > 1 runs N times and returns an :class:`Uncertainty`.
            return_logits: for runs == 1 return logits instead of labels.
            max_memory_mb: bound on the peak memory (MiB, whole process) that picks the group
                and chunk sizes (:meth:`plan`); results are identical whatever it is.

        Returns:
            runs == 1: labels ``(B, H, W)`` uint8, or logits ``(B, H, W, n_out)`` float32
            (without the leading B for a 2D input); runs > 1: :class:`Uncertainty`.
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
