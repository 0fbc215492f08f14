"""Faults: kills, Ctrl-C, a second trainer, damaged checkpoints, a full disk, divergence, bad
inputs and configs. Each must end with a clear message (no traceback for a user's mistake),
intact checkpoints, and a resume that gives the params of a run that never stopped."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import nibabel as nib
import numpy as np
import pytest

import evaluate as evaluate_cli
import train as train_cli
from conftest import REPO
from mednca_jax.train import checkpoint as ckpt
from mednca_jax.train import faults
from mednca_jax.train import loop as trainer
from mednca_jax.config import ConfigError, load_config
from mednca_jax.data import make_split, write_split
from mednca_jax.train.faults import RunError
from conftest import train
from test_trainer import _params, task  # noqa: F401 - the tiny synthetic task fixture

# Run as `python -c CHILD train.py-args`: train.py, made to stop at FAULT_STEP (in the commit
# rename of that step's checkpoint with FAULT_MODE=save, after logging that step with
# FAULT_MODE=train) so that the test can kill or interrupt it there; FAULT_MARKER is created
# when it gets there. FAULT_SLEEP: how long it waits (then goes on).
CHILD = r"""
import os, sys, time
mode, at, marker = os.environ["FAULT_MODE"], int(os.environ["FAULT_STEP"]), os.environ["FAULT_MARKER"]
wait = float(os.environ.get("FAULT_SLEEP", "600"))
import mednca_jax.train.loop as trainer
if mode == "save":
    from orbax.checkpoint._src.path import async_path
    real_rename = async_path.rename
    async def rename(src, dst):
        if dst.name == str(at) and dst.parent.name == "checkpoints":
            open(marker, "w").close()
            time.sleep(wait)
        return await real_rename(src, dst)
    async_path.rename = rename
else:
    real_log = trainer.log_train_metrics
    def log_train_metrics(run, step, *args):
        out = real_log(run, step, *args)
        if step == at:
            open(marker, "w").close()
            time.sleep(wait)
        return out
    trainer.log_train_metrics = log_train_metrics
import train
sys.exit(train.main(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(autouse=True)
def _cache_env(cache, monkeypatch):
    monkeypatch.setenv("MEDNCA_CACHE", str(cache))


@pytest.fixture(scope="module")
def reference(task, cache, tmp_path_factory):  # noqa: F811
    """A 6-step run that never stopped: checkpoints at 3 and 6, validation at 3 and 6."""
    data, cfg_path = task
    os.environ["MEDNCA_CACHE"] = str(cache)
    run = tmp_path_factory.mktemp("reference") / "run"
    out = train(load_config(cfg_path), run, data, progress=False)
    assert out["step"] == 6 and out["reason"] == "done"
    return run


def assert_same_params(a: Path, b: Path) -> None:
    for x, y in zip(_params(a), _params(b), strict=True):
        np.testing.assert_array_equal(x, y)


def cli_args(cfg_path: Path, data: Path, run: Path, *extra: str) -> list[str]:
    return ["--config", str(cfg_path), "--data", str(data), "--workdir", str(run), "--no-progress", *extra]


def start_child(mode: str, step: int, args: list[str], marker: Path, sleep: float = 600) -> subprocess.Popen:
    env = dict(os.environ, FAULT_MODE=mode, FAULT_STEP=str(step), FAULT_MARKER=str(marker), FAULT_SLEEP=str(sleep))
    env.pop("XLA_FLAGS", None)
    return subprocess.Popen([sys.executable, "-c", CHILD, *args], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def wait_for(marker: Path, child: subprocess.Popen, timeout: float = 240) -> None:
    t0 = time.monotonic()
    while not marker.exists():
        if child.poll() is not None:
            out, err = child.communicate()
            pytest.fail(f"the training child ended (rc {child.returncode}) before reaching the fault point:\n{err[-3000:]}")
        if time.monotonic() - t0 > timeout:
            child.kill()
            pytest.fail("the training child did not reach the fault point in time")
        time.sleep(0.05)


def kill9(child: subprocess.Popen) -> None:
    child.send_signal(signal.SIGKILL)
    child.communicate(timeout=60)
    assert child.returncode == -signal.SIGKILL


def saved_steps_all_finite(run: Path) -> dict[str, list[int]]:
    """Restore every step of checkpoints/ and best/, assert each is finite; return the steps."""
    seen = {}
    for sub in (ckpt.LATEST_DIR, ckpt.BEST_DIR):
        with ckpt.manager(run, sub) as m:
            seen[sub] = sorted(m.all_steps())
        for step in seen[sub]:
            items = ckpt._restore_step(run.absolute(), sub, step, {"params": None})
            assert not ckpt.non_finite_leaves(items["params"]), (sub, step)
    return seen


# --------------------------------------------------------------------------- kills and signals
@pytest.mark.slow
def test_kill9_during_training_then_resume_and_a_second_trainer_is_refused(task, reference, tmp_path, capsys):  # noqa: F811
    data, cfg_path = task
    run = tmp_path / "run"
    marker = tmp_path / "at_step_4"
    child = start_child("train", 4, cli_args(cfg_path, data, run), marker)
    wait_for(marker, child)
    try:  # the child holds the run folder: a second trainer must be refused, not race it
        assert train_cli.main(cli_args(cfg_path, data, run, "--resume")) == 2
        err = capsys.readouterr().err
        assert "in use by another trainer" in err and f"process {child.pid}" in err and "Traceback" not in err
    finally:
        kill9(child)
    assert (run / faults.LOCK_FILE).is_file()  # left behind by kill -9: a stale lock
    out = train(load_config(cfg_path), run, data, resume=True, progress=False)
    assert out["step"] == 6
    assert "taking over the stale lock" in capsys.readouterr().out
    assert not (run / faults.LOCK_FILE).exists()
    assert_same_params(run, reference)


@pytest.mark.slow
def test_kill9_during_a_checkpoint_save_then_resume(task, reference, tmp_path):  # noqa: F811
    data, cfg_path = task
    run = tmp_path / "run"
    marker = tmp_path / "saving_6"
    child = start_child("save", 6, cli_args(cfg_path, data, run), marker)
    wait_for(marker, child)
    kill9(child)
    assert not (run / ckpt.LATEST_DIR / "6").exists()  # only orbax's temporary folder
    with ckpt.manager(run) as m:
        assert m.latest_step() == 3
    out = train(load_config(cfg_path), run, data, resume=True, progress=False)
    assert out["step"] == 6
    assert_same_params(run, reference)
    assert not [p for p in (run / ckpt.LATEST_DIR).iterdir() if "tmp" in p.name]


@pytest.mark.slow
def test_ctrl_c_saves_and_exits_then_resume(task, reference, tmp_path):  # noqa: F811
    data, cfg_path = task
    run = tmp_path / "run"
    marker = tmp_path / "at_step_2"
    child = start_child("train", 2, cli_args(cfg_path, data, run), marker, sleep=2)
    wait_for(marker, child)
    child.send_signal(signal.SIGINT)
    out, err = child.communicate(timeout=120)
    assert child.returncode == 130, err[-3000:]
    assert "interrupted: step 2" in out and "Traceback" not in err
    with ckpt.manager(run) as m:
        assert m.latest_step() == 2
    train(load_config(cfg_path), run, data, resume=True, progress=False)
    assert_same_params(run, reference)


def test_ctrl_c_during_start_up_exits_cleanly(task, tmp_path, monkeypatch, capsys):  # noqa: F811
    data, cfg_path = task

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(trainer, "prepare_data", interrupted)
    assert train_cli.main(cli_args(cfg_path, data, tmp_path / "run")) == 130
    assert "interrupted" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # nothing half-made left behind


# --------------------------------------------------------------------------- divergence
def poisoned_steps(monkeypatch, from_step: int, healthy_below_lr: float | None, loss: float = float("nan")) -> None:
    """Make the train step return NaN params and loss from ``from_step`` on; with
    ``healthy_below_lr``, only while the learning rate is at least that (a rollback heals it).
    A finite ``loss`` leaves the params finite: an exploded but finite run."""
    real = trainer.make_train_step

    def make(cfg, tx, mesh=None, *, backend):
        step = real(cfg, tx, mesh, backend=backend)
        if healthy_below_lr is not None and cfg.train.lr < healthy_below_lr:
            return step

        def bad(state, batch, key):
            state, metrics = step(state, batch, key)
            if int(state.step) >= from_step:
                if not np.isfinite(loss):
                    state = state._replace(params=jax.tree_util.tree_map(lambda x: x * jnp.nan, state.params))
                metrics = dict(metrics, loss=jnp.float32(loss))
            return state, metrics

        return bad

    monkeypatch.setattr(trainer, "make_train_step", make)


@pytest.mark.slow
def test_divergence_between_loss_checks_rolls_back_at_half_lr(task, tmp_path, monkeypatch, capsys):  # noqa: F811
    """NaN params from step 5 reach the save at step 6 before any loss check (log_every 4):
    not saved; back to step 3 with lr / 2, which trains on to the end."""
    data, cfg_path = task
    cfg = load_config(cfg_path, ["train.log_every=4", "train.num_steps=9"])
    poisoned_steps(monkeypatch, 5, healthy_below_lr=cfg.train.lr)
    run = tmp_path / "run"
    out = train(cfg, run, data, progress=False)
    assert out["reason"] == "done" and out["step"] == 9 and out["rollbacks"] == 1
    assert "rollback 1/3 to step 3" in capsys.readouterr().out
    log = [json.loads(l) for l in (run / trainer.LOG_FILE).read_text().splitlines()]
    rollbacks = [r for r in log if "rollback" in r]
    assert len(rollbacks) == 1 and rollbacks[0]["to_step"] == 3 and rollbacks[0]["lr_factor"] == 0.5
    assert saved_steps_all_finite(run)[ckpt.LATEST_DIR] == [3, 6, 9]
    items, step = ckpt.restore(run, {"params": None}, which="latest")
    assert step == 9 and items["meta"]["lr_factor"] == 0.5 and items["meta"]["rollbacks"] == 1
    lrs = [r["lr"] for r in log if "lr" in r]  # the lr of step 9 is that of schedule step 8
    assert lrs[-1] == pytest.approx(cfg.train.lr * 0.5 * cfg.train.lr_decay**8, rel=1e-5)


@pytest.mark.slow
def test_exploded_finite_loss_rolls_back_too(task, tmp_path, monkeypatch, capsys):  # noqa: F811
    """A loss of 1e29 is finite but diverged (train.lr=1 did that on the demo task): above
    train.max_loss it rolls back like a NaN."""
    data, cfg_path = task
    cfg = load_config(cfg_path, ["train.log_every=4", "train.num_steps=9"])
    poisoned_steps(monkeypatch, 5, healthy_below_lr=cfg.train.lr, loss=1e29)
    out = train(cfg, tmp_path / "run", data, progress=False)
    assert out["reason"] == "done" and out["step"] == 9 and out["rollbacks"] == 1
    assert "warning: loss 1e+29 above train.max_loss 100 at step 8; rollback 1/3 to step 6" in capsys.readouterr().out


def test_divergence_criterion():
    assert faults.divergence(float("nan"), 100.0) == "non-finite loss"
    assert faults.divergence(float("inf"), 0.0) == "non-finite loss"
    assert faults.divergence(1e29, 100.0) == "loss 1e+29 above train.max_loss 100"
    assert faults.divergence(1e29, 0.0) == ""  # 0: only non-finite losses count
    assert faults.divergence(2.5, 100.0) == ""


@pytest.mark.slow
def test_divergence_stops_after_max_rollbacks_with_an_intact_best(task, tmp_path, monkeypatch, capsys):  # noqa: F811
    data, cfg_path = task
    poisoned_steps(monkeypatch, 4, healthy_below_lr=None)
    run = tmp_path / "run"
    rc = train_cli.main(cli_args(cfg_path, data, run, "--set", "train.max_rollbacks=2"))
    err = capsys.readouterr()
    assert rc == 2 and "Traceback" not in err.err
    line = [l for l in err.err.splitlines() if l.startswith("error:")]
    assert len(line) == 1 and "diverged (non-finite loss) at step 4 after 2 rollback(s)" in line[0] and "best checkpoint (step 3)" in line[0]
    assert err.out.count("warning: non-finite loss at step 4") == 2
    assert saved_steps_all_finite(run) == {ckpt.LATEST_DIR: [3], ckpt.BEST_DIR: [3]}
    params, _ = ckpt.load_params(run)  # best
    assert all(np.isfinite(p).all() for p in jax.tree_util.tree_leaves(params))
    assert not (run / faults.LOCK_FILE).exists()


def test_non_finite_params_are_never_saved(tmp_path, tiny_cfg):
    from mednca_jax.nca.levels import init_params

    params = jax.device_get(init_params(tiny_cfg.model, jax.random.PRNGKey(0)))
    bad = jax.tree_util.tree_map(lambda x: np.full_like(x, np.inf), params)
    with ckpt.manager(tmp_path / "run") as m:
        with pytest.raises(ckpt.CheckpointError, match="non-finite"):
            ckpt.save_checkpoint(m, 1, bad, {"step": 1})
        with pytest.raises(ckpt.CheckpointError, match="non-finite.*train"):
            ckpt.save_checkpoint(m, 1, params, {"step": 1}, {"opt": bad})
        assert m.all_steps() == []


# --------------------------------------------------------------------------- checkpoints
def _biggest_params_file(step_dir: Path) -> Path:
    return max((f for f in (step_dir / "params").rglob("*") if f.is_file()), key=lambda f: f.stat().st_size)


@pytest.mark.slow
def test_damaged_checkpoints_fall_back_or_fail_clearly(task, reference, tmp_path, monkeypatch):  # noqa: F811
    """Also: the resumed run compiles its train step once (a restored NumPy step counter
    used to make the second call compile again)."""
    data, cfg_path = task
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    f = _biggest_params_file(run / ckpt.LATEST_DIR / "6")
    b = bytearray(f.read_bytes())
    b[len(b) // 2 : len(b) // 2 + 16] = bytes(x ^ 0xFF for x in b[len(b) // 2 : len(b) // 2 + 16])
    f.write_bytes(bytes(b))
    with pytest.warns(ckpt.DamagedCheckpointWarning, match=r"checkpoints/6.*using .*checkpoints/3"):
        items, step = ckpt.restore(run, {"params": None}, which="latest")
    assert step == 3
    good, _ = ckpt.restore(reference, {"params": None}, step=3)
    for a, b_ in zip(jax.tree_util.tree_leaves(items["params"]), jax.tree_util.tree_leaves(good["params"]), strict=True):
        np.testing.assert_array_equal(a, b_)
    # resume continues from step 3, sets the damaged step aside, and ends like the reference
    made = []
    real = trainer.make_train_step
    monkeypatch.setattr(trainer, "make_train_step", lambda *a, **k: made.append(real(*a, **k)) or made[-1])
    with pytest.warns(ckpt.DamagedCheckpointWarning):
        assert train(load_config(cfg_path), run, data, resume=True, progress=False)["step"] == 6
    assert len(made) == 1 and made[0]._cache_size() == 1  # 3 steps, one compile
    assert (run / "damaged" / "checkpoints-6").is_dir()
    assert_same_params(run, reference)
    # truncated files in every step: a clear error naming each, no TensorStore traceback
    for step_dir in (run / ckpt.LATEST_DIR).iterdir():
        f = _biggest_params_file(step_dir)
        f.write_bytes(f.read_bytes()[:100])
    with pytest.raises(ckpt.CheckpointError, match=r"no checkpoint in .* can be restored \(2 tried\).*checkpoints/6.*checkpoints/3"):
        ckpt.restore(run, {"params": None}, which="latest")


@pytest.mark.slow
def test_full_disk_during_a_save(task, reference, tmp_path, capsys):  # noqa: F811
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    disk = tmp_path / "disk"
    disk.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(disk)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    data, cfg_path = task
    run = disk / "run"
    try:
        train(load_config(cfg_path), run, data, progress=False, stop_after=3)
        with open(disk / "filler", "wb") as f:  # fill the disk up
            try:
                while True:
                    f.write(b"\0" * 65536)
                    f.flush()
            except OSError:
                pass
        # Leave 3 pages: the lock file and a new TensorBoard file fit, a checkpoint does not.
        os.truncate(disk / "filler", max(0, (disk / "filler").stat().st_size - 3 * 4096))
        rc = train_cli.main(cli_args(cfg_path, data, run, "--resume"))
        err = capsys.readouterr().err
        assert rc == 2 and "Traceback" not in err
        assert "No space left" in err and "--resume" in err, err
        (disk / "filler").unlink()
        assert not (run / ckpt.LATEST_DIR / "6").exists()
        assert [p.name for p in (run / ckpt.LATEST_DIR).iterdir()] == ["3"]  # nothing half-written
        train(load_config(cfg_path), run, data, resume=True, progress=False)
        assert_same_params(run, reference)
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


# --------------------------------------------------------------------------- inputs and configs
def _copy_task(data: Path, dst: Path) -> Path:
    shutil.copytree(data, dst)
    return dst


def _first(folder: Path) -> Path:
    return sorted(folder.iterdir())[0]


def _write_like(path: Path, array: np.ndarray, like: Path) -> None:
    nib.save(nib.Nifti1Image(array, nib.load(like).affine), path)


@pytest.mark.parametrize("fault, message", [
    ("truncated", "truncated or corrupt"),
    ("shape", "must be the same voxel grid"),
    ("nan", "NaN/inf voxels"),
    ("empty", "cannot be read as NIfTI"),
    ("background", "background only"),
])
def test_bad_nifti_inputs_are_named_and_leave_no_run_folder(task, tmp_path, capsys, fault, message):  # noqa: F811
    data, cfg_path = task
    bad = _copy_task(data, tmp_path / "bad")
    cfg = load_config(cfg_path)
    names = sorted(p.name.split(".")[0] for p in (bad / "imagesTr").iterdir())
    victim = make_split(names, cfg.data.split, cfg.data.split_seed).train[0]  # training reads only train and val cases
    image, label = bad / "imagesTr" / f"{victim}.nii.gz", bad / "labelsTr" / f"{victim}.nii.gz"
    named = image
    if fault == "truncated":
        image.write_bytes(image.read_bytes()[:200])
    elif fault == "shape":
        _write_like(label, np.zeros((8, 8, 8), np.uint8), label)
        named = label
    elif fault == "nan":
        a = np.asarray(nib.load(image).dataobj).astype(np.float32)
        a[0, 0, 0] = np.nan
        _write_like(image, a, image)
    elif fault == "empty":
        image.write_bytes(b"")
    else:
        for lab in (bad / "labelsTr").iterdir():
            _write_like(lab, np.zeros(nib.load(lab).shape, np.uint8), lab)
        named = bad
    run = tmp_path / "run"
    assert train_cli.main(cli_args(cfg_path, bad, run)) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and str(named) in err and "Traceback" not in err
    assert not run.exists()


def test_bad_configs_are_config_errors(task, tmp_path, capsys):  # noqa: F811
    _, cfg_path = task
    for override, key in [("train.lr=inf", "train.lr"), ("train.lr=nan", "train.lr"), ("train.max_rollbacks=-1", "train.max_rollbacks"), ("train.max_loss=-1", "train.max_loss"),
                          ("train.eps=inf", "train.eps")]:
        with pytest.raises(ConfigError, match=key):
            load_config(cfg_path, [override])
        assert train_cli.main(["--config", str(cfg_path), "--workdir", str(tmp_path / "x"), "--set", override]) == 2
        assert key in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_a_stale_split_is_refused_and_the_folder_kept(task, tmp_path, capsys):  # noqa: F811
    data, cfg_path = task
    run = tmp_path / "run"
    names = sorted(p.name.split(".")[0] for p in (data / "imagesTr").iterdir())
    write_split(run / "split.json", make_split(names, (0.5, 0.17, 0.33), seed=0))
    before = (run / "split.json").read_text()
    assert train_cli.main(cli_args(cfg_path, data, run, "--set", "data.split_seed=1")) == 2
    err = capsys.readouterr().err
    assert "split.json" in err and "data.split_seed 0 vs 1" in err
    assert (run / "split.json").read_text() == before and not (run / ckpt.CONFIG_FILE).exists()
    with pytest.raises(RunError, match="data.split"):
        train(load_config(cfg_path, ["data.split=[0.34, 0.33, 0.33]"]), run, data, progress=False)


@pytest.mark.slow
def test_evaluate_one_case_and_unlabelled_folders(task, reference, tmp_path, capsys):  # noqa: F811
    data, _ = task
    one = tmp_path / "one"
    (one / "imagesTr").mkdir(parents=True)
    (one / "labelsTr").mkdir()
    shutil.copy(_first(data / "imagesTr"), one / "imagesTr")
    shutil.copy(_first(data / "labelsTr"), one / "labelsTr")
    base = ["--checkpoint", str(reference), "--data", str(one), "--no-progress"]
    for extra in ([], ["--robustness", "--perturbations", "gaussian_noise", "--severities", "1.0"]):
        assert evaluate_cli.main(base + ["--out", str(tmp_path / "o1"), "--runs", "3"] + extra) == 0
        out = capsys.readouterr().out
        assert "NQM statistics not available" in out and "got 1" in out
        q = json.loads((tmp_path / "o1" / "metrics.json").read_text())["quality"]
        assert q["spearman_nqm_dice"] is None and "nqm_threshold" not in q
    assert evaluate_cli.main(base + ["--out", str(tmp_path / "o2"), "--quality"]) == 2
    assert "--quality needs >= 2 labelled cases" in capsys.readouterr().err
    assert evaluate_cli.main(base + ["--out", str(tmp_path / "o3"), "--batch-size", "0"]) == 2
    assert "--batch-size must be >= 1" in capsys.readouterr().err
    unl = tmp_path / "unlabelled"
    (unl / "imagesTs").mkdir(parents=True)
    (unl / "imagesTr").mkdir()
    shutil.copy(_first(data / "imagesTr"), unl / "imagesTs")
    base = ["--checkpoint", str(reference), "--data", str(unl), "--no-progress", "--out", str(tmp_path / "o4")]
    assert evaluate_cli.main(base + ["--runs", "2"]) == 0
    metrics = json.loads((tmp_path / "o4" / "metrics.json").read_text())
    assert metrics["summary"] == {} and "quality" not in metrics and len(metrics["cases"]) == 1
    capsys.readouterr()
    assert evaluate_cli.main(base + ["--robustness"]) == 2
    assert "--robustness needs labelled cases" in capsys.readouterr().err


@pytest.mark.slow
def test_quality_flag_turns_on_the_quality_metrics(task, reference, tmp_path, capsys):  # noqa: F811
    data, _ = task
    out = tmp_path / "q"
    assert evaluate_cli.main(["--checkpoint", str(reference), "--data", str(data), "--out", str(out), "--no-progress", "--quality"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert "nqm" in metrics["summary"] and "nqm_threshold" in metrics["quality"]
    assert "NQM vs Dice: Spearman" in capsys.readouterr().out
