"""A shipped-model folder made from a 3D run (three ``data.image_size`` entries): a tiny
M3D-NCA trained for two steps on synthetic volumes, scored on its test patients, written with
``mednca export to-model``; then ``mednca models`` lists it as 3D, and ``predict``,
``evaluate`` and ``export to-numpy`` read the model folder (by path and by ``--model``) as
they read the run folder."""

from __future__ import annotations

import json

import jax
import nibabel as nib
import numpy as np
import pytest
from conftest import TINY_3D_TOML

from mednca_jax import models
from mednca_jax.cli import main as cli_main
from mednca_jax.cli.models import table
from mednca_jax.data import make_synthetic_task
from mednca_jax.train import checkpoint as ckpt

@pytest.fixture(scope="module")
def made3d(tmp_path_factory):
    """The synthetic task, the trained 3D run, and ``models/tiny3d`` made from it."""
    root = tmp_path_factory.mktemp("models3d")
    mp = pytest.MonkeyPatch()
    mp.setenv("MEDNCA_CACHE", str(root / "cache"))
    data = make_synthetic_task(root / "synth", n_cases=6, seed=0, shape=(24, 24, 24))
    (root / "tiny3d.toml").write_text(TINY_3D_TOML)
    run = root / "run"
    try:
        assert cli_main(["train", "--config", str(root / "tiny3d.toml"), "--data", str(data), "--workdir", str(run),
                         "--no-progress", "--cpu-processes", "1", "--set", "train.num_steps=2", "--set", "train.eval_every=2",
                         "--set", "train.checkpoint_every=2"]) == 0
        assert cli_main(["evaluate", "--checkpoint", str(run), "--data", str(data), "--split", "test", "--runs", "2",
                         "--no-progress"]) == 0
        shelf = root / "models"
        assert cli_main(["export", "to-model", "--checkpoint", str(run), "--metrics", str(run / "eval-test" / "metrics.json"),
                         "--out", str(shelf / "tiny3d"), "--name", "tiny3d", "--task", "synthetic blobs, 3D volumes",
                         "--command", "mednca train --config tiny3d.toml --data synth", "--machine", "a test"]) == 0
        (shelf / "tiny3d" / models.MODEL_CARD).write_text("# tiny3d\nNot a medical device.\n")
        yield root, run, shelf
    finally:
        mp.undo()


def test_a_3d_model_folder_says_3d_and_holds_the_runs_params(made3d):
    root, run, shelf = made3d
    folder = shelf / "tiny3d"
    info = json.loads((folder / models.MODEL_JSON).read_text())
    assert info["spatial_dims"] == 3 and info["image_size"] == [32, 32, 24]
    want, cfg = ckpt.load_params(run)
    got, cfg2 = ckpt.load_params(folder)
    assert cfg2 == cfg and len(cfg2.data.image_size) == 3
    for a, b in zip(jax.tree_util.tree_leaves(want), jax.tree_util.tree_leaves(got)):
        np.testing.assert_array_equal(a, b)
    # what tests/test_models.py checks of every shipped model holds for a 3D one
    assert info["params_sha256"] == ckpt.tree_digest(got)
    assert info["parameters"] == sum(x.size for x in jax.tree_util.tree_leaves(got))
    split = json.loads((folder / "split.json").read_text())
    metrics = json.loads((run / "eval-test" / "metrics.json").read_text())
    assert len(split["test"]) == info["test"]["patients"] == len(metrics["cases"])
    assert info["test"]["dice"]["mean"] == round(metrics["summary"]["dice"]["mean"], 4)
    assert {"dice_native", "dice_run_mean"} <= set(info["test"]) and info["training"]["steps"] == 2


def test_models_lists_a_3d_model(made3d, monkeypatch, capsys):
    root, run, shelf = made3d
    monkeypatch.setattr(models, "MODELS_DIR", shelf)
    info = models.model_info("tiny3d")
    row = next(line for line in table().splitlines() if line.startswith("tiny3d"))
    assert "synthetic blobs, 3D volumes" in row and " 3D " in row and f"{info['parameters']:,}" in row
    assert f"{info['test']['dice']['mean']:.3f} ± {info['test']['dice']['std']:.3f} ({info['test']['patients']})" in row
    assert cli_main(["models"]) == 0 and row in capsys.readouterr().out


def test_predict_evaluate_and_export_read_a_3d_model_folder(made3d, monkeypatch, tmp_path):
    root, run, shelf = made3d
    monkeypatch.setattr(models, "MODELS_DIR", shelf)
    monkeypatch.setenv("MEDNCA_CACHE", str(root / "cache"))
    scan = sorted((root / "synth" / "imagesTr").glob("*.nii*"))[0]
    outs = {k: tmp_path / f"{k}.nii.gz" for k in ("folder", "name", "run")}
    for key, source in (("folder", ["--checkpoint", str(shelf / "tiny3d")]), ("name", ["--model", "tiny3d"]),
                        ("run", ["--checkpoint", str(run)])):
        assert cli_main(["predict", *source, "--input", str(scan), "--output", str(outs[key]), "--fire-rate", "0"]) == 0
    src = nib.load(scan)
    got = {k: nib.load(p) for k, p in outs.items()}
    assert got["folder"].shape == src.shape and np.allclose(got["folder"].affine, src.affine)
    labels = np.asarray(got["folder"].dataobj)
    assert set(np.unique(labels)) <= {0, 1}
    for k in ("name", "run"):
        np.testing.assert_array_equal(np.asarray(got[k].dataobj), labels)

    monkeypatch.chdir(tmp_path)
    assert cli_main(["evaluate", "--model", "tiny3d", "--data", str(root / "synth"), "--split", "test", "--runs", "2",
                     "--no-progress"]) == 0
    a = json.loads((tmp_path / "eval-tiny3d-test" / "metrics.json").read_text())
    b = json.loads((run / "eval-test" / "metrics.json").read_text())
    for key in ("dice", "dice_run_mean", "dice_native"):
        assert a["summary"][key]["mean"] == pytest.approx(b["summary"][key]["mean"])
    assert cli_main(["export", "to-numpy", "--model", "tiny3d", "--out", str(tmp_path / "np")]) == 0
    assert (tmp_path / "np" / "weights.npz").is_file()
