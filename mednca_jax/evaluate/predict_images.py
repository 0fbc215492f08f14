"""``mednca predict`` for a model trained on an image folder (``data.format = "images"``).

Each image goes through the training preprocessing (:func:`mednca_jax.data.images.preprocess_image`:
resize into the model grid by ``data.resize``, per-channel normalisation), the model's jitted
prediction, and back to the image's own size (:func:`~mednca_jax.data.images.grid_to_native`).
The mask is an 8-bit greyscale PNG of class values (0 background, 1..n_out; a one-class mask
holds 0 and 1, so it looks black in an image viewer). With ``runs >= 2`` the labels come from
the mean probability, and a float TIFF of the variance and the NQM per image are written too.

Every input is read and checked (readable, grey or RGB as the model) before the first output,
and every output is written under a temporary name and renamed when complete.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mednca_jax.config import Config
from mednca_jax.data import Case, DataError
from mednca_jax.data import images as img
from mednca_jax.data.formats import check_task_cases
from mednca_jax.errors import PredictError
from mednca_jax.evaluate.quality import QUALITY_FILE

MASK_SUFFIX = ".png"
VARIANCE_SUFFIX = "_variance.tif"


@dataclass(frozen=True)
class ImageJob:
    """One input image and where its outputs go."""

    name: str
    image: Path
    label_out: Path
    variance_out: Path


def plan_images(input_path: str | Path, output_path: str | Path) -> tuple[list[ImageJob], Path]:
    """The images to segment, their output files, and the quality JSON's path.

    A file input with an output ending in ``.png`` writes that file (variance
    ``<output stem>_variance.tif``, NQM ``<output stem>_quality.json``). A folder input (its
    image files, not recursive), or a file input with any other output, writes
    ``OUTPUT/<stem>.png``, ``OUTPUT/<stem>_variance.tif`` and ``OUTPUT/quality.json``.

    Raises:
        PredictError: a missing input, a file that is not an image, a folder without images,
            two inputs of one stem, an output that does not fit the input or would overwrite it.
    """
    src, dst = Path(input_path), Path(output_path)
    if not src.exists():
        raise PredictError(f"--input {src} does not exist")
    to_file = dst.suffix.lower() == MASK_SUFFIX
    if src.is_dir():
        files = img.image_files(src)
        if not files:
            hint = f" (an image folder keeps them in {img.IMAGES_DIR}/: pass {src / img.IMAGES_DIR})" if (src / img.IMAGES_DIR).is_dir() else ""
            raise PredictError(f"--input folder {src} holds no image file ({', '.join(img.IMAGE_SUFFIXES)}){hint}")
        if to_file:
            raise PredictError(f"--output {dst} names a PNG file, but --input {src} is a folder: name an output folder")
    else:
        if src.suffix.lower() not in img.IMAGE_SUFFIXES:
            raise PredictError(f"--input {src} is not an image file (expected {', '.join(img.IMAGE_SUFFIXES)}); "
                               "this model was trained on images (data.format = 'images')")
        files = [src]
    if to_file:
        jobs = [ImageJob(src.stem, src, dst, dst.with_name(dst.stem + VARIANCE_SUFFIX))]
        quality = dst.with_name(dst.stem + "_quality.json")
    else:
        if dst.exists() and not dst.is_dir():
            raise PredictError(f"--output {dst} exists and is not a folder; name a new or existing folder")
        stems: dict[str, Path] = {}
        for p in files:
            if p.stem in stems:
                raise PredictError(f"--input {p} and {stems[p.stem]} would both write {dst / (p.stem + MASK_SUFFIX)}; "
                                   "rename one of them")
            stems[p.stem] = p
        jobs = [ImageJob(p.stem, p, dst / f"{p.stem}{MASK_SUFFIX}", dst / f"{p.stem}{VARIANCE_SUFFIX}") for p in files]
        quality = dst / QUALITY_FILE
    inputs = {p.resolve() for p in files}
    for job in jobs:
        if job.label_out.resolve() in inputs or job.variance_out.resolve() in inputs:
            raise PredictError(f"--output {dst} would overwrite the input {job.image}; choose another output")
    return jobs, quality


def predict_images(
    params: Any,
    cfg: Config,
    input_path: str | Path,
    output_path: str | Path,
    *,
    fire_rate: float,
    runs: int,
    seed: int,
    batch_size: int,
    predict: Any,
    log: Any = print,
) -> dict[str, Any]:
    """Segment the images of ``input_path`` (a file or a folder) into ``output_path``; returns
    ``{"scans": {stem: {...}}, ...}`` (also written to the quality JSON when ``runs >= 2``).

    ``predict``: from :func:`~mednca_jax.evaluate.inference.make_predict_fn`. Images are
    predicted ``batch_size`` at a time; run ``r`` of batch ``b`` uses the key
    ``fold_in(fold_in(PRNGKey(seed), r), b)``.

    Raises:
        PredictError: any problem with the arguments or an input image, before anything is written.
    """
    import jax

    from mednca_jax.evaluate.evaluation import probabilities_to_labels
    from mednca_jax.evaluate.inference import predict_slices
    from mednca_jax.evaluate.quality import nqm, variance_volume
    from mednca_jax.train.checkpoint import write_text_atomic

    jobs, quality_json = plan_images(input_path, output_path)
    try:  # all inputs first: a bad file stops the command before any output
        check_task_cases([Case(j.name, j.image) for j in jobs], cfg, input_path)
    except DataError as e:
        raise PredictError(str(e)) from None
    key = jax.random.PRNGKey(seed)
    report: dict[str, Any] = {"runs": runs, "fire_rate": fire_rate, "seed": seed, "scans": {}}
    for b, start in enumerate(range(0, len(jobs), batch_size)):
        chunk = jobs[start : start + batch_size]
        raw = [img.read_image(j.image) for j in chunk]
        grid = np.concatenate([img.preprocess_image(a, None, cfg.data)[0] for a in raw])  # (b, H, W, c)
        run_probs = np.stack([
            predict_slices(predict, params, grid, jax.random.fold_in(jax.random.fold_in(key, r), b), fire_rate, batch_size)
            for r in range(runs)
        ])  # (runs, b, H, W, n_out)
        for i, (job, a) in enumerate(zip(chunk, raw)):
            native = a.shape[:2]
            labels = img.grid_to_native(probabilities_to_labels(run_probs[:, i].mean(axis=0)), native, cfg.data)
            img.write_mask_png(job.label_out, labels)
            entry: dict[str, Any] = {"input": str(job.image), "labels": str(job.label_out), "shape": list(native),
                                     "foreground_pixels": int((labels > 0).sum())}
            if runs >= 2:
                variance = img.grid_to_native(variance_volume(run_probs[:, i]), native, cfg.data)
                img.write_float_tiff(job.variance_out, variance)
                entry.update(variance=str(job.variance_out), nqm=nqm(run_probs[:, i]))
            report["scans"][job.name] = entry
            nq = f" (NQM {entry['nqm']:.4f})" if runs >= 2 else ""
            log(f"{job.name}: {native[1]}x{native[0]} -> {job.label_out}{nq}")
    if runs >= 2:
        write_text_atomic(quality_json, json.dumps(report, indent=2) + "\n")
        log(f"NQM per image (higher: the runs disagree more, a likely failure): {quality_json}")
    return report
