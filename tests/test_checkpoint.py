"""Run folders: save/load params, config mismatch, interrupted saves."""

import dataclasses

import jax
import numpy as np
import pytest

from mednca_jax.train import checkpoint as ckpt
from mednca_jax.nca.levels import init_params


def test_params_round_trip(tmp_path, tiny_cfg):
    params = init_params(tiny_cfg.model, jax.random.PRNGKey(3))
    ckpt.save_params(tmp_path / "run", params, tiny_cfg)
    loaded, cfg = ckpt.load_params(tmp_path / "run")
    assert cfg == tiny_cfg
    for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(loaded)):
        np.testing.assert_array_equal(a, b)


def test_checkpoint_from_another_config_is_rejected(tmp_path, tiny_cfg):
    ckpt.save_params(tmp_path / "run", init_params(tiny_cfg.model, jax.random.PRNGKey(0)), tiny_cfg)
    other = tiny_cfg.replace(model=dataclasses.replace(tiny_cfg.model, channels=8))
    with pytest.raises(ckpt.CheckpointError, match="model.channels: checkpoint 6 vs requested 8"):
        ckpt.load_params(tmp_path / "run", other)


def test_params_not_fitting_the_saved_config_are_rejected(tmp_path, tiny_cfg):
    wrong = tiny_cfg.replace(model=dataclasses.replace(tiny_cfg.model, hidden=8))
    ckpt.save_params(tmp_path / "run", init_params(wrong.model, jax.random.PRNGKey(0)), tiny_cfg)
    with pytest.raises(ckpt.CheckpointError, match="shape"):
        ckpt.load_params(tmp_path / "run")


def test_missing_or_foreign_folders_give_clear_errors(tmp_path):
    with pytest.raises(ckpt.CheckpointError, match="does not exist"):
        ckpt.load_params(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ckpt.CheckpointError, match="config.toml is missing"):
        ckpt.load_params(tmp_path / "empty")


def test_failed_save_keeps_the_previous_checkpoint(tmp_path, tiny_cfg, monkeypatch):
    """A save that dies half-way (e.g. ENOSPC) must leave the last good checkpoint loadable."""
    run = tmp_path / "run"
    params = init_params(tiny_cfg.model, jax.random.PRNGKey(0))
    ckpt.save_params(run, params, tiny_cfg)
    import orbax.checkpoint as ocp

    def full_disk(*a, **k):
        raise OSError(28, "No space left on device")

    newer = jax.tree_util.tree_map(lambda x: x + 1, params)
    with ckpt.manager(run) as m:
        monkeypatch.setattr(ocp.CheckpointManager, "save", full_disk)
        with pytest.raises(ckpt.CheckpointError, match="No space left.*earlier checkpoints are kept"):
            ckpt.save_checkpoint(m, 5, newer, {"step": 5})
    monkeypatch.undo()
    loaded, _ = ckpt.load_params(run, which="latest")
    for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(loaded)):
        np.testing.assert_array_equal(a, b)
    # the config is written atomically: a failing write leaves the old file intact
    monkeypatch.setattr("os.replace", full_disk)
    with pytest.raises(OSError):
        ckpt.save_run_config(run, tiny_cfg.replace(name="other"))
    monkeypatch.undo()
    assert ckpt.load_run_config(run).name == tiny_cfg.name
