"""The paper's claims as measurements: Dice under shifts, scale changes and MRI artefacts,
and how well the NCA quality metric (NQM) flags failed cases.

Used by ``evaluate.py --robustness`` and ``evaluate.py --runs N``; works for any model kind.
Results have the shape ``{perturbation: {severity_or_size: {"mean": dice, "std": dice}}}``,
the format :mod:`mednca_jax.evaluate.plots` draws.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import numpy as np

from mednca_jax.config import Config
from mednca_jax.data import SliceSet
from mednca_jax.evaluate.inference import PredictFn, predict_slices
from mednca_jax.losses import volume_dice
from mednca_jax.evaluate.perturbations import PERTURBATIONS, SCALE_SIZES, apply_perturbation, check_severities, rescale
from mednca_jax.evaluate.perturbations_torchio import TORCHIO_LEVELS, apply_torchio, check_torchio_names
from mednca_jax.evaluate.quality import choose_nqm_threshold, failure_detection_summary, spearman

SCALE = "scale"


def check_perturbation_names(names: Sequence[str]) -> list[str]:
    """Validate names (registry entries or ``"scale"``); raise listing the valid choices."""
    valid = list(PERTURBATIONS) + [SCALE]
    bad = [n for n in names if n not in valid]
    if bad:
        raise ValueError(f"unknown perturbation(s) {bad}; valid choices: {', '.join(valid)}")
    return list(names)


def per_case_dice(probs: np.ndarray, labels: np.ndarray, slices: SliceSet) -> np.ndarray:
    """Hard Dice per case ``(K,)`` (the mean over classes) of slice-wise ``probs``/``labels``
    ``(N, H, W, n_out)``."""
    return np.array([volume_dice(probs[rows], labels[rows])["dice"] for rows in map(slices.case_slices, range(len(slices.case_names)))])


def _stats(d: np.ndarray) -> dict[str, float]:
    return {"mean": float(d.mean()), "std": float(d.std())}


def _runner(
    params: Any, cfg: Config, slices: SliceSet, key: jax.Array, fire_rate: float | None, batch_size: int,
    predict: PredictFn,
) -> tuple[Callable[[np.ndarray], np.ndarray], dict[str, float]]:
    """``run(images (N, H, W)) -> probs`` for the model, and its clean per-case Dice stats.
    ``predict``: a jitted :func:`~.inference.make_predict_fn` of ``cfg`` (one compile per caller)."""
    if slices.labels is None:
        raise ValueError("the robustness suite needs labelled cases")
    fire_rate = cfg.model.fire_rate if fire_rate is None else fire_rate
    run = lambda imgs: predict_slices(predict, params, imgs[..., None].astype(np.float32), key, fire_rate, batch_size)  # noqa: E731
    return run, _stats(per_case_dice(run(slices.images[..., 0]), slices.labels, slices))


def robustness_suite(
    params: Any,
    cfg: Config,
    slices: SliceSet,
    key: jax.Array,
    *,
    perturbations: Sequence[str] | None = None,
    severities: Sequence[float] | None = None,
    sizes: Sequence[int] = SCALE_SIZES,
    fire_rate: float | None = None,
    seed: int = 0,
    batch_size: int = 32,
    progress: Callable[[Any], Any] = lambda it: it,
    predict: PredictFn,
) -> dict[str, dict[str, dict[str, float]]]:
    """Per-case Dice (mean, std over cases) for each perturbation and severity.

    ``"clean"`` holds the unperturbed figure (severity 0 of every curve). ``"scale"``
    evaluates the model at other image sizes (``sizes``, pixels): images bilinear, labels
    nearest; both model kinds are fully convolutional and run at the new size directly.
    """
    names = check_perturbation_names(perturbations or list(PERTURBATIONS) + [SCALE])
    sev = check_severities(severities) if severities is not None else None
    run, clean = _runner(params, cfg, slices, key, fire_rate, batch_size, predict)
    images, labels = slices.images[..., 0], slices.labels
    results: dict[str, dict[str, dict[str, float]]] = {"clean": {"0": clean}}
    for name in progress(names):
        if name == SCALE:
            results[SCALE] = {}
            for size in sizes:
                if size % cfg.model.scales[0] or (cfg.model.kind == "unet" and size % 2**cfg.model.unet_depth):
                    continue
                imgs, labs = rescale(images, labels, size)
                results[SCALE][str(size)] = _stats(per_case_dice(run(imgs), labs, slices))
            continue
        results[name] = {"0": clean}
        for s in sev if sev is not None else PERTURBATIONS[name].severities:
            imgs, labs = apply_perturbation(name, images, labels, float(s), seed)
            results[name][str(float(s))] = _stats(per_case_dice(run(imgs), labs, slices))
    return results


def torchio_suite(
    params: Any,
    cfg: Config,
    slices: SliceSet,
    key: jax.Array,
    *,
    perturbations: Sequence[str] | None = None,
    levels: Sequence[int] = TORCHIO_LEVELS,
    fire_rate: float | None = None,
    seed: int = 0,
    batch_size: int = 32,
    progress: Callable[[Any], Any] = lambda it: it,
    predict: PredictFn,
) -> dict[str, dict[str, dict[str, float]]]:
    """Per-case Dice under the torchio protocol (:mod:`.perturbations_torchio`), levels 1…5.

    Same layout as :func:`robustness_suite`: ``{"clean": {"0": …}, name: {"0": clean,
    "1": …, …, "5": …}}`` with the transforms' class names (``RandomGhosting``, …) as names.
    """
    names = check_torchio_names(list(perturbations) if perturbations else None)
    run, clean = _runner(params, cfg, slices, key, fire_rate, batch_size, predict)
    images = slices.images[..., 0]
    results: dict[str, dict[str, dict[str, float]]] = {"clean": {"0": clean}}
    for name in progress(names):
        results[name] = {"0": clean}
        for level in levels:
            perturbed = apply_torchio(name, images, int(level), seed)
            results[name][str(int(level))] = _stats(per_case_dice(run(perturbed), slices.labels, slices))
    return results


def quality_summary(
    nqm_test: Sequence[float],
    dice_test: Sequence[float],
    nqm_val: Sequence[float] | None,
    dice_val: Sequence[float] | None,
    dice_threshold: float,
) -> dict[str, Any]:
    """Spearman(NQM, Dice) on the test cases and failure detection with an NQM threshold
    chosen on validation cases (on the test cases themselves, flagged as such, without)."""
    if len(nqm_test) < 2:
        return {"spearman_nqm_dice": None, "note": f"quality statistics need >= 2 labelled cases, got {len(nqm_test)}"}
    chosen_on = "val" if nqm_val is not None and len(nqm_val) >= 2 else "test (no validation cases)"
    ref_n, ref_d = (nqm_val, dice_val) if chosen_on == "val" else (nqm_test, dice_test)
    thr = choose_nqm_threshold(ref_n, ref_d, dice_threshold)
    return {
        "spearman_nqm_dice": spearman(nqm_test, dice_test),
        "nqm_threshold": thr,
        "threshold_chosen_on": chosen_on,
        "failure_detection": failure_detection_summary(nqm_test, dice_test, thr, dice_threshold),
    }


__all__ = ["SCALE", "check_perturbation_names", "per_case_dice", "quality_summary", "robustness_suite", "torchio_suite", "PredictFn"]
