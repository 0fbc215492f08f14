"""Run folders and their orbax checkpoints.

A run folder (what ``train.py`` writes, ``evaluate.py --checkpoint`` and the exporters read)::

    DIR/config.toml            the effective config of the run
    DIR/split.json             patient-level split (train.py only)
    DIR/data.json              the --data folder it was trained on (absent: the generated task in DIR)
    DIR/checkpoints/<step>/    latest N: params, train (optimiser state, PRNG key), meta (JSON)
    DIR/best/<step>/           best by validation Dice: params, meta

or, for the models shipped in the package (``mednca_jax/models/<name>/``, read-only, no
orbax), ``DIR/config.toml`` + ``DIR/params.npz`` (:func:`write_params_file`), which every
reader of a run folder accepts too.

Orbax writes each step into a temporary folder and renames it when complete, so a crash or
a full disk during a save leaves the previous checkpoint intact. Each step's ``meta`` holds a
sha256 of every saved array (:func:`tree_digest`); :func:`restore` checks it and falls back
to the newest intact step, with a warning naming the damaged one. Params or optimiser state
that are not finite are never saved (:func:`save_checkpoint` refuses them).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Iterator

import jax
import numpy as np
import orbax.checkpoint as ocp

from mednca_jax.config import Config, ConfigError, dumps, load_config
from mednca_jax.errors import MedNCAError

CONFIG_FILE = "config.toml"
DATA_FILE = "data.json"
LATEST_DIR = "checkpoints"
PARAMS_FILE = "params.npz"
BEST_DIR = "best"
LOW_DISK_BYTES = 1 << 20  # a failed write with less free space than this is a full disk


class CheckpointError(MedNCAError, ValueError):
    """A run folder is missing, incomplete, damaged, or belongs to another config."""


class DamagedCheckpointWarning(UserWarning):
    """A checkpoint step failed its checksum or could not be read; an older one was used."""


def tree_digest(tree: Any) -> str:
    """sha256 over every array leaf of ``tree`` (dtype, shape and bytes, in flatten order).

    Flatten order of dicts is by sorted key, so a tree restored by orbax hashes like the one
    saved. Leaves are brought to host first (a device array's bytes are its values).
    """
    h = hashlib.sha256()
    for leaf in jax.tree_util.tree_leaves(tree):
        a = np.ascontiguousarray(np.asarray(jax.device_get(leaf)))
        h.update(f"{a.dtype.str}{a.shape};".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def non_finite_leaves(tree: Any) -> list[str]:
    """Paths of the floating-point leaves of ``tree`` holding NaN or inf (empty: all finite)."""
    bad = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        a = np.asarray(jax.device_get(leaf))
        if np.issubdtype(a.dtype, np.inexact) and not np.isfinite(a).all():
            bad.append(jax.tree_util.keystr(path))
    return bad


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


def save_data_dir(run_dir: str | Path, data_dir: str | Path) -> None:
    """Record the run's ``--data`` folder (absolute), so that evaluate finds it without ``--data``."""
    write_text_atomic(Path(run_dir) / DATA_FILE, json.dumps({"data_dir": str(Path(data_dir).resolve())}) + "\n")


def load_data_dir(run_dir: str | Path) -> Path | None:
    """The ``--data`` folder the run was trained on (None: not recorded, or unreadable)."""
    try:
        return Path(json.loads((Path(run_dir) / DATA_FILE).read_text())["data_dir"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def load_run_config(run_dir: str | Path) -> Config:
    path = Path(run_dir) / CONFIG_FILE
    if not Path(run_dir).is_dir():
        raise CheckpointError(f"checkpoint folder {run_dir} does not exist")
    if not path.is_file():
        raise CheckpointError(
            f"{run_dir} is not a mednca-jax run folder: {CONFIG_FILE} is missing "
            "(train.py and 'python -m mednca_jax.export from-torch' write one)"
        )
    from mednca_jax.plugins import PluginError

    try:
        return load_config(path)
    except PluginError as e:  # not "another version": the run's own plug-in moved or broke
        raise CheckpointError(e.in_run(path)) from None
    except ConfigError as e:
        raise CheckpointError(f"{path} is not a valid config for this version: {e}") from None


def check_same_model(saved: Config, wanted: Config, run_dir: str | Path) -> None:
    """Raise :class:`CheckpointError` naming the model keys in which two configs differ."""
    a, b = saved.to_dict()["model"], wanted.to_dict()["model"]
    shape_keys = ("kind", "channels", "hidden", "n_in", "n_out", "steps", "scales", "perception", "unet_width", "unet_depth")
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
    """Save params (+ optimiser/PRNG state when given) and JSON metadata at ``step``.

    ``meta`` gains ``checksum``: :func:`tree_digest` of each saved tree. A step that already
    exists is replaced (a resumed run recomputes the same step).

    Raises:
        CheckpointError: params or optimiser state hold NaN/inf (nothing is written), or the
            write failed (e.g. a full disk); the earlier steps stay intact either way.
    """
    trees = {"params": params} if train is None else {"params": params, "train": train}
    bad = [f"{k}{p}" for k, tree in trees.items() for p in non_finite_leaves(tree)]
    if bad:
        raise CheckpointError(f"refusing to save step {step} to {mngr.directory}: non-finite values in {', '.join(bad[:3])}")
    meta = dict(meta, checksum={k: tree_digest(tree) for k, tree in trees.items()})
    items = {k: ocp.args.StandardSave(tree) for k, tree in trees.items()}
    items["meta"] = ocp.args.JsonSave(meta)
    if step in mngr.all_steps():
        mngr.delete(step)
    try:
        mngr.save(step, args=ocp.args.Composite(**items), force=True)
        mngr.wait_until_finished()
    except (OSError, ValueError) as e:  # TensorStore reports failed writes as ValueError
        folder = Path(str(mngr.directory))
        try:  # let orbax's writer threads end before removing what they wrote
            mngr.wait_until_finished()
        except Exception:  # noqa: BLE001 - they fail the same way; the first error is reported
            pass
        remove_unfinished(folder)
        free = shutil.disk_usage(folder).free
        if (isinstance(e, OSError) and e.errno == errno.ENOSPC) or free < LOW_DISK_BYTES:
            why = f"No space left on device ({free} bytes free)"
        elif isinstance(e, OSError):
            why = e.strerror or str(e)
        else:
            raise  # not a failed write: a bug, keep its traceback
        raise CheckpointError(
            f"could not write checkpoint step {step} to {folder}: {why}. "
            "The earlier checkpoints are kept; free some space and continue with --resume"
        ) from None


def remove_unfinished(folder: Path) -> list[Path]:
    """Delete orbax's temporary step folders in ``folder`` (what a failed or killed save left:
    never a valid checkpoint, and in the way of saving that step again); return them.
    Only safe while no save into ``folder`` is running (the trainer holds the run's lock)."""
    def left() -> list[Path]:
        return [p for p in folder.glob("*.orbax-checkpoint-tmp*") if p.is_dir()] if folder.is_dir() else []

    gone = now = left()
    # A writer thread of a failed save can still be adding files while rmtree runs (seen on a
    # loaded machine): the folder then survives one pass, so try again for up to a second.
    for _ in range(20):
        if not now:
            break
        for p in now:
            shutil.rmtree(p, ignore_errors=True)
        time.sleep(0.05)
        now = left()
    return gone


def save_params(run_dir: str | Path, params: Any, cfg: Config, meta: dict[str, Any] | None = None) -> None:
    """Write a run folder holding only ``params`` and ``cfg`` (e.g. imported weights)."""
    save_run_config(run_dir, cfg)
    with manager(run_dir) as m:
        save_checkpoint(m, 0, jax.device_get(params), dict(meta or {"source": "params"}))


def _candidates(run_dir: Path, which: str) -> Iterator[tuple[str, int]]:
    """``(folder, step)`` to try, newest first: ``best`` then ``checkpoints`` for ``"best"``."""
    order = [BEST_DIR, LATEST_DIR] if which == "best" else [LATEST_DIR]
    for sub in order:
        if (run_dir / sub).is_dir():
            with manager(run_dir, sub) as m:
                steps = sorted(m.all_steps(), reverse=True)
            for step in steps:
                yield sub, step


def _restore_step(run_dir: Path, sub: str, step: int, abstract: dict[str, Any]) -> dict[str, Any]:
    """Restore one step and check its checksums; raise :class:`CheckpointError` if it is damaged."""
    items = {
        k: (ocp.args.StandardRestore(v) if v is not None else ocp.args.StandardRestore())
        for k, v in abstract.items()
    }
    items["meta"] = ocp.args.JsonRestore()
    where = run_dir / sub / str(step)
    try:
        with manager(run_dir, sub) as m:
            out = m.restore(step, args=ocp.args.Composite(**items))
    except Exception as e:  # noqa: BLE001 - orbax/TensorStore raise many types for one damaged file
        raise CheckpointError(f"could not restore {where}: {type(e).__name__}: {str(e)[:300]}") from None
    out = {k: out[k] for k in items}
    sums = (out["meta"] or {}).get("checksum", {})
    for k in abstract:
        if k in sums and tree_digest(out[k]) != sums[k]:
            raise CheckpointError(f"{where}: the {k} arrays do not match their checksum (the files were changed or damaged)")
    return out


def restore(
    run_dir: str | Path, abstract: dict[str, Any], which: str = "best", step: int | None = None
) -> tuple[dict[str, Any], int]:
    """Restore the items named in ``abstract`` (``{"params": tree, "train": tree}`` of arrays
    or ``jax.ShapeDtypeStruct``; ``None`` restores as saved) plus ``meta``.

    ``which``: ``"best"`` (falls back to the latest) or ``"latest"``. A step that cannot be
    read or fails its checksum is skipped with a :class:`DamagedCheckpointWarning`, and the
    next older one is used. ``step`` restores exactly that step of ``checkpoints/``.
    Returns ``(items, step)``.

    Raises:
        CheckpointError: no step can be restored (each failure is named).
    """
    run_dir = Path(run_dir).absolute()
    candidates = [(LATEST_DIR, step)] if step is not None else list(_candidates(run_dir, which))
    if not candidates:
        looked = "best, checkpoints" if which == "best" else LATEST_DIR
        raise CheckpointError(f"{run_dir} holds no complete checkpoint (looked in {looked})")
    failures = []
    for sub, s in candidates:
        try:
            out = _restore_step(run_dir, sub, s, abstract)
        except CheckpointError as e:
            failures.append(str(e))
            continue
        for msg in failures:
            warnings.warn(f"{msg}; using {run_dir / sub / str(s)} instead", DamagedCheckpointWarning, stacklevel=2)
        return out, s
    raise CheckpointError(
        f"no checkpoint in {run_dir} can be restored ({len(failures)} tried): " + "; ".join(failures)
        + ". Was it written by another config or version, or are the files damaged?"
    )


def load_params(run_dir: str | Path, cfg: Config | None = None, which: str = "best") -> tuple[Any, Config]:
    """Params and config of a run folder, checked against the config's expected shapes.

    With ``cfg`` given, its model must match the saved one (else :class:`CheckpointError`).
    """
    from mednca_jax.networks import check_network_params  # local: networks imports the models

    saved = load_run_config(run_dir)
    if cfg is not None:
        check_same_model(saved, cfg, run_dir)
    if (Path(run_dir) / PARAMS_FILE).is_file():
        params = read_params_file(Path(run_dir) / PARAMS_FILE)
    else:
        items, _ = restore(run_dir, {"params": None}, which=which)
        params = jax.tree_util.tree_map(np.asarray, items["params"])
    try:
        check_network_params(params, saved)
    except ValueError as e:
        raise CheckpointError(f"checkpoint {run_dir}: {e}") from None
    return params, saved


def write_params_file(path: str | Path, params: Any) -> str:
    """Write ``params`` (nested dicts of arrays) as one ``.npz`` keyed by ``/``-joined paths,
    atomically; returns the sha256 of its arrays (:func:`tree_digest`)."""
    from flax.traverse_util import flatten_dict

    path = Path(path)
    flat = {"/".join(k): np.asarray(jax.device_get(v)) for k, v in flatten_dict(params).items()}
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp.npz")
    os.close(fd)
    try:
        np.savez(tmp, **flat)
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would keep it from other users of an installed package
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return tree_digest(params)


def read_params_file(path: str | Path) -> dict[str, Any]:
    """The nested params of a :func:`write_params_file` file.

    Raises:
        CheckpointError: the file cannot be read.
    """
    from flax.traverse_util import unflatten_dict

    try:
        with np.load(path, allow_pickle=False) as z:
            return unflatten_dict({tuple(k.split("/")): z[k] for k in z.files})
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path} cannot be read as params ({type(e).__name__}: {e})") from None
