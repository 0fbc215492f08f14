"""mednca-jax: Med-NCA (Kalkhof et al., IPMI 2023) as pure JAX functions.

Three lines from a config to a segmentation::

    import jax, mednca_jax as mn
    cfg = mn.load_config("configs/hippocampus_official.toml")
    params = mn.load_torch_weights(["model0.pth", "model1.pth"], cfg.model)   # or mn.init_params(cfg.model, key)
    probs = mn.segment(params, cfg, slices, jax.random.PRNGKey(0), backend=mn.backend_for(cfg))  # (B, H, W, n_out)

The package: ``nca/`` (the rule as data, its registries, rollouts, levels, backends),
``train/``, ``evaluate/``, ``data/``, ``augment/``, ``export/``, ``baselines/`` and ``cli/``.
"""

from __future__ import annotations

import importlib
from typing import Any

# The public names and the modules that define them. They are imported on first use (PEP 562),
# so that ``mednca`` (whose entry point is ``mednca_jax.cli``) starts without importing JAX:
# ``--help`` answers at once, and a Ctrl-C while the modules load is a clean exit, not a
# traceback from inside an import.
_EXPORTS: dict[str, tuple[str, str]] = {
    "Config": ("mednca_jax.config", "Config"),
    "ConfigError": ("mednca_jax.config", "ConfigError"),
    "load_config": ("mednca_jax.config", "load_config"),
    "dice_bce_loss": ("mednca_jax.losses", "dice_bce_loss"),
    "dice_hard": ("mednca_jax.losses", "dice_hard"),
    "dice_soft": ("mednca_jax.losses", "dice_soft"),
    "Machine": ("mednca_jax.machine", "Machine"),
    "backend_for": ("mednca_jax.machine", "backend_for"),
    "InputError": ("mednca_jax.nca.levels", "InputError"),
    "forward": ("mednca_jax.nca.levels", "forward"),
    "forward_train": ("mednca_jax.nca.levels", "forward_train"),
    "init_params": ("mednca_jax.nca.levels", "init_params"),
    "level_rules": ("mednca_jax.nca.levels", "level_rules"),
    "segment": ("mednca_jax.nca.levels", "segment"),
    "Perception": ("mednca_jax.nca.perceptions", "Perception"),
    "register_perception": ("mednca_jax.nca.perceptions", "register_perception"),
    "nca_step": ("mednca_jax.nca.rollout", "nca_step"),
    "rollout": ("mednca_jax.nca.rollout", "rollout"),
    "Rule": ("mednca_jax.nca.rule", "Rule"),
    "Update": ("mednca_jax.nca.updates", "Update"),
    "register_update": ("mednca_jax.nca.updates", "register_update"),
    "WeightsError": ("mednca_jax.nca.weights", "WeightsError"),
    "load_torch_weights": ("mednca_jax.nca.weights", "load_torch_weights"),
    "load_checkpoint": ("mednca_jax.train.checkpoint", "load_params"),
    "init_train_state": ("mednca_jax.train.step", "init_train_state"),
    "make_optimizer": ("mednca_jax.train.step", "make_optimizer"),
    "make_train_step": ("mednca_jax.train.step", "make_train_step"),
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    try:
        module, attr = _EXPORTS[name]
    except KeyError:
        raise AttributeError(f"module 'mednca_jax' has no attribute {name!r}") from None
    value = getattr(importlib.import_module(module), attr)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
