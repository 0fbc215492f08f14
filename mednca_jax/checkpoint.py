"""Run folders and their orbax checkpoints.

A run folder (what ``train.py`` writes, ``evaluate.py --checkpoint`` and the exporters read)::

    DIR/config.toml            the effective config of the run
    DIR/split.json             patient-level split (train.py only)
    DIR/checkpoints/<step>/    latest N: params, train (optimiser state, PRNG key), meta (JSON)
    DIR/best/<step>/           best by validation Dice: params, meta

Orbax writes each step into a temporary folder and renames it when complete, so a crash or
a full disk during a save leaves the previous checkpoint intact.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from .config import Config, ConfigError, dumps, load_config

CONFIG_FILE = "config.toml"
LATEST_DIR = "checkpoints"
BEST_DIR = "best"


class CheckpointError(ValueError):
    """A run folder is missing, incomplete, or belongs to another config."""


def write_text_atomic(path: Path, text: str) -> None:
    """Write via a temporary file and rename, so a failed write never truncates ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_run_config(run_dir: str | Path, cfg: Config) -> None:
    write_text_atomic(Path(run_dir) / CONFIG_FILE, dumps(cfg))


def load_run_config(run_dir: str | Path) -> Config:
    path = Path(run_dir) / CONFIG_FILE
    if not Path(run_dir).is_dir():
        raise CheckpointError(f"checkpoint folder {run_dir} does not exist")
    if not path.is_file():
        raise CheckpointError(
            f"{run_dir} is not a mednca-jax run folder: {CONFIG_FILE} is missing "
            "(train.py and 'python -m mednca_jax.export from-torch' write one)"
        )
    try:
        return load_config(path)
    except ConfigError as e:
        raise CheckpointError(f"{path} is not a valid config for this version: {e}") from None


def check_same_model(saved: Config, wanted: Config, run_dir: str | Path) -> None:
    """Raise :class:`CheckpointError` naming the model keys in which two configs differ."""
    a, b = saved.to_dict()["model"], wanted.to_dict()["model"]
    shape_keys = ("kind", "channels", "hidden", "n_in", "n_out", "steps", "scales", "unet_width", "unet_depth")
    diff = [k for k in shape_keys if a[k] != b[k]]
    if diff:
        detail = ", ".join(f"model.{k}: checkpoint {a[k]!r} vs requested {b[k]!r}" for k in diff)
        raise CheckpointError(f"checkpoint {run_dir} was made with another config ({detail})")


def manager(run_dir: str | Path, which: str = LATEST_DIR, max_to_keep: int | None = None) -> ocp.CheckpointManager:
    """An orbax manager over ``DIR/checkpoints`` (latest N) or ``DIR/best``."""
    path = Path(run_dir).absolute() / which
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, create=True, enable_async_checkpointing=False
    )
    return ocp.CheckpointManager(path, options=options, item_names=("params", "train", "meta"))


def save_checkpoint(
    mngr: ocp.CheckpointManager, step: int, params: Any, meta: dict[str, Any], train: Any | None = None
) -> None:
    """Save params (+ optimiser/PRNG state when given) and JSON metadata at ``step``."""
    items = {"params": ocp.args.StandardSave(params), "meta": ocp.args.JsonSave(meta)}
    if train is not None:
        items["train"] = ocp.args.StandardSave(train)
    mngr.save(step, args=ocp.args.Composite(**items), force=True)
    mngr.wait_until_finished()


def save_params(run_dir: str | Path, params: Any, cfg: Config, meta: dict[str, Any] | None = None) -> None:
    """Write a run folder holding only ``params`` and ``cfg`` (e.g. imported weights)."""
    save_run_config(run_dir, cfg)
    with manager(run_dir) as m:
        save_checkpoint(m, 0, jax.device_get(params), dict(meta or {"source": "params"}))


def _pick_step(run_dir: Path, which: str) -> tuple[str, int]:
    order = [BEST_DIR, LATEST_DIR] if which == "best" else [LATEST_DIR]
    for sub in order:
        if (run_dir / sub).is_dir():
            with manager(run_dir, sub) as m:
                step = m.latest_step()
            if step is not None:
                return sub, step
    raise CheckpointError(f"{run_dir} holds no complete checkpoint (looked in {', '.join(order)})")


def restore(
    run_dir: str | Path, abstract: dict[str, Any], which: str = "best", step: int | None = None
) -> tuple[dict[str, Any], int]:
    """Restore the items named in ``abstract`` (``{"params": tree, "train": tree}`` of arrays
    or ``jax.ShapeDtypeStruct``; ``None`` restores as saved) plus ``meta``.

    ``which``: ``"best"`` (falls back to the latest) or ``"latest"``.
    Returns ``(items, step)``.
    """
    run_dir = Path(run_dir).absolute()
    if step is None:
        sub, step = _pick_step(run_dir, which)
    else:
        sub = LATEST_DIR
    items = {
        k: (ocp.args.StandardRestore(v) if v is not None else ocp.args.StandardRestore())
        for k, v in abstract.items()
    }
    items["meta"] = ocp.args.JsonRestore()
    try:
        with manager(run_dir, sub) as m:
            out = m.restore(step, args=ocp.args.Composite(**items))
    except (ValueError, KeyError, FileNotFoundError) as e:
        raise CheckpointError(
            f"could not restore {run_dir / sub / str(step)}: {type(e).__name__}: {e}. "
            "Was it written by another config or version?"
        ) from None
    return {k: out[k] for k in items}, step


def load_params(run_dir: str | Path, cfg: Config | None = None, which: str = "best") -> tuple[Any, Config]:
    """Params and config of a run folder, checked against the config's expected shapes.

    With ``cfg`` given, its model must match the saved one (else :class:`CheckpointError`).
    """
    from .networks import check_network_params  # local: networks imports the models

    saved = load_run_config(run_dir)
    if cfg is not None:
        check_same_model(saved, cfg, run_dir)
    items, _ = restore(run_dir, {"params": None}, which=which)
    params = jax.tree_util.tree_map(np.asarray, items["params"])
    try:
        check_network_params(params, saved)
    except ValueError as e:
        raise CheckpointError(f"checkpoint {run_dir}: {e}") from None
    return params, saved
