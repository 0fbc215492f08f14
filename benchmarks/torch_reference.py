"""A plain PyTorch Med-NCA with the original's structure, for side-by-side timing.

Written for this project (nothing copied from the original repository); it follows the
computation described in ``docs/design.md``:

* one level: state ``(B, H, W, C)`` channels-last; per step the state is moved to
  channels-first for two separate 3x3 reflect-padded convs ``p0``, ``p1``, the perception
  ``[x | p0 x | p1 x]`` goes back to channels-last through ``fc0 -> relu -> fc1`` (Linear
  layers, fc1 without bias), a fresh uniform per cell decides which cells add the update,
  and the input channels are reset to the image;
* ``layout="original"`` (the default) moves the state to channels-first as the original does,
  with ``transpose(1, 3)`` to ``(B, C, W, H)``, adds the update in that layout and copies the
  new state before resetting the inputs. That view is not a memory format PyTorch's CPU
  convolutions take directly, which costs time. ``layout="channels-last"`` is a leaner
  variant: ``permute(0, 3, 1, 2)`` to ``(B, C, H, W)``, a view PyTorch recognises as
  channels-last, and no copy. Both compute the same numbers;
* two levels: bilinear x4 downscale without anti-aliasing (mean of the centre 2x2 pixels of
  each 4x4 block), level 0, nearest x4 upsample, image written back, level 1 on one random
  16x16 crop per sample (training) or on the whole image (inference);
* DiceBCE per output channel over the flattened batch, Adam (betas 0.5, 0.5).

Weights come from our JAX parameter tree (``{"level0": {"p0": {"kernel": (3,3,C,C)...}}}``)
so that a deterministic run (fire rate 0) can be checked against the JAX path. Our kernels
are ``[dh, dw, c_in, c_out]`` over ``(H, W)``; torch's ``Conv2d`` on ``(B, C, H, W)`` wants
``[c_out, c_in, dh, dw]``.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn


LAYOUTS = ("original", "channels-last")


class TorchNCA(nn.Module):
    """One NCA level with the original's layers (two convs, two Linears, fc1 without bias)."""

    def __init__(self, channels: int, hidden: int, n_in: int = 1, layout: str = "original"):
        super().__init__()
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
        self.n_in, self.layout = n_in, layout
        self.p0 = nn.Conv2d(channels, channels, 3, padding=1, padding_mode="reflect")
        self.p1 = nn.Conv2d(channels, channels, 3, padding=1, padding_mode="reflect")
        self.fc0 = nn.Linear(3 * channels, hidden)
        self.fc1 = nn.Linear(hidden, channels, bias=False)
        with torch.no_grad():
            self.fc1.weight.zero_()  # a fresh NCA is the identity

    def load_jax(self, p: Mapping[str, Any]) -> "TorchNCA":
        """Copy one level of our JAX params into this module."""
        t = lambda a: torch.from_numpy(np.array(a, np.float32))  # noqa: E731
        with torch.no_grad():
            for name in ("p0", "p1"):
                # ours: [dh, dw, in, out]; torch: [out, in, a, b] over its view's two spatial axes
                perm = (3, 2, 1, 0) if self.layout == "original" else (3, 2, 0, 1)
                getattr(self, name).weight.copy_(t(p[name]["kernel"]).permute(*perm))
                getattr(self, name).bias.copy_(t(p[name]["bias"]))
            self.fc0.weight.copy_(t(p["fc0"]["kernel"]).T)
            self.fc0.bias.copy_(t(p["fc0"]["bias"]))
            self.fc1.weight.copy_(t(p["fc1"]["kernel"]).T)
        return self

    def step(self, x: Tensor, image: Tensor, fire_rate: float, gen: torch.Generator | None, mask: Tensor | None = None) -> Tensor:
        """One stochastic step, ``x (B, H, W, C)`` channels-last; ``mask (B, H, W)`` bool, when
        given, replaces the drawn fire mask (True: the cell updates)."""
        if self.layout == "original":
            xc = x.transpose(1, 3)  # (B, C, W, H)
            y = torch.cat([xc, self.p0(xc), self.p1(xc)], 1).transpose(1, 3)
        else:
            xc = x.permute(0, 3, 1, 2)  # (B, C, H, W), channels-last in memory
            y = torch.cat([xc, self.p0(xc), self.p1(xc)], 1).permute(0, 2, 3, 1)
        d = self.fc1(F.relu(self.fc0(y)))
        if mask is None:
            u = 1.0 - torch.rand(x.shape[:3] + (1,), generator=gen)
            d = d * (u > fire_rate).float()
        else:
            d = d * mask[..., None].float()
        if self.layout == "original":
            new = (xc + d.transpose(1, 3)).transpose(1, 3).clone()
        else:
            new = x + d
        return torch.cat([image, new[..., self.n_in :]], -1)

    def forward(self, x: Tensor, image: Tensor, steps: int, fire_rate: float, gen: torch.Generator | None = None,
                masks: Tensor | None = None) -> Tensor:
        """``steps`` steps; ``masks (steps, B, H, W)`` bool, when given, are the fire masks."""
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
    """Two NCA levels (coarse x4, then full resolution)."""

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
