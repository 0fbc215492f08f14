"""``mednca predict``: new scans in their own voxel grid, the same predictions as ``evaluate``,
run and export folders, and a clear one-line error for every bad input."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
from conftest import REFERENCE, random_params, require

from mednca_jax.train import checkpoint as ckpt
from mednca_jax.cli import main as cli_main
from mednca_jax.data import write_volume
from mednca_jax.data.msd import VolumeMeta

AFFINE = np.array([[0.0, -1.2, 0.0, 10.0], [0.9, 0.0, 0.0, -4.0], [0.0, 0.0, 2.5, 7.0], [0.0, 0.0, 0.0, 1.0]])


def write_scan(path, shape=(20, 13, 5), seed=0, value=None) -> np.ndarray:
    """A NIfTI scan with a non-trivial affine (a permutation, anisotropic voxels, an offset)."""
    rng = np.random.default_rng(seed)
    data = rng.random(shape).astype(np.float32) * 300 if value is None else np.full(shape, value, np.float32)
    header = nib.Nifti1Header()
    header.set_data_shape(shape)
    write_volume(path, data, VolumeMeta(shape, AFFINE, header), np.float32)
    return data


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny_cfg):
    root = tmp_path_factory.mktemp("predict")
    ckpt.save_params(root / "run", random_params(tiny_cfg.model, seed=1, scale=1.0), tiny_cfg)
    scans = root / "scans"
    scans.mkdir()
    write_scan(scans / "a.nii.gz", seed=0)
    write_scan(scans / "b.nii", shape=(9, 16, 3), seed=1)
    return root


def test_folder_with_runs_writes_labels_variance_and_nqm_in_the_input_grid(tiny_run, tmp_path, capsys):
    out = tmp_path / "p"
    assert cli_main(["predict", "--checkpoint", str(tiny_run / "run"), "--input", str(tiny_run / "scans"),
                     "--output", str(out), "--runs", "3"]) == 0
    q = json.loads((out / "quality.json").read_text())
    assert set(q["scans"]) == {"a", "b"} and q["runs"] == 3
    for name in ("a", "b"):
        src = nib.load(next((tiny_run / "scans").glob(name + ".nii*")))
        lab, var = nib.load(out / f"{name}.nii.gz"), nib.load(out / f"{name}_variance.nii.gz")
        for img in (lab, var):
            assert img.shape == src.shape and np.allclose(img.affine, src.affine)
            assert np.allclose(img.header.get_zooms(), src.header.get_zooms())
        labels = np.asarray(lab.dataobj)
        assert labels.dtype == np.uint8 and set(np.unique(labels)) <= {0, 1}
        assert 0 < (labels > 0).sum() < labels.size  # random weights: some of each, or the test says nothing
        variance = np.asarray(var.dataobj)
        assert variance.dtype == np.float32 and variance.max() > 0  # fire 0.5: the runs differ
        assert q["scans"][name]["nqm"] > 0 and q["scans"][name]["foreground_voxels"] == int((labels > 0).sum())
    assert "NQM" in capsys.readouterr().out
    assert not list(out.glob(".*"))  # no temporary file left behind


@pytest.mark.slow
def test_predict_equals_evaluate_on_an_unlabelled_case(tiny_run, tmp_path, monkeypatch):
    """One code path for both commands: same seed, same labels, voxel for voxel."""
    monkeypatch.setenv("MEDNCA_CACHE", str(tmp_path / "cache"))
    msd = tmp_path / "msd"
    (msd / "imagesTs").mkdir(parents=True)
    (msd / "imagesTr").mkdir()  # an MSD folder needs one; empty: no labelled case
    (msd / "imagesTs" / "a.nii.gz").symlink_to(tiny_run / "scans" / "a.nii.gz")
    assert cli_main(["evaluate", "--checkpoint", str(tiny_run / "run"), "--data", str(msd), "--out", str(tmp_path / "e"),
                     "--seed", "4", "--no-progress"]) == 0
    assert cli_main(["predict", "--checkpoint", str(tiny_run / "run"), "--input", str(tiny_run / "scans" / "a.nii.gz"),
                     "--output", str(tmp_path / "a_label.nii.gz"), "--seed", "4"]) == 0
    ours = np.asarray(nib.load(tmp_path / "a_label.nii.gz").dataobj)
    theirs = np.asarray(nib.load(tmp_path / "e" / "predictions" / "a.nii.gz").dataobj)
    assert ours.shape == theirs.shape and np.array_equal(ours, theirs)
    assert not (tmp_path / "a_label_quality.json").exists()  # one run: labels only


def test_export_folder_predicts_like_its_run_folder(tiny_run, tmp_path):
    assert cli_main(["export", "to-numpy", "--checkpoint", str(tiny_run / "run"), "--out", str(tmp_path / "np")]) == 0
    args = ["--input", str(tiny_run / "scans" / "b.nii"), "--fire-rate", "0"]
    assert cli_main(["predict", "--checkpoint", str(tiny_run / "run"), "--output", str(tmp_path / "r.nii.gz"), *args]) == 0
    assert cli_main(["predict", "--checkpoint", str(tmp_path / "np"), "--output", str(tmp_path / "x"), *args]) == 0
    a = np.asarray(nib.load(tmp_path / "r.nii.gz").dataobj)
    b = np.asarray(nib.load(tmp_path / "x" / "b.nii.gz").dataobj)  # a folder output names the file after the scan
    assert np.array_equal(a, b)


def _bad_inputs(root):
    bad = root / "bad"
    bad.mkdir()
    (bad / "notes.txt").write_text("not a scan")
    (bad / "broken.nii.gz").write_bytes(b"\x1f\x8b this is no gzip stream")
    flat = nib.Nifti1Image(np.ones((8, 8), np.float32), np.eye(4))
    nib.save(flat, str(bad / "flat2d.nii.gz"))
    nan = np.random.default_rng(0).random((8, 8, 3)).astype(np.float32)
    nan[1, 2, 0] = np.nan
    nib.save(nib.Nifti1Image(nan, np.eye(4)), str(bad / "nan.nii.gz"))
    write_scan(bad / "constant.nii.gz", shape=(8, 8, 3), value=7.0)
    return bad


@pytest.mark.parametrize("case,expected", [
    ("missing.nii.gz", "does not exist"),
    ("notes.txt", "is not a NIfTI file"),
    ("broken.nii.gz", "cannot be read as NIfTI"),
    ("flat2d.nii.gz", "expected a 3D (X, Y, Z) or 4D"),
    ("nan.nii.gz", "NaN/inf voxels"),
    ("constant.nii.gz", "is constant"),
])
def test_bad_input_is_one_line_and_exit_2(tiny_run, tmp_path, capsys, case, expected):
    bad = _bad_inputs(tmp_path)
    out = tmp_path / "out"
    rc = cli_main(["predict", "--checkpoint", str(tiny_run / "run"), "--input", str(bad / case), "--output", str(out)])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("error: ") and len(err.splitlines()) == 1, err
    assert expected in err and case in err and "Traceback" not in err
    assert not out.exists()


def test_one_bad_scan_in_a_folder_stops_before_any_output(tiny_run, tmp_path, capsys):
    folder = tmp_path / "mixed"
    folder.mkdir()
    write_scan(folder / "good.nii.gz")
    nib.save(nib.Nifti1Image(np.ones((4, 4, 4, 4, 2), np.float32), np.eye(4)), str(folder / "z_five_d.nii.gz"))
    out = tmp_path / "out"
    assert cli_main(["predict", "--checkpoint", str(tiny_run / "run"), "--input", str(folder), "--output", str(out)]) == 2
    assert "z_five_d.nii.gz" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("args,expected", [
    (["--checkpoint", "{root}/nowhere"], "is not a folder"),
    (["--runs", "0"], "--runs must be >= 1"),
    (["--fire-rate", "1.5"], "fire_rate must be in [0, 1)"),
    (["--runs", "3", "--fire-rate", "0"], "the runs would be identical"),
    (["--input", "{root}/scans", "--output", "{root}/x.nii.gz"], "names a NIfTI file"),
    (["--input", "{root}/run"], "holds no .nii.gz or .nii file"),
])
def test_bad_arguments_are_one_line_and_exit_2(tiny_run, tmp_path, capsys, args, expected):
    base = {"--checkpoint": str(tiny_run / "run"), "--input": str(tiny_run / "scans" / "a.nii.gz"),
            "--output": str(tmp_path / "o")}
    extra = [a.format(root=tiny_run) for a in args]
    for flag in list(base):
        if flag in extra:
            del base[flag]
    argv = ["predict", *[x for kv in base.items() for x in kv], *extra]
    assert cli_main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert expected in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_official_weights_segment_the_reference_scan(tmp_path, capsys):
    """The original's pretrained weights, imported as a user would, on a scan with its label."""
    case = require(REFERENCE / "hippocampus_374")
    weights = require(REFERENCE / "mednca_hippocampus_official.npz")
    run = tmp_path / "official"
    assert cli_main(["export", "from-torch", "--config", "hippocampus_official", "--weights", str(weights), "--out", str(run)]) == 0
    out = tmp_path / "label.nii.gz"
    assert cli_main(["predict", "--checkpoint", str(run), "--input", str(case / "image.nii.gz"), "--output", str(out)]) == 0
    src, pred = nib.load(case / "image.nii.gz"), nib.load(out)
    assert pred.shape == src.shape[:3] and np.allclose(pred.affine, src.affine)
    p = np.asarray(pred.dataobj) > 0
    t = np.asarray(nib.load(case / "label.nii.gz").dataobj) > 0
    dice = 2 * (p & t).sum() / (p.sum() + t.sum())
    assert dice >= 0.84, dice
