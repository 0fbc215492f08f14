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

What it computes (channels-last states ``(B, H, W, C)``): level ``i`` runs on the image
downscaled by ``scales[i]``; each step is ``x += fc1(relu(fc0([x | p0(x) | p1(x)]))) * mask``
with 3x3 reflect-padded convs ``p0``/``p1`` and ``mask = u > fire_rate`` drawn per cell and
step, after which the input channels are reset to the image; between levels the state is
upsampled by nearest neighbour. Logits are channels ``[n_in, n_in + n_out)`` of the final state.
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


def expected_shapes(spec: Spec) -> dict[str, tuple[int, ...]]:
    """Keys and shapes of ``weights.npz`` (the training layout, channels-last)."""
    c, h = spec.channels, spec.hidden
    shapes: dict[str, tuple[int, ...]] = {}
    for i in range(spec.n_levels):
        shapes.update({
            f"level{i}.p0.kernel": (3, 3, c, c), f"level{i}.p0.bias": (c,),
            f"level{i}.p1.kernel": (3, 3, c, c), f"level{i}.p1.bias": (c,),
            f"level{i}.fc0.kernel": (3 * c, h), f"level{i}.fc0.bias": (h,),
            f"level{i}.fc1.kernel": (h, c),
        })
    return shapes


def check_weights(arrays: dict[str, np.ndarray], spec: Spec, source: str = WEIGHTS_FILE) -> None:
    """Raise :class:`ExportFormatError` naming ``source`` unless ``arrays`` fit ``spec``."""
    exp = expected_shapes(spec)
    missing, extra = sorted(set(exp) - set(arrays)), sorted(set(arrays) - set(exp))
    what = f"config.json (channels={spec.channels}, hidden={spec.hidden}, {spec.n_levels} levels)"
    if missing or extra:
        raise ExportFormatError(
            f"{source} does not match {what}: missing {missing or 'nothing'}, unexpected {extra or 'nothing'}")
    for k, shape in exp.items():
        if tuple(arrays[k].shape) != shape:
            raise ExportFormatError(f"{source}: {k} has shape {tuple(arrays[k].shape)}, {what} expects {shape}")
        if not np.issubdtype(arrays[k].dtype, np.floating) or not np.all(np.isfinite(arrays[k])):
            raise ExportFormatError(f"{source}: {k} must hold finite floats, got dtype {arrays[k].dtype}")


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
    """One level's weights rearranged for matmuls (C channels, ``hid`` hidden units)."""

    conv: np.ndarray  # (9C, 2C): p0 and p1 side by side, rows ordered (dh, dw, c_in)
    conv_bias: np.ndarray  # (2C,)
    fc0: np.ndarray  # (3C, hid): rows read [x | p0(x) | p1(x)]
    fc0_bias: np.ndarray  # (hid,)
    fc1: np.ndarray  # (hid, C)


def level_weights(arrays: dict[str, np.ndarray], i: int) -> LevelWeights:
    """Rearrange ``level{i}.*`` arrays of ``weights.npz`` into :class:`LevelWeights`.

    (Folding the conv biases into fc0's bias would save a pass per step, but moves the logits
    further from the JAX/original round-off: the operation order here is theirs.)
    """
    g = lambda k: np.ascontiguousarray(arrays[f"level{i}.{k}"], dtype=np.float32)  # noqa: E731
    c = g("p0.kernel").shape[-1]
    conv = np.concatenate([g("p0.kernel"), g("p1.kernel")], axis=-1).reshape(9 * c, 2 * c)
    return LevelWeights(
        conv=np.ascontiguousarray(conv),
        conv_bias=np.concatenate([g("p0.bias"), g("p1.bias")]),
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
    """Split ``(B, H, W)`` into ``(b0, b1, r0, r1)`` blocks of at most ~``pixels`` pixels:
    groups of whole images when they are small, else row bands of one image."""
    if h * w <= pixels:
        g = max(1, pixels // (h * w))
        return [(b0, min(b, b0 + g), 0, h) for b0 in range(0, b, g)]
    rows = max(1, pixels // w)
    return [(i, i + 1, r0, min(h, r0 + rows)) for i in range(b) for r0 in range(0, h, rows)]


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
    def from_state(cls, x: np.ndarray) -> "PaddedState":
        b, h, w, c = x.shape
        buf = np.zeros((b * (h + 2) * (w + 2) + 2, c), np.float32)
        xp = buf[1:-1].reshape(b, h + 2, w + 2, c)
        xp[:, 1:-1, 1:-1] = x
        reflect_border_(xp)
        return cls(buf, xp)


def nca_update(lw: LevelWeights, st: PaddedState, delta: np.ndarray, chunk_pixels: int = CHUNK_PIXELS) -> None:
    """Residual ``fc1(relu(fc0([x | p0(x) | p1(x)])))`` of the padded state into ``delta``
    (flat ``(B*(H+2)*(W+2), C)``, same positions as ``st.xp``), chunk by chunk.

    im2col: for each kernel row ``dh`` the three taps ``dw = 0, 1, 2`` of a position are
    ``3C`` consecutive floats of ``st.buf``, copied through one overlapping strided view;
    then one matmul does both convs.
    """
    b, hp, wp, c = st.xp.shape
    h = hp - 2
    buf = st.buf
    step = buf.strides[0]
    chunks = []
    for b0, b1, r0, r1 in _chunks(b, h, wp, chunk_pixels):
        q0 = b0 * hp * wp + (r0 + 1) * wp  # flat (xp) position of the chunk's first output
        q1 = (b1 - 1) * hp * wp + (r1 + 1) * wp  # spans the pad rows between images: unused
        chunks.append((q0, q1 - q0))
    n_max = max(n for _, n in chunks)
    cols_buf = np.empty((n_max, 9 * c), np.float32)
    y_buf = np.empty((n_max, 3 * c), np.float32)  # [x | p0(x) | p1(x)]
    hid_buf = np.empty((n_max, lw.fc1.shape[0]), np.float32)
    for q0, n in chunks:
        cols = cols_buf[:n].reshape(n, 3, 3 * c)
        for dh in range(3):
            s = q0 + (dh - 1) * wp  # buf index of tap (dh, dw=0) = xp index + 1 - 1
            cols[:, dh, :] = np.lib.stride_tricks.as_strided(buf[s:], shape=(n, 3 * c), strides=(step, buf.strides[1]))
        y = y_buf[:n]
        np.matmul(cols_buf[:n], lw.conv, out=y[:, c:])
        y[:, c:] += lw.conv_bias
        y[:, :c] = buf[q0 + 1:q0 + 1 + n]  # the centre tap is x itself
        hid = np.matmul(y, lw.fc0, out=hid_buf[:n])
        hid += lw.fc0_bias
        np.maximum(hid, 0.0, out=hid)
        np.matmul(hid, lw.fc1, out=delta[q0:q0 + n])


def run_level(
    lw: LevelWeights, x: np.ndarray, image: np.ndarray, steps: int, fire_rate: float,
    rng: Optional[np.random.Generator],
) -> np.ndarray:
    """``steps`` NCA steps on ``x (B, H, W, C)`` with ``image (B, H, W, n_in)`` held fixed.

    The fire mask is ``u > fire_rate`` with ``u`` uniform in (0, 1], one per cell, drawn
    fresh every step; ``fire_rate = 0`` updates every cell and draws nothing.
    """
    b, h, w, c = x.shape
    n_in = image.shape[-1]
    st = PaddedState.from_state(x)
    inner = st.xp[:, 1:-1, 1:-1]
    delta = np.zeros((b * (h + 2) * (w + 2), c), np.float32)
    d_inner = delta.reshape(b, h + 2, w + 2, c)[:, 1:-1, 1:-1]
    for _ in range(steps):
        nca_update(lw, st, delta)
        if fire_rate > 0.0:
            assert rng is not None
            u = 1.0 - rng.random((b, h, w, 1), dtype=np.float32)
            d_inner *= u > np.float32(fire_rate)
        inner += d_inner
        inner[..., :n_in] = image
        reflect_border_(st.xp)
    return np.ascontiguousarray(inner)


def forward(
    levels: Sequence[LevelWeights], spec: Spec, images: np.ndarray, fire_rate: float,
    rng: Optional[np.random.Generator],
) -> np.ndarray:
    """Multi-level inference: ``images (B, H, W, n_in)`` float32 -> logits ``(B, H, W, n_out)``."""
    x = None
    for i, lw in enumerate(levels):
        img = downscale(images, spec.scales[i], spec.downscale)
        if x is None:
            b, h, w, _ = img.shape
            x = np.zeros((b, h, w, spec.channels), np.float32)
        else:
            x = upsample_nearest(x, spec.scales[i - 1] // spec.scales[i])
        x[..., :spec.n_in] = img
        x = run_level(lw, x, img, spec.steps[i], fire_rate, rng)
    assert x is not None
    return np.ascontiguousarray(x[..., spec.n_in:spec.n_in + spec.n_out])


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
    code and ``mednca_jax.quality.nqm``.
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

    def __init__(self, arrays: dict[str, np.ndarray], spec: Spec, source: str = WEIGHTS_FILE):
        check_weights(arrays, spec, source)
        self.spec = spec
        self.levels = [level_weights(arrays, i) for i in range(spec.n_levels)]

    @classmethod
    def load(cls, directory: "str | Path") -> "MedNCA":
        """Read ``DIR/config.json`` and ``DIR/weights.npz`` (written by the exporter)."""
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
                                    f"(keys like level0.p0.kernel), written by the exporter")
        try:
            with np.load(w_path, allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
        except Exception as e:  # zip/npy errors come in many types
            raise ExportFormatError(f"{w_path} is not a readable .npz file: {e}") from None
        return cls(arrays, spec, str(w_path))

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

    def logits(self, images: Any, seed: Optional[int] = None, fire_rate: Optional[float] = None) -> np.ndarray:
        """One inference run: ``(B, H, W, n_in)`` (or see :meth:`segment`) -> ``(B, H, W, n_out)``."""
        x, _ = self._as_batch(images)
        rate = self._fire_rate(fire_rate)
        return self._run(x, rate, np.random.default_rng(seed))

    def _fire_rate(self, fire_rate: Optional[float]) -> float:
        rate = self.spec.fire_rate if fire_rate is None else float(fire_rate)
        if not 0.0 <= rate < 1.0:
            raise InputError(f"fire_rate must be in [0, 1), got {rate}")
        return rate

    def _run(self, x: np.ndarray, rate: float, rng: np.random.Generator) -> np.ndarray:
        # Bounded groups of slices keep memory flat for whole volumes.
        per = max(1, BATCH_PIXELS // (x.shape[1] * x.shape[2]))
        outs = [forward(self.levels, self.spec, x[i:i + per], rate, rng) for i in range(0, len(x), per)]
        return outs[0] if len(outs) == 1 else np.concatenate(outs)

    def segment(
        self, images: Any, seed: Optional[int] = None, fire_rate: Optional[float] = None, runs: int = 1,
        return_logits: bool = False,
    ) -> "np.ndarray | Uncertainty":
        """Segment preprocessed slices.

        Args:
            images: ``(H, W)``, ``(B, H, W)`` or ``(B, H, W, n_in)`` preprocessed slices.
            seed: seeds the fire masks (numpy Generator); None draws fresh entropy.
            fire_rate: defaults to the config's; 0 is deterministic.
            runs: N > 1 runs N times and returns an :class:`Uncertainty`.
            return_logits: for runs == 1 return logits instead of labels.

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
            z = self._run(x, rate, rng)
            return sq(z) if return_logits else sq(labels_from_probability(sigmoid(z)))
        all_logits = np.stack([self._run(x, rate, rng) for _ in range(int(runs))])
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
    return p


def _is_nifti(path: str) -> bool:
    return path.endswith(".nii") or path.endswith(".nii.gz")


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parser().parse_args(argv)
    try:
        model = MedNCA.load(args.model_dir)
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
