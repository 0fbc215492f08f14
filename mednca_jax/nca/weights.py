"""Convert between the original PyTorch state dicts and this project's params.

Med-NCA (2D) keeps, per level, ``p0.weight (C, C, 3, 3)``, ``p0.bias``, ``p1.weight``,
``p1.bias``, ``fc0.weight (hidden, 3C)``, ``fc0.bias``, ``fc1.weight (C, hidden)``. M3D-NCA
(3D) keeps one depthwise ``p0.weight (C, 1, k, k, k)``, ``p0.bias``, ``fc0.*``, the batch
norm's ``bn.weight``/``bn.bias`` (our ``bn.scale``/``bn.bias``) and ``fc1.weight``.

Both originals transpose the state before convolving: Med-NCA convolves ``(B, C, W, H)``,
M3D-NCA ``(B, C, Y, Z, X)`` (``transpose(1, 4)`` of ``(B, X, Y, Z, C)``). So the kernel's
spatial axes run along other axes than ours: :data:`TORCH_SPATIAL` says, for each of our
spatial axes, which kernel axis runs along it (docs/design.md, "Weight layout"). Linear
weights are transposed. Every conversion is exact (only transposes).
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from mednca_jax.config import ModelConfig
from mednca_jax.errors import MedNCAError
from mednca_jax.nca.levels import check_params, level_names, level_rule
from mednca_jax.nca.rule import Params, Rule

# our spatial axis i runs along the original kernel's spatial axis TORCH_SPATIAL[ndim][i]
TORCH_SPATIAL = {2: (1, 0), 3: (2, 0, 1)}
# the original's layers of each perception (their weights are (out, in or 1, *kernel))
TORCH_CONVS = {"learned": ("p0", "p1"), "depthwise": ("p0",), "sobel": ()}


class WeightsError(MedNCAError, ValueError):
    """A weights file is missing, unreadable, or does not fit the config."""


def torch_keys(rule: Rule) -> tuple[str, ...]:
    """The state-dict keys of one original level with ``rule``."""
    if rule.perception not in TORCH_CONVS or rule.update != "mlp" or rule.ndim not in TORCH_SPATIAL:
        raise WeightsError(
            f"the original's weights exist for the learned / depthwise perceptions and the mlp update in 2D or 3D; "
            f"got perception {rule.perception!r}, update {rule.update!r}, rank {rule.ndim}"
        )
    convs = tuple(f"{p}.{w}" for p in TORCH_CONVS[rule.perception] for w in ("weight", "bias"))
    return convs + ("fc0.weight", "fc0.bias") + (("bn.weight", "bn.bias") if rule.norm == "batch" else ()) + ("fc1.weight",)


def _kernel_to_ours(w: np.ndarray, ndim: int) -> np.ndarray:
    """``(out, in, *k)`` in the original's axis order -> ``(*k, in, out)`` in ours."""
    return w.transpose([2 + a for a in TORCH_SPATIAL[ndim]] + [1, 0])


def _kernel_to_torch(k: np.ndarray, ndim: int) -> np.ndarray:
    """Inverse of :func:`_kernel_to_ours`."""
    order = [2 + a for a in TORCH_SPATIAL[ndim]] + [1, 0]
    return k.transpose(np.argsort(order))


def torch_level_to_params(sd: Mapping[str, np.ndarray], rule: Rule = Rule(), source: str = "state dict") -> Params:
    """One level's original state dict (arrays) -> our level params for ``rule``."""
    keys = torch_keys(rule)
    missing = [k for k in keys if k not in sd]
    extra = sorted(set(sd) - set(keys))
    if missing or extra:
        raise WeightsError(f"{source}: expected keys {list(keys)}; missing {missing or 'none'}, unexpected {extra or 'none'}")
    a = {k: np.asarray(v, np.float32) for k, v in sd.items()}
    out: Params = {}
    for name in TORCH_CONVS[rule.perception]:
        w = a[f"{name}.weight"]
        if w.ndim != rule.ndim + 2 or w.shape[2:] != (rule.kernel_size,) * rule.ndim:
            raise WeightsError(
                f"{source}: {name}.weight must have shape (C, C or 1, {', '.join([str(rule.kernel_size)] * rule.ndim)}), got {w.shape}"
            )
        kernel = _kernel_to_ours(w, rule.ndim)  # depthwise: (*k, 1, C) -> our (*k, C, 1)
        if rule.perception == "depthwise":
            kernel = np.swapaxes(kernel, -1, -2)
        out[name] = {"kernel": np.ascontiguousarray(kernel), "bias": a[f"{name}.bias"]}
    out["fc0"] = {"kernel": a["fc0.weight"].T, "bias": a["fc0.bias"]}
    if rule.norm == "batch":
        out["bn"] = {"scale": a["bn.weight"], "bias": a["bn.bias"]}
    out["fc1"] = {"kernel": a["fc1.weight"].T}
    return out


def params_to_torch_level(level: Params, rule: Rule = Rule()) -> dict[str, np.ndarray]:
    """Inverse of :func:`torch_level_to_params` (exact: only transposes)."""
    g = lambda x: np.ascontiguousarray(np.asarray(x, np.float32))  # noqa: E731
    out = {}
    for name in TORCH_CONVS[rule.perception]:
        kernel = np.asarray(level[name]["kernel"])
        if rule.perception == "depthwise":
            kernel = np.swapaxes(kernel, -1, -2)
        out[f"{name}.weight"] = g(_kernel_to_torch(kernel, rule.ndim))
        out[f"{name}.bias"] = g(level[name]["bias"])
    out["fc0.weight"], out["fc0.bias"] = g(np.asarray(level["fc0"]["kernel"]).T), g(level["fc0"]["bias"])
    if rule.norm == "batch":
        out["bn.weight"], out["bn.bias"] = g(level["bn"]["scale"]), g(level["bn"]["bias"])
    out["fc1.weight"] = g(np.asarray(level["fc1"]["kernel"]).T)
    return out


def params_to_torch_state_dicts(params: Params, model_cfg: ModelConfig, ndim: int = 2) -> list[dict[str, np.ndarray]]:
    """Our params -> one original-layout state dict (NumPy arrays) per level, coarse to fine."""
    return [params_to_torch_level(params[name], level_rule(model_cfg, i, ndim)) for i, name in enumerate(level_names(model_cfg))]


def torch_state_dicts_to_params(
    state_dicts: Sequence[Mapping[str, np.ndarray]], model_cfg: ModelConfig, sources: Sequence[str] | None = None,
    ndim: int | None = None,
) -> Params:
    """One original state dict per level -> params, checked against ``model_cfg``. ``ndim``:
    the spatial rank (default: read from the first level's kernel, 2 for a fixed perception)."""
    names = level_names(model_cfg)
    sources = list(sources) if sources is not None else [f"level {i}" for i in range(len(state_dicts))]
    if len(state_dicts) != len(names):
        raise WeightsError(
            f"the config has {len(names)} levels but {len(state_dicts)} weight sets were given ({', '.join(sources)})"
        )
    if ndim is None:
        ndim = np.ndim(state_dicts[0]["p0.weight"]) - 2 if "p0.weight" in state_dicts[0] else 2
    params = {
        n: torch_level_to_params(sd, level_rule(model_cfg, i, ndim), src)
        for i, (n, sd, src) in enumerate(zip(names, state_dicts, sources))
    }
    try:
        check_params(params, model_cfg, source=" + ".join(sources), ndim=ndim)
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
    known = {f"model{i}.{k}" for i in range(n_levels) for k in torch_keys(Rule(norm="batch"))}
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
