"""The NCA rule, once: perception, update, fire mask and one step, as pure functions.

This is the definition every backend is derived from and tested against
(``tests/test_equivalence.py``). A state is ``x (B, *S, C)`` with ``S`` the spatial shape of
any rank (``(H, W)`` for the 2D model); channels ``[0, n_in)`` hold the input image,
``[n_in, n_in + n_out)`` the logits, the rest are hidden. One step (docs/design.md, "One
NCA step"):

    y = perceive(x)                          [x | conv3x3(x; K) + b]            (B, *S, C + F)
    d = fc1(relu(fc0(y)))                    per-cell MLP                        (B, *S, C)
    x = x + d * mask                         mask = u > fire_rate, u ~ U(0, 1]   (B, *S)
    x[..., :n_in] = image

A *perception* says what ``K`` and ``b`` are. ``"learned"`` is the original's: two learned
3x3 convs ``p0``, ``p1`` (``F = 2C``). ``"sobel"`` is the fixed filter bank of the
growing-NCA literature: a Sobel gradient along each spatial axis and a Laplacian, per
channel (``F = (rank + 1) C``). To add a rule, register a :class:`Perception`; a linear one
(``filters`` given) runs on every backend, since the fast CPU path only needs ``K`` and ``b``.
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from mednca_jax.nca import prng

Params = dict[str, Any]


class Rule(NamedTuple):
    """The static choices of a rule: which perception, and the matmul input precision
    (``"float32"``, or ``"bfloat16"`` inputs with float32 accumulation)."""

    perception: str = "learned"
    precision: str = "float32"


# --------------------------------------------------------------------------- initialisation
def torch_uniform(key: jax.Array, shape: tuple[int, ...], fan_in: int) -> jax.Array:
    """PyTorch's default init for conv/linear layers: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(fan_in)
    return jax.random.uniform(key, shape, jnp.float32, -bound, bound)


def _conv_init(key: jax.Array, channels: int, ndim: int) -> Params:
    kk, kb = jax.random.split(key)
    fan_in = 3**ndim * channels
    return {
        "kernel": torch_uniform(kk, (3,) * ndim + (channels, channels), fan_in),
        "bias": torch_uniform(kb, (channels,), fan_in),
    }


# --------------------------------------------------------------------------- perceptions
class Perception(NamedTuple):
    """One perception rule.

    ``init(key, channels, ndim) -> params`` (its own parameters, may be empty);
    ``filters(params, channels, ndim) -> (K (3,)*ndim + (C, F), b (F,))`` for a linear 3x3
    perception; ``n_features(channels, ndim) -> F``.
    """

    init: Callable[[jax.Array, int, int], Params]
    filters: Callable[[Params, int, int], tuple[jax.Array, jax.Array]]
    n_features: Callable[[int, int], int]


def _learned_init(key: jax.Array, channels: int, ndim: int) -> Params:
    k0, k1 = jax.random.split(key)
    return {"p0": _conv_init(k0, channels, ndim), "p1": _conv_init(k1, channels, ndim)}


def _learned_filters(params: Params, channels: int, ndim: int) -> tuple[jax.Array, jax.Array]:
    kernel = jnp.concatenate([params["p0"]["kernel"], params["p1"]["kernel"]], axis=-1)
    return kernel, jnp.concatenate([params["p0"]["bias"], params["p1"]["bias"]])


def sobel_bank(ndim: int) -> np.ndarray:
    """``(ndim + 1, 3, ..., 3)``: a Sobel derivative along each axis (central difference
    ``[-1, 0, 1] / 2`` along it, smoothing ``[1, 2, 1] / 4`` along the others), then the
    Laplacian (the sum over axes of ``[1, -2, 1]``). Cross-correlation taps, as the convs."""
    diff, smooth, second = np.array([-1.0, 0.0, 1.0]) / 2, np.array([1.0, 2.0, 1.0]) / 4, np.array([1.0, -2.0, 1.0])
    centre = np.array([0.0, 1.0, 0.0])

    def outer(vectors):
        out = np.ones(())
        for v in vectors:
            out = np.multiply.outer(out, v)
        return out

    grads = [outer([diff if a == b else smooth for b in range(ndim)]) for a in range(ndim)]
    lap = sum(outer([second if a == b else centre for b in range(ndim)]) for a in range(ndim))
    return np.stack(grads + [lap]).astype(np.float32)


def _sobel_filters(params: Params, channels: int, ndim: int) -> tuple[jax.Array, jax.Array]:
    # Depthwise: feature f * C + c is filter f applied to channel c.
    bank = sobel_bank(ndim)  # (n_filters, 3, ..., 3)
    eye = np.eye(channels, dtype=np.float32)
    kernel = np.einsum("f...,cd->...cfd", bank, eye).reshape((3,) * ndim + (channels, bank.shape[0] * channels))
    return jnp.asarray(kernel), jnp.zeros((kernel.shape[-1],), jnp.float32)


PERCEPTIONS: dict[str, Perception] = {
    "learned": Perception(_learned_init, _learned_filters, lambda c, nd: 2 * c),
    "sobel": Perception(lambda key, c, nd: {}, _sobel_filters, lambda c, nd: (nd + 1) * c),
}


def get_perception(name: str) -> Perception:
    if name not in PERCEPTIONS:
        raise ValueError(f"unknown perception {name!r}; registered: {sorted(PERCEPTIONS)}")
    return PERCEPTIONS[name]


def perception_filters(perception: str, params: Params, channels: int, ndim: int = 2) -> tuple[jax.Array, jax.Array]:
    """``(K (3,)*ndim + (C, F), b (F,))`` of a level's linear perception (after ``x`` itself)."""
    return get_perception(perception).filters(params, channels, ndim)


def init_rule_params(key: jax.Array, channels: int, hidden: int, perception: str = "learned", ndim: int = 2) -> Params:
    """Fresh parameters of one level, initialised as the original.

    ``{**perception params, "fc0": {"kernel": (C + F, hidden), "bias": (hidden,)},
    "fc1": {"kernel": (hidden, C)}}``; fc1 starts at zero so that a fresh NCA is the identity.
    """
    rule = get_perception(perception)
    kp, kk, kb = jax.random.split(key, 3)
    n_y = channels + rule.n_features(channels, ndim)
    return {
        **rule.init(kp, channels, ndim),
        "fc0": {"kernel": torch_uniform(kk, (n_y, hidden), n_y), "bias": torch_uniform(kb, (hidden,), n_y)},
        "fc1": {"kernel": jnp.zeros((hidden, channels), jnp.float32)},
    }


# --------------------------------------------------------------------------- the rule
def _spatial(ndim: int) -> str:
    return "HWDTUV"[:ndim]


def matmul(a: jax.Array, b: jax.Array, precision: str) -> jax.Array:
    """``a @ b`` contracting the last axis of ``a`` with the first of ``b``; bfloat16 inputs
    with float32 accumulation when asked, else full float32 (no TF32 on GPUs)."""
    if precision == "bfloat16":
        return jnp.matmul(a.astype(jnp.bfloat16), b.astype(jnp.bfloat16), preferred_element_type=jnp.float32)
    return jnp.matmul(a, b, precision=jax.lax.Precision.HIGHEST)


def conv3x3(x: jax.Array, kernel: jax.Array, precision: str = "float32") -> jax.Array:
    """Reflect-padded 3x3 (3x3x3, ...) cross-correlation ``(B, *S, C) -> (B, *S, F)``;
    ``kernel (3,)*ndim + (C, F)``. Reflect mirrors without repeating the border (torch's)."""
    ndim = x.ndim - 2
    xp = jnp.pad(x, [(0, 0)] + [(1, 1)] * ndim + [(0, 0)], mode="reflect")
    s = _spatial(ndim)
    dims = jax.lax.conv_dimension_numbers(xp.shape, kernel.shape, (f"N{s}C", f"{s}IO", f"N{s}C"))
    if precision == "bfloat16":
        xp, kernel = xp.astype(jnp.bfloat16), kernel.astype(jnp.bfloat16)
        return jax.lax.conv_general_dilated(xp, kernel, (1,) * ndim, "VALID", dimension_numbers=dims, preferred_element_type=jnp.float32)
    return jax.lax.conv_general_dilated(
        xp, kernel, (1,) * ndim, "VALID", dimension_numbers=dims, precision=jax.lax.Precision.HIGHEST
    )


def perceive(rule: Rule, params: Params, x: jax.Array) -> jax.Array:
    """``[x | conv3x3(x; K) + b]``: ``(B, *S, C) -> (B, *S, C + F)``."""
    kernel, bias = perception_filters(rule.perception, params, x.shape[-1], x.ndim - 2)
    return jnp.concatenate([x, conv3x3(x, kernel, rule.precision) + bias], axis=-1)


def update(rule: Rule, params: Params, y: jax.Array) -> jax.Array:
    """The residual ``d = fc1(relu(fc0(y)))``: ``(B, *S, C + F) -> (B, *S, C)``."""
    hidden = jax.nn.relu(matmul(y, params["fc0"]["kernel"], rule.precision) + params["fc0"]["bias"])
    return matmul(hidden, params["fc1"]["kernel"], rule.precision)


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
