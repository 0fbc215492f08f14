"""A plug-in template: a new perception (``gradient3``) and a new update (``gated``).

Use it from the repository root (paths in ``model.plugins`` are looked up in the working
directory, then in the folder of the config file)::

    mednca train --config demo --workdir runs/gated \\
        --set 'model.plugins=["examples/custom_rule.py"]' \\
        --set model.perception=gradient3 --set model.update=gated
    mednca evaluate --checkpoint runs/gated --split test

The run folder's ``config.toml`` records this file with its absolute path, so ``evaluate``,
``predict``, ``train --resume`` and ``export`` find it from any working directory (as long
as the file stays where it was). Copy this file, rename the two entries, and edit.

Shapes
------
A state is ``x (B, *S, C)``: batch, a spatial shape of any rank (``(H, W)`` in 2D,
``(X, Y, Z)`` in 3D) and ``C = model.channels`` channels. Every function below receives the
level's :class:`~mednca_jax.nca.rule.Rule` (``rule.channels``, ``rule.hidden``,
``rule.ndim``, ``rule.kernel_size``, ``rule.precision``, ...) and must work for any
``rule.ndim``.

A perception
------------
``Perception(n_features, init, filters=None, depthwise=None, apply=None, check=None)``:

- ``n_features(rule) -> F``: how many features it adds; the update then reads
  ``y = [x | features]``, ``C + F`` numbers per cell.
- ``init(key, rule) -> params``: its own parameters (a dict of arrays; ``{}`` for none).
  Key names must not clash with the update's.
- ``filters(params, rule) -> (K, b)``: for a **linear** perception, the whole perception as
  one reflect-padded cross-correlation, ``K (k,)*ndim + (C, F)`` and ``b (F,)`` with
  ``k = rule.kernel_size``. The reference backend convolves with them, ``cpu_fast`` gathers
  neighbourhoods and multiplies by ``K``, and the exporters write ``K`` and ``b``, so one
  definition runs everywhere. (``depthwise`` is the compact form of a per-channel bank.)
- ``apply(params, x, rule) -> (B, *S, F)``: instead of filters, for a **non-linear**
  perception. Only the ``reference`` backend runs it; ``cpu_fast`` and the exporters refuse.
- ``check(rule) -> str | None``: why the perception cannot take this rule (shown as a config
  error), or ``None``.

``gradient3`` below is linear: fixed central differences ``(x[i+1] - x[i-1]) / 2`` of every
channel along every axis, mixed by a learned ``(ndim * C, C)`` matrix plus a bias, so
``F = C``. It holds no identity tap: the state itself is already in ``y``.

An update
---------
``Update(init, apply, norms=("none",))``:

- ``init(key, rule) -> params``: the update's parameters; ``y`` has ``C + F`` features
  (``rule.channels + rule.n_features``).
- ``apply(params, y, rule) -> d``: the residual ``d (B, *S, C)`` from ``y (B, *S, C + F)``,
  computed per cell (any leading axes). The step adds ``d`` where cells fire and then writes
  the image back into the input channels.
- ``norms``: the values of ``model.norm`` it accepts.

``gated`` below is a sigmoid-gated residual
``d = sigmoid(y @ Wg + bg) * (relu(y @ W0 + b0) @ W1)`` with ``W1`` starting at zero, so a
fresh NCA is the identity (as the original's ``fc1``). Only the ``reference`` backend runs
an update other than the built-in ``mlp``: with ``model.backend = "auto"`` training says so
once and uses it; ``model.backend = "cpu_fast"`` is an error naming the update, and the
NumPy / ONNX / PyTorch exporters refuse it (they interpret ``mlp`` only).

Registering
-----------
``register_perception(name, p)`` / ``register_update(name, u)`` raise ``ValueError`` when a
name is already taken by another definition (a built-in included). A plug-in file listed in
``model.plugins`` is imported once per process however often a config names it, so it
registers unconditionally.
"""

from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from mednca_jax.nca.perceptions import Perception, register_perception, torch_uniform
from mednca_jax.nca.rule import Rule
from mednca_jax.nca.updates import Update, matmul, register_update

Params = dict[str, Any]


# --------------------------------------------------------------------------- gradient3
def central_differences(ndim: int) -> np.ndarray:
    """``(ndim, 3, ..., 3)``: the central difference along each axis (taps ``-1/2, 0, 1/2``
    along it, the centre only along the others), as cross-correlation taps."""
    diff, centre = np.array([-0.5, 0.0, 0.5]), np.array([0.0, 1.0, 0.0])
    bank = []
    for axis in range(ndim):
        taps = np.ones(())
        for b in range(ndim):
            taps = np.multiply.outer(taps, diff if b == axis else centre)
        bank.append(taps)
    return np.stack(bank).astype(np.float32)


def _gradient3_init(key: jax.Array, rule: Rule) -> Params:
    # PyTorch's default Linear init over the ndim * C gradient inputs.
    n_in = rule.ndim * rule.channels
    kk, kb = jax.random.split(key)
    return {"mix": {"kernel": torch_uniform(kk, (n_in, rule.channels), n_in), "bias": torch_uniform(kb, (rule.channels,), n_in)}}


def _gradient3_filters(params: Params, rule: Rule) -> tuple[jax.Array, jax.Array]:
    # Mixing gradients linearly is itself a linear filter: K[tap, c, f] = sum_a D_a[tap] W[a, c, f].
    c = rule.channels
    mix = params["mix"]["kernel"].reshape(rule.ndim, c, c)
    kernel = jnp.einsum("a...,acf->...cf", jnp.asarray(central_differences(rule.ndim)), mix)
    return kernel, params["mix"]["bias"]


def _gradient3_check(rule: Rule) -> Optional[str]:
    return None if rule.kernel_size == 3 else f"central differences are 3 wide: needs kernel_size 3, got {rule.kernel_size}"


GRADIENT3 = register_perception(
    "gradient3",
    Perception(n_features=lambda rule: rule.channels, init=_gradient3_init, filters=_gradient3_filters, check=_gradient3_check),
)


# --------------------------------------------------------------------------- gated
def _gated_init(key: jax.Array, rule: Rule) -> Params:
    n_y = rule.channels + rule.n_features
    kg, kgb, k0, k0b = jax.random.split(key, 4)
    return {
        "gate": {"kernel": torch_uniform(kg, (n_y, rule.channels), n_y), "bias": torch_uniform(kgb, (rule.channels,), n_y)},
        "fc0": {"kernel": torch_uniform(k0, (n_y, rule.hidden), n_y), "bias": torch_uniform(k0b, (rule.hidden,), n_y)},
        # zero: a fresh NCA changes nothing, and learning starts from the identity
        "fc1": {"kernel": jnp.zeros((rule.hidden, rule.channels), jnp.float32)},
    }


def _gated_apply(params: Params, y: jax.Array, rule: Rule) -> jax.Array:
    gate = jax.nn.sigmoid(matmul(y, params["gate"]["kernel"], rule.precision) + params["gate"]["bias"])
    h = jax.nn.relu(matmul(y, params["fc0"]["kernel"], rule.precision) + params["fc0"]["bias"])
    return gate * matmul(h, params["fc1"]["kernel"], rule.precision)


GATED = register_update("gated", Update(init=_gated_init, apply=_gated_apply, norms=("none",)))
