"""Per-patient evaluation: predict every slice, stack to volumes, score, write NIfTI.

Metrics per case (REFERENCE.md, "Evaluation"): hard Dice (sigmoid > 0.5) and soft Dice on
the model grid, as the original reports them, and hard Dice on the native voxel grid (the
prediction resampled back to the input's shape, against the original label file). With
``runs >= 2`` the stochastic model is run several times: mean prediction, a variance
volume, and the NQM quality score (sum of std / sum of mean of the sigmoid outputs).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from . import networks
from .config import Config
from .data import Case, SliceSet, load_case, resample_to_native, write_volume
from .data.preprocess import encode_labels
from .losses import dice_hard, dice_soft
from .quality import nqm

PredictFn = Callable[[Any, jax.Array, jax.Array, jax.Array], jax.Array]


def make_predict_fn(cfg: Config) -> PredictFn:
    """Jitted ``(params, images (B,H,W,n_in), key, fire_rate) -> probabilities (B,H,W,n_out)``."""

    def predict(params, images, key, fire_rate):
        return jax.nn.sigmoid(networks.forward(params, cfg, images, key, fire_rate))

    return jax.jit(predict)


def predict_slices(
    predict: PredictFn,
    params: Any,
    images: np.ndarray,
    key: jax.Array,
    fire_rate: float,
    batch_size: int = 32,
) -> np.ndarray:
    """Probabilities for all ``images (N, H, W, n_in)`` -> ``(N, H, W, n_out)``.

    The last batch is padded to ``batch_size`` so one compiled shape serves every call.
    """
    n = images.shape[0]
    out = []
    for i, start in enumerate(range(0, n, batch_size)):
        chunk = images[start : start + batch_size]
        pad = batch_size - chunk.shape[0]
        if pad:
            chunk = np.concatenate([chunk, np.zeros((pad,) + chunk.shape[1:], chunk.dtype)])
        probs = predict(params, jnp.asarray(chunk), jax.random.fold_in(key, i), jnp.float32(fire_rate))
        out.append(np.asarray(probs)[: batch_size - pad])
    return np.concatenate(out) if out else np.zeros((0,), np.float32)


def probabilities_to_labels(probs: np.ndarray) -> np.ndarray:
    """``(..., n_out)`` probabilities -> integer labels ``(...)``: 0 background, else the
    most probable class ``c + 1`` among those above 0.5."""
    above = probs > 0.5
    best = np.argmax(np.where(above, probs, -1.0), axis=-1) + 1
    return np.where(above.any(axis=-1), best, 0).astype(np.uint8)


def _native_dice(pred_labels: np.ndarray, case: Case, cfg: Config, meta_shape: tuple[int, ...], axis: int) -> float:
    """Hard Dice on the native grid: predicted labels resampled back vs. the label file."""
    native_pred = resample_to_native(pred_labels, meta_shape, axis)
    label = load_case(case, cfg.data).label
    assert label is not None
    n_out = cfg.model.n_out
    t = encode_labels(label, cfg.data.labels, n_out)
    p = (native_pred[..., None] == np.arange(1, n_out + 1)).astype(np.float32)
    return dice_hard(p, t)


def evaluate_cases(
    params: Any,
    cfg: Config,
    slices: SliceSet,
    cases: Sequence[Case],
    key: jax.Array,
    *,
    fire_rate: float | None = None,
    runs: int = 1,
    batch_size: int = 32,
    out_dir: str | Path | None = None,
    native: bool = True,
    predict: PredictFn | None = None,
    progress: Callable[[Any], Any] = lambda it: it,
) -> dict[str, Any]:
    """Score every case of ``slices`` (and write predictions when ``out_dir`` is given).

    Returns ``{"summary": {metric: {"mean", "std"}}, "cases": {name: {metric: value}}}``
    with metrics ``dice``, ``dice_soft``, ``dice_native`` (when labels exist and ``native``)
    and ``nqm`` (when ``runs >= 2``). Unlabelled cases get predictions only.
    """
    if runs < 1:
        raise ValueError(f"runs must be >= 1, got {runs}")
    fire_rate = cfg.model.fire_rate if fire_rate is None else fire_rate
    predict = predict or make_predict_fn(cfg)
    by_name = {c.name: c for c in cases}
    run_probs = np.stack(
        [predict_slices(predict, params, slices.images, jax.random.fold_in(key, r), fire_rate, batch_size) for r in range(runs)]
    )  # (runs, N, H, W, n_out)
    probs = run_probs.mean(axis=0)
    out = Path(out_dir) if out_dir is not None else None
    results: dict[str, dict[str, float]] = {}
    for k, name in enumerate(progress(slices.case_names)):
        rows = slices.case_slices(k)
        p = probs[rows]
        pred_labels = probabilities_to_labels(p)
        r: dict[str, float] = {}
        if slices.labels is not None:
            t = slices.labels[rows]
            r["dice"] = dice_hard(p, t)
            r["dice_soft"] = dice_soft(p, t)
            if native and name in by_name and by_name[name].label is not None:
                r["dice_native"] = _native_dice(pred_labels, by_name[name], cfg, slices.native_shapes[k], slices.slice_axis)
        if runs >= 2:
            r["nqm"] = nqm(run_probs[:, rows])
        results[name] = r
        if out is not None:
            meta = slices.meta(k)
            write_volume(out / "predictions" / f"{name}.nii.gz", resample_to_native(pred_labels, meta.shape, slices.slice_axis), meta)
            if runs >= 2:
                var = run_probs[:, rows].var(axis=0).max(axis=-1).astype(np.float32)
                write_volume(out / "variance" / f"{name}.nii.gz", resample_to_native(var, meta.shape, slices.slice_axis), meta, np.float32)
    metrics = {"summary": summarize(results), "cases": results}
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics


def summarize(results: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    """Mean and (population) std over cases of every metric present."""
    keys = sorted({k for r in results.values() for k in r})
    summary = {}
    for k in keys:
        vals = np.array([r[k] for r in results.values() if k in r], np.float64)
        summary[k] = {"mean": float(vals.mean()), "std": float(vals.std()), "n": int(vals.size)}
    return summary


def format_table(metrics: dict[str, Any]) -> str:
    """A plain-text table: one row per case, then mean ± std."""
    cases = metrics["cases"]
    keys = list(metrics["summary"])
    if not keys:
        return f"{len(cases)} case(s) predicted (no labels, no metrics)"
    width = max([len("case")] + [len(n) for n in cases])
    lines = [f"{'case':<{width}}  " + "  ".join(f"{k:>11}" for k in keys)]
    for name, r in cases.items():
        lines.append(f"{name:<{width}}  " + "  ".join(f"{r[k]:>11.4f}" if k in r else f"{'-':>11}" for k in keys))
    s = metrics["summary"]
    lines.append(f"{'mean ± std':<{width}}  " + "  ".join(f"{s[k]['mean']:.4f}±{s[k]['std']:.3f}".rjust(11) for k in keys))
    return "\n".join(lines)
