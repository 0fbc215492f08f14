"""A plain PyTorch Med-NCA with the original's structure, for side-by-side timing.

Written for this project (nothing copied from the original repository); it follows the
computation described in ``docs/design.md``. A level's step is the exported PyTorch runtime's
(``mednca_jax/export/runtime_torch.py``, :class:`NCALevel`, loaded from its file so that this
process imports torch and NumPy only): ``NCALevel.step`` is out of place, so autograd trains
through it, and the timing reference, the exported runtime and its tests share one definition
of a step in PyTorch. What this file adds is what surrounds the step in the original:

* one level: state ``(B, H, W, C)`` channels-last between steps; per step the runtime gets a
  channels-first view of it (one reflect-padded conv ``C -> 2C``, the original's ``p0`` and
  ``p1`` side by side; ``[x | p0 x | p1 x] -> fc0 -> relu -> fc1``, fc1 without bias, as
  per-cell 1x1 convs), a fresh uniform per cell decides which cells add the update, and the
  input channels are reset to the image;
* ``layout="original"`` (the default) hands the runtime the original's view
  ``transpose(1, 3)``, ``(B, C, W, H)``, and copies the new state back to channels-last, as
  the original keeps it. That view is not a memory format PyTorch's CPU convolutions take
  directly, which costs time. ``layout="channels-last"`` is a leaner variant:
  ``permute(0, 3, 1, 2)`` to ``(B, C, H, W)``, a view PyTorch recognises as channels-last,
  and no copy. Both compute the same numbers;
* two levels: bilinear x4 downscale without anti-aliasing (mean of the centre 2x2 pixels of
  each 4x4 block), level 0, nearest x4 upsample, image written back, level 1 on one random
  16x16 crop per sample (training) or on the whole image (inference);
* DiceBCE per output channel over the flattened batch, Adam (betas 0.5, 0.5).

Weights come from our JAX parameter tree (``{"level0": {"p0": {"kernel": (3,3,C,C)...}}}``)
or a level's arrays in the export layout (``perception.kernel``, ...), so that a run on given
fire masks can be checked against the JAX path. :class:`TorchNCA` takes any rule the runtime
interprets (``rule=``), e.g. M3D-NCA's 3D depthwise level with batch norm on ``(B, X, Y, Z,
C)``; :class:`TorchMedNCA` is the 2D two-level Med-NCA.

:class:`TorchM3DNCA` is the two-level M3D-NCA (3D) as the original computes it
(``../shared/reference/REFERENCE.md``, "M3D-NCA (3D)"): its level, :class:`TorchBasicNCA3D`,
is written here rather than taken from the runtime, because the original's perception is a
grouped (depthwise) ``Conv3d`` that the runtime runs as a dense conv over its filters; a timing
reference must cost what the original costs. It takes the original's state dicts (``p0``,
``fc0``, ``bn``, ``fc1``; :func:`mednca_jax.nca.weights.params_to_torch_level` writes them
from our parameters).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

LAYOUTS = ("original", "channels-last")
RUNTIME_FILE = Path(__file__).resolve().parents[1] / "mednca_jax" / "export" / "runtime_torch.py"


def load_runtime() -> ModuleType:
    """The PyTorch runtime module, imported from its file (not through ``mednca_jax``, which
    would import JAX into the timed PyTorch process)."""
    name = "mednca_runtime_torch_for_benchmarks"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, RUNTIME_FILE)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # NamedTuples need the module registered while executing
        spec.loader.exec_module(module)
    return sys.modules[name]


rt = load_runtime()


def arrays_of(p: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """A JAX level (``p0``/``p1``/``fc0``/``fc1``[/``bn``] subtrees) or flat export-layout
    arrays -> the export layout (``perception.kernel (k,)*nd + (C, F)``, ...)."""
    if "perception.kernel" in p:
        return {k: np.asarray(v, np.float32) for k, v in p.items()}
    f32 = lambda a: np.asarray(a, np.float32)  # noqa: E731
    out = {"perception.kernel": np.concatenate([f32(p["p0"]["kernel"]), f32(p["p1"]["kernel"])], -1),
           "perception.bias": np.concatenate([f32(p["p0"]["bias"]), f32(p["p1"]["bias"])]),
           "fc0.kernel": f32(p["fc0"]["kernel"]), "fc0.bias": f32(p["fc0"]["bias"]), "fc1.kernel": f32(p["fc1"]["kernel"])}
    if "bn" in p:
        out["bn.scale"], out["bn.bias"] = f32(p["bn"]["scale"]), f32(p["bn"]["bias"])
    return out


class TorchNCA(nn.Module):
    """One NCA level: the runtime's :class:`NCALevel` on a channels-last state ``(B, *S, C)``.

    ``rule``: a rule description (``Rule.describe()``; default the original's, 2D 3x3 learned
    ``mlp``, F = 2C); the parameters are the level's (``level.perception``, ``level.fc0``,
    ``level.fc1``[, ``level.bn``]), fc1 starting at zero as the original's.
    """

    def __init__(self, channels: int, hidden: int, n_in: int = 1, layout: str = "original",
                 rule: Mapping[str, Any] | None = None):
        super().__init__()
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
        self.n_in, self.layout = n_in, layout
        self.level = rt.NCALevel.from_rule(dict(rule) if rule is not None else {"channels": channels, "hidden": hidden})
        with torch.no_grad():
            self.level.fc1.weight.zero_()  # a fresh NCA is the identity

    def load_jax(self, p: Mapping[str, Any]) -> "TorchNCA":
        """Copy one level of our JAX params (or its export-layout arrays) into this module. Our
        kernels are ``[d0, d1, (d2,) c_in, c_out]`` over ``(S0, S1, ...)``; the conv wants
        them over its view's spatial axes: ``(S1, ..., S0)`` (original) or ``(S0, ...)``."""
        self.level.load_arrays(arrays_of(p), natural=self.layout == "channels-last")
        return self

    def _view(self, a: Tensor) -> Tensor:
        """Channels-last ``(B, *S, c)`` -> the channels-first view the level's conv reads."""
        if self.layout == "original":
            return a.transpose(1, a.dim() - 1)  # (B, C, W, H) in 2D
        return a.movedim(-1, 1)  # (B, C, H, W), channels-last in memory

    def _unview(self, a: Tensor) -> Tensor:
        if self.layout == "original":
            return a.transpose(1, a.dim() - 1).contiguous()  # the original keeps its state channels-last
        return a.movedim(1, -1)

    def step(self, x: Tensor, image: Tensor, fire_rate: float, gen: torch.Generator | None, mask: Tensor | None = None) -> Tensor:
        """One stochastic step, ``x (B, *S, C)`` channels-last; ``mask (B, *S)`` bool, when
        given, replaces the drawn fire mask (True: the cell updates)."""
        if mask is None:
            u = 1.0 - torch.rand(x.shape[:-1] + (1,), generator=gen)
            mask = (u > fire_rate)[..., 0]
        mv = mask.movedim(1, -1) if self.layout == "original" else mask  # the view's spatial order
        return self._unview(self.level.step(self._view(x), self._view(image), mv))

    def forward(self, x: Tensor, image: Tensor, steps: int, fire_rate: float, gen: torch.Generator | None = None,
                masks: Tensor | None = None) -> Tensor:
        """``steps`` steps; ``masks (steps, B, *S)`` bool, when given, are the fire masks."""
        for s in range(steps):
            x = self.step(x, image, fire_rate, gen, None if masks is None else masks[s])
        return x


def downscale_bilinear(images: Tensor, factor: int) -> Tensor:
    """Bilinear without anti-aliasing for an even factor: centre 2x2 mean of each block."""
    b, h, w, c = images.shape
    lo = factor // 2 - 1
    blocks = images.reshape(b, h // factor, factor, w // factor, factor, c)
    return blocks[:, :, lo : lo + 2, :, lo : lo + 2, :].mean(dim=(2, 4))


def upsample_nearest(x: Tensor, factor: int) -> Tensor:
    return x.repeat_interleave(factor, 1).repeat_interleave(factor, 2)


class TorchMedNCA(nn.Module):
    """Two NCA levels (coarse x4, then full resolution), 2D."""

    def __init__(self, channels: int = 16, hidden: int = 128, steps: tuple[int, int] = (64, 64), scale: int = 4, n_in: int = 1,
                 n_out: int = 1, layout: str = "original"):
        super().__init__()
        self.channels, self.steps, self.scale, self.n_in, self.n_out = channels, steps, scale, n_in, n_out
        self.level0 = TorchNCA(channels, hidden, n_in, layout)
        self.level1 = TorchNCA(channels, hidden, n_in, layout)

    def load_jax(self, params: Mapping[str, Any]) -> "TorchMedNCA":
        self.level0.load_jax(params["level0"])
        self.level1.load_jax(params["level1"])
        return self

    def _seed(self, image: Tensor) -> Tensor:
        b, h, w, _ = image.shape
        return torch.cat([image, torch.zeros(b, h, w, self.channels - self.n_in)], -1)

    def _level0(self, images: Tensor, fire_rate: float, gen: torch.Generator | None, masks: Tensor | None = None) -> Tensor:
        small = downscale_bilinear(images, self.scale)
        x = self.level0(self._seed(small), small, self.steps[0], fire_rate, gen, masks)
        return torch.cat([images, upsample_nearest(x, self.scale)[..., self.n_in :]], -1)

    def forward(self, images: Tensor, fire_rate: float = 0.5, gen: torch.Generator | None = None,
                masks: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """Inference on whole images ``(B, H, W, n_in) -> logits (B, H, W, n_out)``; ``masks``:
        optional fire masks per level, ``(steps_i, B, h_i, w_i)`` bool, instead of drawn ones."""
        m0, m1 = (None, None) if masks is None else masks
        x = self.level1(self._level0(images, fire_rate, gen, m0), images, self.steps[1], fire_rate, gen, m1)
        return x[..., self.n_in : self.n_in + self.n_out]

    def forward_train(self, images: Tensor, labels: Tensor, patch: int, fire_rate: float, gen: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """Level 1 on one random ``patch x patch`` crop per sample (0: whole images)."""
        x = self._level0(images, fire_rate, gen)
        h, w = images.shape[1:3]
        if 0 < patch < min(h, w):
            ys = torch.randint(0, h - patch + 1, (images.shape[0],), generator=gen).tolist()
            xs = torch.randint(0, w - patch + 1, (images.shape[0],), generator=gen).tolist()
            crop = lambda a: torch.stack([a[i, y : y + patch, q : q + patch] for i, (y, q) in enumerate(zip(ys, xs))])  # noqa: E731
            x, images, labels = crop(x), crop(images), crop(labels)
        x = self.level1(x, images, self.steps[1], fire_rate, gen)
        return x[..., self.n_in : self.n_in + self.n_out], labels


def dice_bce(logits: Tensor, target: Tensor) -> Tensor:
    """The original's DiceBCE summed over output channels (channels without foreground skipped)."""
    z = logits.reshape(-1, logits.shape[-1])
    t = target.reshape(-1, target.shape[-1])
    p = torch.sigmoid(z)
    bce = F.binary_cross_entropy(p, t, reduction="none").mean(0)
    dice = 1.0 - (2.0 * (p * t).sum(0) + 1.0) / (p.sum(0) + t.sum(0) + 1.0)
    return torch.where(t.sum(0) > 0, bce + dice, torch.zeros_like(bce)).sum()


def make_optimizer(model: nn.Module, lr: float = 1.6e-3) -> torch.optim.Optimizer:
    return torch.optim.Adam(model.parameters(), lr=lr, betas=(0.5, 0.5), eps=1e-8)


def train_step(model: TorchMedNCA, opt: torch.optim.Optimizer, images: Tensor, labels: Tensor, patch: int, fire_rate: float, gen: torch.Generator | None = None) -> float:
    """Forward on crops, DiceBCE, backward, one Adam step; returns the loss."""
    opt.zero_grad(set_to_none=True)
    logits, target = model.forward_train(images, labels, patch, fire_rate, gen)
    loss = dice_bce(logits, target)
    loss.backward()
    opt.step()
    return float(loss.detach())


# --------------------------------------------------------------------------- M3D-NCA (3D)
class TorchBasicNCA3D(nn.Module):
    """One M3D-NCA level on a channels-last state ``(B, X, Y, Z, C)``, the original's ops in
    the original's order: ``transpose(1, 4)`` to ``(B, C, Y, Z, X)``, ``[x | p0 x]`` with
    ``p0`` a reflect-padded depthwise ``Conv3d`` (bias), back to channels-last for ``fc0``,
    ``BatchNorm3d(track_running_stats=False)`` channels-first, ReLU, ``fc1`` (no bias, zero
    at init), the update added where a fresh uniform exceeds the fire rate, the input
    channels kept."""

    def __init__(self, channels: int = 16, hidden: int = 64, kernel_size: int = 7, n_in: int = 1):
        super().__init__()
        self.n_in = n_in
        self.p0 = nn.Conv3d(channels, channels, kernel_size, padding=kernel_size // 2, padding_mode="reflect", groups=channels)
        self.fc0 = nn.Linear(2 * channels, hidden)
        self.bn = nn.BatchNorm3d(hidden, eps=1e-5, track_running_stats=False)
        self.fc1 = nn.Linear(hidden, channels, bias=False)
        with torch.no_grad():
            self.fc1.weight.zero_()

    def load_original(self, state_dict: Mapping[str, Any]) -> "TorchBasicNCA3D":
        """Load the original's state dict (NumPy or torch arrays)."""
        self.load_state_dict({k: torch.tensor(np.asarray(v, np.float32)) for k, v in state_dict.items()})
        return self

    def step(self, x: Tensor, fire_rate: float, gen: torch.Generator | None, mask: Tensor | None = None) -> Tensor:
        """``x (B, X, Y, Z, C) -> (B, X, Y, Z, C)``; ``mask (B, X, Y, Z)`` bool replaces the
        drawn fire mask (True: the cell updates)."""
        xt = x.transpose(1, 4)
        y = torch.cat([xt, self.p0(xt)], 1).transpose(1, 4)
        h = self.bn(self.fc0(y).transpose(1, 4)).transpose(1, 4)
        d = self.fc1(F.relu(h))
        if mask is None:
            mask = (torch.rand(d.shape[:-1] + (1,), generator=gen) > fire_rate)[..., 0]
        new = (xt + (d * mask[..., None].to(d.dtype)).transpose(1, 4)).transpose(1, 4)
        return torch.cat([x[..., : self.n_in], new[..., self.n_in :]], -1)

    def forward(self, x: Tensor, steps: int, fire_rate: float, gen: torch.Generator | None = None,
                masks: Tensor | None = None) -> Tensor:
        for s in range(steps):
            x = self.step(x, fire_rate, gen, None if masks is None else masks[s])
        return x


class TorchM3DNCA(nn.Module):
    """Two M3D-NCA levels: level 0 on the volume max-pooled x2, nearest x2 upsampling, the
    full-resolution image written back, level 1 (on one random patch per sample in training)."""

    def __init__(self, channels: int = 16, hidden: int = 64, steps: tuple[int, int] = (10, 10),
                 kernel_sizes: tuple[int, int] = (7, 3), n_in: int = 1, n_out: int = 1):
        super().__init__()
        self.channels, self.steps, self.n_in, self.n_out = channels, steps, n_in, n_out
        self.level0 = TorchBasicNCA3D(channels, hidden, kernel_sizes[0], n_in)
        self.level1 = TorchBasicNCA3D(channels, hidden, kernel_sizes[1], n_in)

    def _level0(self, images: Tensor, fire_rate: float, gen: torch.Generator | None, masks: Tensor | None = None) -> Tensor:
        small = F.max_pool3d(images.movedim(-1, 1), 2).movedim(1, -1)
        seed = torch.cat([small, torch.zeros(small.shape[:-1] + (self.channels - self.n_in,))], -1)
        x = self.level0(seed, self.steps[0], fire_rate, gen, masks)
        up = x.repeat_interleave(2, 1).repeat_interleave(2, 2).repeat_interleave(2, 3)
        return torch.cat([images, up[..., self.n_in :]], -1)

    def forward(self, images: Tensor, fire_rate: float = 0.5, gen: torch.Generator | None = None,
                masks: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """Whole volumes ``(B, X, Y, Z, n_in) -> logits (B, X, Y, Z, n_out)``; ``masks``: fire
        masks per level ``(steps_i, B, *S_i)`` bool instead of drawn ones."""
        m0, m1 = (None, None) if masks is None else masks
        x = self.level1(self._level0(images, fire_rate, gen, m0), self.steps[1], fire_rate, gen, m1)
        return x[..., self.n_in : self.n_in + self.n_out]

    def forward_train(self, images: Tensor, labels: Tensor, patch: tuple[int, int, int], fire_rate: float,
                      gen: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """Level 1 on one random ``patch`` (per axis) crop per sample."""
        x = self._level0(images, fire_rate, gen)
        spatial = images.shape[1:4]
        corners = [torch.randint(0, s - p + 1, (images.shape[0],), generator=gen).tolist() for s, p in zip(spatial, patch)]

        def crop(a: Tensor) -> Tensor:
            return torch.stack([a[i, x0 : x0 + patch[0], y0 : y0 + patch[1], z0 : z0 + patch[2]]
                                for i, (x0, y0, z0) in enumerate(zip(*corners))])

        x, images, labels = crop(x), crop(images), crop(labels)
        x = self.level1(x, self.steps[1], fire_rate, gen)
        return x[..., self.n_in : self.n_in + self.n_out], labels
