"""The training losses (Med-NCA's DiceBCE, M3D-NCA's DiceFocal) and Dice metrics.

All functions take logits or probabilities ``(..., n_out)`` with the class channels last.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def _bce_with_logits(z: jax.Array, t: jax.Array) -> jax.Array:
    # = BCE(sigmoid(z), t) written stably; the original computes sigmoid then log and clamps
    # logs at -100, which only differs for |z| beyond float32 saturation (~17 .. 100).
    return jax.nn.softplus(z) - z * t


def dice_bce_sums(logits: jax.Array, target: jax.Array) -> jax.Array:
    """The batch sums DiceBCE is computed from, per output channel: ``(n_out, 5)`` holding
    ``[sum BCE(p, t), sum p t, sum p, sum t, number of pixels]``.

    Sums over parts of a batch add up to the sums of the whole batch, so a data-parallel step
    adds them over devices before :func:`dice_bce_from_sums`.
    """
    z = logits.reshape(-1, logits.shape[-1]).astype(jnp.float32)
    t = target.reshape(-1, target.shape[-1]).astype(jnp.float32)
    p = jax.nn.sigmoid(z)
    count = jnp.full((z.shape[1],), z.shape[0], jnp.float32)
    return jnp.stack([_bce_with_logits(z, t).sum(axis=0), (p * t).sum(axis=0), p.sum(axis=0), t.sum(axis=0), count], axis=1)


def dice_bce_from_sums(sums: jax.Array) -> jax.Array:
    """DiceBCE from :func:`dice_bce_sums` ``(n_out, 5)``: per channel
    ``mean BCE + 1 - (2 sum(p t) + 1) / (sum(p) + sum(t) + 1)``, averaged over the ``n_out``
    channels; a channel whose target has no foreground contributes 0, as in the original."""
    bce, pt, ps, ts, count = (sums[:, i] for i in range(5))
    dice = 1.0 - (2.0 * pt + 1.0) / (ps + ts + 1.0)
    # One sigmoid channel per class, each with its own DiceBCE, rather than a softmax over
    # classes: one class is then exactly the original Med-NCA, the rule and its runtimes need no
    # background channel, and each class's Dice term is not swamped by the large background.
    # The mean over all channels (not over those present) is the original's sum over present
    # channels divided by a constant: Adam trains the same, while the loss keeps the one-class
    # scale (train.max_loss, the logged figures).
    return jnp.sum(jnp.where(ts > 0, bce / count + dice, 0.0)) / sums.shape[0]


def dice_bce_loss(logits: jax.Array, target: jax.Array) -> jax.Array:
    """The original's DiceBCE loss, averaged over output channels (classes).

    Per channel ``c`` over the whole batch flattened (``p = sigmoid(z)``):
    ``mean BCE(p, t) + 1 - (2 sum(p t) + 1) / (sum(p) + sum(t) + 1)``; a channel whose
    target has no foreground in the batch contributes 0, as in the original. The loss is the
    mean of the ``n_out`` channels' (so one channel is the original's loss).

    Args:
        logits, target: ``(B, H, W, n_out)``, target in [0, 1].
    Returns:
        scalar loss (0 when no channel has foreground).
    """
    return dice_bce_from_sums(dice_bce_sums(logits, target))


def dice_focal_sums(logits: jax.Array, target: jax.Array) -> jax.Array:
    """The batch sums DiceFocal is computed from, per output channel: ``(n_out, 8)``, the five
    of :func:`dice_bce_sums` then ``[sum BCE e, sum BCE e**2, sum e]`` with ``e = exp(p)``.

    The original's focal factor is ``(1 - softmax(p))**2`` with the softmax over every voxel of
    the batch: ``softmax_i = e_i / S``, ``S = sum e``. Expanding the square,
    ``sum BCE_i (1 - e_i / S)**2 = sum BCE - 2 sum(BCE e) / S + sum(BCE e**2) / S**2``: every
    term is a sum, so parts of a batch (data-parallel shards) add up exactly as for DiceBCE.
    ``p`` is in [0, 1], so ``e`` cannot overflow.
    """
    z = logits.reshape(-1, logits.shape[-1]).astype(jnp.float32)
    t = target.reshape(-1, target.shape[-1]).astype(jnp.float32)
    bce, e = _bce_with_logits(z, t), jnp.exp(jax.nn.sigmoid(z))
    extra = jnp.stack([(bce * e).sum(axis=0), (bce * e * e).sum(axis=0), e.sum(axis=0)], axis=1)
    return jnp.concatenate([dice_bce_sums(logits, target), extra], axis=1)


def dice_focal_from_sums(sums: jax.Array) -> jax.Array:
    """DiceFocal from :func:`dice_focal_sums` ``(n_out, 8)``: per channel
    ``mean(BCE (1 - softmax(p))**2) + 1 - (2 sum(p t) + 1) / (sum(p) + sum(t) + 1)``, averaged
    over channels like :func:`dice_bce_from_sums` (a channel without foreground gives 0)."""
    bce, pt, ps, ts, count, bce_e, bce_e2, e_sum = (sums[:, i] for i in range(8))
    focal = (bce - 2.0 * bce_e / e_sum + bce_e2 / (e_sum * e_sum)) / count
    dice = 1.0 - (2.0 * pt + 1.0) / (ps + ts + 1.0)
    return jnp.sum(jnp.where(ts > 0, focal + dice, 0.0)) / sums.shape[0]


def dice_focal_loss(logits: jax.Array, target: jax.Array) -> jax.Array:
    """M3D-NCA's DiceFocal loss (REFERENCE.md, "M3D-NCA"): soft Dice (smooth 1) over the
    flattened batch plus the mean of ``BCE(p, t) (1 - softmax(p))**2``, the softmax taken
    over every voxel of the batch. That softmax is about ``1 / N`` per voxel, so the loss is
    in effect DiceBCE (within ``~2 / N`` of it); kept for exactness. Shapes as
    :func:`dice_bce_loss`."""
    return dice_focal_from_sums(dice_focal_sums(logits, target))


# train.loss -> (the per-part sums, the loss from the summed sums): the train step's two halves
LOSS_SUMS = {"dice_bce": (dice_bce_sums, dice_bce_from_sums), "dice_focal": (dice_focal_sums, dice_focal_from_sums)}


def has_foreground(target: jax.Array) -> jax.Array:
    """True where any channel of the batch has foreground (else the original skips the update)."""
    return jnp.any(target > 0)


def dice_soft(probs: np.ndarray, target: np.ndarray) -> float:
    """Soft Dice ``2 sum(p t) / (sum p + sum t)`` as the original reports it (no smoothing).

    Both empty counts as 1 (nothing to find, nothing found).
    """
    p = np.asarray(probs, np.float64)
    t = np.asarray(target, np.float64)
    denom = p.sum() + t.sum()
    return 1.0 if denom == 0 else float(2.0 * (p * t).sum() / denom)


def dice_hard(probs: np.ndarray, target: np.ndarray, threshold: float = 0.5) -> float:
    """Hard Dice of ``probs > threshold`` against ``target > 0.5``; both empty counts as 1."""
    p = np.asarray(probs) > threshold
    t = np.asarray(target) > 0.5
    denom = p.sum() + t.sum()
    return 1.0 if denom == 0 else float(2.0 * np.logical_and(p, t).sum() / denom)


def probabilities_to_labels(probs: np.ndarray) -> np.ndarray:
    """``(..., n_out)`` probabilities -> integer labels ``(...)`` uint8: 0 (background) where
    no channel's sigmoid exceeds 0.5, else the class ``c + 1`` of the most probable channel
    among those above 0.5 (the first on ties). One channel: ``p > 0.5``. The exported runtimes
    decode the same way (``labels_from_probability``)."""
    above = probs > 0.5
    best = np.argmax(np.where(above, probs, -1.0), axis=-1) + 1
    return np.where(above.any(axis=-1), best, 0).astype(np.uint8)


def dice_per_class(pred_labels: np.ndarray, target: np.ndarray) -> list[float]:
    """Hard Dice of each class ``c = 1..K``: ``pred_labels == c`` (integer labels ``(...)``,
    decoded from the probabilities) against channel ``c - 1`` of ``target (..., K)``; both
    empty counts as 1. With one class this is :func:`dice_hard` of ``probs`` itself."""
    labels = np.asarray(pred_labels)
    return [dice_hard(labels == c + 1, target[..., c]) for c in range(target.shape[-1])]


def soft_dice_per_class(probs: np.ndarray, target: np.ndarray) -> list[float]:
    """Soft Dice (:func:`dice_soft`) of each channel of ``probs``/``target (..., K)``."""
    return [dice_soft(probs[..., c], target[..., c]) for c in range(target.shape[-1])]


def volume_dice(probs: np.ndarray, target: np.ndarray) -> dict[str, float]:
    """Hard and soft Dice of one patient's stacked slices ``(S, H, W, n_out)``: the means
    over classes of :func:`dice_per_class` (of the decoded labels) and :func:`soft_dice_per_class`
    (one class: the original's per-volume figures)."""
    return {"dice": float(np.mean(dice_per_class(probabilities_to_labels(probs), target))),
            "dice_soft": float(np.mean(soft_dice_per_class(probs, target)))}
