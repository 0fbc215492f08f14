"""One entry point per operation for every model kind (``model.kind``: nca | unet).

Training, evaluation and checkpoints call these, so the UNet baseline goes through exactly
the same data, loss, optimiser, checkpoints and metrics as Med-NCA.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from mednca_jax.nca import levels
from mednca_jax.config import Config
from mednca_jax.nca.backends import Backend
from mednca_jax.nca.rule import fold_keys, sample_keys

# Folded into a sample's key for the UNet's training crop (model.unet_patch_size).
UNET_CROP_TAG = 0x756E6574


def init_network_params(cfg: Config, key: jax.Array) -> Any:
    if cfg.model.kind == "unet":
        from mednca_jax.baselines.unet import init_unet_params

        return init_unet_params(cfg.model, tuple(cfg.data.image_size), key)
    return levels.init_params(cfg.model, key, len(cfg.data.image_size))


def check_network_params(params: Any, cfg: Config) -> None:
    """Raise ``ValueError`` naming the first key/shape of ``params`` that does not fit ``cfg``."""
    if cfg.model.kind == "nca":
        levels.check_params(params, cfg.model, ndim=len(cfg.data.image_size))
        return
    expected = init_network_params(cfg, jax.random.PRNGKey(0))  # the UNet init is host-side NumPy: no eval_shape
    exp = {jax.tree_util.keystr(p): tuple(v.shape) for p, v in jax.tree_util.tree_leaves_with_path(expected)}
    got = {jax.tree_util.keystr(p): tuple(np.shape(v)) for p, v in jax.tree_util.tree_leaves_with_path(params)}
    if exp != got:
        bad = sorted(k for k in set(exp) | set(got) if exp.get(k) != got.get(k))
        raise ValueError(f"params do not fit the {cfg.model.kind} config at {bad[:5]}")


def forward_train(
    params: Any, cfg: Config, images: jax.Array, labels: jax.Array, keys: jax.Array, backend: Backend
) -> tuple[jax.Array, jax.Array]:
    """``(logits, labels)`` the loss is computed on: NCA random crops at ``model.fire_rate``
    with ``model.remat``; UNet whole images (2D or 3D, the rank of ``data.image_size``) or, with
    ``model.unet_patch_size = P``, one ``P×…×P`` crop per sample placed as the NCA's
    (``model.patch_foreground`` of them around foreground). ``keys``: per-sample keys ``(B,)``
    (see :func:`levels.forward_train`; they only place the UNet's crops)."""
    if cfg.model.kind == "unet":
        from mednca_jax.baselines.unet import unet_forward

        p = cfg.model.unet_patch_size
        if p and any(p < s for s in images.shape[1:-1]):
            crop_keys = fold_keys(sample_keys(keys, images.shape[0]), UNET_CROP_TAG)
            images, labels = levels.random_crops(crop_keys, (images, labels), p, labels, cfg.model.patch_foreground)
        return unet_forward(params, cfg.model, images), labels
    return levels.forward_train(params, cfg.model, images, labels, keys, cfg.model.fire_rate, backend=backend, remat=cfg.model.remat)


def forward(params: Any, cfg: Config, images: jax.Array, key: jax.Array, fire_rate: Any, backend: Backend) -> jax.Array:
    """Inference logits ``(B, *S, n_out)`` on whole images ``(B, *S, n_in)`` (the UNet ignores
    key/fire_rate)."""
    if cfg.model.kind == "unet":
        from mednca_jax.baselines.unet import unet_forward

        return unet_forward(params, cfg.model, images)
    return levels.forward(params, cfg.model, images, key, fire_rate, backend=backend)
