"""Rollouts of one NCA level: :func:`rule.step` iterated with ``jax.lax.scan``.

The fire masks come from explicit per-sample keys, so the same keys give the same masks,
and the same states, on every backend (:mod:`mednca_jax.nca.backends`). Gradient
checkpointing (``remat``) is :mod:`mednca_jax.nca.remat`.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from mednca_jax.nca import cpu_fast
from mednca_jax.nca.backends import REFERENCE, Backend
from mednca_jax.nca.remat import blocked_scan, check_remat
from mednca_jax.nca.rule import Params, Rule, fire_mask, fire_masks, reset_inputs, sample_keys, step, step_keys


def count_params(params: Any) -> int:
    return int(sum(x.size for x in jax.tree_util.tree_leaves(params)))


def reference_rollout(
    rule: Rule,
    params: Params,
    x: jax.Array,
    image: jax.Array,
    xs: jax.Array,
    fire_rate: float | jax.Array,
    *,
    remat: str = "none",
    trajectory: bool = False,
) -> tuple[jax.Array, jax.Array | None]:
    """Iterate :func:`rule.step` over ``xs``: per-step keys ``(S, B)`` (each step's mask is drawn
    in the scan body, so masks take no memory across steps) or masks ``(S, B, *spatial)`` bool."""
    spatial = x.shape[1:-1]

    def one(carry, a):
        mask = a if a.dtype == jnp.bool_ else fire_mask(a, spatial, fire_rate)
        new = step(rule, params, carry, image, mask)
        return new, (new if trajectory else None)

    if remat != "none":
        one = jax.checkpoint(one, prevent_cse=False)

    def run(carry, xs_):
        return jax.lax.scan(one, carry, xs_)

    if remat == "nested":
        return blocked_scan(run, x, xs, xs.shape[0])
    return run(x, xs)


def check_state(rule: Rule, x: jax.Array) -> None:
    """``ValueError`` when ``x (B, *S, C)`` is not a state of ``rule`` (channels or rank)."""
    if x.shape[-1] != rule.channels or x.ndim - 2 != rule.ndim:
        raise ValueError(
            f"state of shape {x.shape} does not fit the rule: it expects {rule.ndim} spatial axes and "
            f"{rule.channels} channels, shape (B, {', '.join('S' + str(i) for i in range(rule.ndim))}, {rule.channels})"
        )


def rollout(
    params: Params,
    x: jax.Array,
    image: jax.Array,
    key: jax.Array,
    steps: int,
    fire_rate: float | jax.Array,
    *,
    rule: Rule = Rule(),
    backend: Backend = REFERENCE,
    remat: str = "none",
    trajectory: bool = False,
    masks: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array | None]:
    """``steps`` NCA steps of one level with ``jax.lax.scan``.

    Args:
        x: initial state ``(B, *S, C)``; image: ``(B, *S, n_in)``, written into the input
            channels before the first step and after every step.
        key: one key, or per-sample keys ``(B,)`` (see :func:`rule.sample_keys`); step ``s``
            of sample ``b`` draws its mask from ``split(keys[b], steps)[s]``.
        fire_rate: a cell updates where ``u > fire_rate``; static values let ``cpu_fast``
            compute only the fired cells.
        rule, backend: which rule, and which implementation runs it (:class:`Backend`).
        remat: ``none`` | ``step`` | ``nested`` (:mod:`mednca_jax.nca.remat`); values and
            gradients do not depend on it.
        trajectory: also return every state after each step, ``(steps, B, *S, C)``.
        masks: ``(steps, B, *S)`` bool, used instead of drawing from ``key``.

    Returns:
        ``(final state (B, *S, C), trajectory or None)``.
    """
    check_remat(remat)
    check_state(rule, x)
    keys = sample_keys(key, x.shape[0])
    x = reset_inputs(x, image)
    spatial = x.shape[1:-1]
    if masks is not None and masks.shape != (steps, x.shape[0]) + spatial:
        raise ValueError(f"masks must have shape {(steps, x.shape[0]) + spatial}, got {masks.shape}")
    if backend.name == "cpu_fast":
        if masks is None:
            masks = fire_masks(keys, steps, spatial, fire_rate)
        return cpu_fast.rollout(rule, params, x, image, masks, fire_rate, pieces=backend.pieces, remat=remat, trajectory=trajectory)
    xs = step_keys(keys, steps) if masks is None else masks
    return reference_rollout(rule, params, x, image, xs, fire_rate, remat=remat, trajectory=trajectory)


def nca_step(
    params: Params, x: jax.Array, image: jax.Array, key: jax.Array, fire_rate: float | jax.Array, *, rule: Rule = Rule()
) -> jax.Array:
    """One stochastic step of one level ``(B, *S, C) -> (B, *S, C)``, its masks drawn from
    ``key`` (one key or per-sample keys) as the first step of :func:`rollout`."""
    return rollout(params, x, image, key, 1, fire_rate, rule=rule)[0]
