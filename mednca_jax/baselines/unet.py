"""The UNet baseline that Med-NCA and M3D-NCA are compared against: the classic 2D UNet
(Ronneberger et al. 2015) and, from the same code, its 3D form (Çiçek et al. 2016).

The spatial rank ``n`` is the input's (``len(data.image_size)``): images ``(B, H, W, C)`` or
volumes ``(B, X, Y, Z, C)``; every window below is that size along each of the ``n`` axes.
Architecture for ``depth = L`` and base width ``w`` (widths ``c_i = w * 2**i``):

* encoder: blocks at levels ``0 .. L-1`` (``c_i`` channels), each followed by a 2×…×2 max-pool;
* bottleneck: a block with ``c_L`` channels at ``S / 2**L``;
* decoder, levels ``L-1 .. 0``: 2×…×2 stride-2 transposed conv ``c_{i+1} -> c_i``, concatenate
  the encoder skip (``[up | skip]`` on the channel axis), a block ``2 c_i -> c_i``;
* head: 1×…×1 conv ``c_0 -> n_out`` giving logits.

A block is (3×…×3 conv, no bias → GroupNorm → ReLU) twice, zero ("SAME") padding.

Why GroupNorm: BatchNorm keeps running statistics, a mutable collection that would make the
model differ between train and eval and would break the "params in, logits out" interface
shared with the NCA (checkpoints, export, jit). GroupNorm normalises per sample, so the model
is a pure function of ``params`` and the batch size does not matter. The group count is
``gcd(features, 8)`` (8 for every width that is a multiple of 8). Convs feeding a norm have no
bias: the norm's learned shift makes it redundant.

With ``w = 64, L = 4`` (the classic configuration) and one input/output channel the 2D UNet
has 31,036,481 parameters; ``w = 32`` (the config default) 7,762,465. Parameter names do not
depend on the rank; the kernels do (``(3, 3, cin, cout)`` in 2D, ``(3, 3, 3, cin, cout)`` in 3D).
"""

from __future__ import annotations

import functools
import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mednca_jax.nca.rollout import count_params  # noqa: F401  (re-exported: one parameter counter for every model)
from mednca_jax.config import ModelConfig

Params = dict[str, Any]


def _groups(features: int) -> int:
    return math.gcd(features, 8)


def _window(x: jax.Array, size: int) -> tuple[int, ...]:
    """``(size,) * n`` for the ``n`` spatial axes of ``x (B, *S, C)``."""
    return (size,) * (x.ndim - 2)


class _ConvBlock(nn.Module):
    """(3×…×3 conv → GroupNorm → ReLU) × 2."""

    features: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for _ in range(2):
            x = nn.Conv(self.features, _window(x, 3), padding="SAME", use_bias=False)(x)
            x = nn.GroupNorm(num_groups=_groups(self.features))(x)
            x = nn.relu(x)
        return x


class UNet(nn.Module):
    """Flax module; use :func:`init_unet_params` / :func:`unet_forward` rather than this."""

    width: int
    depth: int
    n_out: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """``(B, *S, n_in) -> (B, *S, n_out)`` for any spatial rank."""
        skips = []
        for i in range(self.depth):
            x = _ConvBlock(self.width * 2**i, name=f"down{i}")(x)
            skips.append(x)
            x = nn.max_pool(x, _window(x, 2), strides=_window(x, 2))
        x = _ConvBlock(self.width * 2**self.depth, name="bottleneck")(x)
        for i in reversed(range(self.depth)):
            c = self.width * 2**i
            x = nn.ConvTranspose(c, _window(x, 2), strides=_window(x, 2), name=f"upconv{i}")(x)
            x = jnp.concatenate([x, skips[i]], axis=-1)
            x = _ConvBlock(c, name=f"up{i}")(x)
        return nn.Conv(self.n_out, _window(x, 1), name="head")(x)


def _module(model_cfg: ModelConfig) -> UNet:
    return UNet(width=model_cfg.unet_width, depth=model_cfg.unet_depth, n_out=model_cfg.n_out)


def check_image_size(image_size: Sequence[int], depth: int) -> None:
    """Raise ``ValueError`` unless every side is divisible by ``2**depth`` (one pool per level)."""
    f = 2**depth
    sizes = [int(s) for s in image_size]
    if any(s % f or s < f for s in sizes):
        what = "image height and width" if len(sizes) == 2 else "every side of the input"
        fit = "x".join(str(max(f, -(-s // f) * f)) for s in sizes)
        raise ValueError(
            f"UNet with unet_depth={depth} needs {what} divisible by 2**depth = {f}; got "
            f"{'x'.join(map(str, sizes))}. Resize/pad the images (e.g. to {fit}) or lower unet_depth."
        )


def init_unet_params(model_cfg: ModelConfig, image_size: Sequence[int], key: jax.Array) -> Params:
    """Fresh UNet parameters (a plain nested dict, no flax ``"params"`` wrapper).

    Args:
        model_cfg: uses ``unet_width``, ``unet_depth``, ``n_in``, ``n_out``.
        image_size: ``(H, W)`` or ``(X, Y, Z)``: its length is the spatial rank of the
            kernels; the sizes are only checked for divisibility (the params do not depend on them).
        key: PRNG key.

    Distributions are flax's defaults (truncated LeCun-normal kernels, zero biases, unit
    GroupNorm scales), but all kernels come from one ``truncated_normal`` draw: compiling
    flax's per-layer initialisers (``module.init``) costs ~15 s of XLA time on CPU.
    """
    check_image_size(image_size, model_cfg.unet_depth)
    dummy = jax.ShapeDtypeStruct((1, *map(int, image_size), model_cfg.n_in), jnp.float32)
    shapes = jax.eval_shape(_module(model_cfg).init, jax.random.key(0), dummy)["params"]
    flat, treedef = jax.tree_util.tree_flatten_with_path(shapes)
    names = [str(getattr(path[-1], "key", path[-1])) for path, _ in flat]
    sizes = [math.prod(leaf.shape) if n == "kernel" else 0 for n, (_, leaf) in zip(names, flat)]
    noise = np.asarray(jax.random.truncated_normal(key, -2.0, 2.0, (max(sum(sizes), 1),), jnp.float32))
    leaves, offset = [], 0
    for name, size, (_, leaf) in zip(names, sizes, flat):
        if name == "kernel":
            fan_in = math.prod(leaf.shape[:-1])  # receptive field × input channels
            std = math.sqrt(1.0 / fan_in) / 0.87962566103423978  # std of N(0,1) truncated to ±2
            leaves.append(noise[offset : offset + size].reshape(leaf.shape) * np.float32(std))
            offset += size
        elif name == "scale":
            leaves.append(np.ones(leaf.shape, np.float32))
        else:
            leaves.append(np.zeros(leaf.shape, np.float32))
    params = jax.tree_util.tree_unflatten(treedef, [jnp.asarray(a) for a in leaves])
    return _plain(params)


def _plain(tree: Any) -> Any:
    """Nested ``dict`` copy (flax may hand back a FrozenDict; the project uses plain dicts)."""
    if hasattr(tree, "items"):
        return {k: _plain(v) for k, v in tree.items()}
    return tree


def unet_forward(params: Params, model_cfg: ModelConfig, images: jax.Array) -> jax.Array:
    """Logits ``(B, *S, n_out)`` for ``images (B, *S, n_in)``: ``(B, H, W, ·)`` or ``(B, X, Y,
    Z, ·)``, the rank ``params`` were made for. Deterministic, jittable (``model_cfg`` is
    hashable, pass it as a static argument)."""
    ndim = np.ndim(params["head"]["kernel"]) - 2  # head kernel (1,)*n + (c_0, n_out)
    axes = "H, W" if ndim == 2 else "X, Y, Z" if ndim == 3 else ", ".join(f"S{i}" for i in range(ndim))
    if images.ndim != ndim + 2 or images.shape[-1] != model_cfg.n_in:
        raise ValueError(
            f"unet_forward expects images (B, {axes}, n_in={model_cfg.n_in}) for these {ndim}D params, got shape {tuple(images.shape)}"
        )
    check_image_size(images.shape[1:-1], model_cfg.unet_depth)
    return _apply(params, model_cfg, images)


@functools.partial(jax.jit, static_argnums=1)
def _apply(params: Params, model_cfg: ModelConfig, images: jax.Array) -> jax.Array:
    # jitted so that eager calls compile once instead of dispatching op by op
    return _module(model_cfg).apply({"params": params}, images)


def expected_param_count(width: int, depth: int, n_in: int = 1, n_out: int = 1, ndim: int = 2) -> int:
    """Closed-form parameter count of :class:`UNet` of spatial rank ``ndim`` (used by the
    tests and for reports)."""
    c = [width * 2**i for i in range(depth + 1)]
    k3, k2 = 3**ndim, 2**ndim  # taps of a 3×…×3 conv and of a 2×…×2 transposed conv

    def block(cin: int, cout: int) -> int:  # two bias-free 3×…×3 convs + two GroupNorms
        return k3 * cin * cout + 2 * cout + k3 * cout * cout + 2 * cout

    total = block(n_in, c[0]) + sum(block(c[i - 1], c[i]) for i in range(1, depth + 1))
    for i in range(depth):
        total += k2 * c[i + 1] * c[i] + c[i]  # transposed conv with bias
        total += block(2 * c[i], c[i])
    return total + c[0] * n_out + n_out
