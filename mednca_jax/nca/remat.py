"""Gradient checkpointing of a rollout: how many states the backward pass keeps.

``"none"``: what autodiff stores (every step's activations); ``"step"``: one state per step
(``jax.checkpoint`` per step, the activations are recomputed); ``"nested"``: blocks of
~sqrt(steps) steps are checkpointed too, so about ``2 sqrt(steps)`` states are kept.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp

from mednca_jax.config import REMAT_MODES

Run = Callable[[jax.Array, Any], tuple[jax.Array, Any]]


def check_remat(remat: str) -> None:
    if remat not in REMAT_MODES:
        raise ValueError(f"remat must be one of {REMAT_MODES}, got {remat!r}")


def nested_block(steps: int) -> int:
    """Steps per checkpointed block: sqrt(steps) blocks of sqrt(steps) steps."""
    return max(1, math.isqrt(steps))


def blocked_scan(run: Run, carry: jax.Array, xs: Any, steps: int) -> tuple[jax.Array, Any]:
    """``run(carry, xs)`` over all ``steps``, as checkpointed blocks of :func:`nested_block`
    steps (plus a shorter tail). ``xs`` is a pytree with a leading axis of ``steps``;
    ``run`` returns ``(carry, per-step outputs with a leading axis, or None)``."""
    block = nested_block(steps)
    n_blocks = steps // block
    cut = n_blocks * block
    head = jax.tree_util.tree_map(lambda a: a[:cut].reshape((n_blocks, block) + a.shape[1:]), xs)
    carry, out = jax.lax.scan(jax.checkpoint(run), carry, head)
    if out is not None:
        out = jax.tree_util.tree_map(lambda a: a.reshape((cut,) + a.shape[2:]), out)
    if cut < steps:
        carry, tail = run(carry, jax.tree_util.tree_map(lambda a: a[cut:], xs))
        if out is not None:
            out = jax.tree_util.tree_map(lambda a, b: jnp.concatenate([a, b]), out, tail)
    return carry, out
