"""Shipped pretrained models: the folder format, ``mednca models``, ``--model NAME`` everywhere
``--checkpoint`` is accepted, and the models that ship in the package."""

from __future__ import annotations

import json

import jax
import nibabel as nib
import numpy as np
import pytest
from conftest import HIPPOCAMPUS, random_params, require

from mednca_jax import models
from mednca_jax.cli import main as cli_main
from mednca_jax.data import make_synthetic_task
from mednca_jax.train import checkpoint as ckpt


@pytest.fixture(scope="module")
def made(tmp_path_factory, tiny_cfg):
    """A run folder with random params, its test evaluation, and the model folder made from them."""
    root = tmp_path_factory.mktemp("models")
    make_synthetic_task(root / "synth", n_cases=4, seed=0, shape=(24, 24, 24))
    run = root / "run"
    ckpt.save_params(run, random_params(tiny_cfg.model, seed=3, scale=1.0), tiny_cfg)
    assert cli_main(["evaluate", "--checkpoint", str(run), "--data", str(root / "synth"), "--out", str(root / "eval"),
                     "--no-progress"]) == 0
    (run / "log.jsonl").write_text(json.dumps({"step": 6, "minutes": 0.1, "loss": 0.5}) + "\n")
    shelf = root / "shelf"
    assert cli_main(["export", "to-model", "--checkpoint", str(run), "--metrics", str(root / "eval" / "metrics.json"),
                     "--out", str(shelf / "tiny"), "--name", "tiny", "--task", "synthetic blobs", "--command", "mednca train ...",
                     "--machine", "a test"]) == 0
    (shelf / "tiny" / models.MODEL_CARD).write_text("# tiny\nNot a medical device.\n")
    return root, run, shelf


def test_a_model_folder_holds_the_runs_params_and_figures(made):
    root, run, shelf = made
    want, cfg = ckpt.load_params(run)
    got, cfg2 = ckpt.load_params(shelf / "tiny")
    assert cfg2 == cfg
    for a, b in zip(jax.tree_util.tree_leaves(want), jax.tree_util.tree_leaves(got)):
        np.testing.assert_array_equal(a, b)
    info = json.loads((shelf / "tiny" / models.MODEL_JSON).read_text())
    metrics = json.loads((root / "eval" / "metrics.json").read_text())
    assert info["params_sha256"] == ckpt.tree_digest(got)
    assert info["test"]["dice"]["mean"] == round(metrics["summary"]["dice"]["mean"], 4)
    assert info["test"]["patients"] == len(metrics["cases"]) and info["training"]["steps"] == 6
    assert info["parameters"] == sum(x.size for x in jax.tree_util.tree_leaves(got))


def test_models_lists_them_and_model_name_works_where_checkpoint_does(made, monkeypatch, tmp_path, capsys):
    root, run, shelf = made
    monkeypatch.setattr(models, "MODELS_DIR", shelf)
    assert cli_main(["models"]) == 0
    listing = capsys.readouterr().out
    info = json.loads((shelf / "tiny" / models.MODEL_JSON).read_text())
    assert "tiny" in listing and "synthetic blobs" in listing and f"{info['test']['dice']['mean']:.3f}" in listing
    assert cli_main(["models", "tiny"]) == 0 and "Not a medical device" in capsys.readouterr().out

    scan = next((root / "synth" / "imagesTr").glob("*.nii*"))
    a, b = tmp_path / "by_name.nii.gz", tmp_path / "by_folder.nii.gz"
    assert cli_main(["predict", "--model", "tiny", "--input", str(scan), "--output", str(a), "--fire-rate", "0"]) == 0
    assert cli_main(["predict", "--checkpoint", str(run), "--input", str(scan), "--output", str(b), "--fire-rate", "0"]) == 0
    np.testing.assert_array_equal(nib.load(a).get_fdata(), nib.load(b).get_fdata())

    monkeypatch.chdir(tmp_path)  # a shipped model's evaluation goes to the current folder, not into the package
    assert cli_main(["evaluate", "--model", "tiny", "--data", str(root / "synth"), "--no-progress"]) == 0
    assert (tmp_path / "eval-tiny-all" / "metrics.json").is_file()
    assert cli_main(["export", "to-numpy", "--model", "tiny", "--out", str(tmp_path / "np")]) == 0
    assert (tmp_path / "np" / "weights.npz").is_file()


@pytest.mark.parametrize("command", [["predict", "--input", "x.nii.gz", "--output", "y.nii.gz"], ["evaluate"],
                                     ["export", "to-numpy", "--out", "o"]])
def test_an_unknown_model_name_is_one_line_naming_the_shipped_ones(command, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli_main([*command, "--model", "no_such_model"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --model 'no_such_model' is not a shipped model") and err.count("\n") == 1, err
    assert not (tmp_path / "o").exists()


def test_checkpoint_and_model_are_exclusive(capsys):
    with pytest.raises(SystemExit) as e:
        cli_main(["predict", "--model", "a", "--checkpoint", "b", "--input", "x", "--output", "y"])
    assert e.value.code == 2 and "not allowed with argument" in capsys.readouterr().err


# ----------------------------------------------------------------------------- shipped models
SHIPPED = models.model_names()


def test_the_package_ships_the_hippocampus_model():
    assert "hippocampus" in SHIPPED


@pytest.mark.parametrize("name", SHIPPED)
def test_a_shipped_model_is_complete_and_intact(name):
    folder = models.model_dir(name)
    info = models.model_info(name)
    params, cfg = ckpt.load_params(folder)
    assert info["name"] == name and info["params_sha256"] == ckpt.tree_digest(params)
    assert info["parameters"] == sum(x.size for x in jax.tree_util.tree_leaves(params))
    assert len(cfg.data.image_size) == info["spatial_dims"]
    card = (folder / models.MODEL_CARD).read_text()
    for must in ("not a medical device", "CC-BY-SA 4.0", "Licen", f"{info['test']['dice']['mean']:.3f}", info["training"]["command"]):
        assert must.lower() in card.lower(), f"{name}'s model card does not mention {must!r}"
    split = json.loads((folder / "split.json").read_text())
    assert len(split["test"]) == info["test"]["patients"]


@pytest.mark.slow
@pytest.mark.parametrize("model", ["hippocampus", "hippocampus3d"])
def test_a_hippocampus_model_segments_a_real_scan_in_its_native_grid(model, tmp_path):
    """A shipped hippocampus model (2D slices, or 3D volumes once ``hippocampus3d`` ships) on
    the reference case ``hippocampus_374`` through ``mednca predict --model``. (That case is a
    training patient of the models' split: this checks the path from a scan to a label volume;
    the test patients' figures are in the model card.)"""
    if model not in SHIPPED:
        pytest.skip(f"{model} is not shipped in this installation")
    require(HIPPOCAMPUS)
    name = "hippocampus_374"
    image, label = HIPPOCAMPUS / "imagesTr" / f"{name}.nii.gz", HIPPOCAMPUS / "labelsTr" / f"{name}.nii.gz"
    out = tmp_path / "label.nii.gz"
    assert cli_main(["predict", "--model", model, "--input", str(image), "--output", str(out)]) == 0
    pred, src, ref = nib.load(out), nib.load(image), nib.load(label)
    assert pred.shape == src.shape and np.allclose(pred.affine, src.affine)
    p, t = np.asarray(pred.dataobj) > 0, np.asarray(ref.dataobj) > 0
    dice = 2 * (p & t).sum() / (p.sum() + t.sum())
    assert dice >= 0.85, dice


def test_model_json_figures_name_each_class_only_when_there_are_several():
    stat = lambda m: {"mean": m, "std": 0.01, "n": 40}  # noqa: E731
    one = {"summary": {"dice": stat(0.9), "dice_per_class": {"1": stat(0.9)}}}
    two = {"summary": {"dice": stat(0.8), "dice_per_class": {"1": stat(0.82), "2": stat(0.78)}}}
    assert models.summary_figures(one) == {"patients": 40, "dice": {"mean": 0.9, "std": 0.01}}
    assert models.summary_figures(two)["dice_per_class"] == {"1": {"mean": 0.82, "std": 0.01}, "2": {"mean": 0.78, "std": 0.01}}
