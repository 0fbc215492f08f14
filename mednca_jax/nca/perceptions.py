"""The registry of perceptions: what a cell sees of its neighbourhood.

A perception maps a state ``x (B, *S, C)`` to features ``(B, *S, F)``; the rule's update then
reads ``y = [x | features]``. Each entry carries its reference implementation and what a
faster backend or an exported runtime needs to run it without a second definition:

- ``filters(params, rule)``: a *linear* perception is one reflect-padded cross-correlation
  with ``K (k,)*ndim + (C, F)`` and bias ``b (F,)``, ``k = rule.kernel_size``. Every backend
  and runtime runs any linear perception from these filters alone.
- ``depthwise(params, rule)``: optionally, the compact form of a linear perception whose
  feature ``m*C + c`` reads channel ``c`` only: ``(Kd (k,)*ndim + (C, M), b (M*C,))``. The dense
  ``K`` is then derived (:func:`dense_from_depthwise`); runtimes may use the compact form.
- ``apply(params, x, rule)``: a non-linear perception gives its features directly; only the
  ``reference`` backend runs it, and the others refuse it by name.

Built-ins: ``learned`` (the original's two learned convs, ``F = 2C``), ``sobel`` (a fixed
gradient and Laplacian bank per channel, ``F = (ndim + 1) C``, kernel 3) and ``depthwise``
(M3D-NCA's: one learned depthwise conv with bias, ``F = C``). Register more with
:func:`register_perception`, from a plug-in module (``model.plugins``, see docs/rule.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from mednca_jax.nca.registry import Registry

if TYPE_CHECKING:
    from mednca_jax.nca.rule import Rule

Params = dict[str, Any]
Filters = tuple[jax.Array, jax.Array]


@dataclass(frozen=True)
class Perception:
    """One registered perception (see the module docstring for each field).

    ``check(rule)`` returns why this perception cannot take ``rule`` (e.g. a kernel size it
    has no filters for), or ``None``.
    """

    n_features: Callable[["Rule"], int]
    init: Callable[[jax.Array, "Rule"], Params]
    filters: Optional[Callable[[Params, "Rule"], Filters]] = None
    depthwise: Optional[Callable[[Params, "Rule"], Filters]] = None
    apply: Optional[Callable[[Params, jax.Array, "Rule"], jax.Array]] = None
    check: Optional[Callable[["Rule"], Optional[str]]] = None

    @property
    def linear(self) -> bool:
        return self.filters is not None or self.depthwise is not None


PERCEPTIONS: Registry[Perception] = Registry("perception")


def register_perception(name: str, perception: Perception, *, replace: bool = False) -> Perception:
    """Add ``perception`` to the registry under ``name`` (``model.perception = name``).

    Raises ``ValueError`` when the name is taken (pass ``replace=True`` to redefine it, e.g.
    when a plug-in module is imported again) or the entry defines neither filters nor apply.
    """
    if not (perception.linear or perception.apply is not None):
        raise ValueError(f"perception {name!r} needs filters, depthwise filters or an apply function")
    return PERCEPTIONS.add(name, perception, replace)


def get_perception(name: str) -> Perception:
    return PERCEPTIONS.lookup(name)


# --------------------------------------------------------------------------- helpers
def torch_uniform(key: jax.Array, shape: tuple[int, ...], fan_in: int) -> jax.Array:
    """PyTorch's default init for conv/linear layers: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(fan_in)
    return jax.random.uniform(key, shape, jnp.float32, -bound, bound)


def conv_init(key: jax.Array, kernel_shape: tuple[int, ...], fan_in: int) -> Params:
    """``{"kernel": kernel_shape, "bias": (kernel_shape[-1],)}`` with PyTorch's default init."""
    kk, kb = jax.random.split(key)
    return {"kernel": torch_uniform(kk, kernel_shape, fan_in), "bias": torch_uniform(kb, (kernel_shape[-1],), fan_in)}


def dense_from_depthwise(kernel: jax.Array) -> jax.Array:
    """``Kd (k,)*nd + (C, M)`` -> the dense ``K (k,)*nd + (C, M*C)`` with feature ``m*C + c``
    reading channel ``c`` only."""
    c, m = kernel.shape[-2:]
    eye = jnp.eye(c, dtype=kernel.dtype)
    dense = jnp.einsum("...cm,cd->...cmd", kernel, eye)  # (..., C_in, M, C_out)
    return dense.reshape(kernel.shape[:-2] + (c, m * c))


def filters_of(rule: "Rule", params: Params) -> Filters:
    """The dense linear filters ``(K (k,)*nd + (C, F), b (F,))`` of ``rule``'s perception;
    ``ValueError`` naming it when it is not linear."""
    p = get_perception(rule.perception)
    if p.filters is not None:
        return p.filters(params, rule)
    if p.depthwise is not None:
        kernel, bias = p.depthwise(params, rule)
        return dense_from_depthwise(kernel), bias
    raise ValueError(f"perception {rule.perception!r} is not linear: it has no filters (only the reference backend runs it)")


# --------------------------------------------------------------------------- learned
def _learned_init(key: jax.Array, rule: "Rule") -> Params:
    k0, k1 = jax.random.split(key)
    shape, fan_in = (rule.kernel_size,) * rule.ndim + (rule.channels, rule.channels), rule.kernel_size**rule.ndim * rule.channels
    return {"p0": conv_init(k0, shape, fan_in), "p1": conv_init(k1, shape, fan_in)}


def _learned_filters(params: Params, rule: "Rule") -> Filters:
    kernel = jnp.concatenate([params["p0"]["kernel"], params["p1"]["kernel"]], axis=-1)
    return kernel, jnp.concatenate([params["p0"]["bias"], params["p1"]["bias"]])


# --------------------------------------------------------------------------- sobel
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


def _sobel_depthwise(params: Params, rule: "Rule") -> Filters:
    # Feature f * C + c is filter f applied to channel c.
    bank = sobel_bank(rule.ndim)  # (M, 3, ..., 3)
    kernel = np.broadcast_to(np.moveaxis(bank, 0, -1)[..., None, :], (3,) * rule.ndim + (rule.channels, bank.shape[0]))
    return jnp.asarray(kernel), jnp.zeros((bank.shape[0] * rule.channels,), jnp.float32)


def _kernel_3_only(rule: "Rule") -> Optional[str]:
    return None if rule.kernel_size == 3 else f"the sobel bank is 3 wide: needs kernel_size 3, got {rule.kernel_size}"


# --------------------------------------------------------------------------- depthwise
def _depthwise_init(key: jax.Array, rule: "Rule") -> Params:
    # A conv with groups = C: each output sees one input channel, fan-in k**ndim.
    shape = (rule.kernel_size,) * rule.ndim + (rule.channels, 1)
    p = conv_init(key, shape, rule.kernel_size**rule.ndim)
    return {"p0": {"kernel": p["kernel"], "bias": torch_uniform(jax.random.fold_in(key, 1), (rule.channels,), rule.kernel_size**rule.ndim)}}


def _depthwise_filters(params: Params, rule: "Rule") -> Filters:
    return params["p0"]["kernel"], params["p0"]["bias"]


register_perception("learned", Perception(lambda r: 2 * r.channels, _learned_init, filters=_learned_filters))
register_perception(
    "sobel", Perception(lambda r: (r.ndim + 1) * r.channels, lambda key, r: {}, depthwise=_sobel_depthwise, check=_kernel_3_only)
)
register_perception("depthwise", Perception(lambda r: r.channels, _depthwise_init, depthwise=_depthwise_filters))
