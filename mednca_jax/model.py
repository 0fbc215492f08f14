"""One NCA level: parameters (Flax), the local update rule, one step, and the rollout.

The state of a level is ``x`` with shape ``(B, H, W, C)``: channels ``[0, n_in)`` hold the
input image and are never changed, ``[n_in, n_in + n_out)`` are read as logits, the rest
are hidden. One step (REFERENCE.md, "One NCA"):

    y  = [x | conv_p0(x) | conv_p1(x)]         3x3 convs, reflect padding      (B, H, W, 3C)
    d  = fc1(relu(fc0(y)))                     per-cell MLP                     (B, H, W, C)
    x  = x + d * [u > fire_rate]               u ~ U per cell, fresh each step
    x[..., :n_in] = image

Everything here is a pure function of ``(params, state, image, key)``; the Flax module
:class:`NCARule` exists to declare the parameters with the original initialisation and
applies the same :func:`nca_update`.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

Params = dict[str, Any]

REMAT_MODES = ("none", "step", "nested")


# --------------------------------------------------------------------------- parameters
def _torch_uniform(key: jax.Array, shape: tuple[int, ...], fan_in: int) -> jax.Array:
    """PyTorch's default init for conv/linear layers: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(fan_in)
    return jax.random.uniform(key, shape, jnp.float32, -bound, bound)


def _conv_init(key: jax.Array, channels: int) -> Params:
    kk, kb = jax.random.split(key)
    fan_in = 9 * channels
    return {
        "kernel": _torch_uniform(kk, (3, 3, channels, channels), fan_in),
        "bias": _torch_uniform(kb, (channels,), fan_in),
    }


def _dense_init(key: jax.Array, n_in: int, n_out: int) -> Params:
    kk, kb = jax.random.split(key)
    return {"kernel": _torch_uniform(kk, (n_in, n_out), n_in), "bias": _torch_uniform(kb, (n_out,), n_in)}


def _zero_dense_init(key: jax.Array, n_in: int, n_out: int) -> Params:
    # fc1 starts at zero so that a fresh NCA is the identity map.
    del key
    return {"kernel": jnp.zeros((n_in, n_out), jnp.float32)}


class NCARule(nn.Module):
    """Parameter declaration of one NCA level, initialised as the original.

    Params: ``p0``/``p1``: ``{"kernel": (3, 3, C, C), "bias": (C,)}``;
    ``fc0``: ``{"kernel": (3C, hidden), "bias": (hidden,)}``; ``fc1``: ``{"kernel": (hidden, C)}``.
    Calling the module returns :func:`nca_update` of its input.
    """

    channels: int
    hidden: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c, h = self.channels, self.hidden
        params = {
            "p0": self.param("p0", _conv_init, c),
            "p1": self.param("p1", _conv_init, c),
            "fc0": self.param("fc0", _dense_init, 3 * c, h),
            "fc1": self.param("fc1", _zero_dense_init, h, c),
        }
        return nca_update(params, x)


def init_level_params(key: jax.Array, channels: int, hidden: int) -> Params:
    """Fresh parameters of one level (see :class:`NCARule` for the tree)."""
    dummy = jnp.zeros((1, 3, 3, channels), jnp.float32)
    return NCARule(channels, hidden).init(key, dummy)["params"]


def count_params(params: Any) -> int:
    return int(sum(x.size for x in jax.tree_util.tree_leaves(params)))


# --------------------------------------------------------------------------- the rule
def reflect_pad(x: jax.Array) -> jax.Array:
    """Pad H and W by one pixel, mirroring without repeating the border: (B,H,W,C)->(B,H+2,W+2,C)."""
    return jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="reflect")


def im2col3x3(x: jax.Array) -> jax.Array:
    """3x3 reflect-padded neighbourhoods, ``(B, H, W, C) -> (B, H, W, 9C)``.

    Column block ``3*dh + dw`` holds the neighbour at offset ``(dh - 1, dw - 1)``. A conv as
    one matmul over these columns is much faster on CPU than XLA's convolution, whose
    gradient kernels are slow there.
    """
    h, w = x.shape[1], x.shape[2]
    xp = reflect_pad(x)
    return jnp.concatenate([xp[:, i : i + h, j : j + w, :] for i in range(3) for j in range(3)], axis=-1)


def perceive(params: Params, x: jax.Array) -> jax.Array:
    """``[x | p0(x) | p1(x)]``: ``(B, H, W, C) -> (B, H, W, 3C)``."""
    c = x.shape[-1]
    kernel = jnp.concatenate([params["p0"]["kernel"], params["p1"]["kernel"]], axis=-1)  # (3,3,C,2C)
    bias = jnp.concatenate([params["p0"]["bias"], params["p1"]["bias"]])
    conv = im2col3x3(x) @ kernel.reshape(9 * c, 2 * c) + bias
    return jnp.concatenate([x, conv], axis=-1)


def nca_update(params: Params, x: jax.Array) -> jax.Array:
    """The residual ``d = fc1(relu(fc0(perceive(x))))``, ``(B, H, W, C) -> (B, H, W, C)``."""
    y = perceive(params, x)
    hidden = jax.nn.relu(y @ params["fc0"]["kernel"] + params["fc0"]["bias"])
    return hidden @ params["fc1"]["kernel"]


def fire_mask(key: jax.Array, shape: tuple[int, ...], fire_rate: float | jax.Array) -> jax.Array:
    """Per-cell update mask ``u > fire_rate`` as float, shape ``(B, H, W, 1)``.

    ``u`` is drawn from (0, 1] (not [0, 1)) so that ``fire_rate = 0`` updates every cell,
    exactly and deterministically.
    """
    u = 1.0 - jax.random.uniform(key, shape[:-1] + (1,), jnp.float32)
    return (u > fire_rate).astype(jnp.float32)


def reset_inputs(x: jax.Array, image: jax.Array) -> jax.Array:
    """Write ``image (B, H, W, n_in)`` into channels ``[0, n_in)`` of ``x (B, H, W, C)``."""
    return jnp.concatenate([image.astype(x.dtype), x[..., image.shape[-1] :]], axis=-1)


def nca_step(
    params: Params, x: jax.Array, image: jax.Array, key: jax.Array, fire_rate: float | jax.Array
) -> jax.Array:
    """One stochastic step of one level: ``(B, H, W, C) -> (B, H, W, C)``."""
    x = x + nca_update(params, x) * fire_mask(key, x.shape, fire_rate)
    return reset_inputs(x, image)


# --------------------------------------------------------------------------- the rollout
def _scan_steps(
    step: Callable[[jax.Array, jax.Array], jax.Array], x: jax.Array, keys: jax.Array, trajectory: bool
) -> tuple[jax.Array, jax.Array | None]:
    def body(carry, k):
        new = step(carry, k)
        return new, (new if trajectory else None)

    return jax.lax.scan(body, x, keys)


def _nested_block(n: int) -> int:
    # sqrt(n) blocks of sqrt(n) steps: stored states grow as 2*sqrt(n), not n.
    return max(1, int(math.isqrt(n)))


def rollout(
    params: Params,
    x: jax.Array,
    image: jax.Array,
    key: jax.Array,
    steps: int,
    fire_rate: float | jax.Array,
    *,
    remat: str = "none",
    trajectory: bool = False,
) -> tuple[jax.Array, jax.Array | None]:
    """Iterate :func:`nca_step` ``steps`` times with ``jax.lax.scan``.

    Args:
        x: initial state ``(B, H, W, C)``; image: ``(B, H, W, n_in)`` kept in the input channels.
        key: split into one key per step (the same keys whatever ``remat`` is, so values and
            gradients do not depend on it).
        remat: ``"none"`` stores every step's activations for the backward pass;
            ``"step"`` wraps each step in ``jax.checkpoint`` (stores one state per step);
            ``"nested"`` checkpoints blocks of ~sqrt(steps) steps as well, so memory grows as
            ~2*sqrt(steps) states.
        trajectory: also return every state after each step, ``(steps, B, H, W, C)``.

    Returns:
        ``(final state (B, H, W, C), trajectory or None)``.
    """
    if remat not in REMAT_MODES:
        raise ValueError(f"remat must be one of {REMAT_MODES}, got {remat!r}")
    keys = jax.random.split(key, steps)

    def step(carry, k):
        return nca_step(params, carry, image, k, fire_rate)

    if remat == "none":
        return _scan_steps(step, x, keys, trajectory)
    step = jax.checkpoint(step)
    if remat == "step":
        return _scan_steps(step, x, keys, trajectory)

    block = _nested_block(steps)
    n_blocks = steps // block
    head = keys[: n_blocks * block].reshape((n_blocks, block) + keys.shape[1:])

    @jax.checkpoint
    def run_block(carry, block_keys):
        return _scan_steps(step, carry, block_keys, trajectory)

    x, traj = jax.lax.scan(run_block, x, head)
    if traj is not None:
        traj = traj.reshape((n_blocks * block,) + traj.shape[2:])
    if n_blocks * block < steps:
        x, tail = _scan_steps(step, x, keys[n_blocks * block :], trajectory)
        if traj is not None:
            traj = jnp.concatenate([traj, tail], axis=0)
    return x, traj
