"""``mednca predict`` with a 3D model (three ``data.image_size`` entries): the whole volume in
one batch, placed in the model grid as ``data.placement`` says, and back in the scan's grid.

- A tiny two-level volume model (depthwise kernel 3, batch norm, max downscale; random
  weights) on small synthetic scans with a non-identity affine: the written labels are those
  of ``levels.forward`` on ``preprocess_volume_3d``'s output, taken back with
  ``volume_to_native``; ``--runs 3`` adds the variance volume and the NQM; a scan larger than
  a ``keep_original_scale`` grid is a one-line error that writes nothing; ``resample`` takes it.
- The original M3D-NCA weights (``../shared/reference/m3d_hippocampus``), imported with
  ``mednca export from-torch``, segment hippocampus_374 as the original's fixture logits say
  (skips without ``../shared``).
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import nibabel as nib
import numpy as np
import pytest
from conftest import HIPPOCAMPUS, REFERENCE, machine_backend, random_level_params, require
from test_predict import write_scan

from mednca_jax.cli import main as cli_main
from mednca_jax.config import Config, DataConfig, ModelConfig, TrainConfig, validate
from mednca_jax.data.volumes import preprocess_volume_3d, volume_to_native
from mednca_jax.losses import probabilities_to_labels
from mednca_jax.nca.levels import forward, level_names, level_rule
from mednca_jax.train import checkpoint as ckpt

GRID = (16, 16, 12)
SMALL = (13, 10, 7)  # fits the grid
LARGE = (20, 13, 5)  # X beyond the grid


def volume_cfg(placement: str = "keep_original_scale") -> Config:
    return validate(Config(
        name="tiny3d",
        model=ModelConfig(channels=8, hidden=16, steps=(2, 2), scales=(2, 1), patch_size=0, fire_rate=0.5, remat="none",
                          perception="depthwise", kernel_size=(3,), norm="batch", downscale="max"),
        data=DataConfig(image_size=GRID, placement=placement),
        train=TrainConfig(batch_size=1, num_steps=1),
    ))


def volume_params(cfg: Config, seed: int = 3) -> dict:
    keys = jax.random.split(jax.random.PRNGKey(seed), cfg.model.n_levels)
    return {n: random_level_params(k, rule=level_rule(cfg.model, i, 3), scale=1.0)
            for i, (n, k) in enumerate(zip(level_names(cfg.model), keys))}


@pytest.fixture(scope="module")
def volume_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("predict3d")
    for placement in ("keep_original_scale", "resample"):
        cfg = volume_cfg(placement)
        ckpt.save_params(root / placement, volume_params(cfg), cfg)
    scans = root / "scans"
    scans.mkdir()
    write_scan(scans / "small.nii.gz", shape=SMALL, seed=0)
    write_scan(scans / "large.nii.gz", shape=LARGE, seed=1)
    return root


def direct_labels(cfg: Config, params, image: np.ndarray) -> np.ndarray:
    """The labels ``levels.forward`` gives at fire rate 0, in the scan's grid."""
    grid_image, _ = preprocess_volume_3d(image, None, cfg.data.image_size, cfg.data.placement)
    logits = forward(params, cfg.model, jnp.asarray(grid_image[None, ..., None]), jax.random.PRNGKey(0), 0.0,
                     backend=machine_backend(cfg))
    labels = probabilities_to_labels(np.asarray(jax.nn.sigmoid(logits))[0])
    return volume_to_native(labels, image.shape, cfg.data.placement)


def read(path) -> tuple[np.ndarray, nib.Nifti1Image]:
    img = nib.load(path)
    return np.asarray(img.dataobj), img


@pytest.mark.parametrize("placement,scan", [("keep_original_scale", "small"), ("resample", "large")])
def test_labels_in_the_scan_grid_equal_those_of_forward(volume_run, tmp_path, placement, scan):
    src = volume_run / "scans" / f"{scan}.nii.gz"
    out = tmp_path / "label.nii.gz"
    assert cli_main(["predict", "--checkpoint", str(volume_run / placement), "--input", str(src), "--output", str(out),
                     "--fire-rate", "0"]) == 0
    labels, img = read(out)
    src_img = nib.load(src)
    assert img.shape == src_img.shape and np.allclose(img.affine, src_img.affine)
    assert np.allclose(img.header.get_zooms(), src_img.header.get_zooms())
    assert labels.dtype == np.uint8 and 0 < (labels > 0).sum() < labels.size  # some of each, or it says nothing
    params, cfg = ckpt.load_params(volume_run / placement)
    np.testing.assert_array_equal(labels, direct_labels(cfg, params, np.asarray(src_img.dataobj, np.float32)))
    assert not (tmp_path / "label_quality.json").exists() and not list(tmp_path.glob(".*"))


def test_runs_write_a_variance_volume_and_the_nqm(volume_run, tmp_path):
    out = tmp_path / "p"
    assert cli_main(["predict", "--checkpoint", str(volume_run / "keep_original_scale"),
                     "--input", str(volume_run / "scans" / "small.nii.gz"), "--output", str(out), "--runs", "3"]) == 0
    q = json.loads((out / "quality.json").read_text())
    labels, lab = read(out / "small.nii.gz")
    variance, var = read(out / "small_variance.nii.gz")
    for img in (lab, var):
        assert img.shape == SMALL and np.allclose(img.affine, nib.load(volume_run / "scans" / "small.nii.gz").affine)
    assert variance.dtype == np.float32 and variance.max() > 0  # fire 0.5: the runs differ
    assert q["runs"] == 3 and q["scans"]["small"]["nqm"] > 0
    assert q["scans"]["small"]["foreground_voxels"] == int((labels > 0).sum())
    assert not list(out.glob(".*"))


def test_a_scan_larger_than_the_grid_is_a_clear_error_and_writes_nothing(volume_run, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["predict", "--checkpoint", str(volume_run / "keep_original_scale"), "--output", str(out)]
    assert cli_main([*args, "--input", str(volume_run / "scans")]) == 2  # the small scan comes first, alone it works
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert "large.nii.gz" in err and str(list(LARGE)[0]) in err and 'data.placement = "resample"' in err
    assert not out.exists()


def test_predict_volume_names_the_scan_when_it_does_not_fit(volume_run):
    from mednca_jax.errors import PredictError
    from mednca_jax.evaluate.predict import predict_volume

    cfg = volume_cfg()
    with pytest.raises(PredictError, match="big scan has shape"):
        predict_volume({}, cfg, np.ones(LARGE, np.float32), jax.random.PRNGKey(0), fire_rate=0.0, predict=None,
                       what="big scan")


M3D_FIXTURE = REFERENCE / "m3d_hippocampus"


def test_original_m3d_weights_segment_the_scan_as_the_original(tmp_path, capsys):
    """The original's two-level hippocampus weights, imported as a user would, on the raw scan
    at fire rate 0: the labels in the scan's grid are the fixture's ``logits > 0`` (the fixture
    places the scan at the grid's corner), but for voxels with |logit| below 1e-3 of the range."""
    pytest.importorskip("torch")
    scan = require(HIPPOCAMPUS / "imagesTr" / "hippocampus_374.nii.gz")
    require(M3D_FIXTURE / "fixture.npz", M3D_FIXTURE / "model0.pth", M3D_FIXTURE / "model1.pth")
    run = tmp_path / "m3d"
    assert cli_main(["export", "from-torch", "--config", "m3d_hippocampus", "--weights", str(M3D_FIXTURE / "model0.pth"),
                     str(M3D_FIXTURE / "model1.pth"), "--out", str(run)]) == 0
    out = tmp_path / "out"
    assert cli_main(["predict", "--checkpoint", str(run), "--input", str(scan), "--fire-rate", "0", "--output", str(out)]) == 0
    labels, img = read(out / "hippocampus_374.nii.gz")
    src = nib.load(scan)
    assert img.shape == src.shape and np.allclose(img.affine, src.affine)
    with np.load(M3D_FIXTURE / "fixture.npz") as f:
        logits = f["logits"]
    span = float(logits.max() - logits.min())
    native = logits[tuple(slice(0, s) for s in src.shape)]
    differ = (labels > 0) != (native > 0)
    print(f"differing voxels: {int(differ.sum())} of {native.size}")
    assert not (differ & (np.abs(native) >= 1e-3 * span)).any()
    assert (labels > 0).sum() > 1000  # the hippocampus, not an empty volume
