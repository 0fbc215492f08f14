"""NCA quality metric (NQM, M3D-NCA) and failure detection from it (NumPy only).

The NCA fires a random half of its cells each step, so N inference runs of one case give N
slightly different sigmoid outputs. Where the model is unsure the runs disagree; NQM sums that
disagreement relative to the predicted volume (docs/design.md, "Evaluation and quality"):

    NQM = Σ_voxels std_runs(p) / Σ_voxels mean_runs(p)

High NQM flags a likely failure. Across cases we check how well it ranks Dice (Spearman) and
how well a threshold, chosen on validation cases, detects failures (Dice below a threshold).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

# the file `mednca predict --runs N` writes beside its predictions (NQM per input)
QUALITY_FILE = "quality.json"


def _runs(probs_runs: Any) -> np.ndarray:
    p = np.asarray(probs_runs, dtype=np.float64)
    if p.ndim < 1 or p.shape[0] < 2:
        raise ValueError(
            f"NQM needs at least 2 stochastic runs stacked on axis 0 (use --runs N with N >= 2), "
            f"got shape {p.shape}"
        )
    return p


def std_map(probs_runs: Any, ddof: int = 1) -> np.ndarray:
    """Per-voxel std over runs: ``(N, ...) -> (...)`` (the variance map shown per case)."""
    p = _runs(probs_runs)
    # std is shift-invariant; centring on run 0 makes identical runs give exactly 0
    return (p - p[:1]).std(axis=0, ddof=ddof)


def variance_volume(probs_runs: Any) -> np.ndarray:
    """The written variance volume: per-voxel variance over runs, max over classes,
    ``(N, ..., n_out) -> (...)`` float32."""
    return np.asarray(probs_runs).var(axis=0).max(axis=-1).astype(np.float32)


def nqm(probs_runs: Any, ddof: int = 1) -> float:
    """NCA quality metric of one case.

    Args:
        probs_runs: ``(N, ...)`` sigmoid probabilities of N >= 2 stochastic runs over the whole
            case (e.g. ``(N, slices, H, W)`` or ``(N, slices, H, W, n_out)``).
        ddof: 1 (the default of ``torch.std``, which the original code uses) or 0.

    Returns:
        ``Σ std / Σ mean`` over all voxels; 0.0 when every run is identical; ``inf`` when the
        runs differ but predict nothing on average (cannot happen with sigmoid outputs > 0).

    Raises:
        ValueError: fewer than 2 runs.
    """
    p = _runs(probs_runs)
    s = float(std_map(p, ddof).sum())
    m = float(p.mean(axis=0).sum())
    if s == 0.0:
        return 0.0
    return s / m if m > 0 else math.inf


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n, ties sharing the mean of the ranks they span."""
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    # boundaries of runs of equal values in sorted order
    starts = np.flatnonzero(np.r_[True, xs[1:] != xs[:-1]])
    ends = np.r_[starts[1:], len(xs)]
    avg = (starts + ends + 1) / 2.0  # mean of ranks start+1 .. end
    ranks = np.empty(len(x))
    ranks[order] = np.repeat(avg, ends - starts)
    return ranks


def spearman(a: Any, b: Any) -> float:
    """Spearman rank correlation (Pearson correlation of average ranks; ties averaged).

    NaN when either input is constant (no ranking). ValueError for different lengths, fewer
    than 2 values, or NaN entries.
    """
    x, y = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    if x.shape != y.shape:
        raise ValueError(f"spearman needs equally long inputs, got {x.size} and {y.size}")
    if x.size < 2:
        raise ValueError(f"spearman needs at least 2 values, got {x.size}")
    if np.isnan(x).any() or np.isnan(y).any():
        raise ValueError("spearman inputs contain NaN")
    rx, ry = _average_ranks(x), _average_ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denom = math.sqrt(float((rx**2).sum() * (ry**2).sum()))
    return float((rx * ry).sum() / denom) if denom > 0 else math.nan


def _confusion(nqm_val: np.ndarray, dice_val: np.ndarray, nqm_threshold: float, dice_threshold: float) -> tuple[int, int, int, int]:
    flagged = nqm_val > nqm_threshold
    failed = dice_val < dice_threshold
    tp = int(np.sum(flagged & failed))
    fp = int(np.sum(flagged & ~failed))
    tn = int(np.sum(~flagged & ~failed))
    fn = int(np.sum(~flagged & failed))
    return tp, fp, tn, fn


def _pair(nqm_val: Any, dice_val: Any) -> tuple[np.ndarray, np.ndarray]:
    q, d = np.asarray(nqm_val, np.float64).ravel(), np.asarray(dice_val, np.float64).ravel()
    if q.shape != d.shape or q.size == 0:
        raise ValueError(f"need one NQM per Dice value (non-empty), got {q.size} NQM and {d.size} Dice")
    return q, d


def choose_nqm_threshold(nqm_val: Any, dice_val: Any, dice_threshold: float) -> float:
    """NQM threshold that best separates failures on validation cases.

    A case is a failure when ``dice < dice_threshold`` and is flagged when ``nqm > threshold``.
    Candidates are the midpoints between consecutive distinct NQM values plus one below the
    smallest and the largest value itself; the one with the highest Youden's J
    (sensitivity + specificity − 1, i.e. balanced accuracy − 1/2) wins, ties going to the
    larger threshold (fewer false alarms).

    With only one class in the validation data J is undefined: no failures gives the largest
    NQM (flag nothing seen so far), all failures gives a value below the smallest (flag all).
    """
    q, d = _pair(nqm_val, dice_val)
    failed = d < dice_threshold
    uniq = np.unique(q[np.isfinite(q)])
    if uniq.size == 0:
        raise ValueError("no finite NQM values to choose a threshold from")
    below = uniq[0] - max(1e-6, 1e-3 * abs(uniq[0]))
    if not failed.any():
        return float(uniq[-1])
    if failed.all():
        return float(below)
    candidates = np.r_[below, (uniq[1:] + uniq[:-1]) / 2.0, uniq[-1]]
    best, best_j = float(candidates[0]), -math.inf
    for t in candidates:
        tp, fp, tn, fn = _confusion(q, d, float(t), dice_threshold)
        j = tp / (tp + fn) + tn / (tn + fp) - 1.0
        if j >= best_j - 1e-12:
            best, best_j = float(t), j
    return best


def failure_detection_summary(nqm_val: Any, dice_val: Any, nqm_threshold: float, dice_threshold: float) -> dict[str, Any]:
    """Confusion counts of "NQM > nqm_threshold" as a detector of "Dice < dice_threshold".

    Returns a JSON-ready dict: ``n, n_failures, nqm_threshold, dice_threshold, TP, FP, TN, FN,
    sensitivity, specificity, balanced_accuracy`` (rates are None when undefined, e.g. no
    failures).
    """
    q, d = _pair(nqm_val, dice_val)
    tp, fp, tn, fn = _confusion(q, d, nqm_threshold, dice_threshold)
    sens = tp / (tp + fn) if tp + fn else None
    spec = tn / (tn + fp) if tn + fp else None
    bal = (sens + spec) / 2 if sens is not None and spec is not None else None
    return {
        "n": int(q.size),
        "n_failures": tp + fn,
        "nqm_threshold": float(nqm_threshold),
        "dice_threshold": float(dice_threshold),
        "TP": tp,
        "FP": fp,
        "TN": tn,
        "FN": fn,
        "sensitivity": sens,
        "specificity": spec,
        "balanced_accuracy": bal,
    }
