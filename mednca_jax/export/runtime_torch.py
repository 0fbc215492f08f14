"""Med-NCA inference as a PyTorch ``nn.Module`` (exported as ``mednca_torch.py``).

Written by ``python -m mednca_jax.export to-torch`` next to ``config.json`` and one state
dict per level (``model0.pth``, ``model1.pth``, ...) in the original Med-NCA layout: keys
``p0.weight (C, C, 3, 3)``, ``p0.bias``, ``p1.weight``, ``p1.bias``, ``fc0.weight (hidden, 3C)``,
``fc0.bias``, ``fc1.weight (C, hidden)``. Imports only torch and the standard library.

Usage::

    from mednca_torch import MedNCATorch
    model = MedNCATorch.load("DIR")
    logits = model.predict(images, seed=0)     # (B, H, W, n_in) -> (B, H, W, n_out), inference mode
    labels = model.segment(images, seed=0)     # (H, W) | (B, H, W) | (B, H, W, n_in) -> uint8 labels
    scripted = torch.jit.script(model)         # forward(images, fire_rate, seed) is TorchScript

Like the original, the state is kept as ``(B, C, W, H)`` (width before height), so the
original kernels apply unchanged: a weight ``[o, i, a, b]`` has ``a`` along W and ``b`` along H.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, List, NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

CONFIG_FILE = "config.json"
DOWNSCALE_METHODS = ("bilinear", "area", "antialias")


class ExportFormatError(ValueError):
    """The runtime folder (config.json / model*.pth) is missing, malformed or inconsistent."""


class InputError(ValueError):
    """An image handed to the runtime has the wrong rank, shape or values."""


class NCALevel(nn.Module):
    """One NCA (the original's parameter names and shapes; fc1 has no bias)."""

    def __init__(self, channels: int, hidden: int):
        super().__init__()
        self.channels = channels
        self.hidden = hidden
        # Declared in the original's order, so state_dict() lists keys as its files do.
        self.fc0 = nn.Linear(3 * channels, hidden)
        self.fc1 = nn.Linear(hidden, channels, bias=False)
        self.p0 = nn.Conv2d(channels, channels, 3, padding=1, padding_mode="reflect")
        self.p1 = nn.Conv2d(channels, channels, 3, padding=1, padding_mode="reflect")

    def update(self, x: Tensor) -> Tensor:
        """Residual ``fc1(relu(fc0([x | p0(x) | p1(x)])))``: ``(B, C, W, H) -> (B, C, W, H)``."""
        c, h = self.channels, self.hidden
        xp = F.pad(x, (1, 1, 1, 1), mode="reflect")
        # Both perception convs in one call; the per-cell MLP as 1x1 convs (no layout change).
        b0, b1 = self.p0.bias, self.p1.bias
        assert b0 is not None and b1 is not None  # refines Optional for TorchScript
        conv = F.conv2d(xp, torch.cat([self.p0.weight, self.p1.weight], 0), torch.cat([b0, b1], 0))
        y = torch.cat([x, conv], 1)
        hid = F.relu(F.conv2d(y, self.fc0.weight.reshape(h, 3 * c, 1, 1), self.fc0.bias))
        return F.conv2d(hid, self.fc1.weight.reshape(c, h, 1, 1))


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

    def forward(self, images: Tensor, fire_rate: Optional[float] = None, seed: Optional[int] = None) -> Tensor:
        """``images (B, H, W, n_in)`` float32 -> logits ``(B, H, W, n_out)``.

        ``fire_rate`` defaults to the config's (0: deterministic, every cell updates). Fire
        masks ``u > fire_rate``, ``u`` uniform in (0, 1], come from a ``torch.Generator``
        seeded with ``seed`` (fresh entropy when None).
        """
        rate = self.fire_rate if fire_rate is None else fire_rate
        gen = torch.Generator(device=images.device)
        if seed is None:
            gen.seed()
        else:
            gen.manual_seed(seed)
        full = images.permute(0, 3, 2, 1).contiguous()  # (B, n_in, W, H), the original's layout
        x = torch.zeros(0)
        for i, level in enumerate(self.levels):
            img = downscale(full, self.scales[i], self.downscale)
            if i == 0:
                x = torch.zeros(img.shape[0], self.channels - self.n_in, img.shape[2], img.shape[3], dtype=img.dtype,
                                device=img.device)
            else:
                x = upsample_nearest(x, self.scales[i - 1] // self.scales[i])[:, self.n_in:]
            x = torch.cat([img, x], 1)
            for _ in range(self.steps[i]):
                d = level.update(x)
                if rate > 0.0:
                    u = 1.0 - torch.rand((x.shape[0], 1, x.shape[2], x.shape[3]), generator=gen, dtype=x.dtype,
                                         device=x.device)
                    d = d * (u > rate).to(x.dtype)
                x = torch.cat([img, (x + d)[:, self.n_in:]], 1)
        return x[:, self.n_in:self.n_in + self.n_out].permute(0, 3, 2, 1).contiguous()

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
        for i, level in enumerate(model.levels):
            path = d / f"model{i}.pth"
            if not path.is_file():
                raise ExportFormatError(f"{path} is missing: expected the state dict of level {i} of {len(model.levels)}")
            try:
                sd = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as e:  # pickle/zip errors come in many types
                raise ExportFormatError(f"{path} is not a readable state dict: {e}") from None
            check_state_dict(sd, level, str(path))
            level.load_state_dict(sd)
        return model.eval()

    def predict(self, images: Tensor, fire_rate: Optional[float] = None, seed: Optional[int] = None) -> Tensor:
        """:meth:`forward` under ``torch.inference_mode()``."""
        with torch.inference_mode():
            return self.forward(images, fire_rate, seed)

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
        return_logits: bool = False,
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
            zs = [self.forward(x, rate, None if seed is None else seed + k) for k in range(int(runs))]
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


def check_state_dict(sd: Any, level: NCALevel, source: str) -> None:
    """Raise :class:`ExportFormatError` naming ``source`` unless ``sd`` has exactly the
    original keys with the shapes of ``level``."""
    if not isinstance(sd, dict):
        raise ExportFormatError(f"{source}: expected a state dict (dict of tensors), got {type(sd).__name__}")
    exp = {k: tuple(v.shape) for k, v in level.state_dict().items()}
    missing, extra = sorted(set(exp) - set(sd)), sorted(set(sd) - set(exp))
    what = f"config.json (channels={level.channels}, hidden={level.hidden})"
    if missing or extra:
        raise ExportFormatError(f"{source} does not match {what}: missing {missing or 'nothing'}, "
                                f"unexpected {extra or 'nothing'}")
    for k, shape in exp.items():
        if not isinstance(sd[k], Tensor) or tuple(sd[k].shape) != shape:
            got = tuple(sd[k].shape) if isinstance(sd[k], Tensor) else type(sd[k]).__name__
            raise ExportFormatError(f"{source}: {k} has shape {got}, {what} expects {shape}")
