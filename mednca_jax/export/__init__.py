"""Edge export: trained params -> a NumPy-only runtime folder, a PyTorch one or an ONNX graph, and back.

Folders written here::

    to-numpy DIR2: mednca_numpy.py (copy of runtime_numpy.py), weights.npz, config.json
    to-torch DIR2: mednca_torch.py (copy of runtime_torch.py), model0.pth, model1.pth, ..., config.json
    to-onnx DIR2: mednca.onnx (the whole inference, steps as ONNX Loops), config.json
    from-torch DIR: a run folder (config.toml + orbax checkpoint) via mednca_jax.train.checkpoint

``config.json`` is the full training config (``Config.to_dict()``), a format tag and, per
level, the rule description ``rules[i]`` (:meth:`mednca_jax.nca.rule.Rule.describe`:
perception, kernel_size, update, norm, channels, hidden, n_in, ndim, features, linear): the
NumPy runtime and the ONNX graph are built from it, not from fixed code. ``weights.npz``
holds our (channels-last) layout, one dense linear perception per level (format 3):
``level{i}.perception.kernel (k,)*ndim + (C, F)``, ``.perception.bias (F,)``, ``.fc0.kernel
(C + F, hidden)``, ``.fc0.bias``, ``.bn.scale`` / ``.bn.bias (hidden,)`` when norm is batch,
``.fc1.kernel (hidden, C)`` (format 2 had no ``rules``; format 1 had ``p0.*``/``p1.*``; both
are still read). ``model{i}.pth`` is the original Med-NCA layout (mednca_jax.nca.weights
converts, exactly).

The runtimes interpret linear perceptions (any odd kernel, rank 2 and 3) and the ``mlp``
update with norm ``none`` or ``batch``; :func:`check_interpretable` refuses anything else by
name before a file is written.

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

from mednca_jax.config import Config, ConfigError, load_config
from mednca_jax.export import runtime_numpy as _runtime

HERE = Path(__file__).resolve().parent
NUMPY_RUNTIME_SOURCE = HERE / "runtime_numpy.py"
TORCH_RUNTIME_SOURCE = HERE / "runtime_torch.py"
NUMPY_RUNTIME_NAME = "mednca_numpy.py"
TORCH_RUNTIME_NAME = "mednca_torch.py"
WEIGHTS_NPZ = "weights.npz"
CONFIG_JSON = "config.json"
FORMAT = "mednca-export"
FORMAT_VERSION = 3  # 3: per-level rule descriptions in config.json, bn.* arrays
# The original module declares fc0, fc1 before p0, p1: its state dicts list keys in this order.
ORIGINAL_KEY_ORDER = ("fc0.weight", "fc0.bias", "fc1.weight", "p0.weight", "p0.bias", "p1.weight", "p1.bias")
# What the NumPy runtime and the ONNX graph interpret: the runtime file's own lists (it is
# self-contained and checks them again when it loads a folder).
INTERPRETED_UPDATES, INTERPRETED_NORMS, INTERPRETED_RANKS = _runtime.UPDATES, _runtime.NORMS, _runtime.RANKS

__all__ = [
    "ExportError", "export_numpy", "export_torch", "export_onnx", "onnx_logits", "verify_onnx", "verify_numpy", "import_torch",
    "load_checkpoint", "resolve_config", "params_to_npz_arrays", "npz_arrays_to_params", "export_config", "load_runtime_module",
    "check_interpretable", "rule_weights", "export_rules",
]


class ExportError(ValueError):
    """An export or import cannot proceed; the message names the file and what was expected."""


# --------------------------------------------------------------------------- configs
def resolve_config(config: str | Path, overrides: Sequence[str] = ()) -> Config:
    """A TOML config from a path, or by name from the shipped configs
    (``hippocampus_official`` -> ``configs/hippocampus_official.toml``)."""
    from mednca_jax.named_configs import resolve_config_path

    try:
        return load_config(resolve_config_path(config), overrides)
    except ConfigError as e:
        raise ExportError(str(e)) from None


def _check_exportable(cfg: Config, source: str) -> None:
    if cfg.model.kind != "nca":
        raise ExportError(f"{source}: model.kind = {cfg.model.kind!r}; only Med-NCA ('nca') models can be "
                          "exported to the NumPy/PyTorch runtimes")


def _ndim(cfg: Config) -> int:
    return len(cfg.data.image_size)


def export_rules(cfg: Config) -> list[Any]:
    """The :class:`~mednca_jax.nca.rule.Rule` of every level, at the config's rank."""
    from mednca_jax.nca.levels import level_rules

    return list(level_rules(cfg.model, _ndim(cfg)))


def export_config(cfg: Config) -> dict[str, Any]:
    """The ``config.json`` written next to exported weights: the whole config, a format tag and
    the rule description of every level (``rules``)."""
    return {"format": FORMAT, "format_version": FORMAT_VERSION, **cfg.to_dict(),
            "rules": [r.describe() for r in export_rules(cfg)]}


def uninterpretable(rule: Any) -> tuple[str, str] | None:
    """What of ``rule`` (a :class:`~mednca_jax.nca.rule.Rule`) the exported runtimes cannot
    run and why, as ``(what, why)``, or ``None``: they interpret a linear perception, the
    ``mlp`` update with norm ``none``/``batch``, rank 2 or 3."""
    from mednca_jax.nca.perceptions import get_perception

    if not get_perception(rule.perception).linear:
        return f"perception {rule.perception!r}", "it is not linear"
    if rule.update not in INTERPRETED_UPDATES:
        return f"update {rule.update!r}", "it runs the 'mlp' update only"
    if rule.norm not in INTERPRETED_NORMS:
        return f"norm {rule.norm!r}", f"it runs norms {list(INTERPRETED_NORMS)}"
    if rule.ndim not in INTERPRETED_RANKS:
        return f"rank {rule.ndim}", f"data.image_size has {rule.ndim} axes; it runs ranks {list(INTERPRETED_RANKS)}"
    return None


def check_interpretable(cfg: Config, runtime: str = "the NumPy runtime") -> None:
    """Raise :class:`ExportError` (one line naming the level and what) unless ``runtime``
    can interpret every level's rule (:func:`uninterpretable`). Called before anything is
    written."""
    for i, rule in enumerate(export_rules(cfg)):
        bad = uninterpretable(rule)
        if bad:
            raise ExportError(
                f"{runtime} cannot interpret {bad[0]} (level {i}): {bad[1]}; it runs linear perceptions and the 'mlp' "
                "update; use the JAX checkpoint (mednca predict --checkpoint RUN) instead"
            )


# --------------------------------------------------------------------------- params <-> files
def rule_weights(rule: Any, level_params: Any) -> dict[str, np.ndarray]:
    """One level's params -> the arrays the runtimes read (keys without the ``level{i}.``
    prefix): ``perception.kernel (k,)*nd + (C, F)``, ``perception.bias (F,)``, ``fc0.kernel
    (C + F, hidden)``, ``fc0.bias (hidden,)``, ``bn.scale``/``bn.bias (hidden,)`` when
    ``rule.norm == "batch"``, ``fc1.kernel (hidden, C)``; float32, contiguous. ``rule``: a
    linear :class:`~mednca_jax.nca.rule.Rule` with the ``mlp`` update."""
    from mednca_jax.nca.perceptions import filters_of

    k, b = filters_of(rule, level_params)
    out = {"perception.kernel": k, "perception.bias": b, "fc0.kernel": level_params["fc0"]["kernel"],
           "fc0.bias": level_params["fc0"]["bias"], "fc1.kernel": level_params["fc1"]["kernel"]}
    if rule.norm == "batch":
        out["bn.scale"], out["bn.bias"] = level_params["bn"]["scale"], level_params["bn"]["bias"]
    return {key: np.ascontiguousarray(np.asarray(v, np.float32)) for key, v in out.items()}


def params_to_npz_arrays(params: Any, cfg: Config) -> dict[str, np.ndarray]:
    """Params -> flat float32 arrays of ``weights.npz`` (format 3): :func:`rule_weights` of
    every level, keys prefixed ``level{i}.``."""
    out = {}
    for i, rule in enumerate(export_rules(cfg)):
        out.update({f"level{i}.{k}": v for k, v in rule_weights(rule, params[f"level{i}"]).items()})
    return out


def npz_arrays_to_params(arrays: dict[str, np.ndarray], cfg: Config) -> dict[str, Any]:
    """Inverse of :func:`params_to_npz_arrays`, exact for every built-in perception: learned
    splits the kernel back into p0/p1 (format-1 arrays ``p0.*``/``p1.*`` are read too), sobel
    has no params, depthwise reads its kernel off the dense one's diagonal (feature ``c``
    reads only channel ``c``). A plug-in perception cannot be recovered from its filters:
    ``ExportError`` (load its run folder instead)."""
    from mednca_jax.nca.levels import level_rule

    params: dict[str, Any] = {}
    c = cfg.model.channels
    for i in range(cfg.model.n_levels):
        rule = level_rule(cfg.model, i, _ndim(cfg))
        g = lambda k: np.asarray(arrays[f"level{i}.{k}"], np.float32)  # noqa: E731
        if rule.perception == "learned" and f"level{i}.perception.kernel" in arrays:
            k, b = g("perception.kernel"), g("perception.bias")
            level = {"p0": {"kernel": k[..., :c], "bias": b[:c]}, "p1": {"kernel": k[..., c:], "bias": b[c:]}}
        elif rule.perception == "learned":
            level = {"p0": {"kernel": g("p0.kernel"), "bias": g("p0.bias")},
                     "p1": {"kernel": g("p1.kernel"), "bias": g("p1.bias")}}
        elif rule.perception == "sobel":
            level = {}
        elif rule.perception == "depthwise":
            k = g("perception.kernel")
            diag = np.diagonal(k, axis1=-2, axis2=-1)  # (k,)*nd + (C,): K[..., c, c]
            level = {"p0": {"kernel": np.ascontiguousarray(diag[..., None]), "bias": g("perception.bias")}}
        else:
            raise ExportError(f"perception {rule.perception!r} (level {i}) cannot be read back from its exported "
                              "filters; load the run folder it was exported from")
        level["fc0"] = {"kernel": g("fc0.kernel"), "bias": g("fc0.bias")}
        if rule.norm == "batch":
            level["bn"] = {"scale": g("bn.scale"), "bias": g("bn.bias")}
        level["fc1"] = {"kernel": g("fc1.kernel")}
        params[f"level{i}"] = level
    return params


def load_checkpoint(checkpoint: str | Path, which: str = "best") -> tuple[Any, Config]:
    """Params and config of a run folder (``mednca_jax.train.checkpoint``), checked exportable."""
    from mednca_jax.train.checkpoint import CheckpointError, load_params

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
    """Write the NumPy runtime folder; returns the files written. ``ExportError`` (and
    nothing written) when the runtime cannot interpret the rule or the params do not fit."""
    from mednca_jax.nca.levels import check_params

    _check_exportable(cfg, "config")
    check_interpretable(cfg, "the NumPy runtime")
    try:
        check_params(params, cfg.model, ndim=_ndim(cfg))
    except ValueError as e:
        raise ExportError(str(e)) from None
    out = _prepare_out(out_dir)
    files = [out / NUMPY_RUNTIME_NAME, out / WEIGHTS_NPZ, out / CONFIG_JSON]
    shutil.copyfile(NUMPY_RUNTIME_SOURCE, files[0])
    np.savez(files[1], **params_to_npz_arrays(params, cfg))
    files[2].write_text(json.dumps(export_config(cfg), indent=2) + "\n")
    return files


def _generic_torch_level(level: Any, cfg: Config, i: int) -> dict[str, np.ndarray]:
    """A level in the PyTorch runtime's own layout (any linear perception, any odd kernel, rank
    2 or 3): ``perception.weight (F, C, k, ...)`` over the runtime's spatial order (the first
    spatial axis last: the original's transposed ``(W, H)`` in 2D), ``fc0``/``fc1`` as
    ``nn.Linear`` weights, ``bn.weight``/``bn.bias`` for norm ``batch``. The conversion is the
    runtime's own (``runtime_torch.state_dict_from_arrays``), so the two cannot disagree."""
    from mednca_jax.export.runtime_torch import state_dict_from_arrays

    arrays = rule_weights(export_rules(cfg)[i], level)  # the arrays the other runtimes read
    sd = state_dict_from_arrays(arrays, len(cfg.data.image_size), source=f"level {i}")
    return {key: t.numpy() for key, t in sd.items()}


def export_torch(params: Any, cfg: Config, out_dir: str | Path) -> list[Path]:
    """Write the PyTorch runtime folder; returns the files.

    ``config.json`` carries one rule description per level (``rules[i]``, the dict of
    ``Rule.describe()``, as for the NumPy runtime), which the runtime interprets. ``model{i}.pth`` is the original
    layout (loadable by the original's code) for the original rule (learned 3x3 2D ``mlp``
    without norm), else the runtime's own layout (:func:`_generic_torch_level`). A rule the
    runtime cannot interpret (a non-linear perception, another update) raises
    :class:`ExportError` ("cannot interpret") before anything is written.
    """
    from mednca_jax.nca.weights import params_to_torch_state_dicts

    _check_exportable(cfg, "config")
    try:
        import torch
    except ImportError:
        raise ExportError("to-torch needs PyTorch: pip install 'mednca-jax[torch]'") from None
    from mednca_jax.export.runtime_torch import RuleError, interpret_rule
    from mednca_jax.nca.levels import check_params, level_rules

    ndim = len(cfg.data.image_size)
    rules = level_rules(cfg.model, ndim)
    try:
        for i, rule in enumerate(rules):
            interpret_rule(rule.describe(), i, "config")
    except RuleError as e:
        raise ExportError(f"{e} (the PyTorch runtime runs linear perceptions and the 'mlp' update)") from None
    try:
        check_params(params, cfg.model, ndim=ndim)
    except ValueError as e:
        raise ExportError(str(e)) from None
    out = _prepare_out(out_dir)
    files = []
    original = [r.perception == "learned" and r.kernel_size == 3 and r.ndim == 2 and r.update == "mlp" and r.norm == "none"
                for r in rules]
    originals = params_to_torch_state_dicts(params, cfg.model) if all(original) else []
    state_dicts = [{k: originals[i][k] for k in ORIGINAL_KEY_ORDER} if all(original)  # the original's layout
                   else _generic_torch_level(params[f"level{i}"], cfg, i) for i in range(cfg.model.n_levels)]
    for i, sd in enumerate(state_dicts):
        path = out / f"model{i}.pth"
        torch.save({k: torch.from_numpy(np.array(v, np.float32, order="C")) for k, v in sd.items()}, path)
        files.append(path)
    files += [out / TORCH_RUNTIME_NAME, out / CONFIG_JSON]
    shutil.copyfile(TORCH_RUNTIME_SOURCE, files[-2])
    files[-1].write_text(json.dumps(export_config(cfg), indent=2) + "\n")
    return files


def export_onnx(params: Any, cfg: Config, out_dir: str | Path) -> list[Path]:
    """Write ``mednca.onnx`` (the whole inference, steps as ONNX Loops; see ``onnx_export``) and
    ``config.json``; returns the files. ``ExportError`` (and nothing written) when the graph
    cannot express the rule or the downscale."""
    from mednca_jax.nca.levels import check_params

    _check_exportable(cfg, "config")
    try:
        import onnx  # noqa: F401
    except ImportError:
        raise ExportError("to-onnx needs the onnx package: pip install 'mednca-jax[onnx]'") from None
    m = cfg.model
    check_interpretable(cfg, "the ONNX export")
    if m.downscale == "antialias":
        raise ExportError("model.downscale = 'antialias' has no ONNX export (only 'bilinear', 'area' and 'max', "
                          "which are strided convolutions or pooling)")
    try:
        check_params(params, m, ndim=_ndim(cfg))
    except ValueError as e:
        raise ExportError(str(e)) from None
    from mednca_jax.export.onnx_export import write_onnx

    conf = export_config(cfg)
    out = _prepare_out(out_dir)
    return write_onnx(params_to_npz_arrays(params, cfg), m, conf["rules"], conf, out)


def onnx_logits(path: str | Path, images: np.ndarray, fire_rate: float = 0.0, seed: int = 0, threads: int = 1) -> np.ndarray:
    """Run ``mednca.onnx`` with onnxruntime on CPU: ``images (B, *S)`` (``(B, *S, n_in)`` when
    n_in > 1) -> logits ``(B, *S, n_out)``."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise ExportError("running the ONNX export needs onnxruntime: pip install 'mednca-jax[onnx]'") from None
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    feed = {"images": np.ascontiguousarray(images, np.float32), "fire_rate": np.array(fire_rate, np.float32),
            "seed": np.array(seed, np.int64)}
    return sess.run(None, feed)[0]


def _verify_images(cfg: Config, seed: int) -> np.ndarray:
    """One random image ``(1, *image_size, n_in)`` float32."""
    return np.random.default_rng(seed).random((1, *cfg.data.image_size, cfg.model.n_in), dtype=np.float32)


def _jax_logits(params: Any, cfg: Config, x: np.ndarray) -> np.ndarray:
    import jax

    from mednca_jax.nca.levels import forward

    return np.asarray(jax.jit(forward, static_argnums=1)(params, cfg.model, x, jax.random.PRNGKey(0), 0.0))


def verify_onnx(out_dir: str | Path, params: Any, cfg: Config, seed: int = 0) -> float:
    """Max abs logit difference between ``mednca.onnx`` (onnxruntime) and JAX at fire rate 0
    on one random image of the config's size."""
    check_interpretable(cfg, "the ONNX export")
    x = _verify_images(cfg, seed)
    ours = onnx_logits(Path(out_dir) / "mednca.onnx", x[..., 0] if cfg.model.n_in == 1 else x)
    return float(np.abs(ours - _jax_logits(params, cfg, x)).max())


def import_torch(cfg: Config, weight_paths: Sequence[str | Path], out_dir: str | Path, force: bool = False) -> Path:
    """Original weights (one ``.pth`` per level, or one ``.npz``) -> a run folder."""
    from mednca_jax.train.checkpoint import save_params
    from mednca_jax.nca.weights import WeightsError, load_torch_weights

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
    check_interpretable(cfg, "the NumPy runtime")
    rt = load_runtime_module(Path(out_dir) / NUMPY_RUNTIME_NAME, "mednca_numpy_verify")
    x = _verify_images(cfg, seed)
    ours = rt.MedNCA.load(out_dir).segment(x, fire_rate=0.0, return_logits=True)
    return float(np.abs(ours - _jax_logits(params, cfg, x)).max())
