"""The ``mednca`` console script: dispatch, help, config names, and train -> predict through it."""

from __future__ import annotations

import subprocess
import sys
import tomllib

import nibabel as nib
import pytest
from conftest import REPO

from mednca_jax import cli
from mednca_jax.export.__main__ import build_parser as export_parser
from mednca_jax.named_configs import config_names, configs_dir, resolve_config_path


def test_help_lists_every_command(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in ("train", "evaluate", "predict", "export"):
        assert f"\n  {name} " in out
    assert cli.main([]) == 2  # no command: the same help, as an error


def test_unknown_command_is_a_one_line_error(capsys):
    assert cli.main(["trian"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mednca: unknown command 'trian'") and "Traceback" not in err


@pytest.mark.parametrize("command", ["train", "evaluate", "predict"])
def test_command_help_is_the_commands_own(command, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main([command, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: mednca {command} ")
    flags = {"train": "--cpu-processes", "evaluate": "--robustness", "predict": "--fire-rate"}[command]
    assert flags in out


def test_export_forwards_every_verb_of_the_export_module(capsys):
    """New verbs of ``python -m mednca_jax.export`` appear under ``mednca export`` unchanged."""
    verbs = next(a for a in export_parser()._actions if a.dest == "command").choices
    assert {"from-torch", "to-numpy", "to-torch"} <= set(verbs)
    with pytest.raises(SystemExit):
        cli.main(["export", "--help"])
    out = capsys.readouterr().out
    assert all(v in out for v in verbs)
    for verb in verbs:
        with pytest.raises(SystemExit) as e:
            cli.main(["export", verb, "--help"])
        assert e.value.code == 0


def test_config_names_are_the_shipped_files():
    assert config_names() == sorted(p.stem for p in (REPO / "configs").glob("*.toml"))
    assert "demo" in config_names()
    assert resolve_config_path("demo").read_bytes() == (REPO / "configs" / "demo.toml").read_bytes()
    assert configs_dir().resolve() == (REPO / "configs").resolve()


def test_config_option_resolution_leaves_paths_and_unknown_names_alone(tmp_path):
    own = tmp_path / "mine.toml"
    own.write_text('name = "mine"\n')
    demo = str(resolve_config_path("demo"))
    assert cli.resolve_config_option(["--config", "demo", "--set", "a=1"]) == ["--config", demo, "--set", "a=1"]
    assert cli.resolve_config_option(["--config=demo"]) == ["--config=" + demo]
    assert cli.resolve_config_option(["--config", str(own)]) == ["--config", str(own)]
    assert cli.resolve_config_option(["--config", "no_such"]) == ["--config", "no_such"]


def test_unknown_config_name_is_a_clear_error(tmp_path, capsys):
    assert cli.main(["train", "--config", "no_such", "--workdir", str(tmp_path / "w")]) == 2
    err = capsys.readouterr().err
    assert "no_such" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "w").exists()


def test_wheel_ships_the_configs_and_the_script():
    """What a non-editable ``pip install .`` needs (checked for real by installing, see README)."""
    meta = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert meta["project"]["scripts"]["mednca"] == "mednca_jax.cli:main"
    assert "configs/*.toml" in meta["tool"]["setuptools"]["package-data"]["mednca_jax"]
    assert (REPO / "mednca_jax" / "configs" / "demo.toml").is_file()


@pytest.mark.slow
def test_train_by_config_name_then_predict_its_own_data(tmp_path, monkeypatch, capsys):
    """The README's flow in small: `mednca train --config demo`, then `mednca predict` on the
    synthetic scans it generated."""
    monkeypatch.setenv("MEDNCA_CACHE", str(tmp_path / "cache"))
    run = tmp_path / "W"
    small = ["train.num_steps=2", "train.eval_every=2", "train.checkpoint_every=2", "train.batch_size=4",
             "data.synthetic_cases=6", "data.image_size=[16,16]", "model.steps=[2,2]", "model.patch_size=8"]
    argv = ["train", "--config", "demo", "--workdir", str(run), "--no-progress"]
    for s in small:
        argv += ["--set", s]
    assert cli.main(argv) == 0
    assert 'name = "demo"' in (run / "config.toml").read_text()
    images = sorted((run / "synthetic_data" / "imagesTr").glob("*.nii.gz"))
    assert len(images) == 6
    out = tmp_path / "P"
    assert cli.main(["predict", "--checkpoint", str(run), "--input", str(run / "synthetic_data" / "imagesTr"),
                     "--output", str(out)]) == 0
    for img in images:
        pred = nib.load(out / img.name)
        assert pred.shape == nib.load(img).shape[:3]


def test_the_entry_point_starts_without_importing_jax():
    """What ``mednca`` imports before a command takes over is cheap: --help answers at once and
    a Ctrl-C while the modules load reaches the dispatcher's handler, not an import."""
    code = "import sys, mednca_jax.cli; print(sorted(m for m in ('jax', 'flax', 'optax', 'numpy') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.strip() == "[]", out.stdout


def test_ctrl_c_while_a_command_loads_is_one_line(monkeypatch, capsys):
    def interrupted_import(name):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_command_main", interrupted_import)
    assert cli.main(["train", "--config", "demo"]) == 130
    err = capsys.readouterr().err
    assert err == "interrupted\n", err
