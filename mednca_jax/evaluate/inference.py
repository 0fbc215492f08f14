"""Batched inference of a trained model on preprocessed slices or volumes, jitted once per shape.

Evaluation, the robustness suite, validation during training and ``mednca predict`` all
predict through these two functions.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from mednca_jax import networks
from mednca_jax.config import Config
from mednca_jax.nca.backends import Backend

PredictFn = Callable[[Any, jax.Array, jax.Array, jax.Array], jax.Array]


def make_predict_fn(cfg: Config, backend: Backend) -> PredictFn:
    """Jitted ``(params, images (B, *S, n_in), key, fire_rate) -> probabilities (B, *S, n_out)``.

    The fire rate is static (a Python float): with a known rate only the fired cells are
    computed (one compile per rate). ``backend``: the resolved backend
    (:func:`mednca_jax.machine.backend_for`, at the entry point)."""

    def predict(params, images, key, fire_rate):
        return jax.nn.sigmoid(networks.forward(params, cfg, images, key, fire_rate, backend))

    return jax.jit(predict, static_argnums=3)


def eval_batch_size(cfg: Config, requested: int = 32) -> int:
    """Images per inference call: ``requested`` for 2D slices, one volume in 3D
    (``data.volumetric``): batch norm (``model.norm = "batch"``) normalises with the statistics
    of the batch it is given, and the original M3D-NCA infers one volume at a time; a volume is
    also large enough alone (64x64x52 = 213k cells) to fill the CPU's caches."""
    return 1 if cfg.data.volumetric else int(requested)


def predict_slices(
    predict: PredictFn,
    params: Any,
    images: np.ndarray,
    key: jax.Array,
    fire_rate: float,
    batch_size: int = 32,
) -> np.ndarray:
    """Probabilities for all ``images (N, *S, n_in)`` -> ``(N, *S, n_out)``: 2D slices
    ``(N, H, W, n_in)`` or 3D volumes ``(N, X, Y, Z, n_in)``.

    The last batch is padded to ``batch_size`` so one compiled shape serves every call. Batch
    ``i`` uses ``fold_in(key, i)``. With batch norm (``model.norm = "batch"``) a sample's output
    depends on its batch, padding included: such 3D models predict with ``batch_size = 1``.
    """
    n = images.shape[0]
    out = []
    for i, start in enumerate(range(0, n, batch_size)):
        chunk = images[start : start + batch_size]
        pad = batch_size - chunk.shape[0]
        if pad:
            chunk = np.concatenate([chunk, np.zeros((pad,) + chunk.shape[1:], chunk.dtype)])
        probs = predict(params, jnp.asarray(chunk), jax.random.fold_in(key, i), float(fire_rate))
        out.append(np.asarray(probs)[: batch_size - pad])
    return np.concatenate(out) if out else np.zeros((0,), np.float32)
