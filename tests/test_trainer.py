"""train.py / evaluate.py end to end on a tiny synthetic task: resume, errors, outputs."""

import importlib.util
import json
import shutil

import jax
import numpy as np
import pytest

import evaluate as evaluate_cli
import train as train_cli
from mednca_jax.train import checkpoint as ckpt
from mednca_jax.config import dumps
from mednca_jax.data import make_synthetic_task
from mednca_jax.train.faults import RunError
from conftest import train
from conftest import TINY_RUN_TOML as TINY




@pytest.fixture(scope="module")
def task(tmp_path_factory):
    root = tmp_path_factory.mktemp("task")
    make_synthetic_task(root / "synth", n_cases=6, seed=0, shape=(24, 24, 24))
    cfg_path = root / "tiny.toml"
    cfg_path.write_text(TINY)
    return root / "synth", cfg_path


def _params(run):
    params, _ = ckpt.load_params(run, which="latest")
    return jax.tree_util.tree_leaves(params)


@pytest.mark.slow
def test_interrupted_and_resumed_run_equals_uninterrupted(task, tmp_path, monkeypatch):
    data, cfg_path = task
    monkeypatch.setenv("MEDNCA_CACHE", str(tmp_path / "cache"))
    from mednca_jax.config import load_config

    cfg = load_config(cfg_path)
    full = train(cfg, tmp_path / "full", data, progress=False)
    assert full["step"] == 6 and full["reason"] == "done"
    part = train(cfg, tmp_path / "part", data, progress=False, stop_after=4)
    assert part["step"] == 4
    resumed = train(cfg, tmp_path / "part", data, resume=True, progress=False)
    assert resumed["step"] == 6
    for a, b in zip(_params(tmp_path / "full"), _params(tmp_path / "part")):
        np.testing.assert_array_equal(a, b)
    split = json.loads((tmp_path / "full" / "split.json").read_text())
    assert sorted(split["train"] + split["val"] + split["test"]) == sorted(p.name.split(".")[0] for p in (data / "imagesTr").iterdir())
    log = [json.loads(l) for l in (tmp_path / "full" / "log.jsonl").read_text().splitlines()]
    assert any("val_dice" in r for r in log) and any("loss" in r for r in log)
    assert list((tmp_path / "full" / "tb").iterdir())
    assert (tmp_path / "full" / "curve.png").stat().st_size > 0


@pytest.mark.slow
def test_time_limit_stops_with_a_checkpoint(task, tmp_path, monkeypatch):
    data, cfg_path = task
    monkeypatch.setenv("MEDNCA_CACHE", str(tmp_path / "cache"))
    from mednca_jax.config import load_config

    cfg = load_config(cfg_path, ["train.time_limit_min=1e-9"])
    out = train(cfg, tmp_path / "run", data, progress=False)
    assert out["reason"] == "time_limit" and out["step"] == 1
    assert ckpt.manager(tmp_path / "run", ckpt.LATEST_DIR, 1).latest_step() == 1


def test_a_run_without_validation_keeps_its_ema_as_the_checkpoint_to_load(task, tmp_path, monkeypatch):
    """``data.split`` with no validation part (the shipped models): nothing to choose by, so
    ``best/`` holds the EMA at each checkpoint, and that is what evaluate and export load."""
    data, cfg_path = task
    monkeypatch.setenv("MEDNCA_CACHE", str(tmp_path / "cache"))
    from mednca_jax.config import load_config

    cfg = load_config(cfg_path, ["data.split=[0.67,0.0,0.33]", "train.ema_decay=0.5", "train.schedule=cosine"])
    out = train(cfg, tmp_path / "run", data, progress=False)
    assert out["best_val_dice"] < 0 and out["step"] == cfg.train.num_steps
    assert ckpt.manager(tmp_path / "run", ckpt.BEST_DIR, 1).latest_step() == cfg.train.num_steps
    items, _ = ckpt.restore(tmp_path / "run", {"train": None}, which="latest")
    best, _ = ckpt.load_params(tmp_path / "run")
    raw, _ = ckpt.load_params(tmp_path / "run", which="latest")
    for e, b, r in zip(*(jax.tree_util.tree_leaves(t) for t in (items["train"]["ema"], best, raw))):
        np.testing.assert_array_equal(np.asarray(e), b)
    assert any(not np.array_equal(b, r) for b, r in zip(jax.tree_util.tree_leaves(best), jax.tree_util.tree_leaves(raw)))


@pytest.mark.slow
def test_existing_run_needs_resume_and_resume_needs_a_run(task, tmp_path, monkeypatch):
    data, cfg_path = task
    monkeypatch.setenv("MEDNCA_CACHE", str(tmp_path / "cache"))
    from mednca_jax.config import load_config

    cfg = load_config(cfg_path)
    with pytest.raises(RunError, match="no checkpoint"):
        train(cfg, tmp_path / "new", data, resume=True, progress=False)
    train(cfg, tmp_path / "run", data, progress=False, stop_after=1)
    with pytest.raises(RunError, match="--resume"):
        train(cfg, tmp_path / "run", data, progress=False)
    other = cfg.replace(model=cfg.model.__class__(**{**cfg.model.__dict__, "hidden": 8}))
    with pytest.raises(ckpt.CheckpointError, match="model.hidden"):
        train(other, tmp_path / "run", data, resume=True, progress=False)


@pytest.mark.slow
def test_cli_train_then_evaluate(task, tmp_path, monkeypatch, capsys):
    data, cfg_path = task
    monkeypatch.setenv("MEDNCA_CACHE", str(tmp_path / "cache"))
    run = tmp_path / "cli"
    assert train_cli.main(["--config", str(cfg_path), "--data", str(data), "--workdir", str(run), "--no-progress", "--set", "train.num_steps=3"]) == 0
    assert (run / "config.toml").read_text().count("num_steps = 3") == 1
    out = tmp_path / "eval"
    assert evaluate_cli.main(["--checkpoint", str(run), "--data", str(data), "--split", "test", "--out", str(out), "--runs", "2"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["summary"]) >= {"dice", "dice_soft", "dice_native", "dice_run_mean", "nqm"}
    from mednca_jax.nca.rollout import count_params
    from mednca_jax.train.checkpoint import load_params

    params, _ = load_params(run)
    assert metrics["model"]["params"] == count_params(params) and metrics["model"]["ms_per_slice"] > 0
    split = json.loads((run / "split.json").read_text())
    assert set(metrics["cases"]) == set(split["test"])
    import nibabel as nib

    for name in split["test"]:
        pred = nib.load(out / "predictions" / f"{name}.nii.gz")
        img = nib.load(data / "imagesTr" / f"{name}.nii.gz")
        assert pred.shape == img.shape[:3] and np.allclose(pred.affine, img.affine)
        assert (out / "variance" / f"{name}.nii.gz").is_file()
    text = capsys.readouterr().out
    assert "mean ± std" in text and f"{count_params(params):,} params" in text


def test_cli_errors_are_clear(task, tmp_path, capsys):
    data, cfg_path = task
    assert train_cli.main(["--config", str(cfg_path), "--set", "train.lrr=1", "--workdir", str(tmp_path / "x")]) == 2
    assert "train.lrr" in capsys.readouterr().err
    assert train_cli.main(["--config", str(cfg_path), "--data", str(tmp_path), "--workdir", str(tmp_path / "y")]) == 2
    assert "imagesTr" in capsys.readouterr().err
    assert evaluate_cli.main(["--checkpoint", str(tmp_path / "none")]) == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.slow
def test_unlabelled_folder_gives_predictions_only(task, tmp_path, monkeypatch):
    data, cfg_path = task
    monkeypatch.setenv("MEDNCA_CACHE", str(tmp_path / "cache"))
    from mednca_jax.config import load_config
    from mednca_jax.nca.levels import init_params

    cfg = load_config(cfg_path)
    ckpt.save_params(tmp_path / "run", init_params(cfg.model, jax.random.PRNGKey(0)), cfg)
    unl = tmp_path / "unlabelled"
    (unl / "imagesTs").mkdir(parents=True)
    (unl / "imagesTr").mkdir()
    shutil.copy(data / "imagesTr" / sorted(p.name for p in (data / "imagesTr").iterdir())[0], unl / "imagesTs" / "case_a.nii.gz")
    assert evaluate_cli.main(["--checkpoint", str(tmp_path / "run"), "--data", str(unl), "--out", str(tmp_path / "o")]) == 0
    metrics = json.loads((tmp_path / "o" / "metrics.json").read_text())
    assert metrics["summary"] == {} and "case_a" in metrics["cases"]
    assert (tmp_path / "o" / "predictions" / "case_a.nii.gz").is_file()


@pytest.mark.slow
def test_evaluate_quality_and_robustness_outputs(task, tmp_path, monkeypatch, capsys):
    data, cfg_path = task
    monkeypatch.setenv("MEDNCA_CACHE", str(tmp_path / "cache"))
    run = tmp_path / "run"
    assert train_cli.main(["--config", str(cfg_path), "--data", str(data), "--workdir", str(run), "--no-progress", "--set", "train.num_steps=2"]) == 0
    out = tmp_path / "rob"
    tio = importlib.util.find_spec("torchio") is not None  # the optional torchio protocol, when installed
    args = ["--checkpoint", str(run), "--data", str(data), "--split", "test", "--out", str(out), "--runs", "2",
            "--robustness", "--perturbations", "gaussian_noise", "translation", "scale", *(["RandomNoise"] if tio else []),
            "--severities", "1.0", *(["--protocol", "ours", "torchio"] if tio else [])]
    assert evaluate_cli.main(args) == 0
    rob = json.loads((out / "robustness.json").read_text())["models"]["nca:tiny"]
    assert set(rob) == {"clean", "gaussian_noise", "translation", "scale"}  # robustness.json keeps its layout and names
    if tio:
        tio_res = json.loads((out / "robustness_torchio.json").read_text())["models"]["nca:tiny"]
        assert set(tio_res) == {"clean", "RandomNoise"} and set(tio_res["RandomNoise"]) == {"0", "1", "2", "3", "4", "5"}
        assert tio_res["RandomNoise"]["0"] == tio_res["clean"]["0"] == rob["clean"]["0"]
        assert (out / "robustness_torchio.png").stat().st_size > 0 and "RandomNoise" in (out / "robustness_torchio.md").read_text()
    assert set(rob["gaussian_noise"]) == {"0", "1.0"} and set(rob["scale"]) >= {"48", "64"}
    assert rob["scale"]["64"] == rob["clean"]["0"]  # 64 px is the training size: the clean result
    metrics = json.loads((out / "metrics.json").read_text())
    rho = metrics["quality"]["spearman_nqm_dice"]
    assert rho is None or np.isnan(rho) or -1 <= rho <= 1
    assert metrics["quality"]["threshold_chosen_on"].startswith("test")  # one validation case is too few
    for f in ("robustness.md", "robustness.png", "nqm_vs_dice.png", "rollout.gif"):
        assert (out / f).stat().st_size > 0, f
    assert list((out / "panels").glob("*.png"))
    capsys.readouterr()
    bad = [
        (["--robustness", "--perturbations", "earthquake"], "valid choices"),
        (["--robustness", "--severities", "1.5"], "severities must lie in"),
        (["--quality", "--runs", "1"], "--runs N with N >= 2"),
        (["--fire-rate", "1.0"], "fire_rate must be in"),
    ]
    for extra, msg in bad:
        assert evaluate_cli.main(["--checkpoint", str(run), "--data", str(data), "--out", str(tmp_path / "bad")] + extra) == 2
        assert msg in capsys.readouterr().err


@pytest.mark.slow
def test_unet_baseline_trains_and_evaluates_through_the_same_cli(task, tmp_path, monkeypatch):
    data, cfg_path = task
    monkeypatch.setenv("MEDNCA_CACHE", str(tmp_path / "cache"))
    run = tmp_path / "unet"
    sets = ["--set", "model.kind=unet", "--set", "model.unet_width=4", "--set", "model.unet_depth=2", "--set", "train.num_steps=2", "--set", "name=tiny_unet"]
    assert train_cli.main(["--config", str(cfg_path), "--data", str(data), "--workdir", str(run), "--no-progress"] + sets) == 0
    out = tmp_path / "unet_eval"
    assert evaluate_cli.main(["--checkpoint", str(run), "--data", str(data), "--split", "test", "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert 0.0 <= metrics["summary"]["dice"]["mean"] <= 1.0


@pytest.mark.slow
def test_two_processes_train_like_one_process_with_two_devices(task, tmp_path):
    """Multi-host through jax.distributed (2 local processes, 1 CPU device each, started by
    ``train.py --cpu-processes 2``) gives the params of 1 process with 2 devices, and only
    process 0 writes the logs."""
    import os
    import subprocess
    import sys

    from conftest import REPO

    data, cfg_path = task
    cmd = [sys.executable, "train.py", "--config", str(cfg_path), "--data", str(data), "--no-progress", "--set", "train.data_parallel=true"]
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_COORDINATOR_ADDRESS")}
    env["MEDNCA_CACHE"] = str(tmp_path / "cache")
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs 2 usable cores for 2 pinned processes")
    multi = subprocess.run(cmd + ["--workdir", str(tmp_path / "multi"), "--cpu-processes", "2"], cwd=REPO, capture_output=True,
                           text=True, timeout=300, env=env)
    assert multi.returncode == 0, multi.stderr[-3000:]
    one = subprocess.run(cmd + ["--workdir", str(tmp_path / "one")], cwd=REPO, capture_output=True, text=True, timeout=300,
                         env=dict(env, XLA_FLAGS="--xla_force_host_platform_device_count=2"))
    assert one.returncode == 0, one.stderr[-3000:]
    for a, b in zip(_params(tmp_path / "multi"), _params(tmp_path / "one"), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)
    steps = lambda run: [json.loads(l)["step"] for l in (run / "log.jsonl").read_text().splitlines()]  # noqa: E731
    assert steps(tmp_path / "multi") == steps(tmp_path / "one")


AGREE_SCRIPT = """
import jax
from mednca_jax.train.faults import agree, initialize_distributed_from_env, process0_value
assert initialize_distributed_from_env()
me = jax.process_index()
print("agreed", process0_value(100.0 + 7.5 * me), agree((me == 1,), 0.0)[0][0], agree((me == 0, False), 3.0 + me))
"""


@pytest.mark.slow
def test_processes_agree_on_process0_clock_and_flags(tmp_path):
    """What each process measures alone (its clock, its validation Dice) is replaced by process
    0's: with a budget schedule, differing clocks gave differing learning rates, replicated
    params drifted apart, and a best-checkpoint decision taken by one process only broke the
    job's collectives."""
    import os
    import subprocess
    import sys

    from conftest import REPO
    from mednca_jax.train.launch import free_port, start_job_process

    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs 2 usable cores for 2 pinned processes")
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["PYTHONPATH"] = str(REPO)
    port = free_port()
    procs = [start_job_process([sys.executable, "-c", AGREE_SCRIPT], 2, i, port, env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, cwd=tmp_path) for i in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-2000:]
        assert [l for l in out.splitlines() if l.startswith("agreed")] == ["agreed 100.0 True ((True, False), 3.0)"]
