"""The paper's claims as measurements: Dice under shifts, scale changes and MRI artefacts,
and how well the NCA quality metric (NQM) flags failed cases.

Used by ``evaluate.py --robustness`` and ``evaluate.py --runs N``; works for any model kind,
on 2D slices and on 3D volumes (``data.volumetric``: each case is one ``(X, Y, Z)`` volume,
perturbed as a whole and scored by its per-volume Dice; inference one volume per call,
:func:`~.inference.eval_batch_size`). Results have the shape
``{perturbation: {severity_or_size: {"mean": dice, "std": dice}}}``, the format
:mod:`mednca_jax.evaluate.plots` draws.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import jax
import numpy as np

from mednca_jax.config import Config
from mednca_jax.data import SliceSet
from mednca_jax.evaluate.inference import PredictFn, eval_batch_size, predict_slices
from mednca_jax.losses import volume_dice
from mednca_jax.evaluate.perturbations import (
    PERTURBATIONS, SCALE_FACTORS_3D, SCALE_SIZES, apply_perturbation, check_severities, rescale, scaled_grid,
)
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
    ``(N, H, W, n_out)``, or of volumes ``(K, X, Y, Z, n_out)`` (one row per case)."""
    return np.array([volume_dice(probs[rows], labels[rows])["dice"] for rows in map(slices.case_slices, range(len(slices.case_names)))])


def _stats(d: np.ndarray) -> dict[str, float]:
    return {"mean": float(d.mean()), "std": float(d.std())}


def _runner(
    params: Any, cfg: Config, slices: SliceSet, key: jax.Array, fire_rate: float | None, batch_size: int,
    predict: PredictFn,
) -> tuple[Callable[[np.ndarray], np.ndarray], dict[str, float]]:
    """``run(images (N, *S)) -> probs (N, *S, n_out)`` for the model, and its clean per-case
    Dice stats. ``S``: ``(H, W)``, 3D ``(X, Y, Z)`` (then one volume per call, whatever
    ``batch_size``). ``predict``: a jitted :func:`~.inference.make_predict_fn` of ``cfg`` (one
    compile per caller and shape)."""
    if slices.labels is None:
        raise ValueError("the robustness suite needs labelled cases")
    fire_rate = cfg.model.fire_rate if fire_rate is None else fire_rate
    batch_size = eval_batch_size(cfg, batch_size)
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
    factors: Sequence[float] = SCALE_FACTORS_3D,
    fire_rate: float | None = None,
    seed: int = 0,
    batch_size: int = 32,
    progress: Callable[[Any], Any] = lambda it: it,
    predict: PredictFn,
) -> dict[str, dict[str, dict[str, float]]]:
    """Per-case Dice (mean, std over cases) for each perturbation and severity.

    ``slices``: 2D slices (images ``(N, H, W, 1)``) or, for a 3D model, volumes
    ``(K, X, Y, Z, 1)``; each perturbation acts on the whole slice / volume
    (:mod:`.perturbations` with the spatial rank of the images). ``"clean"`` holds the
    unperturbed figure (severity 0 of every curve). ``"scale"`` evaluates the model at other
    image sizes: images (bi/tri)linear, labels nearest; both model kinds are fully
    convolutional and run at the new size directly. 2D: square ``sizes`` (pixels), those not
    divisible by the coarsest level's scale (UNet: also ``2**unet_depth``) left out. 3D: the model
    grid times ``factors``, each side rounded to a multiple of that divisor
    (:func:`~.perturbations.scaled_grid`), keyed by the first side in voxels (``"24"`` for a
    ``24x24x18`` grid) so the plots and tables read it as a size.
    """
    names = check_perturbation_names(perturbations or list(PERTURBATIONS) + [SCALE])
    sev = check_severities(severities) if severities is not None else None
    run, clean = _runner(params, cfg, slices, key, fire_rate, batch_size, predict)
    images, labels = slices.images[..., 0], slices.labels
    ndim = images.ndim - 1
    divisor = math.lcm(cfg.model.scales[0], 2**cfg.model.unet_depth if cfg.model.kind == "unet" else 1)
    results: dict[str, dict[str, dict[str, float]]] = {"clean": {"0": clean}}
    for name in progress(names):
        if name == SCALE:
            results[SCALE] = {}
            if ndim == 2:
                grids = [(int(size),) * 2 for size in sizes if int(size) % divisor == 0]
            else:
                grids = list(dict.fromkeys(scaled_grid(images.shape[1:], f, divisor) for f in factors))
            for grid in grids:
                imgs, labs = rescale(images, labels, grid, ndim=ndim)
                results[SCALE][str(grid[0])] = _stats(per_case_dice(run(imgs), labs, slices))
            continue
        results[name] = {"0": clean}
        for s in sev if sev is not None else PERTURBATIONS[name].severities:
            imgs, labs = apply_perturbation(name, images, labels, float(s), seed, ndim=ndim)
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
    3D models: each ``(X, Y, Z)`` volume is one torchio image (:func:`.apply_torchio`).
    """
    names = check_torchio_names(list(perturbations) if perturbations else None)
    run, clean = _runner(params, cfg, slices, key, fire_rate, batch_size, predict)
    images = slices.images[..., 0]
    results: dict[str, dict[str, dict[str, float]]] = {"clean": {"0": clean}}
    for name in progress(names):
        results[name] = {"0": clean}
        for level in levels:
            perturbed = apply_torchio(name, images, int(level), seed, ndim=images.ndim - 1)
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
    if max(nqm_test) == min(nqm_test):
        # a deterministic model (the UNet) gives the same output in every run: NQM is constant
        return {"spearman_nqm_dice": None, "note": f"NQM is {max(nqm_test):g} for every case (identical runs: a deterministic model), so it ranks nothing"}
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
