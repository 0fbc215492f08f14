"""Convert between the original PyTorch state dicts and this project's params.

The original keeps, per level, ``p0.weight (C, C, 3, 3)``, ``p0.bias``, ``p1.weight``,
``p1.bias``, ``fc0.weight (hidden, 3C)``, ``fc0.bias``, ``fc1.weight (C, hidden)``.
Its convolutions run on a ``(B, C, W, H)`` tensor, so the first spatial kernel axis runs
along W: our ``(dh, dw, in, out)`` kernel is ``weight.transpose(3, 2, 1, 0)``
(docs/design.md, "Weight layout"). Linear weights are transposed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from mednca_jax.config import ModelConfig
from mednca_jax.errors import MedNCAError
from mednca_jax.nca.levels import check_params, level_names
from mednca_jax.nca.rule import Params

TORCH_KEYS = ("p0.weight", "p0.bias", "p1.weight", "p1.bias", "fc0.weight", "fc0.bias", "fc1.weight")


class WeightsError(MedNCAError, ValueError):
    """A weights file is missing, unreadable, or does not fit the config."""


def torch_level_to_params(sd: Mapping[str, np.ndarray], source: str = "state dict") -> Params:
    """One level's original state dict (arrays) -> our level params."""
    missing = [k for k in TORCH_KEYS if k not in sd]
    extra = sorted(set(sd) - set(TORCH_KEYS))
    if missing or extra:
        raise WeightsError(
            f"{source}: expected keys {list(TORCH_KEYS)}; missing {missing or 'none'}, unexpected {extra or 'none'}"
        )
    a = {k: np.asarray(v, np.float32) for k, v in sd.items()}
    for k in ("p0.weight", "p1.weight"):
        if a[k].ndim != 4 or a[k].shape[2:] != (3, 3):
            raise WeightsError(f"{source}: {k} must have shape (C, C, 3, 3), got {a[k].shape}")
    return {
        "p0": {"kernel": a["p0.weight"].transpose(3, 2, 1, 0), "bias": a["p0.bias"]},
        "p1": {"kernel": a["p1.weight"].transpose(3, 2, 1, 0), "bias": a["p1.bias"]},
        "fc0": {"kernel": a["fc0.weight"].T, "bias": a["fc0.bias"]},
        "fc1": {"kernel": a["fc1.weight"].T},
    }


def params_to_torch_level(level: Params) -> dict[str, np.ndarray]:
    """Inverse of :func:`torch_level_to_params` (exact: only transposes)."""
    g = lambda x: np.ascontiguousarray(np.asarray(x, np.float32))  # noqa: E731
    return {
        "p0.weight": g(np.asarray(level["p0"]["kernel"]).transpose(3, 2, 1, 0)),
        "p0.bias": g(level["p0"]["bias"]),
        "p1.weight": g(np.asarray(level["p1"]["kernel"]).transpose(3, 2, 1, 0)),
        "p1.bias": g(level["p1"]["bias"]),
        "fc0.weight": g(np.asarray(level["fc0"]["kernel"]).T),
        "fc0.bias": g(level["fc0"]["bias"]),
        "fc1.weight": g(np.asarray(level["fc1"]["kernel"]).T),
    }


def params_to_torch_state_dicts(params: Params, model_cfg: ModelConfig) -> list[dict[str, np.ndarray]]:
    """Our params -> one original-layout state dict (NumPy arrays) per level, coarse to fine."""
    return [params_to_torch_level(params[name]) for name in level_names(model_cfg)]


def torch_state_dicts_to_params(
    state_dicts: Sequence[Mapping[str, np.ndarray]], model_cfg: ModelConfig, sources: Sequence[str] | None = None
) -> Params:
    """One original state dict per level -> params, checked against ``model_cfg``."""
    names = level_names(model_cfg)
    sources = list(sources) if sources is not None else [f"level {i}" for i in range(len(state_dicts))]
    if len(state_dicts) != len(names):
        raise WeightsError(
            f"the config has {len(names)} levels but {len(state_dicts)} weight sets were given ({', '.join(sources)})"
        )
    params = {n: torch_level_to_params(sd, src) for n, sd, src in zip(names, state_dicts, sources)}
    try:
        check_params(params, model_cfg, source=" + ".join(sources))
    except ValueError as e:
        raise WeightsError(str(e)) from None
    return params


def _read_pth(path: Path) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError:
        raise WeightsError(
            f"{path}: reading .pth files needs PyTorch (pip install 'mednca-jax[torch]'), "
            "or use the NumPy copy (.npz) of the weights"
        ) from None
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for corrupt files
        raise WeightsError(f"{path}: not a readable PyTorch state dict ({type(e).__name__}: {e})") from None
    if not isinstance(sd, Mapping):
        raise WeightsError(f"{path}: expected a state dict (mapping of tensors), got {type(sd).__name__}")
    return {k: v.detach().cpu().numpy() for k, v in sd.items()}


def _read_npz(path: Path, n_levels: int) -> list[dict[str, np.ndarray]]:
    try:
        with np.load(path) as z:
            arrays = {k: z[k] for k in z.files}
    except Exception as e:
        raise WeightsError(f"{path}: not a readable .npz file ({type(e).__name__}: {e})") from None
    levels = []
    for i in range(n_levels):
        prefix = f"model{i}."
        levels.append({k[len(prefix) :]: v for k, v in arrays.items() if k.startswith(prefix)})
    known = {f"model{i}.{k}" for i in range(n_levels) for k in TORCH_KEYS}
    extra = sorted(set(arrays) - known)
    if extra:
        raise WeightsError(f"{path}: keys {extra} do not belong to a {n_levels}-level model (expected model0.* .. model{n_levels - 1}.*)")
    return levels


def load_torch_weights(paths: Sequence[str | Path], model_cfg: ModelConfig) -> Params:
    """Read the original weights: one ``.pth`` per level (coarse to fine) or one ``.npz``
    with keys ``model{i}.p0.weight`` ...; return params checked against ``model_cfg``."""
    paths = [Path(p) for p in paths]
    for p in paths:
        if not p.is_file():
            raise WeightsError(f"weights file {p} does not exist")
    if len(paths) == 1 and paths[0].suffix == ".npz":
        return torch_state_dicts_to_params(
            _read_npz(paths[0], model_cfg.n_levels), model_cfg, [f"{paths[0]}[model{i}]" for i in range(model_cfg.n_levels)]
        )
    bad = [str(p) for p in paths if p.suffix not in (".pth", ".pt")]
    if bad:
        raise WeightsError(f"expected one .pth per level or a single .npz, got {bad}")
    return torch_state_dicts_to_params([_read_pth(p) for p in paths], model_cfg, [str(p) for p in paths])
