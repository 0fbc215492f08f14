"""Med-NCA inference as a PyTorch ``nn.Module`` (exported as ``mednca_torch.py``).

Written by ``python -m mednca_jax.export to-torch`` next to ``config.json`` and one state
dict per level (``model0.pth``, ``model1.pth``, ...). Imports only torch, NumPy and the
standard library. Each step runs in chunks of cells updating the state in place, so memory is
the state plus a fixed working set (``max_memory_mb`` shrinks it).

**The rule as data.** ``config.json`` holds one rule description per level,
``rules[i]`` (the dict of ``mednca_jax.nca.rule.Rule.describe()``: ``perception``,
``kernel_size``, ``update``, ``norm``, ``channels``, ``hidden``, ``n_in``, ``ndim``,
``features``, ``linear``). This module interprets it; what it runs:

- any *linear* perception (``linear: true``: learned, sobel, depthwise, ...) as one
  reflect-padded convolution ``C -> F`` with the exported dense filters, any odd kernel
  size ``k`` (padding ``k // 2``), spatial rank 2 or 3 (``Conv2d`` / ``Conv3d``);
- the update ``mlp``: ``d = fc1(relu(norm(fc0([x | perception(x)]))))``, fc1 without bias,
  norm ``none`` or ``batch`` (the mean and biased variance of the current batch over batch
  and space, eps 1e-5, learned ``bn.weight`` / ``bn.bias``, no running statistics:
  ``torch.nn.functional.batch_norm(training=True)`` without running stats, at inference too);
- then ``x = x + d * mask`` (``mask = u > fire_rate``) and the input channels reset to the image.

It computes in float32 whatever the description's ``precision`` (bfloat16 matmul inputs in
training only round less here).

Anything else (a non-linear perception, another update or norm) is refused when the level is
built, with a :class:`RuleError` naming the level and what it cannot interpret. Folders
without descriptions (older exports) are read as the original rule: 2D, 3x3, ``mlp``
without norm (``model.update`` / ``model.norm`` / ``model.kernel_size`` of the config when
present).

State dicts: the original Med-NCA layout (``p0.weight (C, C, 3, 3)``, ``p0.bias``,
``p1.weight``, ``p1.bias``, ``fc0.weight (hidden, 3C)``, ``fc0.bias``, ``fc1.weight (C,
hidden)``) for the original rule, or this module's: ``perception.weight (F, C, k, k[, k])``,
``perception.bias (F,)``, ``fc0.weight (hidden, C + F)``, ``fc0.bias``, ``fc1.weight``, and
``bn.weight`` / ``bn.bias (hidden,)`` when norm is ``batch``. The original M3D-NCA's state
dicts (one depthwise ``p0.weight (C, 1, k, k, k)``, ``p0.bias``, ``fc0``, ``bn``, ``fc1``)
are read too, for 3D levels (:func:`check_state_dict`).

**Axis order.** The state is kept as ``(B, C, S1, ..., S_{n-1}, S0)``: the channel axis
swapped with the first spatial axis of the channels-last ``(B, S0, ..., C)``
(``transpose(1, ndim + 1)``). In 2D that is the original Med-NCA's ``(B, C, W, H)`` (width
before height), so the original kernels apply unchanged: a weight ``[o, i, a, b]`` has ``a``
along W and ``b`` along H. In 3D it is ``(B, C, Y, Z, X)`` for a volume ``(X, Y, Z)``, and a
weight ``[o, i, a, b, c]`` has ``a`` along Y, ``b`` along Z, ``c`` along X, the original
M3D-NCA's ``transpose(1, 4)``, so its kernels apply unchanged too. Images, masks
and outputs at the module's boundary are channels-last in image order.

Usage::

    from mednca_torch import MedNCATorch
    model = MedNCATorch.load("DIR")
    logits = model.predict(images, seed=0)     # (B, *S, n_in) -> (B, *S, n_out), inference mode
    labels = model.segment(images, seed=0)     # S | (B, *S) | (B, *S, n_in) -> uint8 labels
    scripted = torch.jit.script(model)         # forward(images, fire_rate, seed, masks, chunk_pixels) is TorchScript

One level alone, from arrays in the JAX export layout: :func:`rollout_level`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, NamedTuple, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

CONFIG_FILE = "config.json"
# Cells per chunk of a step: bounds the temporaries (~20 MiB for C=32, hidden 128).
CHUNK_PIXELS = 8192
BASE_MB = 250  # peak RSS of the interpreter with torch imported, measured ~250 MiB (the floor of max_memory_mb)
DOWNSCALE_METHODS = ("bilinear", "area", "antialias", "max")
UPDATES = ("mlp",)  # the updates this runtime interprets
NORMS = ("none", "batch")
RANKS = (2, 3)
LINEAR_PERCEPTIONS = ("learned", "sobel", "depthwise")  # linear when a description does not say
BN_EPS = 1e-5


class ExportFormatError(ValueError):
    """The runtime folder (config.json / model*.pth) is missing, malformed or inconsistent."""


class RuleError(ExportFormatError):
    """A level's rule description names something this runtime cannot interpret."""


class InputError(ValueError):
    """An image handed to the runtime has the wrong rank, shape or values."""


class LevelSpec(NamedTuple):
    """What :class:`NCALevel` needs of a rule description (``features`` 0: not given)."""

    channels: int
    hidden: int
    features: int
    kernel_size: int
    ndim: int
    norm: str


def interpret_rule(rule: Any, level: int = 0, source: str = "rule") -> LevelSpec:
    """Check a level's rule description (``Rule.describe()``) and return what this runtime runs.

    Raises :class:`RuleError` ("cannot interpret") naming ``source``, the level and the
    perception, update, norm, kernel size or rank it does not run; :class:`ExportFormatError`
    when the description is not a dict or lacks ``channels`` / ``hidden``.
    """
    where = f"{source}: level {level}"
    if not isinstance(rule, dict):
        raise ExportFormatError(f"{where}: the rule description must be a dict, got {type(rule).__name__}")
    perception = str(rule.get("perception", "learned"))
    linear = rule.get("linear")
    if linear is None:  # descriptions always say; a hand-written one may not
        linear = perception in LINEAR_PERCEPTIONS
    if not linear:
        raise RuleError(f"{where}: cannot interpret perception {perception!r}: it is not linear, and this runtime runs a "
                        "perception only as one convolution with its exported filters")
    update = str(rule.get("update", "mlp"))
    if update not in UPDATES:
        raise RuleError(f"{where}: cannot interpret update {update!r}: this runtime runs only {list(UPDATES)} "
                        "(fc1(relu(norm(fc0(y)))))")
    norm = str(rule.get("norm", "none"))
    if norm not in NORMS:
        raise RuleError(f"{where}: cannot interpret norm {norm!r} of update {update!r}: this runtime runs {list(NORMS)}")
    try:
        k, nd = int(rule.get("kernel_size", 3)), int(rule.get("ndim", 2))
        channels, hidden, features = int(rule["channels"]), int(rule["hidden"]), int(rule.get("features", 0))
    except KeyError as e:
        raise ExportFormatError(f"{where}: the rule description lacks {e.args[0]!r}") from None
    except (TypeError, ValueError) as e:
        raise ExportFormatError(f"{where}: malformed rule description ({e})") from None
    if k < 1 or k % 2 == 0:
        raise RuleError(f"{where}: cannot interpret kernel_size {k} of perception {perception!r}: it must be odd")
    if nd not in RANKS:
        raise RuleError(f"{where}: cannot interpret spatial rank {nd} (ndim): this runtime runs ranks {list(RANKS)}")
    return LevelSpec(channels, hidden, features, k, nd, norm)


# --------------------------------------------------------------------------- one level
class NCALevel(nn.Module):
    """One NCA level: ``x + fc1(relu(norm(fc0([x | perception(x)])))) * mask``.

    ``perception`` is one reflect-padded ``k x k (x k)`` conv ``C -> F`` (the original's
    p0/p1 side by side, F = 2C, or any linear perception's dense filters); fc1 has no bias;
    ``bn`` (norm ``batch`` only) holds the affine parameters of the batch normalisation. The
    state is ``(B, C, S1, ..., S0)`` (module docstring, "Axis order").

    Two ways to run it, one computation (:meth:`hidden_pre`, :meth:`finish`):
    :meth:`step` maps a whole state to the next one out of place (autograd flows through it);
    :meth:`run` updates a padded state in place in bounded chunks (inference).
    """

    def __init__(self, channels: int, hidden: int, features: int = 0, kernel_size: int = 3, ndim: int = 2,
                 norm: str = "none"):
        super().__init__()
        if kernel_size < 1 or kernel_size % 2 == 0 or ndim not in RANKS or norm not in NORMS:
            raise RuleError(f"cannot interpret kernel_size={kernel_size}, ndim={ndim}, norm={norm!r}: odd kernels, "
                            f"ranks {list(RANKS)} and norms {list(NORMS)} only")
        features = features or 2 * channels
        self.channels = channels
        self.hidden = hidden
        self.features = features
        self.kernel_size = kernel_size
        self.radius = kernel_size // 2
        self.ndim = ndim
        self.norm = norm
        self.fc0 = nn.Linear(channels + features, hidden)
        self.fc1 = nn.Linear(hidden, channels, bias=False)
        conv = nn.Conv2d if ndim == 2 else nn.Conv3d
        self.perception = conv(channels, features, kernel_size)  # padded by the caller (reflect)
        # Only the affine parameters (keys bn.weight, bn.bias): the statistics are always the batch's.
        self.bn = nn.BatchNorm1d(hidden, eps=BN_EPS, track_running_stats=False) if norm == "batch" else None

    @classmethod
    def from_rule(cls, rule: Dict[str, Any], level: int = 0, source: str = "rule") -> "NCALevel":
        """An (untrained) level for a rule description; :class:`RuleError` if it cannot run it."""
        s = interpret_rule(rule, level, source)
        return cls(s.channels, s.hidden, s.features, s.kernel_size, s.ndim, s.norm)

    def load_arrays(self, weights: Dict[str, Any], natural: bool = False, source: str = "weights") -> "NCALevel":
        """Copy a level's arrays in the JAX export layout (keys without the ``level{i}.``
        prefix, see :func:`state_dict_from_arrays`) into this module; returns it."""
        self.load_state_dict(check_state_dict(state_dict_from_arrays(weights, self.ndim, natural, source), self, source))
        return self

    # ------------------------------------------------------------------ the computation
    def _pointwise(self, y: Tensor, w: Tensor, b: Optional[Tensor]) -> Tensor:
        # A per-cell Linear as a 1x1 conv: the channels-first block needs no layout change.
        if self.ndim == 2:
            return F.conv2d(y, w.reshape(w.shape[0], w.shape[1], 1, 1), b)
        return F.conv3d(y, w.reshape(w.shape[0], w.shape[1], 1, 1, 1), b)

    def hidden_pre(self, xp: Tensor) -> Tensor:
        """``fc0([x | perception(x)])`` of the interior of a reflect-padded block
        ``xp (b, C, *(s + 2r))`` -> ``(b, hidden, *s)``, ``r = k // 2``."""
        conv = self.perception(xp)
        y = torch.cat([_interior(xp, self.radius, 2), conv], 1)
        return self._pointwise(y, self.fc0.weight, self.fc0.bias)

    def statistics(self, h: Tensor) -> Tuple[Tensor, Tensor]:
        """Mean and biased variance ``(hidden,)`` of ``h (b, hidden, *s)`` over batch and space."""
        var, mean = torch.var_mean(h, [0] + [d for d in range(2, h.dim())], unbiased=False)
        return mean, var

    def finish(self, h: Tensor, mean: Tensor, var: Tensor) -> Tensor:
        """``fc1(relu(norm(h)))`` ``(b, hidden, *s) -> (b, C, *s)``; ``mean``/``var`` are the
        batch statistics of norm ``batch`` (ignored without norm)."""
        if self.bn is not None:
            shape = [1, -1] + [1] * (h.dim() - 2)
            scale = torch.rsqrt(var + self.bn.eps) * self.bn.weight  # eps = BN_EPS
            h = (h - mean.reshape(shape)) * scale.reshape(shape) + self.bn.bias.reshape(shape)
        return self._pointwise(F.relu(h), self.fc1.weight, None)

    def residual(self, xp: Tensor) -> Tensor:
        """The residual ``d (b, C, *s)`` of a reflect-padded block ``xp (b, C, *(s + 2r))``,
        batch statistics (norm ``batch``) over this block."""
        h = self.hidden_pre(xp)
        mean, var = torch.zeros(0), torch.zeros(0)
        if self.bn is not None:
            mean, var = self.statistics(h)
        return self.finish(h, mean, var)

    def update(self, x: Tensor) -> Tensor:
        """Residual of a whole state ``(B, C, *S') -> (B, C, *S')`` (reflect padding k // 2)."""
        r = self.radius
        return self.residual(F.pad(x, [r] * (2 * self.ndim), mode="reflect") if r > 0 else x)

    def step(self, x: Tensor, image: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        """One step of a whole state, out of place (differentiable): ``x (B, C, *S')``,
        ``image (B, n_in, *S')``, ``mask (B, *S')`` bool or float (None: every cell fires)."""
        d = self.update(x)
        if mask is not None:
            d = d * mask.unsqueeze(1).to(d.dtype)
        n_in = image.shape[1]
        return torch.cat([image, (x + d)[:, n_in:]], 1)

    def _step_statistics(self, xp: Tensor, chunks: List[Tuple[int, int, int, int]]) -> Tuple[Tensor, Tensor]:
        """Batch statistics of one step over all chunks (a first pass): chunks' mean and
        variance merged in float64 (Chan et al.'s pairwise update), so no chunk's large mean
        cancels another's small variance."""
        r = self.radius
        n = 0.0
        mean = torch.zeros(self.hidden, dtype=torch.float64, device=xp.device)
        m2 = torch.zeros(self.hidden, dtype=torch.float64, device=xp.device)
        for c in range(len(chunks)):
            b0, b1, r0, r1 = chunks[c]
            h = self.hidden_pre(xp[b0:b1, :, r0:r1 + 2 * r])
            m, v = self.statistics(h)
            cnt = float(h.numel() // h.shape[1])
            delta = m.double() - mean
            tot = n + cnt
            mean = mean + delta * (cnt / tot)
            m2 = m2 + v.double() * cnt + delta * delta * (n * cnt / tot)
            n = tot
        return mean.to(xp.dtype), (m2 / n).to(xp.dtype)

    def run(self, xp: Tensor, img: Tensor, steps: int, rate: float, gen: torch.Generator,
            masks: Optional[Tensor], chunk_pixels: int) -> None:
        """``steps`` NCA steps on the reflect-padded state ``xp (B, C, *(S' + 2r))``, in place.

        Chunks of cells (bands along the state's first spatial axis, dim 2, or groups of
        images) keep the temporaries bounded. A step reads the old state of all neighbours, so
        chunk k's delta is added only after chunk k+1 is computed (bands but the last hold at
        least r rows, so no chunk reads further back); the pads of the other spatial axes are
        refreshed per written chunk, those of dim 2 per step. Norm ``batch`` takes one pass
        for the step's statistics first (none when one chunk holds everything). Fire masks
        ``u > rate``, ``u = 1 - rand`` drawn per chunk in C order (the same numbers as one
        ``rand((B, 1, *S'))`` per step), or ``masks (steps, B, *S')`` bool in the state's
        axis order when given. ``img (B, n_in, *S')``.
        """
        r = self.radius
        b = xp.shape[0]
        n_in = img.shape[1]
        inner = [xp.shape[d] - 2 * r for d in range(2, xp.dim())]
        rest = inner[1:]
        per_row = 1
        for s in rest:
            per_row *= s
        chunks = _chunks(b, inner[0], per_row, chunk_pixels, r)
        two_pass = self.bn is not None and len(chunks) > 1
        for step in range(steps):
            mean, var = torch.zeros(0), torch.zeros(0)
            if two_pass:
                mean, var = self._step_statistics(xp, chunks)
            pending = torch.zeros(0)
            for k in range(len(chunks) + 1):
                d = torch.zeros(0)
                if k < len(chunks):
                    b0, b1, r0, r1 = chunks[k]
                    h = self.hidden_pre(xp[b0:b1, :, r0:r1 + 2 * r])
                    if self.bn is not None and not two_pass:
                        mean, var = self.statistics(h)
                    d = self.finish(h, mean, var)
                if k > 0:
                    b0, b1, r0, r1 = chunks[k - 1]
                    if masks is not None:
                        pending = pending * masks[step, b0:b1, r0:r1].unsqueeze(1).to(pending.dtype)
                    elif rate > 0.0:
                        u = 1.0 - torch.rand([b1 - b0, 1, r1 - r0] + rest, generator=gen, dtype=xp.dtype, device=xp.device)
                        pending = pending * (u > rate).to(xp.dtype)
                    band = xp[b0:b1, :, r0 + r:r1 + r]
                    cells = _interior(band, r, 3)
                    cells.add_(pending)
                    cells[:, :n_in] = img[b0:b1, :, r0:r1]
                    _reflect_pads_(band, r, 3, band.dim())
                pending = d
            _reflect_pads_(xp, r, 2, 3)


def _interior(t: Tensor, r: int, first: int) -> Tensor:
    """The view of ``t`` without ``r`` cells at both ends of every dim from ``first`` on."""
    for d in range(first, t.dim()):
        t = t.narrow(d, r, t.shape[d] - 2 * r)
    return t


def _reflect_pads_(t: Tensor, r: int, first: int, last: int) -> None:
    """Refill the ``r``-cell pads of dims ``first .. last - 1`` of ``t`` from its interior
    (reflect: the edge not repeated), one dim after the other over the whole extent of the
    others, so the corners come out as torch's reflect padding makes them."""
    for d in range(first, last):
        n = t.shape[d]
        for q in range(r):
            t.narrow(d, r - 1 - q, 1).copy_(t.narrow(d, r + 1 + q, 1))
            t.narrow(d, n - r + q, 1).copy_(t.narrow(d, n - r - 2 - q, 1))


def _chunks(b: int, rows: int, width: int, pixels: int, min_rows: int = 1) -> List[Tuple[int, int, int, int]]:
    """``(b0, b1, r0, r1)`` blocks of at most ~``pixels`` cells in C order over ``(B, rows,
    width)``: groups of whole images when small, else bands of at least ``min_rows`` rows
    (along the state's dim 2) of one image."""
    out: List[Tuple[int, int, int, int]] = []
    if rows * width <= pixels:
        g = max(1, pixels // (rows * width))
        for b0 in range(0, b, g):
            out.append((b0, min(b, b0 + g), 0, rows))
    else:
        n = max(1, min_rows, pixels // width)
        for i in range(b):
            for r0 in range(0, rows, n):
                out.append((i, i + 1, r0, min(rows, r0 + n)))
    return out


def working_bytes_per_pixel(channels: int, features: int, hidden: int) -> int:
    """Bytes per cell of a chunk's temporaries: conv output, ``[x | conv]``, hidden, two deltas."""
    return 4 * (2 * features + channels + hidden + 3 * channels) + 8


# --------------------------------------------------------------------------- layouts
def to_state_layout(a: Tensor) -> Tensor:
    """Channels-last ``(B, S0, ..., S_{n-1}, c)`` <-> the state's ``(B, c, S1, ..., S0)``
    (a view; the same swap converts back)."""
    return a.transpose(1, a.dim() - 1)


def masks_to_state_layout(m: Tensor) -> Tensor:
    """Masks ``(steps, B, S0, ..., S_{n-1})`` -> ``(steps, B, S1, ..., S0)`` (a view)."""
    return m.movedim(2, m.dim() - 1)


def kernel_to_torch(kernel: Tensor, natural: bool = False) -> Tensor:
    """A JAX kernel ``(k0, ..., k_{n-1}, C, F)`` over ``(S0, ..., S_{n-1})`` -> a torch conv
    weight ``(F, C, ...)`` over the state's spatial order ``(S1, ..., S_{n-1}, S0)``, or over
    ``(S0, ..., S_{n-1})`` when ``natural`` (for a caller keeping ``(B, C, S0, ...)``)."""
    nd = kernel.dim() - 2
    spatial = list(range(nd)) if natural else list(range(1, nd)) + [0]
    return kernel.permute([nd + 1, nd] + spatial)


def state_dict_from_arrays(weights: Dict[str, Any], ndim: int, natural: bool = False,
                           source: str = "weights") -> Dict[str, Tensor]:
    """A level's arrays in the JAX export layout -> this module's state dict.

    ``weights``: ``perception.kernel (k,)*ndim + (C, F)``, ``perception.bias (F,)``,
    ``fc0.kernel (C + F, hidden)``, ``fc0.bias (hidden,)``, ``fc1.kernel (hidden, C)``, and
    ``bn.scale`` / ``bn.bias (hidden,)`` for norm ``batch`` (NumPy arrays or tensors).
    """
    need = ("perception.kernel", "perception.bias", "fc0.kernel", "fc0.bias", "fc1.kernel")
    missing = [k for k in need if k not in weights]
    if missing:
        raise ExportFormatError(f"{source}: missing {missing} (keys {sorted(weights)})")
    t = lambda k: torch.from_numpy(np.array(weights[k], np.float32))  # a copy: the source may be read-only  # noqa: E731
    kernel = t("perception.kernel")
    if kernel.dim() != ndim + 2:
        raise ExportFormatError(f"{source}: perception.kernel has shape {tuple(kernel.shape)}, expected rank {ndim + 2} "
                                f"(k,)*{ndim} + (C, F)")
    sd = {"perception.weight": kernel_to_torch(kernel, natural).contiguous(), "perception.bias": t("perception.bias"),
          "fc0.weight": t("fc0.kernel").T.contiguous(), "fc0.bias": t("fc0.bias"), "fc1.weight": t("fc1.kernel").T.contiguous()}
    if "bn.scale" in weights or "bn.bias" in weights:
        sd["bn.weight"], sd["bn.bias"] = t("bn.scale"), t("bn.bias")
    return sd


def rollout_level(weights: Dict[str, Any], rule: Dict[str, Any], x: np.ndarray, image: np.ndarray, masks: np.ndarray,
                  chunk_pixels: int = CHUNK_PIXELS) -> np.ndarray:
    """Run one level with this runtime's own step and return its final state.

    ``weights``: the level's arrays in the JAX export layout without the ``level{i}.`` prefix
    (:func:`state_dict_from_arrays`); ``rule``: its description (``Rule.describe()``);
    ``x (B, *S, C)`` float32 channels-last, ``image (B, *S, n_in)``, ``masks (steps, B, *S)``
    bool (True: the cell updates). As the JAX rollout, the image is written into the input
    channels before the first step and after every step. Returns ``(B, *S, C)`` float32.
    ``chunk_pixels`` bounds the chunks of :meth:`NCALevel.run`; the result does not depend
    on it. Raises :class:`RuleError` for a rule this runtime cannot interpret.
    """
    level = NCALevel.from_rule(rule).load_arrays(weights)
    # copies: the caller's arrays may be read-only (e.g. views of JAX arrays), and torch shares memory with NumPy
    x, image, masks = np.array(x, np.float32), np.array(image, np.float32), np.array(masks, bool)
    nd, r = level.ndim, level.radius
    if x.ndim != nd + 2 or image.shape[:-1] != x.shape[:-1] or masks.shape[1:] != x.shape[:-1]:
        raise InputError(f"expected x (B, *S, C) with {nd} spatial axes, image (B, *S, n_in), masks (steps, B, *S); "
                         f"got {x.shape}, {image.shape}, {masks.shape}")
    with torch.no_grad():
        state = to_state_layout(torch.from_numpy(x))
        img = to_state_layout(torch.from_numpy(image)).contiguous()
        xp = F.pad(state, [r] * (2 * nd), mode="reflect").contiguous() if r > 0 else state.contiguous()
        _interior(xp, r, 2)[:, :img.shape[1]] = img
        _reflect_pads_(xp, r, 2, xp.dim())
        m = masks_to_state_layout(torch.from_numpy(masks)).contiguous()
        level.run(xp, img, int(masks.shape[0]), 0.0, torch.Generator(), m, chunk_pixels)
        return to_state_layout(_interior(xp, r, 2)).contiguous().numpy()


# --------------------------------------------------------------------------- resampling
def _resize_weights(n: int, factor: int, method: str) -> Tensor:
    """Row-normalised downscale weights ``(n // factor, n)``, half-pixel centres.

    bilinear: triangle of width 1 (no anti-aliasing); antialias: triangle stretched by
    ``factor``; area: box average of each block.
    """
    m = n // factor
    src = torch.arange(n, dtype=torch.float64)
    if method == "area":
        w = ((src.floor() // factor).unsqueeze(0) == torch.arange(m, dtype=torch.float64).unsqueeze(1)).double()
    else:
        centre = (torch.arange(m, dtype=torch.float64) + 0.5) * factor - 0.5
        width = float(factor) if method == "antialias" else 1.0
        w = torch.clamp(1.0 - (centre.unsqueeze(1) - src.unsqueeze(0)).abs() / width, min=0.0)
    return (w / w.sum(1, keepdim=True)).float()


def downscale(x: Tensor, factor: int, method: str) -> Tensor:
    """Downscale ``(B, c, *S)`` by an integer factor along every spatial axis (the original's
    linear resize for ``bilinear``: for even factors the mean of the centre 2x2(x2) of each
    block; ``max``: the maximum of each block)."""
    if factor == 1:
        return x
    nd = x.dim() - 2
    if method == "max" or (method == "bilinear" and factor % 2 == 0):
        shape = [x.shape[0], x.shape[1]]
        for d in range(2, x.dim()):
            shape += [x.shape[d] // factor, factor]
        blocks = x.reshape(shape)
        dims = [3 + 2 * a for a in range(nd)]
        if method == "max":
            return blocks.amax(dim=dims)
        for d in dims:
            blocks = blocks.narrow(d, factor // 2 - 1, 2)
        return blocks.mean(dim=dims)
    out = x
    for d in range(2, x.dim()):
        w = _resize_weights(x.shape[d], factor, method).to(x.dtype)
        out = torch.matmul(out.movedim(d, -1), w.t()).movedim(-1, d)
    return out


def upsample_nearest(x: Tensor, factor: int) -> Tensor:
    """``(B, C, *s) -> (B, C, *(s * f))`` by repeating cells."""
    for d in range(2, x.dim() if factor > 1 else 2):
        x = x.repeat_interleave(factor, dim=d)
    return x


class Uncertainty(NamedTuple):
    """Result of ``segment(..., runs=N)`` with N > 1."""

    labels: Tensor  # (B, *S) uint8 from the mean probability
    probability: Tensor  # (B, *S, n_out)
    variance: Tensor  # (B, *S, n_out), unbiased (ddof 1)
    nqm: float  # sum of per-pixel std (ddof 1) / sum of mean probability
    logits: Optional[Tensor]  # (N, B, *S, n_out) if return_logits


# --------------------------------------------------------------------------- the model
def _legacy_rule(m: Dict[str, Any], ndim: int, level: int) -> Dict[str, Any]:
    """The description of a level in a folder written before descriptions (the model section)."""
    k = m.get("kernel_size", 3)
    if isinstance(k, list):
        k = k[level if len(k) > 1 else 0] if k else 3
    return {"perception": m.get("perception", "learned"), "kernel_size": k, "update": m.get("update", "mlp"),
            "norm": m.get("norm", "none"), "channels": m["channels"], "hidden": m["hidden"], "ndim": ndim}


class MedNCATorch(nn.Module):
    """Full multi-level Med-NCA inference; ``levels[i]`` runs at ``1 / scales[i]`` resolution.

    ``rules``: one rule description per level (None: the original rule, 2D 3x3 ``mlp``);
    every level must have the same spatial rank.
    """

    def __init__(
        self, channels: int, hidden: int, n_in: int, n_out: int, steps: List[int], scales: List[int],
        fire_rate: float = 0.5, downscale: str = "bilinear", rules: Optional[List[Dict[str, Any]]] = None,
    ):
        super().__init__()
        if len(steps) != len(scales) or scales[-1] != 1:
            raise ValueError(f"need one step count per level and a last scale of 1, got steps {steps} scales {scales}")
        if downscale not in DOWNSCALE_METHODS:
            raise ValueError(f"downscale must be one of {DOWNSCALE_METHODS}, got {downscale!r}")
        if rules is None:
            rules = [{"channels": channels, "hidden": hidden} for _ in steps]
        if len(rules) != len(steps):
            raise ValueError(f"need one rule per level ({len(steps)}), got {len(rules)}")
        levels = [NCALevel.from_rule(r, i) for i, r in enumerate(rules)]
        ranks = sorted({lv.ndim for lv in levels})
        if len(ranks) != 1 or any(lv.channels != channels for lv in levels):
            raise ValueError(f"every level needs the model's {channels} channels and one spatial rank, got ranks {ranks}")
        self.channels = channels
        self.n_in = n_in
        self.n_out = n_out
        self.ndim = ranks[0]
        self.steps: List[int] = [int(s) for s in steps]
        self.scales: List[int] = [int(s) for s in scales]
        self.fire_rate = float(fire_rate)
        self.downscale = downscale
        self.levels = nn.ModuleList(levels)

    def forward(self, images: Tensor, fire_rate: Optional[float] = None, seed: Optional[int] = None,
                masks: Optional[List[Tensor]] = None, chunk_pixels: int = CHUNK_PIXELS) -> Tensor:
        """``images (B, *S, n_in)`` float32 -> logits ``(B, *S, n_out)``.

        ``fire_rate`` defaults to the config's (0: deterministic, every cell updates). Fire
        masks ``u > fire_rate``, ``u`` uniform in (0, 1], come from a ``torch.Generator``
        seeded with ``seed`` (fresh entropy when None), unless ``masks`` gives them: one bool
        tensor ``(steps_i, B, *S_i)`` per level (image orientation, ``S_i = S / scales[i]``).
        ``chunk_pixels`` bounds the per-step temporaries; the result does not depend on it.
        """
        rate = self.fire_rate if fire_rate is None else fire_rate
        gen = torch.Generator(device=images.device)
        if seed is None:
            gen.seed()
        else:
            gen.manual_seed(seed)
        if masks is not None and len(masks) != len(self.levels):
            raise ValueError("masks must hold one bool tensor (steps, B, *S) per level")
        nd = self.ndim
        with torch.no_grad():  # the state is updated in place: no autograd graph
            full = to_state_layout(images)  # (B, n_in, S1, ..., S0), the original's layout in 2D
            xp = torch.zeros(0)
            prev_r = 0
            for i, level in enumerate(self.levels):
                r = level.radius
                img = downscale(full, self.scales[i], self.downscale).contiguous()
                b = img.shape[0]
                size = [img.shape[d] for d in range(2, img.dim())]
                fresh = torch.zeros([b, self.channels] + [s + 2 * r for s in size], dtype=img.dtype, device=img.device)
                cells = _interior(fresh, r, 2)
                if i > 0:
                    f = self.scales[i - 1] // self.scales[i]
                    coarse = _interior(xp, prev_r, 2)
                    # Nearest upsampling straight into the new state (no full-size temporary).
                    if nd == 2:
                        for a in range(f):
                            for e in range(f):
                                cells[:, :, a::f, e::f] = coarse
                    else:
                        for a in range(f):
                            for e in range(f):
                                for g in range(f):
                                    cells[:, :, a::f, e::f, g::f] = coarse
                xp = fresh
                cells[:, :self.n_in] = img
                _reflect_pads_(xp, r, 2, xp.dim())
                m: Optional[Tensor] = None
                if masks is not None:
                    m = masks[i]
                    want = [self.steps[i], b] + [size[-1]] + size[:-1]  # image order of the state's size
                    if m.dtype != torch.bool or list(m.shape) != want:
                        raise ValueError(f"masks[{i}] must be a bool tensor (steps, B, *S_i) = {want}, "
                                         f"got {m.dtype} {list(m.shape)}")
                    m = masks_to_state_layout(m)
                level.run(xp, img, self.steps[i], rate, gen, m, chunk_pixels)
                prev_r = r
            out = _interior(xp, prev_r, 2)[:, self.n_in:self.n_in + self.n_out]
            return to_state_layout(out).contiguous()

    def plan(self, shape: List[int], max_memory_mb: Optional[float]) -> int:
        """Chunk size (cells) for a batch ``(B, *S, ...)`` within ``max_memory_mb`` MiB of
        peak memory (None: ``CHUNK_PIXELS``): what is left after ``BASE_MB``, the input and
        output and the two finest padded states, at most ``CHUNK_PIXELS``, at least one band."""
        if max_memory_mb is None:
            return CHUNK_PIXELS
        nd = self.ndim
        b, size = int(shape[0]), [int(s) for s in shape[1:1 + nd]]
        lv = self.levels[-1]
        per_px = working_bytes_per_pixel(self.channels, lv.features, lv.hidden)
        if lv.bn is not None:
            per_px += 4 * lv.hidden  # the statistics pass holds a hidden block of its own
        cells, padded = 1, 1
        for s in size:
            cells *= s
            padded *= s + 2 * lv.radius
        state = b * padded * self.channels * 4
        if len(self.scales) > 1:
            f = self.scales[-2]
            coarse = 1
            for s in size:
                coarse *= s // f + 2 * self.levels[-2].radius
            state += b * coarse * self.channels * 4
        free = max_memory_mb * 2 ** 20 - BASE_MB * 2 ** 20 - b * cells * 4 * (self.n_in + 2 * self.n_out) - state
        row = max(1, lv.radius) * (padded // (size[1] + 2 * lv.radius)) * per_px  # a band of the state's dim 2
        if free < row:
            need = (BASE_MB * 2 ** 20 + max_memory_mb * 2 ** 20 - free + row) / 2 ** 20
            raise InputError(f"max_memory_mb={max_memory_mb:g} is too small for {b} slice(s) of "
                             f"{'x'.join(map(str, size))} with C={self.channels}: allow at least {need:.0f} MiB")
        return max(row // per_px, min(CHUNK_PIXELS, int(free // per_px)))

    # ------------------------------------------------------------------ Python-only helpers
    @classmethod
    def from_config(cls, cfg: dict, source: str = CONFIG_FILE) -> "MedNCATorch":
        """Build an (untrained) module from the exporter's config dict (sections model/data,
        and ``rules[i]`` when present); :class:`RuleError` for a level it cannot run."""
        m = cfg.get("model") if isinstance(cfg, dict) else None
        if not isinstance(m, dict):
            raise ExportFormatError(f"{source}: expected a 'model' section with the NCA settings")
        if m.get("kind", "nca") != "nca":
            raise ExportFormatError(f"{source}: model.kind is {m.get('kind')!r}; only 'nca' models can run here")
        try:
            steps = [int(s) for s in m["steps"]]
            data = cfg.get("data") if isinstance(cfg.get("data"), dict) else {}
            ndim = len(data.get("image_size", (0, 0)))
            described = cfg.get("rules")
            if isinstance(described, list) and described:
                if len(described) != len(steps):
                    raise ExportFormatError(f"{source}: {len(described)} rule descriptions for {len(steps)} levels")
                rules = list(described)
            else:
                rules = [_legacy_rule(m, ndim, i) for i in range(len(steps))]
            for i, r in enumerate(rules):
                interpret_rule(r, i, source)  # the naming error before anything else
            return cls(int(m["channels"]), int(m["hidden"]), int(m["n_in"]), int(m["n_out"]), steps,
                       [int(s) for s in m["scales"]], float(m["fire_rate"]), str(m.get("downscale", "bilinear")), rules)
        except KeyError as e:
            raise ExportFormatError(f"{source}: missing key model.{e.args[0]}") from None
        except ExportFormatError:
            raise
        except (TypeError, ValueError) as e:
            raise ExportFormatError(f"{source}: malformed model settings ({e})") from None

    @classmethod
    def load(cls, directory: "str | Path") -> "MedNCATorch":
        """Read ``DIR/config.json`` and ``DIR/model{i}.pth`` (one state dict per level)."""
        d = Path(directory)
        cfg_path = d / CONFIG_FILE
        if not cfg_path.is_file():
            raise ExportFormatError(f"{cfg_path} is missing: expected the model config written by the exporter")
        try:
            cfg = json.loads(cfg_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ExportFormatError(f"{cfg_path} is not valid JSON: {e}") from None
        model = cls.from_config(cfg, str(cfg_path))
        described = isinstance(cfg.get("rules"), list) and bool(cfg["rules"])
        for i, level in enumerate(list(model.levels)):
            path = d / f"model{i}.pth"
            if not path.is_file():
                raise ExportFormatError(f"{path} is missing: expected the state dict of level {i} of {len(model.levels)}")
            try:
                sd = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as e:  # pickle/zip errors come in many types
                raise ExportFormatError(f"{path} is not a readable state dict: {e}") from None
            pw = sd.get("perception.weight") if isinstance(sd, dict) else None
            if not described and isinstance(pw, Tensor) and pw.dim() == level.ndim + 2 and int(pw.shape[0]) != level.features:
                # Older folders do not say F: a fixed filter bank's is its state dict's.
                level = NCALevel(level.channels, level.hidden, int(pw.shape[0]), level.kernel_size, level.ndim, level.norm)
                model.levels[i] = level
            level.load_state_dict(check_state_dict(sd, level, str(path)))
        return model.eval()

    def predict(self, images: Tensor, fire_rate: Optional[float] = None, seed: Optional[int] = None,
                masks: Optional[List[Tensor]] = None, max_memory_mb: Optional[float] = None) -> Tensor:
        """:meth:`forward` under ``torch.inference_mode()``, with chunks sized by :meth:`plan`."""
        with torch.inference_mode():
            return self.forward(images, fire_rate, seed, masks, self.plan(list(images.shape), max_memory_mb))

    def _as_batch(self, images: Any) -> tuple[Tensor, bool]:
        a = torch.as_tensor(images)
        nd = self.ndim
        if a.dim() == nd and self.n_in == 1:
            a, single = a[None, ..., None], True
        elif a.dim() == nd + 1 and self.n_in == 1:
            a, single = a[..., None], False
        elif a.dim() == nd + 2 and a.shape[-1] == self.n_in:
            single = False
        else:
            s = ", ".join("HW"[j] if nd == 2 else "XYZ"[j] for j in range(nd))
            want = f"({s}), (B, {s}) or (B, {s}, 1)" if self.n_in == 1 else f"(B, {s}, {self.n_in})"
            raise InputError(f"images must have shape {want} (n_in={self.n_in}), got rank {a.dim()} shape {tuple(a.shape)}")
        f = self.scales[0]
        size = list(a.shape[1:1 + nd])
        if any(s % f for s in size) or a.shape[0] == 0:
            raise InputError(f"image size {'x'.join(map(str, size))} (batch {a.shape[0]}) must be non-empty and "
                             f"divisible by the coarsest scale {f}")
        a = a.to(torch.float32).contiguous()
        if not bool(torch.isfinite(a).all()):
            raise InputError("images contain NaN or inf values")
        return a, single

    def segment(
        self, images: Any, seed: Optional[int] = None, fire_rate: Optional[float] = None, runs: int = 1,
        return_logits: bool = False, max_memory_mb: Optional[float] = None,
    ) -> "Tensor | Uncertainty":
        """Segment preprocessed slices or volumes (same contract as the NumPy runtime's ``segment``).

        runs == 1: labels ``(B, *S)`` uint8 or logits ``(B, *S, n_out)`` (no B for an input
        without one); runs > 1: :class:`Uncertainty` with mean probability, variance and NQM.
        With a seed, run ``k`` uses seed ``seed + k``.
        """
        x, single = self._as_batch(images)
        rate = self.fire_rate if fire_rate is None else float(fire_rate)
        if not 0.0 <= rate < 1.0:
            raise InputError(f"fire_rate must be in [0, 1), got {rate}")
        if int(runs) < 1:
            raise InputError(f"runs must be >= 1, got {runs}")
        sq = (lambda t: t[0]) if single else (lambda t: t)  # noqa: E731
        with torch.inference_mode():
            chunk = self.plan(list(x.shape), max_memory_mb)
            zs = [self.forward(x, rate, None if seed is None else seed + k, None, chunk) for k in range(int(runs))]
            if runs == 1:
                return sq(zs[0]) if return_logits else sq(_labels(torch.sigmoid(zs[0])))
            z = torch.stack(zs)
            p = torch.sigmoid(z).double()  # identical runs then give exactly zero variance
            mean, var = p.mean(0), p.var(0, unbiased=True)  # ddof 1, as torch.std in the original
            total = float(mean.sum())
            nqm = float(var.sqrt().sum()) / total if total > 0 else 0.0
            return Uncertainty(sq(_labels(mean)), sq(mean.float()), sq(var.float()), nqm,
                               (z[:, 0] if single else z) if return_logits else None)


def _labels(p: Tensor) -> Tensor:
    """``(..., n_out)`` probabilities -> uint8 labels (``p > 0.5``; several channels:
    ``1 + argmax`` where the largest exceeds 0.5, else 0)."""
    if p.shape[-1] == 1:
        return (p[..., 0] > 0.5).to(torch.uint8)
    best = p.argmax(-1) + 1
    return torch.where(p.amax(-1) > 0.5, best, torch.zeros_like(best)).to(torch.uint8)


def check_state_dict(sd: Any, level: NCALevel, source: str) -> dict:
    """Check a level's state dict and return it in this module's layout.

    Accepted: this module's layout (``perception.weight (F, C, k, k[, k])``, ``perception.bias
    (F,)``, ``fc0.weight (hidden, C + F)``, ``fc0.bias``, ``fc1.weight``, ``bn.weight``/``bn.bias``
    with norm ``batch``); the original Med-NCA layout (``p0.*``, ``p1.*``, ``fc0.weight (hidden,
    3C)``..., converted: ``perception = cat([p0, p1])``) for a 2D 3x3 level with F = 2C and
    no norm; and the original M3D-NCA layout (one depthwise ``p0.weight (C, 1, k, k, k)``,
    ``p0.bias``, ``fc0.weight (hidden, 2C)``, ``bn.*``, ``fc1.weight``; converted to the dense
    kernel) for a 3D level with F = C. Raises :class:`ExportFormatError` naming ``source`` on
    missing/unexpected keys or shapes.
    """
    if not isinstance(sd, dict):
        raise ExportFormatError(f"{source}: expected a state dict (dict of tensors), got {type(sd).__name__}")
    c, h, f, k = level.channels, level.hidden, level.features, level.kernel_size
    window = (k,) * level.ndim
    layout = "ours"
    if "p0.weight" in sd or "p1.weight" in sd:
        layout = "m3d" if level.ndim == 3 else "med"
    bn = {"bn.weight": (h,), "bn.bias": (h,)} if level.bn is not None else {}
    if layout == "med":
        if level.ndim != 2 or k != 3 or f != 2 * c or level.bn is not None:
            raise ExportFormatError(f"{source}: p0/p1 weights (the original layout) need a 2D 3x3 level with F = 2C and "
                                    f"no norm; this level is {level.ndim}D, kernel {k}, F = {f}, norm {level.norm!r}")
        exp = {"fc0.weight": (h, 3 * c), "fc0.bias": (h,), "fc1.weight": (c, h), "p0.weight": (c, c, 3, 3),
               "p0.bias": (c,), "p1.weight": (c, c, 3, 3), "p1.bias": (c,)}
    elif layout == "m3d":
        if f != c:
            raise ExportFormatError(f"{source}: a depthwise p0.weight (the original M3D-NCA layout) needs F = C; "
                                    f"this level has F = {f}")
        exp = {"p0.weight": (c, 1) + window, "p0.bias": (c,), "fc0.weight": (h, 2 * c), "fc0.bias": (h,),
               "fc1.weight": (c, h), **bn}
    else:
        exp = {"perception.weight": (f, c) + window, "perception.bias": (f,), "fc0.weight": (h, c + f), "fc0.bias": (h,),
               "fc1.weight": (c, h), **bn}
    missing, extra = sorted(set(exp) - set(sd)), sorted(set(sd) - set(exp))
    what = f"config.json (channels={c}, hidden={h})"
    if missing or extra:
        raise ExportFormatError(f"{source} does not match {what}: missing {missing or 'nothing'}, "
                                f"unexpected {extra or 'nothing'}")
    for key, shape in exp.items():
        if not isinstance(sd[key], Tensor) or tuple(sd[key].shape) != shape:
            got = tuple(sd[key].shape) if isinstance(sd[key], Tensor) else type(sd[key]).__name__
            raise ExportFormatError(f"{source}: {key} has shape {got}, {what} expects {shape}")
    if layout == "ours":
        return dict(sd)
    out = {key: sd[key] for key in ("fc0.weight", "fc0.bias", "fc1.weight", *bn)}
    if layout == "m3d":  # feature j reads channel j only: the dense kernel is diagonal in (F, C)
        dense = torch.zeros((c, c) + window, dtype=sd["p0.weight"].dtype)
        idx = torch.arange(c)
        dense[idx, idx] = sd["p0.weight"][:, 0]
        out.update({"perception.weight": dense, "perception.bias": sd["p0.bias"]})
    else:
        out.update({"perception.weight": torch.cat([sd["p0.weight"], sd["p1.weight"]], 0),
                    "perception.bias": torch.cat([sd["p0.bias"], sd["p1.bias"]], 0)})
    return out
