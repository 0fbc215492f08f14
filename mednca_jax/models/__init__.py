"""The pretrained models shipped in the package, usable offline by name.

Each model is a folder ``mednca_jax/models/<name>/`` that every reader of a run folder accepts
(``mednca predict / evaluate / export --model NAME`` resolve the name to it)::

    config.toml     the config it was trained with (the model, the preprocessing)
    params.npz      its weights (the EMA of the weights the run validated or ended with)
    split.json      the patient split it was trained and scored on
    model.json      name, task, figures on the test patients, training command, machine, sha256
    MODEL_CARD.md   what it is for and what not, data and licence, how it was made and scored

They are small (tens of thousands of parameters), made by :func:`write_model` from a run folder
and its evaluation, and read with no network access.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from mednca_jax.errors import MedNCAError

MODELS_DIR = Path(__file__).resolve().parent
MODEL_JSON = "model.json"
MODEL_CARD = "MODEL_CARD.md"


class ModelError(MedNCAError, ValueError):
    """An unknown shipped-model name, or a model folder that cannot be written."""


def model_names() -> list[str]:
    """The shipped models, sorted."""
    return sorted(p.parent.name for p in MODELS_DIR.glob(f"*/{MODEL_JSON}"))


def model_dir(name: str) -> Path:
    """The folder of the shipped model ``name``.

    Raises:
        ModelError: no such model (the message lists those there are).
    """
    folder = MODELS_DIR / name
    if "/" in name or not (folder / MODEL_JSON).is_file():
        have = ", ".join(model_names()) or "none"
        raise ModelError(f"--model {name!r} is not a shipped model (shipped: {have}; `mednca models` lists them)")
    return folder


def model_info(name: str) -> dict[str, Any]:
    """The ``model.json`` of the shipped model ``name``."""
    return json.loads((model_dir(name) / MODEL_JSON).read_text())


def summary_figures(metrics: dict[str, Any]) -> dict[str, Any]:
    """The test figures a model card quotes, from an evaluation's ``metrics.json``: hard and
    soft Dice on the model grid and hard Dice in the native grid (mean, std), the mean of the
    single runs' hard Dice when it was scored with ``--runs N >= 2`` (``dice`` is then the hard
    Dice of the runs' mean), the number of patients, and the per-class Dice when there are several classes."""
    s = metrics["summary"]
    out: dict[str, Any] = {"patients": int(s["dice"]["n"])}
    for key in ("dice", "dice_run_mean", "dice_soft", "dice_native"):
        if key in s:
            out[key] = {"mean": round(float(s[key]["mean"]), 4), "std": round(float(s[key]["std"]), 4)}
    if len(s.get("dice_per_class", {})) > 1:  # one class: the same figure as "dice"
        out["dice_per_class"] = {c: {k: round(float(d[k]), 4) for k in ("mean", "std")} for c, d in s["dice_per_class"].items()}
    return out


def write_model(run_dir: str | Path, out: str | Path, *, name: str, task: str, metrics: dict[str, Any],
                training: dict[str, Any], which: str = "best") -> Path:
    """Write the shipped-model folder ``out`` from the run folder ``run_dir``: its config,
    split and params (``which`` checkpoint) and ``model.json`` with ``task``, the test figures
    of ``metrics`` (:func:`summary_figures`) and ``training`` (command, steps, minutes, machine,
    date). The model card is written by hand beside it. Returns ``out``.

    Raises:
        ModelError: ``out`` exists and holds something else than a model folder.
    """
    from mednca_jax.train.checkpoint import CONFIG_FILE, PARAMS_FILE, load_params, write_params_file
    from mednca_jax.nca.rollout import count_params

    run_dir, out = Path(run_dir), Path(out)
    if out.exists() and any(p.name not in (CONFIG_FILE, PARAMS_FILE, "split.json", MODEL_JSON, MODEL_CARD) for p in out.iterdir()):
        raise ModelError(f"{out} holds other files than a model folder; choose an empty or new folder")
    params, cfg = load_params(run_dir, which=which)
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(run_dir / CONFIG_FILE, out / CONFIG_FILE)
    if (run_dir / "split.json").is_file():
        shutil.copyfile(run_dir / "split.json", out / "split.json")
    digest = write_params_file(out / PARAMS_FILE, params)
    info = {
        "name": name,
        "task": task,
        "kind": cfg.model.kind,
        "spatial_dims": len(cfg.data.image_size),
        "image_size": list(cfg.data.image_size),
        "parameters": count_params(params),
        "test": summary_figures(metrics),
        "training": training,
        "params_sha256": digest,
    }
    (out / MODEL_JSON).write_text(json.dumps(info, indent=2) + "\n")
    return out
