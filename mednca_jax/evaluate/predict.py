"""Segment new, unlabelled NIfTI scans: ``mednca predict`` (a model trained on 2D image
folders segments images instead: :mod:`mednca_jax.evaluate.predict_images`).

Each scan goes through the training preprocessing and the model's jitted prediction
(``inference.make_predict_fn`` / ``predict_slices``, as ``mednca evaluate`` uses), and back to
the scan's own voxel grid. A 2D model (two ``data.image_size`` entries) segments slices
(``data.preprocess.preprocess_volume``: slices along ``data.slice_axis``, bicubic resize to
``data.image_size``, per-slice [0, 1] normalisation; back with ``data.resample_to_native``).
A 3D model (three entries, ``data.volumetric``) segments the whole volume at once, one volume
per batch (batch norm with batch statistics makes a volume's output depend on its batch):
``data.volumes.preprocess_volume_3d`` places it in the model grid (``data.placement``), and
``volumes.volume_to_native`` takes the prediction back. The label volume is written with the
input's affine and header (``data.write_volume``). With ``runs >= 2`` the stochastic model
runs several times: the labels come from the mean probability, and a variance volume and the
NQM quality score (``quality.nqm``; high means the runs disagree, a likely failure) are
written as well.

Every output file is written under a temporary name and renamed when complete, and every
input is checked before the first prediction, so a bad scan in a folder leaves no output.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from mednca_jax.config import Config
from mednca_jax.errors import PredictError
from mednca_jax.evaluate.quality import QUALITY_FILE
from mednca_jax.machine import Machine, backend_for

LABEL_SUFFIX = ".nii.gz"
VARIANCE_SUFFIX = "_variance.nii.gz"

@dataclass(frozen=True)
class Scan:
    """One input scan and where its outputs go."""

    name: str
    image: Path
    label_out: Path
    variance_out: Path


# --------------------------------------------------------------------------- model
def load_model(checkpoint: str | Path, which: str = "best") -> tuple[Any, Config]:
    """Params and config from a run folder (``mednca train``, or ``mednca export from-torch``
    for the original weights) or from a ``mednca export to-numpy`` folder.

    Raises:
        PredictError: the folder is missing or is neither kind.
    """
    from mednca_jax.train.checkpoint import CONFIG_FILE, CheckpointError, load_params
    from mednca_jax.config import ConfigError, from_dict
    from mednca_jax.export import CONFIG_JSON, WEIGHTS_NPZ, npz_arrays_to_params

    path = Path(checkpoint)
    if not path.is_dir():
        raise PredictError(f"--checkpoint {path} is not a folder; pass a run folder (mednca train, mednca export "
                           "from-torch) or a to-numpy export folder")
    if (path / CONFIG_FILE).is_file() or not (path / WEIGHTS_NPZ).is_file():
        try:
            return load_params(path, which=which)
        except CheckpointError as e:
            raise PredictError(str(e)) from None
    try:  # a to-numpy export: config.json (the whole config plus a format tag) + weights.npz
        raw = json.loads((path / CONFIG_JSON).read_text())
        cfg = from_dict({k: v for k, v in raw.items() if k in ("name", "model", "data", "train")})
        with np.load(path / WEIGHTS_NPZ) as z:
            params = npz_arrays_to_params(dict(z), cfg)
    except (OSError, ValueError, KeyError, ConfigError) as e:
        raise PredictError(f"--checkpoint {path} looks like a to-numpy export but cannot be read "
                           f"({type(e).__name__}: {e}); export it again") from None
    from mednca_jax.networks import check_network_params

    try:
        check_network_params(params, cfg)
    except ValueError as e:
        raise PredictError(f"--checkpoint {path}: {e}") from None
    return params, cfg


# --------------------------------------------------------------------------- inputs, outputs
def _is_nifti(path: Path) -> bool:
    from mednca_jax.data.msd import NIFTI_SUFFIXES

    return path.name.endswith(NIFTI_SUFFIXES)


def plan_scans(input_path: str | Path, output_path: str | Path) -> tuple[list[Scan], Path]:
    """The scans to segment, their output files, and the quality JSON's path.

    A file input with an output ending in ``.nii.gz``/``.nii`` writes that file (variance
    ``<output stem>_variance.nii.gz``, NQM ``<output stem>_quality.json``). A folder input
    (its NIfTI files, not recursive), or a file input with any other output, writes
    ``OUTPUT/<scan>.nii.gz``, ``OUTPUT/<scan>_variance.nii.gz`` and ``OUTPUT/quality.json``.

    Raises:
        PredictError: missing input, a file that is not NIfTI, a folder without NIfTI files,
            an output that does not fit the input.
    """
    from mednca_jax.data.msd import _nifti_files, case_name

    src, dst = Path(input_path), Path(output_path)
    if not src.exists():
        raise PredictError(f"--input {src} does not exist")
    if src.is_dir():
        images = _nifti_files(src)
        if not images:
            raise PredictError(f"--input folder {src} holds no .nii.gz or .nii file (an MSD task folder keeps them "
                               "in imagesTr/ and imagesTs/: pass one of those)")
        if _is_nifti(dst):
            raise PredictError(f"--output {dst} names a NIfTI file, but --input {src} is a folder: name an output folder")
    else:
        if not _is_nifti(src):
            raise PredictError(f"--input {src} is not a NIfTI file (expected .nii.gz or .nii)")
        if _is_nifti(dst):
            stem = case_name(dst)
            scan = Scan(case_name(src), src, dst, dst.with_name(stem + VARIANCE_SUFFIX))
            return [scan], dst.with_name(stem + "_quality.json")
        images = [src]
    if dst.exists() and not dst.is_dir():
        raise PredictError(f"--output {dst} exists and is not a folder; name a new or existing folder")
    scans = [Scan(case_name(p), p, dst / (case_name(p) + LABEL_SUFFIX), dst / (case_name(p) + VARIANCE_SUFFIX)) for p in images]
    return scans, dst / QUALITY_FILE


def load_scan(scan: Scan, cfg: Config):
    """The scan as training reads an image (``data.load_case``), as a :class:`PredictError`
    naming the file when it is unreadable, not 3D/4D, NaN/inf or constant, or (a 3D model
    with ``data.placement = "keep_original_scale"``) larger than the model grid."""
    from mednca_jax.data import Case, DataError, load_case
    from mednca_jax.data.volumes import check_fits_grid

    try:
        loaded = load_case(Case(scan.name, scan.image), cfg.data)
        if cfg.data.volumetric and cfg.data.placement == "keep_original_scale":
            check_fits_grid(loaded.image.shape, cfg.data.image_size, str(scan.image))
    except DataError as e:
        raise PredictError(str(e)) from None
    return loaded


# --------------------------------------------------------------------------- prediction
def predict_volume(
    params: Any,
    cfg: Config,
    image: np.ndarray,
    key: Any,
    *,
    fire_rate: float,
    runs: int = 1,
    batch_size: int = 32,
    predict: Any,
    what: str = "volume",
) -> tuple[np.ndarray, np.ndarray | None, float | None]:
    """Segment one volume in its own grid: slice by slice (a 2D model) or whole, one volume
    per batch (a 3D model, ``cfg.data.volumetric``).

    Args:
        image: ``(X, Y, Z)`` float32, as read by ``data.load_case``.
        key: PRNG key of the fire masks; run ``r`` uses ``fold_in(key, r)``, as ``evaluate``.
        batch_size: slices per call of a 2D model (a 3D model predicts one volume per call).
        predict: a function from ``inference.make_predict_fn(cfg, backend)`` (one for all
            scans: it keeps its compiled shapes).
        what: the scan's name in errors.

    Returns:
        ``labels (X, Y, Z) uint8`` (0 background, else class 1..n_out), and with ``runs >= 2``
        ``variance (X, Y, Z) float32`` (over runs, max over classes) and the NQM; else None, None.

    Raises:
        PredictError: a 3D model's ``keep_original_scale`` grid is smaller than the scan.
    """
    import jax

    from mednca_jax.data import DataError
    from mednca_jax.data.formats import preprocess_scan, to_native
    from mednca_jax.evaluate.inference import eval_batch_size, predict_slices
    from mednca_jax.evaluate.quality import nqm, variance_volume
    from mednca_jax.losses import probabilities_to_labels

    try:  # 2D: slices (S, H, W, 1); 3D: the volume on the model grid (1, X', Y', Z', 1)
        images, _ = preprocess_scan(image, None, cfg.data, cfg.model.n_out, what)
    except DataError as e:
        raise PredictError(str(e)) from None
    run_probs = np.stack([
        predict_slices(predict, params, images, jax.random.fold_in(key, r), fire_rate, eval_batch_size(cfg, batch_size))
        for r in range(runs)
    ])  # (runs, S, H, W, n_out) or (runs, 1, X', Y', Z', n_out)
    back = lambda a: to_native(a, image.shape, cfg.data.slice_axis, cfg.data)  # noqa: E731
    labels = back(probabilities_to_labels(run_probs.mean(axis=0)))
    if runs < 2:
        return labels, None, None
    return labels, back(variance_volume(run_probs)), nqm(run_probs)


def _write_atomic(path: Path, volume: np.ndarray, meta: Any, dtype: Any) -> None:
    """``data.write_volume`` under a temporary name in the same folder, then renamed."""
    from mednca_jax.data import write_volume

    tmp = path.with_name(f".{path.name}.partial{os.getpid()}{LABEL_SUFFIX}")
    try:
        write_volume(tmp, volume, meta, dtype)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def predict_scans(
    checkpoint: str | Path,
    input_path: str | Path,
    output_path: str | Path,
    *,
    runs: int = 1,
    fire_rate: float | None = None,
    seed: int = 0,
    which: str = "best",
    batch_size: int = 32,
    log: Any = print,
    machine: Machine,
) -> dict[str, Any]:
    """Everything ``mednca predict`` does; returns ``{"scans": {name: {...}}, ...}`` (also
    written to the quality JSON when ``runs >= 2``). ``machine``: where it runs
    (:meth:`mednca_jax.machine.Machine.here`, at the entry point), for the backend.

    Raises:
        PredictError: any problem with the arguments, the checkpoint or an input scan,
            found before anything is written.
    """
    import jax

    from mednca_jax.evaluate.inference import make_predict_fn
    from mednca_jax.nca.levels import InputError, check_fire_rate

    if runs < 1:
        raise PredictError(f"--runs must be >= 1, got {runs}")
    if batch_size < 1:
        raise PredictError(f"--batch-size must be >= 1, got {batch_size}")
    params, cfg = load_model(checkpoint, which)
    fr = float(cfg.model.fire_rate if fire_rate is None else fire_rate)
    try:
        check_fire_rate(fr)
    except InputError as e:
        raise PredictError(f"--fire-rate: {e}") from None
    if runs >= 2 and (fr == 0.0 or cfg.model.kind != "nca"):
        raise PredictError(f"--runs {runs} needs a stochastic model (Med-NCA at a fire rate > 0; here "
                           f"{cfg.model.kind} at fire rate {fr}): the runs would be identical")
    if cfg.data.format == "images":  # a model of 2D images: PNG masks in each image's own size
        from mednca_jax.evaluate.predict_images import predict_images

        report = predict_images(params, cfg, input_path, output_path, fire_rate=fr, runs=runs, seed=seed,
                                batch_size=batch_size, predict=make_predict_fn(cfg, backend_for(cfg, machine)), log=log)
        return {"checkpoint": str(checkpoint), **report}
    scans, quality_json = plan_scans(input_path, output_path)
    for scan in scans:  # all inputs first: a bad file stops the command before any output
        load_scan(scan, cfg)
    predict = make_predict_fn(cfg, backend_for(cfg, machine))
    key = jax.random.PRNGKey(seed)
    report: dict[str, Any] = {"checkpoint": str(checkpoint), "runs": runs, "fire_rate": fr, "seed": seed, "scans": {}}
    for scan in scans:
        image, _, meta = load_scan(scan, cfg)
        labels, variance, score = predict_volume(params, cfg, image, key, fire_rate=fr, runs=runs,
                                                 batch_size=batch_size, predict=predict, what=str(scan.image))
        scan.label_out.parent.mkdir(parents=True, exist_ok=True)
        _write_atomic(scan.label_out, labels, meta, np.uint8)
        entry: dict[str, Any] = {"input": str(scan.image), "labels": str(scan.label_out), "shape": list(meta.shape),
                                 "foreground_voxels": int((labels > 0).sum())}
        if cfg.model.n_out > 1:  # the label volume holds the class values 1..n_out
            entry["class_voxels"] = {str(c): int((labels == c).sum()) for c in range(1, cfg.model.n_out + 1)}
        if variance is not None:
            _write_atomic(scan.variance_out, variance, meta, np.float32)
            entry.update(variance=str(scan.variance_out), nqm=score)
        report["scans"][scan.name] = entry
        log(f"{scan.name}: {tuple(meta.shape)} -> {scan.label_out}" + (f" (NQM {score:.4f})" if score is not None else ""))
    if runs >= 2:
        from mednca_jax.train.checkpoint import write_text_atomic

        write_text_atomic(quality_json, json.dumps(report, indent=2) + "\n")
        log(f"NQM per scan (higher: the runs disagree more, a likely failure): {quality_json}")
    return report


# --------------------------------------------------------------------------- command line
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mednca predict",
        description="Segment new NIfTI scans (no labels needed) with a trained or imported model. Each scan is "
                    "preprocessed as in training and the label volume is written in the scan's own voxel grid, "
                    "with its affine and header. A 2D model segments the scan slice by slice; a 3D model "
                    "(three data.image_size entries) segments the whole volume at once, placed in its grid as "
                    "data.placement says. A model trained on 2D images (data.format = 'images') segments "
                    "PNG/JPEG/TIFF/BMP images instead and writes one PNG mask per image, of that image's size.",
        epilog="examples:\n"
               "  mednca predict --model hippocampus --input scan.nii.gz --output scan_label.nii.gz\n"
               "  mednca predict --checkpoint runs/demo --input scan.nii.gz --output scan_label.nii.gz\n"
               "  mednca predict --checkpoint runs/official --input imagesTs/ --output predictions/ --runs 10\n"
               "  mednca predict --checkpoint runs/photos --input photos/images --output masks/\n\n"
               "PNG masks hold the class values themselves (0 background, 1..n_out), as 8-bit grey: a one-class\n"
               "mask of 0 and 1 looks black in an image viewer; scale it (e.g. x255) to look at it.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    from mednca_jax.cli.options import add_model_source

    add_model_source(p, "a run folder (mednca train; mednca export from-torch for the original weights) or a "
                        "mednca export to-numpy folder", metavar="RUN_OR_EXPORT")
    p.add_argument("--input", required=True, type=Path, metavar="FILE_OR_FOLDER",
                   help="one .nii.gz/.nii scan (3D, or 4D with the modality of data.channel), or a folder of them; "
                        "for an image model one image file or a folder of them (e.g. DIR/images)")
    p.add_argument("--output", required=True, type=Path, metavar="FILE_OR_FOLDER",
                   help="a .nii.gz file (with a file --input) or a folder that gets <scan>.nii.gz per scan; for an "
                        "image model a .png file (with a file --input) or a folder that gets <stem>.png per image")
    p.add_argument("--runs", type=int, default=1, metavar="N",
                   help="stochastic runs per scan (default 1). N >= 2 takes the labels from the mean probability "
                        "and also writes <scan>_variance.nii.gz (images: <stem>_variance.tif) and the NQM per scan in quality.json")
    p.add_argument("--fire-rate", type=float, metavar="F",
                   help="cell fire rate at inference, in [0, 1) (default: the checkpoint config's; 0 is deterministic)")
    p.add_argument("--seed", type=int, default=0, help="PRNG seed of the fire masks (default 0)")
    p.add_argument("--which", choices=("best", "latest"), default="best",
                   help="checkpoint of a run folder: best validation Dice (default; falls back to latest) or latest")
    p.add_argument("--batch-size", type=int, default=32, metavar="B", help="slices per inference batch of a 2D model (default 32); a 3D model "
                        "predicts one volume at a time")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    from mednca_jax.cli.options import model_source
    from mednca_jax.models import ModelError

    args = build_parser().parse_args(argv)
    try:
        predict_scans(model_source(args), args.input, args.output, runs=args.runs, fire_rate=args.fire_rate,
                      seed=args.seed, which=args.which, batch_size=args.batch_size, machine=Machine.here())
    except (PredictError, ModelError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
