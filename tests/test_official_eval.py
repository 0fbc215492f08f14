"""evaluate.py on the imported official weights reproduces the original's Dice (docs/results.md, "Fidelity to the original")."""

import json

import pytest
from conftest import REFERENCE, require

import evaluate as evaluate_cli
from mednca_jax.train import checkpoint as ckpt
from mednca_jax.config import load_config
from mednca_jax.nca.weights import load_torch_weights


@pytest.fixture(scope="module")
def official_run(tmp_path_factory):
    case = require(REFERENCE / "hippocampus_374")
    root = tmp_path_factory.mktemp("official")
    msd = root / "msd"
    for sub, name in (("imagesTr", "image.nii.gz"), ("labelsTr", "label.nii.gz")):
        (msd / sub).mkdir(parents=True)
        (msd / sub / "hippocampus_374.nii.gz").symlink_to(case / name)
    cfg = load_config("configs/hippocampus_official.toml")
    ckpt.save_params(root / "run", load_torch_weights([REFERENCE / "mednca_hippocampus_official.npz"], cfg.model), cfg)
    return root, msd


@pytest.mark.parametrize("fire,seed,expected", [("0", "0", 0.843), ("0.5", "3", 0.902)])
@pytest.mark.slow
def test_official_weights_reproduce_the_original_dice(official_run, fire, seed, expected, monkeypatch):
    root, msd = official_run
    monkeypatch.setenv("MEDNCA_CACHE", str(root / "cache"))
    out = root / f"eval-{fire}"
    assert evaluate_cli.main(["--checkpoint", str(root / "run"), "--data", str(msd), "--out", str(out), "--fire-rate", fire, "--seed", seed]) == 0
    m = json.loads((out / "metrics.json").read_text())["cases"]["hippocampus_374"]
    assert abs(m["dice"] - expected) <= 0.01
    assert abs(m["dice_native"] - m["dice"]) < 0.03
