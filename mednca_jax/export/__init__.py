"""Edge export: trained params -> a NumPy-only runtime folder or a PyTorch one, and back.

Folders written here::

    to-numpy DIR2: mednca_numpy.py (copy of runtime_numpy.py), weights.npz, config.json
    to-torch DIR2: mednca_torch.py (copy of runtime_torch.py), model0.pth, model1.pth, ..., config.json
    from-torch DIR: a run folder (config.toml + orbax checkpoint) via mednca_jax.checkpoint

``weights.npz`` holds our (channels-last) layout under keys ``level{i}.p0.kernel`` ...;
``model{i}.pth`` the original Med-NCA layout (mednca_jax.weights converts, exactly).
``config.json`` is the full training config (``Config.to_dict()``) plus a format tag; the
runtimes read its ``model`` and ``data`` sections.

The command line lives in ``__main__.py`` (``python -m mednca_jax.export --help``).
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from pathlib import Path
from types import ModuleType
from typing import Any, Sequence

import numpy as np

from ..config import Config, ConfigError, load_config

HERE = Path(__file__).resolve().parent
NUMPY_RUNTIME_SOURCE = HERE / "runtime_numpy.py"
TORCH_RUNTIME_SOURCE = HERE / "runtime_torch.py"
NUMPY_RUNTIME_NAME = "mednca_numpy.py"
TORCH_RUNTIME_NAME = "mednca_torch.py"
WEIGHTS_NPZ = "weights.npz"
CONFIG_JSON = "config.json"
FORMAT = "mednca-export"
FORMAT_VERSION = 1
# The original module declares fc0, fc1 before p0, p1: its state dicts list keys in this order.
ORIGINAL_KEY_ORDER = ("fc0.weight", "fc0.bias", "fc1.weight", "p0.weight", "p0.bias", "p1.weight", "p1.bias")
LEVEL_KEYS = ("p0.kernel", "p0.bias", "p1.kernel", "p1.bias", "fc0.kernel", "fc0.bias", "fc1.kernel")

__all__ = [
    "ExportError", "export_numpy", "export_torch", "import_torch", "load_checkpoint", "resolve_config",
    "params_to_npz_arrays", "npz_arrays_to_params", "export_config", "load_runtime_module",
]


class ExportError(ValueError):
    """An export or import cannot proceed; the message names the file and what was expected."""


# --------------------------------------------------------------------------- configs
def resolve_config(config: str | Path, overrides: Sequence[str] = ()) -> Config:
    """A TOML config from a path, or by name from the shipped configs
    (``hippocampus_official`` -> ``configs/hippocampus_official.toml``)."""
    from ..named_configs import resolve_config_path

    try:
        return load_config(resolve_config_path(config), overrides)
    except ConfigError as e:
        raise ExportError(str(e)) from None


def _check_exportable(cfg: Config, source: str) -> None:
    if cfg.model.kind != "nca":
        raise ExportError(f"{source}: model.kind = {cfg.model.kind!r}; only Med-NCA ('nca') models can be "
                          "exported to the NumPy/PyTorch runtimes")


def export_config(cfg: Config) -> dict[str, Any]:
    """The ``config.json`` written next to exported weights: the whole config plus a format tag."""
    return {"format": FORMAT, "format_version": FORMAT_VERSION, **cfg.to_dict()}


# --------------------------------------------------------------------------- params <-> files
def params_to_npz_arrays(params: Any, cfg: Config) -> dict[str, np.ndarray]:
    """``{"level0": {"p0": {"kernel": ...}}}`` -> flat float32 arrays ``{"level0.p0.kernel": ...}``."""
    out = {}
    for i in range(cfg.model.n_levels):
        level = params[f"level{i}"]
        for key in LEVEL_KEYS:
            layer, leaf = key.split(".")
            out[f"level{i}.{key}"] = np.ascontiguousarray(np.asarray(level[layer][leaf], np.float32))
    return out


def npz_arrays_to_params(arrays: dict[str, np.ndarray], cfg: Config) -> dict[str, Any]:
    """Inverse of :func:`params_to_npz_arrays`."""
    params: dict[str, Any] = {}
    for i in range(cfg.model.n_levels):
        level: dict[str, dict[str, np.ndarray]] = {}
        for key in LEVEL_KEYS:
            layer, leaf = key.split(".")
            level.setdefault(layer, {})[leaf] = arrays[f"level{i}.{key}"]
        params[f"level{i}"] = level
    return params


def load_checkpoint(checkpoint: str | Path, which: str = "best") -> tuple[Any, Config]:
    """Params and config of a run folder (``mednca_jax.checkpoint``), checked exportable."""
    from ..checkpoint import CheckpointError, load_params

    path = Path(checkpoint)
    if not path.is_dir():
        raise ExportError(f"checkpoint folder {path} does not exist (expected a run folder with config.toml "
                          "and checkpoints/, as written by train.py or `python -m mednca_jax.export from-torch`)")
    try:
        params, cfg = load_params(path, which=which)
    except CheckpointError as e:
        raise ExportError(str(e)) from None
    _check_exportable(cfg, str(path / "config.toml"))
    return params, cfg


def _prepare_out(out_dir: str | Path) -> Path:
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ExportError(f"output {out} exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    return out


def export_numpy(params: Any, cfg: Config, out_dir: str | Path) -> list[Path]:
    """Write the NumPy runtime folder; returns the files written."""
    from ..levels import check_params

    _check_exportable(cfg, "config")
    try:
        check_params(params, cfg.model)
    except ValueError as e:
        raise ExportError(str(e)) from None
    out = _prepare_out(out_dir)
    files = [out / NUMPY_RUNTIME_NAME, out / WEIGHTS_NPZ, out / CONFIG_JSON]
    shutil.copyfile(NUMPY_RUNTIME_SOURCE, files[0])
    np.savez(files[1], **params_to_npz_arrays(params, cfg))
    files[2].write_text(json.dumps(export_config(cfg), indent=2) + "\n")
    return files


def export_torch(params: Any, cfg: Config, out_dir: str | Path) -> list[Path]:
    """Write the PyTorch runtime folder (original-layout ``model{i}.pth``); returns the files."""
    from ..weights import params_to_torch_state_dicts

    _check_exportable(cfg, "config")
    try:
        import torch
    except ImportError:
        raise ExportError("to-torch needs PyTorch: pip install 'mednca-jax[torch]'") from None
    from ..levels import check_params

    try:
        check_params(params, cfg.model)
    except ValueError as e:
        raise ExportError(str(e)) from None
    out = _prepare_out(out_dir)
    files = []
    for i, sd in enumerate(params_to_torch_state_dicts(params, cfg.model)):
        path = out / f"model{i}.pth"
        ordered = {k: sd[k] for k in ORIGINAL_KEY_ORDER}
        torch.save({k: torch.from_numpy(np.array(v, np.float32, order="C")) for k, v in ordered.items()}, path)
        files.append(path)
    files += [out / TORCH_RUNTIME_NAME, out / CONFIG_JSON]
    shutil.copyfile(TORCH_RUNTIME_SOURCE, files[-2])
    files[-1].write_text(json.dumps(export_config(cfg), indent=2) + "\n")
    return files


def import_torch(cfg: Config, weight_paths: Sequence[str | Path], out_dir: str | Path, force: bool = False) -> Path:
    """Original weights (one ``.pth`` per level, or one ``.npz``) -> a run folder."""
    from ..checkpoint import save_params
    from ..weights import WeightsError, load_torch_weights

    _check_exportable(cfg, "config")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ExportError(f"output {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise ExportError(f"output folder {out} is not empty; choose a new folder or pass --force to overwrite")
    try:
        params = load_torch_weights([Path(p) for p in weight_paths], cfg.model)
    except WeightsError as e:
        raise ExportError(str(e)) from None
    if force and out.is_dir():
        shutil.rmtree(out)
    save_params(out, params, cfg, {"source": "from-torch", "weights": [str(p) for p in weight_paths]})
    return out


def load_runtime_module(path: str | Path, name: str = "mednca_exported_runtime") -> ModuleType:
    """Import an exported runtime file (``mednca_numpy.py`` / ``mednca_torch.py``) by path."""
    spec = importlib.util.spec_from_file_location(name, str(path))
    if spec is None or spec.loader is None:
        raise ExportError(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses need the module registered while executing
    spec.loader.exec_module(module)
    return module


def verify_numpy(out_dir: str | Path, params: Any, cfg: Config, seed: int = 0) -> float:
    """Max abs logit difference between the exported NumPy runtime and JAX at fire rate 0 on
    one random image of the config's size."""
    import jax

    from ..levels import forward

    rt = load_runtime_module(Path(out_dir) / NUMPY_RUNTIME_NAME, "mednca_numpy_verify")
    h, w = cfg.data.image_size
    x = np.random.default_rng(seed).random((1, h, w, cfg.model.n_in), dtype=np.float32)
    ours = rt.MedNCA.load(out_dir).segment(x, fire_rate=0.0, return_logits=True)
    ref = np.asarray(jax.jit(forward, static_argnums=1)(params, cfg.model, x, jax.random.PRNGKey(0), 0.0))
    return float(np.abs(ours - ref).max())
