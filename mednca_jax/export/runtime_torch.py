"""Med-NCA inference as a PyTorch ``nn.Module`` (exported as ``mednca_torch.py``).

Written by ``python -m mednca_jax.export to-torch`` next to ``config.json`` and one state
dict per level (``model0.pth``, ``model1.pth``, ...) in the original Med-NCA layout: keys
``p0.weight (C, C, 3, 3)``, ``p0.bias``, ``p1.weight``, ``p1.bias``, ``fc0.weight (hidden, 3C)``,
``fc0.bias``, ``fc1.weight (C, hidden)`` (or, for other perceptions, ``perception.weight (F, C, 3,
3)``, ``perception.bias (F,)``, ``fc0.weight (hidden, C + F)``...). Imports only torch and the
standard library. Each step runs in chunks of cells updating the state in place, so memory is
the state plus a fixed working set (``max_memory_mb`` shrinks it).

Usage::

    from mednca_torch import MedNCATorch
    model = MedNCATorch.load("DIR")
    logits = model.predict(images, seed=0)     # (B, H, W, n_in) -> (B, H, W, n_out), inference mode
    labels = model.segment(images, seed=0)     # (H, W) | (B, H, W) | (B, H, W, n_in) -> uint8 labels
    scripted = torch.jit.script(model)         # forward(images, fire_rate, seed, masks, chunk_pixels) is TorchScript

Like the original, the state is kept as ``(B, C, W, H)`` (width before height), so the
original kernels apply unchanged: a weight ``[o, i, a, b]`` has ``a`` along W and ``b`` along H.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, List, NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

CONFIG_FILE = "config.json"
# Cells per chunk of a step: bounds the temporaries (~20 MiB for C=32, hidden 128).
CHUNK_PIXELS = 8192
BASE_MB = 250  # peak RSS of the interpreter with torch imported, measured ~250 MiB (the floor of max_memory_mb)
DOWNSCALE_METHODS = ("bilinear", "area", "antialias")


class ExportFormatError(ValueError):
    """The runtime folder (config.json / model*.pth) is missing, malformed or inconsistent."""


class InputError(ValueError):
    """An image handed to the runtime has the wrong rank, shape or values."""


class NCALevel(nn.Module):
    """One NCA: ``x + fc1(relu(fc0([x | perception(x)]))) * mask``; ``perception`` is one 3x3
    reflect-padded conv ``C -> F`` (the original's p0/p1 side by side, F = 2C, or a fixed
    filter bank); fc1 has no bias. Loads the original state dicts (p0/p1) too."""

    def __init__(self, channels: int, hidden: int, features: int = 0):
        super().__init__()
        features = features or 2 * channels
        self.channels = channels
        self.hidden = hidden
        self.features = features
        self.fc0 = nn.Linear(channels + features, hidden)
        self.fc1 = nn.Linear(hidden, channels, bias=False)
        self.perception = nn.Conv2d(channels, features, 3)  # padded by the caller (reflect)

    def residual(self, xp: Tensor) -> Tensor:
        """``fc1(relu(fc0([x | conv(x)])))`` of the interior of a reflect-padded block
        ``xp (b, C, w+2, h+2)`` -> ``(b, C, w, h)``; the MLP as 1x1 convs (no layout change)."""
        c, h, f = self.channels, self.hidden, self.features
        conv = self.perception(xp)
        y = torch.cat([xp[:, :, 1:-1, 1:-1], conv], 1)
        hid = F.relu(F.conv2d(y, self.fc0.weight.reshape(h, c + f, 1, 1), self.fc0.bias))
        return F.conv2d(hid, self.fc1.weight.reshape(c, h, 1, 1))

    def update(self, x: Tensor) -> Tensor:
        """Residual of a whole state ``(B, C, W, H) -> (B, C, W, H)``."""
        return self.residual(F.pad(x, (1, 1, 1, 1), mode="reflect"))

    def run(self, xp: Tensor, img: Tensor, steps: int, rate: float, gen: torch.Generator,
            masks: Optional[Tensor], chunk_pixels: int) -> None:
        """``steps`` NCA steps on the reflect-padded state ``xp (B, C, W+2, H+2)``, in place.

        Chunks of cells (row bands along W, or groups of images) keep the temporaries bounded.
        A step reads the old state of all neighbours, so chunk k's delta is added only after
        chunk k+1 is computed; pad columns are refreshed per written chunk, pad rows per step.
        Fire masks ``u > rate``, ``u = 1 - rand`` drawn per chunk in C order (the same numbers as
        one ``rand((B, 1, W, H))`` per step), or ``masks (steps, B, H, W)`` bool when given.
        """
        b, c, wp, hp = xp.shape
        n_in = img.shape[1]
        chunks = _chunks(b, wp - 2, hp, chunk_pixels)
        pending = torch.zeros(0)
        for step in range(steps):
            for k in range(len(chunks) + 1):
                d = torch.zeros(0)
                if k < len(chunks):
                    b0, b1, r0, r1 = chunks[k]
                    d = self.residual(xp[b0:b1, :, r0:r1 + 2])
                if k > 0:
                    b0, b1, r0, r1 = chunks[k - 1]
                    if masks is not None:
                        m = masks[step, b0:b1, :, r0:r1].transpose(1, 2).unsqueeze(1)
                        pending = pending * m.to(pending.dtype)
                    elif rate > 0.0:
                        u = 1.0 - torch.rand((b1 - b0, 1, r1 - r0, hp - 2), generator=gen, dtype=xp.dtype, device=xp.device)
                        pending = pending * (u > rate).to(xp.dtype)
                    rows = xp[b0:b1, :, r0 + 1:r1 + 1]
                    rows[:, :, :, 1:-1] += pending
                    rows[:, :n_in, :, 1:-1] = img[b0:b1, :, r0:r1]
                    rows[:, :, :, 0] = rows[:, :, :, 2]
                    rows[:, :, :, -1] = rows[:, :, :, -3]
                pending = d
            xp[:, :, 0] = xp[:, :, 2]
            xp[:, :, -1] = xp[:, :, -3]


def _chunks(b: int, rows: int, width: int, pixels: int) -> List[Tuple[int, int, int, int]]:
    """``(b0, b1, r0, r1)`` blocks of at most ~``pixels`` cells in C order over ``(B, rows, width)``:
    groups of whole images when small, else bands of rows (along W, the state's dim 2) of one image."""
    out: List[Tuple[int, int, int, int]] = []
    if rows * width <= pixels:
        g = max(1, pixels // (rows * width))
        for b0 in range(0, b, g):
            out.append((b0, min(b, b0 + g), 0, rows))
    else:
        n = max(1, pixels // width)
        for i in range(b):
            for r0 in range(0, rows, n):
                out.append((i, i + 1, r0, min(rows, r0 + n)))
    return out


def working_bytes_per_pixel(channels: int, features: int, hidden: int) -> int:
    """Bytes per cell of a chunk's temporaries: conv output, ``[x | conv]``, hidden, two deltas."""
    return 4 * (2 * features + channels + hidden + 3 * channels) + 8


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
    """Downscale ``(B, c, W, H)`` by an integer factor (the original's linear resize for
    ``bilinear``: for even factors the mean of the centre 2x2 of each block)."""
    if factor == 1:
        return x
    b, c, w, h = x.shape
    if method == "bilinear" and factor % 2 == 0:
        lo = factor // 2 - 1
        blocks = x.reshape(b, c, w // factor, factor, h // factor, factor)
        return blocks[:, :, :, lo:lo + 2, :, lo:lo + 2].mean(dim=(3, 5))
    ww = _resize_weights(w, factor, method).to(x.dtype)
    wh = _resize_weights(h, factor, method).to(x.dtype)
    return torch.einsum("iw,bcwh,jh->bcij", ww, x, wh)


def upsample_nearest(x: Tensor, factor: int) -> Tensor:
    """``(B, C, w, h) -> (B, C, w*f, h*f)`` by repeating pixels."""
    if factor == 1:
        return x
    return x.repeat_interleave(factor, dim=2).repeat_interleave(factor, dim=3)


def _reflect_border_(xp: Tensor) -> None:
    """Refill the 1-cell border of ``xp (B, C, W+2, H+2)`` from its interior (reflect, the
    edge not repeated), rows first so the corners come out right."""
    xp[:, :, 0] = xp[:, :, 2]
    xp[:, :, -1] = xp[:, :, -3]
    xp[:, :, :, 0] = xp[:, :, :, 2]
    xp[:, :, :, -1] = xp[:, :, :, -3]


class Uncertainty(NamedTuple):
    """Result of ``segment(..., runs=N)`` with N > 1."""

    labels: Tensor  # (B, H, W) uint8 from the mean probability
    probability: Tensor  # (B, H, W, n_out)
    variance: Tensor  # (B, H, W, n_out), unbiased (ddof 1)
    nqm: float  # sum of per-pixel std (ddof 1) / sum of mean probability
    logits: Optional[Tensor]  # (N, B, H, W, n_out) if return_logits


class MedNCATorch(nn.Module):
    """Full multi-level Med-NCA inference; ``levels[i]`` runs at ``1 / scales[i]`` resolution."""

    def __init__(
        self, channels: int, hidden: int, n_in: int, n_out: int, steps: List[int], scales: List[int],
        fire_rate: float = 0.5, downscale: str = "bilinear",
    ):
        super().__init__()
        if len(steps) != len(scales) or scales[-1] != 1:
            raise ValueError(f"need one step count per level and a last scale of 1, got steps {steps} scales {scales}")
        if downscale not in DOWNSCALE_METHODS:
            raise ValueError(f"downscale must be one of {DOWNSCALE_METHODS}, got {downscale!r}")
        self.channels = channels
        self.n_in = n_in
        self.n_out = n_out
        self.steps: List[int] = [int(s) for s in steps]
        self.scales: List[int] = [int(s) for s in scales]
        self.fire_rate = float(fire_rate)
        self.downscale = downscale
        self.levels = nn.ModuleList([NCALevel(channels, hidden) for _ in steps])

    def forward(self, images: Tensor, fire_rate: Optional[float] = None, seed: Optional[int] = None,
                masks: Optional[List[Tensor]] = None, chunk_pixels: int = CHUNK_PIXELS) -> Tensor:
        """``images (B, H, W, n_in)`` float32 -> logits ``(B, H, W, n_out)``.

        ``fire_rate`` defaults to the config's (0: deterministic, every cell updates). Fire
        masks ``u > fire_rate``, ``u`` uniform in (0, 1], come from a ``torch.Generator``
        seeded with ``seed`` (fresh entropy when None), unless ``masks`` gives them: one bool
        tensor ``(steps_i, B, H_i, W_i)`` per level (image orientation, ``H_i = H / scales[i]``).
        ``chunk_pixels`` bounds the per-step temporaries; the result does not depend on it.
        """
        rate = self.fire_rate if fire_rate is None else fire_rate
        gen = torch.Generator(device=images.device)
        if seed is None:
            gen.seed()
        else:
            gen.manual_seed(seed)
        if masks is not None and len(masks) != len(self.levels):
            raise ValueError("masks must hold one bool tensor (steps, B, h, w) per level")
        with torch.no_grad():  # the state is updated in place: no autograd graph
            full = images.permute(0, 3, 2, 1)  # (B, n_in, W, H), the original's layout
            xp = torch.zeros(0)
            for i, level in enumerate(self.levels):
                img = downscale(full, self.scales[i], self.downscale).contiguous()
                b, w, h = img.shape[0], img.shape[2], img.shape[3]
                fresh = torch.zeros(b, self.channels, w + 2, h + 2, dtype=img.dtype, device=img.device)
                if i > 0:
                    f = self.scales[i - 1] // self.scales[i]
                    coarse = xp[:, :, 1:-1, 1:-1]
                    for a in range(f):  # nearest upsampling straight into the new state
                        for e in range(f):
                            fresh[:, :, 1 + a:w + 1:f, 1 + e:h + 1:f] = coarse
                xp = fresh
                xp[:, :self.n_in, 1:-1, 1:-1] = img
                _reflect_border_(xp)
                m: Optional[Tensor] = None
                if masks is not None:
                    m = masks[i]
                    if m.dtype != torch.bool or m.shape != (self.steps[i], b, h, w):
                        raise ValueError(f"masks[{i}] must be a bool tensor (steps, B, h, w) = "
                                         f"{[self.steps[i], b, h, w]}, got {m.dtype} {list(m.shape)}")
                level.run(xp, img, self.steps[i], rate, gen, m, chunk_pixels)
            return xp[:, self.n_in:self.n_in + self.n_out, 1:-1, 1:-1].permute(0, 3, 2, 1).contiguous()

    def plan(self, shape: List[int], max_memory_mb: Optional[float]) -> int:
        """Chunk size (cells) for a batch ``(B, H, W, ...)`` within ``max_memory_mb`` MiB of
        peak memory (None: ``CHUNK_PIXELS``): what is left after ``BASE_MB``, the input and
        output and the two finest padded states, at most ``CHUNK_PIXELS``, at least one row."""
        if max_memory_mb is None:
            return CHUNK_PIXELS
        b, h, w = int(shape[0]), int(shape[1]), int(shape[2])
        lv = self.levels[-1]
        per_px = working_bytes_per_pixel(self.channels, lv.features, lv.hidden)
        state = b * (h + 2) * (w + 2) * self.channels * 4
        if len(self.scales) > 1:
            f = self.scales[-2]
            state += b * (h // f + 2) * (w // f + 2) * self.channels * 4
        free = max_memory_mb * 2 ** 20 - BASE_MB * 2 ** 20 - b * h * w * 4 * (self.n_in + 2 * self.n_out) - state
        row = (h + 2) * per_px
        if free < row:
            need = (BASE_MB * 2 ** 20 + max_memory_mb * 2 ** 20 - free + row) / 2 ** 20
            raise InputError(f"max_memory_mb={max_memory_mb:g} is too small for {b} slice(s) of {h}x{w} with "
                             f"C={self.channels}: allow at least {need:.0f} MiB")
        return max(h + 2, min(CHUNK_PIXELS, int(free // per_px)))

    # ------------------------------------------------------------------ Python-only helpers
    @classmethod
    def from_config(cls, cfg: dict, source: str = CONFIG_FILE) -> "MedNCATorch":
        """Build an (untrained) module from the exporter's config dict (sections model/data)."""
        m = cfg.get("model") if isinstance(cfg, dict) else None
        if not isinstance(m, dict):
            raise ExportFormatError(f"{source}: expected a 'model' section with the NCA settings")
        if m.get("kind", "nca") != "nca":
            raise ExportFormatError(f"{source}: model.kind is {m.get('kind')!r}; only 'nca' models can run here")
        try:
            return cls(int(m["channels"]), int(m["hidden"]), int(m["n_in"]), int(m["n_out"]),
                       [int(s) for s in m["steps"]], [int(s) for s in m["scales"]], float(m["fire_rate"]),
                       str(m.get("downscale", "bilinear")))
        except KeyError as e:
            raise ExportFormatError(f"{source}: missing key model.{e.args[0]}") from None
        except (TypeError, ValueError) as e:
            raise ExportFormatError(f"{source}: malformed model settings ({e})") from None

    @classmethod
    def load(cls, directory: "str | Path") -> "MedNCATorch":
        """Read ``DIR/config.json`` and ``DIR/model{i}.pth`` (one original-layout state dict per level)."""
        d = Path(directory)
        cfg_path = d / CONFIG_FILE
        if not cfg_path.is_file():
            raise ExportFormatError(f"{cfg_path} is missing: expected the model config written by the exporter")
        try:
            cfg = json.loads(cfg_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ExportFormatError(f"{cfg_path} is not valid JSON: {e}") from None
        model = cls.from_config(cfg, str(cfg_path))
        for i, level in enumerate(list(model.levels)):
            path = d / f"model{i}.pth"
            if not path.is_file():
                raise ExportFormatError(f"{path} is missing: expected the state dict of level {i} of {len(model.levels)}")
            try:
                sd = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as e:  # pickle/zip errors come in many types
                raise ExportFormatError(f"{path} is not a readable state dict: {e}") from None
            sd = check_state_dict(sd, level, str(path))
            features = int(sd["perception.weight"].shape[0])
            if features != level.features:
                model.levels[i] = NCALevel(level.channels, level.hidden, features)
            model.levels[i].load_state_dict(sd)
        return model.eval()

    def predict(self, images: Tensor, fire_rate: Optional[float] = None, seed: Optional[int] = None,
                masks: Optional[List[Tensor]] = None, max_memory_mb: Optional[float] = None) -> Tensor:
        """:meth:`forward` under ``torch.inference_mode()``, with chunks sized by :meth:`plan`."""
        with torch.inference_mode():
            return self.forward(images, fire_rate, seed, masks, self.plan(list(images.shape), max_memory_mb))

    def _as_batch(self, images: Any) -> tuple[Tensor, bool]:
        a = torch.as_tensor(images)
        if a.dim() == 2 and self.n_in == 1:
            a, single = a[None, :, :, None], True
        elif a.dim() == 3 and self.n_in == 1:
            a, single = a[..., None], False
        elif a.dim() == 4 and a.shape[-1] == self.n_in:
            single = False
        else:
            want = "(H, W), (B, H, W) or (B, H, W, 1)" if self.n_in == 1 else f"(B, H, W, {self.n_in})"
            raise InputError(f"images must have shape {want} (n_in={self.n_in}), got rank {a.dim()} shape {tuple(a.shape)}")
        f = self.scales[0]
        if a.shape[1] % f or a.shape[2] % f or a.shape[0] == 0:
            raise InputError(f"image size {a.shape[1]}x{a.shape[2]} (batch {a.shape[0]}) must be non-empty and "
                             f"divisible by the coarsest scale {f}")
        a = a.to(torch.float32).contiguous()
        if not bool(torch.isfinite(a).all()):
            raise InputError("images contain NaN or inf values")
        return a, single

    def segment(
        self, images: Any, seed: Optional[int] = None, fire_rate: Optional[float] = None, runs: int = 1,
        return_logits: bool = False, max_memory_mb: Optional[float] = None,
    ) -> "Tensor | Uncertainty":
        """Segment preprocessed slices (same contract as the NumPy runtime's ``segment``).

        runs == 1: labels ``(B, H, W)`` uint8 or logits ``(B, H, W, n_out)`` (no B for a 2D
        input); runs > 1: :class:`Uncertainty` with mean probability, variance and NQM. With
        a seed, run ``k`` uses seed ``seed + k``.
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


ORIGINAL_KEYS = ("fc0.weight", "fc0.bias", "fc1.weight", "p0.weight", "p0.bias", "p1.weight", "p1.bias")


def check_state_dict(sd: Any, level: NCALevel, source: str) -> dict:
    """Check a level's state dict and return it in this module's layout.

    Accepted: the original Med-NCA layout (``p0.*``, ``p1.*``, ``fc0.weight (hidden, 3C)``...,
    converted: ``perception = cat([p0, p1])``) or this module's (``perception.weight (F, C, 3,
    3)``, ``perception.bias (F,)``, ``fc0.weight (hidden, C + F)``, ``fc0.bias``, ``fc1.weight``).
    Raises :class:`ExportFormatError` naming ``source`` on missing/unexpected keys or shapes.
    """
    if not isinstance(sd, dict):
        raise ExportFormatError(f"{source}: expected a state dict (dict of tensors), got {type(sd).__name__}")
    c, h = level.channels, level.hidden
    original = "p0.weight" in sd or "p1.weight" in sd
    if original:
        f = 2 * c
        exp = {"fc0.weight": (h, 3 * c), "fc0.bias": (h,), "fc1.weight": (c, h), "p0.weight": (c, c, 3, 3),
               "p0.bias": (c,), "p1.weight": (c, c, 3, 3), "p1.bias": (c,)}
    else:
        pw = sd.get("perception.weight")
        f = int(pw.shape[0]) if isinstance(pw, Tensor) and pw.dim() == 4 else 2 * c
        exp = {"perception.weight": (f, c, 3, 3), "perception.bias": (f,), "fc0.weight": (h, c + f), "fc0.bias": (h,),
               "fc1.weight": (c, h)}
    missing, extra = sorted(set(exp) - set(sd)), sorted(set(sd) - set(exp))
    what = f"config.json (channels={c}, hidden={h})"
    if missing or extra:
        raise ExportFormatError(f"{source} does not match {what}: missing {missing or 'nothing'}, "
                                f"unexpected {extra or 'nothing'}")
    for k, shape in exp.items():
        if not isinstance(sd[k], Tensor) or tuple(sd[k].shape) != shape:
            got = tuple(sd[k].shape) if isinstance(sd[k], Tensor) else type(sd[k]).__name__
            raise ExportFormatError(f"{source}: {k} has shape {got}, {what} expects {shape}")
    if not original:
        return dict(sd)
    return {"perception.weight": torch.cat([sd["p0.weight"], sd["p1.weight"]], 0),
            "perception.bias": torch.cat([sd["p0.bias"], sd["p1.bias"]], 0),
            "fc0.weight": sd["fc0.weight"], "fc0.bias": sd["fc0.bias"], "fc1.weight": sd["fc1.weight"]}
