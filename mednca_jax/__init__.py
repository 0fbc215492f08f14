"""mednca-jax: Med-NCA (Kalkhof et al., IPMI 2023) as pure JAX functions.

Three lines from a config to a segmentation::

    import jax, mednca_jax as mn
    cfg = mn.load_config("configs/hippocampus_official.toml")
    params = mn.load_torch_weights(["model0.pth", "model1.pth"], cfg.model)   # or mn.init_params(cfg.model, key)
    probs = mn.segment(params, cfg, slices, jax.random.PRNGKey(0))            # (B, H, W, n_out)
"""

from mednca_jax.train.checkpoint import load_params as load_checkpoint
from mednca_jax.config import Config, ConfigError, load_config
from mednca_jax.nca.levels import InputError, forward, forward_train, init_params, segment
from mednca_jax.losses import dice_bce_loss, dice_hard, dice_soft
from mednca_jax.nca.rollout import nca_step, rollout
from mednca_jax.train.step import init_train_state, make_optimizer, make_train_step
from mednca_jax.nca.weights import WeightsError, load_torch_weights

__all__ = [
    "Config", "ConfigError", "InputError", "WeightsError", "dice_bce_loss", "dice_hard", "dice_soft",
    "forward", "forward_train", "init_params", "init_train_state", "load_checkpoint", "load_config",
    "load_torch_weights", "make_optimizer", "make_train_step", "nca_step", "rollout", "segment",
]
