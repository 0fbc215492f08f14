"""The registry of updates: how a cell turns what it perceives into its state change.

An update maps ``y = [x | features] (B, *S, C + F)`` to the residual ``d (B, *S, C)``. Each
entry carries its reference implementation, its parameters' initialisation and which
normalisations (``model.norm``) it takes.

Built-in: ``mlp``, the original's per-cell MLP ``d = fc1(relu(norm(fc0(y))))`` with ``fc1``
starting at zero (a fresh NCA is the identity). ``norm``:

- ``none``: the original Med-NCA.
- ``batch``: M3D-NCA's ``BatchNorm(track_running_stats=False)``: ``fc0``'s outputs are
  normalised with the mean and (biased) variance of the current batch over batch and space,
  then scaled and shifted by learned ``bn.scale`` / ``bn.bias`` (eps 1e-5). There are no
  running statistics, at inference either, so a sample's output depends on the other samples
  in its batch: batch-1 inference normalises over one volume's cells, and a data-parallel
  step normalises each device's shard over that shard only (as the original's
  ``DataParallel`` would). Results are therefore comparable only at the same batch layout.

Register more with :func:`register_update` from a plug-in module (``model.plugins``, see
docs/rule.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

import jax
import jax.numpy as jnp

from mednca_jax.nca.perceptions import torch_uniform
from mednca_jax.nca.registry import Registry

if TYPE_CHECKING:
    from mednca_jax.nca.rule import Rule

Params = dict[str, Any]
BN_EPS = 1e-5


@dataclass(frozen=True)
class Update:
    """One registered update: ``init(key, rule) -> params``, ``apply(params, y, rule) -> d``
    (the reference), and the ``norms`` it accepts (``model.norm``)."""

    init: Callable[[jax.Array, "Rule"], Params]
    apply: Callable[[Params, jax.Array, "Rule"], jax.Array]
    norms: tuple[str, ...] = ("none",)


UPDATES: Registry[Update] = Registry("update")


def register_update(name: str, update: Update, *, replace: bool = False) -> Update:
    """Add ``update`` to the registry under ``name`` (``model.update = name``); ``ValueError``
    when the name is taken and ``replace`` is not set."""
    return UPDATES.add(name, update, replace)


def get_update(name: str) -> Update:
    return UPDATES.lookup(name)


def matmul(a: jax.Array, b: jax.Array, precision: str) -> jax.Array:
    """``a @ b`` contracting the last axis of ``a`` with the first of ``b``; bfloat16 inputs
    with float32 accumulation when asked, else full float32 (no TF32 on GPUs)."""
    if precision == "bfloat16":
        return jnp.matmul(a.astype(jnp.bfloat16), b.astype(jnp.bfloat16), preferred_element_type=jnp.float32)
    return jnp.matmul(a, b, precision=jax.lax.Precision.HIGHEST)


def batch_norm(h: jax.Array, scale: jax.Array, bias: jax.Array) -> jax.Array:
    """``(h - mean) / sqrt(var + eps) * scale + bias`` with the mean and biased variance over
    every axis but the last (batch and space), as ``BatchNorm`` in training mode."""
    axes = tuple(range(h.ndim - 1))
    mean = jnp.mean(h, axis=axes)
    var = jnp.mean(jnp.square(h - mean), axis=axes)
    return (h - mean) * jax.lax.rsqrt(var + BN_EPS) * scale + bias


def linear_batch_norm(y: jax.Array, kernel: jax.Array, bias: jax.Array, scale: jax.Array, shift: jax.Array) -> jax.Array:
    """``batch_norm(y @ kernel + bias, scale, shift)`` computed as one matmul with folded weights.

    The statistics of ``h = y @ kernel + bias`` follow from ``y``'s: ``mean(h) = mean(y) @ kernel
    + bias`` and ``var(h) = diag(kernel^T cov(y) kernel)``, with ``cov(y)`` the ``(K, K)`` Gram
    matrix of the centred ``y`` (two passes: no cancellation when a mean is large). The
    normalisation is then a per-feature affine map folded into the kernel (``bias`` cancels
    against the mean, as in the literal form). Same values as the
    literal form to float32 rounding (``tests/test_updates.py``), but it never reduces over the
    ``(N, hidden)`` activations: on a 2-core CPU the literal form's reductions and their
    gradients took 40% of an M3D-NCA train step (BN off: 7.5 s against 12.6 s per step, a busy
    2-core AMD EPYC, 2026-12-07).
    """
    axes = tuple(range(y.ndim - 1))
    n = y.size // y.shape[-1]
    mu = jnp.mean(y, axis=axes)
    yc = y - mu  # centred once: the covariance and the product (whose rounding it keeps small)
    rows = yc.reshape(n, y.shape[-1])
    cov = jnp.matmul(rows.T, rows, precision=jax.lax.Precision.HIGHEST) / n
    var = jnp.sum(jnp.matmul(cov, kernel, precision=jax.lax.Precision.HIGHEST) * kernel, axis=0)
    return matmul(yc, kernel * (scale * jax.lax.rsqrt(var + BN_EPS)), "float32") + shift


# --------------------------------------------------------------------------- mlp
def _mlp_init(key: jax.Array, rule: "Rule") -> Params:
    kk, kb = jax.random.split(key)
    n_y = rule.channels + rule.n_features
    params = {
        "fc0": {"kernel": torch_uniform(kk, (n_y, rule.hidden), n_y), "bias": torch_uniform(kb, (rule.hidden,), n_y)},
        "fc1": {"kernel": jnp.zeros((rule.hidden, rule.channels), jnp.float32)},
    }
    if rule.norm == "batch":
        params["bn"] = {"scale": jnp.ones((rule.hidden,), jnp.float32), "bias": jnp.zeros((rule.hidden,), jnp.float32)}
    return params


def _mlp_apply(params: Params, y: jax.Array, rule: "Rule") -> jax.Array:
    fc0 = params["fc0"]
    if rule.norm == "batch" and rule.precision == "float32":
        h = linear_batch_norm(y, fc0["kernel"], fc0["bias"], params["bn"]["scale"], params["bn"]["bias"])
    else:
        h = matmul(y, fc0["kernel"], rule.precision) + fc0["bias"]
        if rule.norm == "batch":
            h = batch_norm(h, params["bn"]["scale"], params["bn"]["bias"])
    return matmul(jax.nn.relu(h), params["fc1"]["kernel"], rule.precision)


register_update("mlp", Update(_mlp_init, _mlp_apply, norms=("none", "batch")))
