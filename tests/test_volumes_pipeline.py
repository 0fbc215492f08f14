"""3D volumes end to end (``data.image_size`` with three entries): the DiceFocal loss, the
foreground-placed training crops, whole volumes in the slice cache, training, evaluation with
a pseudo-ensemble and predictions in each scan's own grid, for the NCA and the UNet.

The volumes are the synthetic task's (24 x 28 x 24 voxels) on a 32 x 32 x 24 model grid, so a
few training steps compile and run in seconds.
"""

from __future__ import annotations

import importlib.util
import json

import jax
import jax.numpy as jnp
import nibabel as nib
import numpy as np
import pytest
from conftest import TINY_3D_TOML

from mednca_jax.config import Config, ConfigError, DataConfig, ModelConfig, TrainConfig, loads, validate
from mednca_jax.data import list_cases, load_slices, make_synthetic_task
from mednca_jax.data.cache import cache_key
from mednca_jax.data.formats import native_label, to_native
from mednca_jax.evaluate.quality import spearman
from mednca_jax.losses import LOSS_SUMS, dice_bce_loss, dice_focal_loss
from mednca_jax.nca.levels import random_crops

SHAPE = (24, 28, 24)
GRID = [32, 32, 24]

@pytest.fixture(scope="module")
def task(tmp_path_factory):
    return make_synthetic_task(tmp_path_factory.mktemp("vol") / "synth", n_cases=6, seed=0, shape=SHAPE)


# --------------------------------------------------------------------------- the loss
def _dice_focal_numpy(z: np.ndarray, t: np.ndarray) -> float:
    """The original's DiceFocal written out for one channel, in float64."""
    z, t = z.astype(np.float64).ravel(), t.astype(np.float64).ravel()
    p = 1 / (1 + np.exp(-z))
    bce = -(t * np.log(p) + (1 - t) * np.log(1 - p))
    softmax = np.exp(p) / np.exp(p).sum()
    focal = np.mean(bce * (1 - softmax) ** 2)
    dice = 1 - (2 * (p * t).sum() + 1) / (p.sum() + t.sum() + 1)
    return focal + dice


def test_dice_focal_is_the_original_formula_and_adds_over_parts(rng):
    z = rng.normal(0, 2, (3, 5, 6, 4, 1)).astype(np.float32)
    t = (rng.random((3, 5, 6, 4, 1)) < 0.3).astype(np.float32)
    got = float(dice_focal_loss(jnp.asarray(z), jnp.asarray(t)))
    np.testing.assert_allclose(got, _dice_focal_numpy(z, t), rtol=1e-5)
    # the focal factor is ~1 - 2/N per voxel: the loss is within a few 1/N of DiceBCE ...
    bce = float(dice_bce_loss(jnp.asarray(z), jnp.asarray(t)))
    assert 0 < bce - got < 4 * bce / z.size
    # ... and, being a function of sums, the sums of parts of a batch give the whole batch's loss
    to_sums, from_sums = LOSS_SUMS["dice_focal"]
    parts = sum(to_sums(jnp.asarray(z[i : i + 1]), jnp.asarray(t[i : i + 1])) for i in range(3))
    np.testing.assert_allclose(float(from_sums(parts)), got, rtol=1e-6)
    # no foreground: 0, as DiceBCE
    assert float(dice_focal_loss(jnp.asarray(z), jnp.zeros_like(jnp.asarray(t)))) == 0.0


# --------------------------------------------------------------------------- crops
def test_foreground_crops_hold_foreground_and_uniform_ones_are_unchanged(rng):
    image = jnp.asarray(rng.random((4, 20, 20, 12, 1)), jnp.float32)
    label = np.zeros((4, 20, 20, 12, 1), np.float32)
    label[0, 2:4, 15:17, 1:3] = 1  # small structures far from the centre
    label[1, 17:19, 1:3, 9:11] = 1
    label[2, 10, 10, 6] = 1
    # sample 3 has no foreground: it keeps its uniform window
    keys = jax.random.split(jax.random.PRNGKey(0), 4)
    uniform = random_crops(keys, (image, jnp.asarray(label)), 8)
    same = random_crops(keys, (image, jnp.asarray(label)), 8, jnp.asarray(label), 0.0)
    for a, b in zip(uniform, same):
        np.testing.assert_array_equal(a, b)
    hits = 0
    for seed in range(10):
        keys = jax.random.split(jax.random.PRNGKey(seed), 4)
        img, lab = random_crops(keys, (image, jnp.asarray(label)), 8, jnp.asarray(label), 1.0)
        assert img.shape == (4, 8, 8, 8, 1) and lab.shape == (4, 8, 8, 8, 1)
        assert all(float(lab[b].sum()) > 0 for b in range(3)), f"seed {seed}: a foreground crop missed the foreground"
        np.testing.assert_array_equal(img[3], random_crops(keys, (image,), 8)[0][3])
        hits += int(float(random_crops(keys, (jnp.asarray(label),), 8)[0][:3].sum()) > 0)
    assert hits < 10  # uniform windows miss those structures often: the placement is what finds them


# --------------------------------------------------------------------------- data
def test_volumes_in_the_slice_cache_and_back_to_each_scan(task, tmp_path):
    cfg = validate(Config(data=DataConfig(image_size=tuple(GRID))))
    cases = list_cases(task)[:2]
    vols = load_slices(cases, cfg.data, tmp_path / "cache")
    assert vols.images.shape == (2, *GRID, 1) and vols.labels.shape == (2, *GRID, 1)
    assert list(vols.case_index) == [0, 1] and vols.native_shapes[0] == SHAPE
    assert 0.0 <= vols.images.min() and vols.images.max() <= 1.0
    again = load_slices(cases, cfg.data, tmp_path / "cache")  # from the cache: the same arrays
    np.testing.assert_array_equal(again.images, vols.images)
    # keep_original_scale: the grid's corner is the scan, voxel for voxel
    back = to_native(vols.labels[0:1].astype(np.uint8)[..., 0], SHAPE, 2, cfg.data)
    np.testing.assert_array_equal(back, native_label(cases[0], cfg.data, 1) > 0)
    # resample onto a smaller grid, and back to the scan's shape
    small = validate(Config(data=DataConfig(image_size=(16, 16, 16), placement="resample")))
    assert cache_key(cases[0], small.data) != cache_key(cases[0], cfg.data)
    rs = load_slices(cases, small.data, tmp_path / "cache")
    assert rs.images.shape == (2, 16, 16, 16, 1)
    assert to_native(rs.labels[0:1], SHAPE, 2, small.data).shape == SHAPE + (1,)
    # a scan larger than the grid is named, with what to do
    from mednca_jax.data import DataError

    tight = validate(Config(data=DataConfig(image_size=(16, 16, 16))))
    with pytest.raises(DataError, match="placement"):
        load_slices(cases[:1], tight.data, tmp_path / "cache")


def test_3d_config_keys_are_checked():
    with pytest.raises(ConfigError, match="data.placement"):
        loads('[data]\nimage_size = [32, 32, 24]\nplacement = "stretch"\n')
    with pytest.raises(ConfigError, match="train.loss"):
        loads('[train]\nloss = "focal"\n')
    with pytest.raises(ConfigError, match="model.patch_foreground"):
        loads("[model]\npatch_foreground = 1.5\n")
    with pytest.raises(ConfigError, match="data.image_size"):
        loads("[data]\nimage_size = [8, 8, 8, 8]\n")
    assert loads("[data]\nimage_size = [32, 32, 24]\n").data.volumetric
    assert not loads("").data.volumetric


# --------------------------------------------------------------------------- end to end
def _cli(*argv: str) -> int:
    from mednca_jax.cli import main as cli_main

    return cli_main(list(argv))


def test_tiny_3d_nca_trains_resumes_and_scores_whole_volumes(task, tmp_path, monkeypatch):
    """train (2 levels, DiceFocal, foreground crops) -> resume (the params of a run never
    stopped, bit for bit) -> evaluate --runs 3: per-volume
    Dice on the grid and in each scan's grid, NQM and its statistics, predictions and variance
    volumes with the scan's shape and affine; evaluate --robustness perturbs whole volumes
    (ours, and torchio's protocol where the extra is installed)."""
    from mednca_jax.config import load_config
    from conftest import train

    monkeypatch.setenv("MEDNCA_CACHE", str(tmp_path / "cache"))
    (tmp_path / "tiny3d.toml").write_text(TINY_3D_TOML)
    run = tmp_path / "run"
    assert _cli("train", "--config", str(tmp_path / "tiny3d.toml"), "--data", str(task), "--workdir", str(run),
                "--no-progress", "--cpu-processes", "1") == 0
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert any("val_dice" in r for r in log) and all(np.isfinite(r["loss"]) for r in log if "loss" in r)
    longer = load_config(tmp_path / "tiny3d.toml", ["train.num_steps=8"])
    resumed = train(longer, run, task, resume=True, progress=False)
    assert resumed["step"] == 8
    train(longer, tmp_path / "straight", task, progress=False)  # exact resume: as if never stopped
    from mednca_jax.train import checkpoint as ckpt

    for a, b in zip(*(jax.tree_util.tree_leaves(ckpt.load_params(r, which="latest")[0]) for r in (run, tmp_path / "straight"))):
        np.testing.assert_array_equal(a, b)
    out = tmp_path / "eval"
    assert _cli("evaluate", "--checkpoint", str(run), "--data", str(task), "--split", "test", "--runs", "3",
                "--out", str(out), "--no-progress") == 0
    metrics = json.loads((out / "metrics.json").read_text())
    split = json.loads((run / "split.json").read_text())
    assert set(metrics["cases"]) == set(split["test"])
    for name, r in metrics["cases"].items():
        assert {"dice", "dice_soft", "dice_native", "dice_run_mean", "nqm"} <= set(r)
        assert 0 <= r["dice"] <= 1 and r["nqm"] >= 0
        scan = nib.load(task / "imagesTr" / f"{name}.nii.gz")
        for folder in ("predictions", "variance"):
            written = nib.load(out / folder / f"{name}.nii.gz")
            assert written.shape == scan.shape
            np.testing.assert_allclose(written.affine, scan.affine)
    assert "spearman" in json.dumps(metrics["quality"]).lower()
    assert (out / "panels").is_dir() and any((out / "panels").iterdir())
    rob = tmp_path / "rob"
    tio = importlib.util.find_spec("torchio") is not None
    assert _cli("evaluate", "--checkpoint", str(run), "--data", str(task), "--split", "test", "--out", str(rob), "--no-progress",
                "--robustness", "--perturbations", "gaussian_noise", "spike", *(["RandomNoise"] if tio else []),
                "--severities", "0.5", "1", "--protocol", "ours", *(["torchio"] if tio else [])) == 0
    res = json.loads((rob / "robustness.json").read_text())["models"]["nca:tiny3d"]
    assert set(res) == {"clean", "gaussian_noise", "spike"}
    for name in ("gaussian_noise", "spike"):
        assert set(res[name]) == {"0", "0.5", "1.0"} and res[name]["0"] == res["clean"]["0"]
        assert all(0.0 <= c["mean"] <= 1.0 for c in res[name].values())
    rob_metrics = json.loads((rob / "metrics.json").read_text())
    assert res["clean"]["0"]["mean"] == pytest.approx(rob_metrics["summary"]["dice"]["mean"])  # the evaluation's own Dice
    assert "| spike | 1 |" in (rob / "robustness.md").read_text() and (rob / "robustness.png").stat().st_size > 0
    # --quality: NQM and Dice per case under each of our perturbations, pooled Spearman
    rq = tmp_path / "rob_quality"
    assert _cli("evaluate", "--checkpoint", str(run), "--data", str(task), "--split", "test", "--out", str(rq), "--no-progress",
                "--robustness", "--perturbations", "gaussian_noise", "spike", "--severities", "0.5", "1", "--quality", "--runs", "2") == 0
    q, qm = (json.loads((rq / f).read_text()) for f in ("robustness_quality.json", "metrics.json"))
    conds = {"clean", "gaussian_noise@0.5", "gaussian_noise@1", "spike@0.5", "spike@1"}
    assert q["runs"] == 2 and set(q["cases"]) == conds == set(q["spearman_by_condition"])
    assert q["cases"]["clean"] == {n: {"dice": r["dice"], "nqm": r["nqm"]} for n, r in qm["cases"].items()}  # same key and runs
    assert all(set(c) == set(split["test"]) for c in q["cases"].values())
    assert q["cases"]["spike@1"] != q["cases"]["clean"]
    pooled = [r for c in q["cases"].values() for r in c.values()]
    rho = spearman([r["nqm"] for r in pooled], [r["dice"] for r in pooled])  # NaN when the tiny model's Dice is constant
    assert q["spearman_nqm_dice"] == pytest.approx(rho, nan_ok=True)
    assert qm["robustness_quality"]["spearman_nqm_dice"] == pytest.approx(rho, nan_ok=True)
    assert (rq / "robustness_nqm_vs_dice.png").stat().st_size > 0
    # the CLI reuses the evaluation's clean runs; computed afresh they are the same
    from mednca_jax.evaluate.evaluation import make_predict_fn, quality_under_shift, select_cases
    from mednca_jax.machine import backend_for
    from mednca_jax.train.checkpoint import load_params

    params, rcfg = load_params(run)
    vols = load_slices(select_cases(run, task, None, "test", rcfg.data), rcfg.data, tmp_path / "cache", rcfg.model.n_out)
    again = quality_under_shift(params, rcfg, vols, jax.random.PRNGKey(0), perturbations=["spike", "scale"], severities=[1.0],
                                runs=2, predict=make_predict_fn(rcfg, backend_for(rcfg)))
    assert set(again["cases"]) == {"clean", "spike@1"}  # scale changes the grid: left out
    assert again["cases"] == {c: q["cases"][c] for c in ("clean", "spike@1")}
    if tio:
        t = json.loads((rob / "robustness_torchio.json").read_text())["models"]["nca:tiny3d"]
        assert set(t) == {"clean", "RandomNoise"} and set(t["RandomNoise"]) == {"0", "1", "2", "3", "4", "5"}
        assert (rob / "robustness_torchio.png").stat().st_size > 0


@pytest.mark.slow
def test_tiny_3d_nca_learns_the_synthetic_structure(task, tmp_path, monkeypatch):
    """A few hundred steps on the synthetic volumes reach a validation Dice no untrained or
    constant model gives: the 3D path learns, not only runs."""
    from conftest import train

    monkeypatch.setenv("MEDNCA_CACHE", str(tmp_path / "cache"))
    cfg = loads(TINY_3D_TOML).replace(train=TrainConfig(batch_size=2, num_steps=240, lr=5e-3, loss="dice_focal",
                                                        log_every=40, eval_every=80, checkpoint_every=80))
    result = train(cfg, tmp_path / "run", task, progress=False)
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    best = max(r["val_dice"] for r in log if "val_dice" in r)
    assert result["step"] == 240 and best > 0.5, f"best validation Dice {best:.3f}"


@pytest.mark.slow
def test_tiny_3d_unet_trains_and_scores_whole_volumes(task, tmp_path, monkeypatch):
    monkeypatch.setenv("MEDNCA_CACHE", str(tmp_path / "cache"))
    (tmp_path / "unet3d.toml").write_text(
        'name = "unet3d"\n[model]\nkind = "unet"\nunet_width = 4\nunet_depth = 2\n'
        "[data]\nimage_size = [32, 32, 24]\nsplit = [0.5, 0.17, 0.33]\n"
        "[train]\nbatch_size = 2\nnum_steps = 4\nlog_every = 2\neval_every = 2\ncheckpoint_every = 2\n"
    )
    run = tmp_path / "run"
    assert _cli("train", "--config", str(tmp_path / "unet3d.toml"), "--data", str(task), "--workdir", str(run),
                "--no-progress", "--cpu-processes", "1") == 0
    out = tmp_path / "eval"
    assert _cli("evaluate", "--checkpoint", str(run), "--data", str(task), "--split", "test", "--out", str(out),
                "--no-progress") == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["model"]["kind"] == "unet" and metrics["summary"]["dice"]["n"] == 2
    name = next(iter(metrics["cases"]))
    assert nib.load(out / "predictions" / f"{name}.nii.gz").shape == SHAPE
