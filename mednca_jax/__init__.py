"""mednca-jax: Med-NCA (Kalkhof et al., IPMI 2023) as pure JAX functions.

Three lines from a config to a segmentation::

    import jax, mednca_jax as mn
    cfg = mn.load_config("configs/hippocampus_official.toml")
    params = mn.load_torch_weights(["model0.pth", "model1.pth"], cfg.model)   # or mn.init_params(cfg.model, key)
    probs = mn.segment(params, cfg, slices, jax.random.PRNGKey(0), backend=mn.backend_for(cfg))  # (B, H, W, n_out)

The package: ``nca/`` (the rule as data, its registries, rollouts, levels, backends),
``train/``, ``evaluate/``, ``data/``, ``augment/``, ``export/``, ``baselines/`` and ``cli/``.
"""

from mednca_jax.config import Config, ConfigError, load_config
from mednca_jax.losses import dice_bce_loss, dice_hard, dice_soft
from mednca_jax.machine import Machine, backend_for
from mednca_jax.nca.levels import InputError, forward, forward_train, init_params, level_rules, segment
from mednca_jax.nca.perceptions import Perception, register_perception
from mednca_jax.nca.rollout import nca_step, rollout
from mednca_jax.nca.rule import Rule
from mednca_jax.nca.updates import Update, register_update
from mednca_jax.nca.weights import WeightsError, load_torch_weights
from mednca_jax.train.checkpoint import load_params as load_checkpoint
from mednca_jax.train.step import init_train_state, make_optimizer, make_train_step

__all__ = [
    "Config", "ConfigError", "InputError", "Machine", "Perception", "Rule", "Update", "WeightsError", "backend_for",
    "dice_bce_loss", "dice_hard", "dice_soft", "forward", "forward_train", "init_params", "init_train_state",
    "level_rules", "load_checkpoint", "load_config", "load_torch_weights", "make_optimizer", "make_train_step",
    "nca_step", "register_perception", "register_update", "rollout", "segment",
]
