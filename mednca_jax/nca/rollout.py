"""One NCA level: its parameters, the backends that run its rule, and the rollout.

The rule itself is :mod:`mednca_jax.nca.rule`. A rollout iterates :func:`rule.step` with
``jax.lax.scan``; the fire masks come from explicit per-sample keys, so the same keys give
the same masks, and the same states, on every backend:

- ``reference``: the rule as written, differentiated by JAX itself, with honest remat modes
  (:mod:`mednca_jax.nca.remat`); any spatial rank, float32 or bfloat16 matmul inputs. Runs
  anywhere (CPU, GPU, TPU) and is what a researcher edits.
- ``cpu_fast``: :mod:`mednca_jax.nca.cpu_fast`, derived from the rule's perception filters
  (fired cells only, a hand-written VJP); 2D, float32. 3-6x faster on XLA:CPU.

``model.backend = "auto"`` takes ``cpu_fast`` on a CPU for rules it supports, else
``reference``. The choice is made at the entry point (:func:`mednca_jax.train.launch.backend_for`)
and passed in as a static :class:`Backend`; nothing here reads the machine.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mednca_jax.nca import cpu_fast
from mednca_jax.config import BACKENDS
from mednca_jax.nca.remat import blocked_scan, check_remat
from mednca_jax.nca.rule import (  # noqa: F401  (re-exported: the rule's pieces are part of this module's API)
    Params, Rule, fire_mask, fire_masks, init_rule_params, perceive, reset_inputs, sample_keys, step, step_keys, update,
)


# --------------------------------------------------------------------------- parameters
class NCARule(nn.Module):
    """One NCA level as a Flax module: declares the parameters of :func:`rule.init_rule_params`
    (the original's initialisation) and applies :func:`rule.step`.

    Params (``"learned"``): ``p0``/``p1``: ``{"kernel": (3, 3, C, C), "bias": (C,)}``;
    ``fc0``: ``{"kernel": (3C, hidden), "bias": (hidden,)}``; ``fc1``: ``{"kernel": (hidden, C)}``.
    """

    channels: int
    hidden: int
    perception: str = "learned"
    ndim: int = 2

    @nn.compact
    def __call__(self, x: jax.Array, image: jax.Array, mask: jax.Array) -> jax.Array:
        def full(key):
            return init_rule_params(key, self.channels, self.hidden, self.perception, self.ndim)

        names = jax.eval_shape(full, jax.random.PRNGKey(0)).keys()
        params = {name: self.param(name, lambda key, n=name: full(key)[n]) for name in names}
        return step(Rule(self.perception), params, x, image, mask)


def init_level_params(key: jax.Array, channels: int, hidden: int, perception: str = "learned", ndim: int = 2) -> Params:
    """Fresh parameters of one level (see :class:`NCARule` for the tree)."""
    x = jnp.zeros((1,) + (3,) * ndim + (channels,), jnp.float32)
    mask = jnp.ones(x.shape[:-1], bool)
    return NCARule(channels, hidden, perception, ndim).init(key, x, x[..., :1], mask)["params"]


def count_params(params: Any) -> int:
    return int(sum(x.size for x in jax.tree_util.tree_leaves(params)))


# --------------------------------------------------------------------------- backends
@dataclass(frozen=True)
class Backend:
    """A resolved backend (static): ``name`` is ``"reference"`` or ``"cpu_fast"``; ``pieces``
    is into how many independent pieces ``cpu_fast`` splits a step (one per usable core, at
    most 2; XLA:CPU runs them side by side); ``group_cells``: inference runs a large batch in
    groups of about this many cells, one group after the other (0: the whole batch at once;
    see :func:`mednca_jax.nca.levels.forward`)."""

    name: str = "reference"
    pieces: int = 1
    group_cells: int = 0


# cpu_fast inference in groups of ~8 slices of 64x64: a step's working set (state, gathered
# neighbourhoods) then stays in the CPU caches. Measured on 2 cores, batch 32 of 64x64 at 2 x 64
# steps: 24.1 ms/slice whole, 15.7 in groups of 8, 15.1 of 4, 17.9 of 2, 23.4 one by one.
CPU_GROUP_CELLS = 8 * 64 * 64


REFERENCE = Backend("reference")


def resolve_backend(requested: str, rule: Rule, platform: str, cores: int, ndim: int = 2) -> Backend:
    """The backend for ``model.backend = requested`` on ``platform`` (``jax.default_backend()``)
    with ``cores`` usable CPU cores. ``auto``: ``cpu_fast`` on a CPU when it supports the rule,
    else ``reference``. Asking for ``cpu_fast`` by name for a rule it cannot run raises
    ``ValueError`` saying why."""
    if requested not in BACKENDS:
        raise ValueError(f"model.backend must be one of {BACKENDS}, got {requested!r}")
    if requested == "reference":
        return REFERENCE
    try:
        cpu_fast.check_supported(rule, ndim)
    except ValueError:
        if requested == "cpu_fast":
            raise
        return REFERENCE
    if requested == "auto" and platform != "cpu":
        return REFERENCE
    return Backend("cpu_fast", pieces=2 if platform == "cpu" and cores >= 2 else 1, group_cells=CPU_GROUP_CELLS if platform == "cpu" else 0)


# --------------------------------------------------------------------------- rollouts
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
