"""The NCA rule as data: :class:`Rule` describes one level's rule, and one step is a pure
function of that description.

A state is ``x (B, *S, C)`` with ``S`` the spatial shape of any rank (``(H, W)`` for Med-NCA,
``(X, Y, Z)`` for M3D-NCA); channels ``[0, n_in)`` hold the input image, ``[n_in, n_in +
n_out)`` the logits, the rest are hidden. One step (docs/design.md, "One NCA step"):

    y = perceive(x)          [x | perception(x)]                           (B, *S, C + F)
    d = update(y)            e.g. fc1(relu(norm(fc0(y)))), per cell        (B, *S, C)
    x = x + d * mask         mask = u > fire_rate, u ~ U(0, 1] per cell    (B, *S)
    x[..., :n_in] = image    input reset

The perception and the update are looked up by name in their registries
(:mod:`mednca_jax.nca.perceptions`, :mod:`mednca_jax.nca.updates`), where each entry carries
its reference implementation. This module is the reference every backend and exported
runtime is derived from and tested against (``tests/test_equivalence.py``): a backend reads
the same :class:`Rule` and either runs it exactly or refuses it by name.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from mednca_jax.nca import prng
from mednca_jax.nca.depthwise import depthwise_conv_reflect
from mednca_jax.nca.perceptions import filters_of, get_perception
from mednca_jax.nca.updates import get_update

Params = dict[str, Any]


class Rule(NamedTuple):
    """Everything a backend or runtime needs to know about one level's rule (static).

    - ``perception``: a registered perception; ``kernel_size``: its odd window (3 for the
      original, 7 for M3D-NCA's coarse level).
    - ``update``: a registered update; ``norm``: its normalisation (``none`` | ``batch``).
    - ``channels`` ``C``, ``hidden`` (the update's width), ``n_in`` (input channels, reset
      after every step), ``ndim`` (spatial rank).
    - ``precision``: matmul inputs, ``float32`` or ``bfloat16`` with float32 accumulation.

    The fire mask is one uniform number per cell and step, ``u > fire_rate`` (the rate is an
    argument of the rollout, not of the rule).
    """

    perception: str = "learned"
    kernel_size: int = 3
    update: str = "mlp"
    norm: str = "none"
    channels: int = 16
    hidden: int = 128
    n_in: int = 1
    ndim: int = 2
    precision: str = "float32"

    @property
    def n_features(self) -> int:
        """``F``, the number of perception features (the update reads ``C + F`` per cell)."""
        return get_perception(self.perception).n_features(self)

    def describe(self) -> dict[str, Any]:
        """The description as plain data (what an exported runtime reads)."""
        return {**self._asdict(), "features": self.n_features, "linear": get_perception(self.perception).linear}


def level_rule(model_cfg: Any, level: int, ndim: int = 2) -> Rule:
    """The :class:`Rule` of ``level`` of a :class:`~mednca_jax.config.ModelConfig` for states
    of spatial rank ``ndim`` (the one place a config becomes a rule)."""
    m = model_cfg
    return Rule(m.perception, m.kernel_of(level), m.update, m.norm, m.channels, m.hidden, m.n_in, ndim, m.precision)


def level_rules(model_cfg: Any, ndim: int = 2) -> tuple[Rule, ...]:
    """One :class:`Rule` per level, coarse to fine."""
    return tuple(level_rule(model_cfg, i, ndim) for i in range(model_cfg.n_levels))


def check_rule(rule: Rule) -> None:
    """Raise ``ValueError`` naming what does not fit: an unknown perception or update, an
    even kernel, a norm the update does not take, or the perception's own objection."""
    p, u = get_perception(rule.perception), get_update(rule.update)
    if rule.kernel_size < 1 or rule.kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be odd and >= 1, got {rule.kernel_size}")
    if rule.norm not in u.norms:
        raise ValueError(f"update {rule.update!r} takes norm {u.norms}, got {rule.norm!r}")
    why = p.check(rule) if p.check is not None else None
    if why:
        raise ValueError(f"perception {rule.perception!r}: {why}")


def init_level(key: jax.Array, rule: Rule) -> Params:
    """Fresh parameters of one level, initialised as the original (PyTorch's defaults, ``fc1``
    zero): ``{**perception params, **update params}``, e.g. for ``learned`` + ``mlp``:
    ``p0``/``p1``: ``{"kernel": (k,)*nd + (C, C), "bias": (C,)}``, ``fc0``: ``{"kernel":
    (C + F, hidden), "bias": (hidden,)}``, ``fc1``: ``{"kernel": (hidden, C)}``."""
    check_rule(rule)
    kp, ku = jax.random.split(key)
    return {**get_perception(rule.perception).init(kp, rule), **get_update(rule.update).init(ku, rule)}


# --------------------------------------------------------------------------- the step
def _spatial(ndim: int) -> str:
    return "HWDTUV"[:ndim]


def conv_reflect(x: jax.Array, kernel: jax.Array, precision: str = "float32") -> jax.Array:
    """Reflect-padded ``k x k (x k ...)`` cross-correlation ``(B, *S, C) -> (B, *S, F)`` with
    ``kernel (k,)*ndim + (C, F)``, ``k`` odd. Reflect mirrors without repeating the border
    (torch's ``padding_mode="reflect"``)."""
    ndim = x.ndim - 2
    r = kernel.shape[0] // 2
    xp = jnp.pad(x, [(0, 0)] + [(r, r)] * ndim + [(0, 0)], mode="reflect")
    s = _spatial(ndim)
    dims = jax.lax.conv_dimension_numbers(xp.shape, kernel.shape, (f"N{s}C", f"{s}IO", f"N{s}C"))
    if precision == "bfloat16":
        xp, kernel = xp.astype(jnp.bfloat16), kernel.astype(jnp.bfloat16)
        return jax.lax.conv_general_dilated(xp, kernel, (1,) * ndim, "VALID", dimension_numbers=dims, preferred_element_type=jnp.float32)
    return jax.lax.conv_general_dilated(
        xp, kernel, (1,) * ndim, "VALID", dimension_numbers=dims, precision=jax.lax.Precision.HIGHEST
    )


def perceive(rule: Rule, params: Params, x: jax.Array) -> jax.Array:
    """``[x | perception(x)]``: ``(B, *S, C) -> (B, *S, C + F)``. A linear perception is one
    reflect-padded conv with its filters (with its compact depthwise form when it has one:
    the same features at ``1/C`` of the work, :mod:`mednca_jax.nca.depthwise`); another one
    runs its own ``apply``."""
    p = get_perception(rule.perception)
    if p.apply is not None:
        features = p.apply(params, x, rule)
    elif p.filters is None and p.depthwise is not None:
        kernel, bias = p.depthwise(params, rule)
        features = depthwise_conv_reflect(x, kernel, rule.precision) + bias
    else:
        kernel, bias = filters_of(rule, params)
        features = conv_reflect(x, kernel, rule.precision) + bias
    return jnp.concatenate([x, features.astype(x.dtype)], axis=-1)


def update(rule: Rule, params: Params, y: jax.Array) -> jax.Array:
    """The residual ``d (B, *S, C)`` of the rule's update from ``y (B, *S, C + F)``."""
    return get_update(rule.update).apply(params, y, rule)


def reset_inputs(x: jax.Array, image: jax.Array) -> jax.Array:
    """Write ``image (B, *S, n_in)`` into channels ``[0, n_in)`` of ``x (B, *S, C)``."""
    return jnp.concatenate([image.astype(x.dtype), x[..., image.shape[-1] :]], axis=-1)


def step(rule: Rule, params: Params, x: jax.Array, image: jax.Array, mask: jax.Array) -> jax.Array:
    """One stochastic step: ``x (B, *S, C)``, ``image (B, *S, n_in)``, ``mask (B, *S)`` bool."""
    d = update(rule, params, perceive(rule, params, x))
    return reset_inputs(x + d * mask[..., None].astype(x.dtype), image)


# --------------------------------------------------------------------------- randomness
def sample_keys(key: jax.Array, batch: int) -> jax.Array:
    """Per-sample keys ``(B,)``: ``fold_in(key, i)`` for sample ``i``, so that any subset of a
    batch (a data-parallel shard) draws exactly its own samples' numbers. A key that already
    holds one key per sample is returned as it is."""
    typed = jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key)
    if key.ndim == (1 if typed else 2):
        if key.shape[0] != batch:
            raise ValueError(f"got {key.shape[0]} per-sample keys for a batch of {batch}")
        return key
    return jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(batch))


def fold_keys(keys: jax.Array, tag: int) -> jax.Array:
    """``fold_in(k, tag)`` of every key in ``keys (B,)``."""
    return jax.vmap(lambda k: jax.random.fold_in(k, tag))(keys)


def step_keys(keys: jax.Array, steps: int) -> jax.Array:
    """``(steps, B)`` keys: each sample's key split into one key per step."""
    return jnp.swapaxes(jax.vmap(lambda k: jax.random.split(k, steps))(keys), 0, 1)


def fire_mask(keys: jax.Array, spatial: tuple[int, ...], fire_rate: float | jax.Array) -> jax.Array:
    """One step's update mask ``u > fire_rate`` ``(B, *S)`` bool from per-sample keys ``(B,)``.

    ``u`` is drawn from (0, 1] (not [0, 1)) so that ``fire_rate = 0`` updates every cell
    exactly; a static rate of 0 draws nothing. The numbers are ``jax.random.uniform``'s
    (through :func:`prng.uniform`, faster on CPU).
    """
    if not isinstance(fire_rate, jax.core.Tracer) and float(fire_rate) == 0.0:
        return jnp.ones((keys.shape[0],) + tuple(spatial), bool)
    u = 1.0 - jax.vmap(lambda k: prng.uniform(k, tuple(spatial)))(keys)
    return u > fire_rate


def fire_masks(keys: jax.Array, steps: int, spatial: tuple[int, ...], fire_rate: float | jax.Array) -> jax.Array:
    """Masks of a whole rollout ``(steps, B, *S)``: :func:`fire_mask` of :func:`step_keys`."""
    return jax.vmap(lambda k: fire_mask(k, spatial, fire_rate))(step_keys(keys, steps))
