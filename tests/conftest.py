"""Shared fixtures: small configs, and the one place that knows the paths of ../shared.

The reference weights, the reference case and the MSD data live in ``../shared`` next to the
repository (never copied into it). Tests reach them only through :data:`REFERENCE`,
:data:`HIPPOCAMPUS` and :func:`require`, which skips with the missing path named; the parity
checks that must run everywhere use ``tests/golden/`` instead.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

# XLA's persistent compilation cache, shared by the test processes, their children and the two
# xdist workers: most tests compile the same tiny train steps again (every trainer run, every
# resumed child), and loading a compiled step instead of compiling it halves a fault test's
# time. Set before JAX is imported, so that the children inherit it through the environment;
# the folder is outside the repository (which CI mounts read-only), and a user's own setting wins.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(Path(tempfile.gettempdir()) / "mednca-jax-tests-xla-cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from mednca_jax.config import Config, DataConfig, ModelConfig, TrainConfig, validate  # noqa: E402

# `mednca train` starts one process per core by default on a CPU-only machine; the tests that
# run the command (in this process or in children, which inherit the environment) measure one
# process unless they ask for more, so that they stay cheap and their step counts exact.
os.environ.setdefault("MEDNCA_CPU_PROCESSES", "1")

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
REFERENCE = SHARED / "reference"
HIPPOCAMPUS = SHARED / "data" / "Task04_Hippocampus"


def require(path: Path, *more: Path) -> Path:
    """Skip the calling test with a clear reason unless every path exists; returns ``path``."""
    for p in (path, *more):
        if not p.exists():
            pytest.skip(f"{p} is not available (the shared reference data lives in ../shared next to the repository)")
    return path


@pytest.fixture(scope="session")
def tiny_cfg() -> Config:
    """2 levels (x2), C=6, hidden 16, 3 steps each, 16x16 images, 8x8 patches."""
    return validate(
        Config(
            name="tiny",
            model=ModelConfig(channels=6, hidden=16, steps=(3, 3), scales=(2, 1), patch_size=8, fire_rate=0.5, remat="none"),
            data=DataConfig(image_size=(16, 16)),
            train=TrainConfig(batch_size=4, num_steps=10),
        )
    )


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


def random_level_params(key, channels: int | None = None, hidden: int | None = None, scale: float = 0.3, rule=None):
    """Level params of ``rule`` (default: the learned perception with ``channels`` and
    ``hidden``) with a non-zero fc1 (a fresh NCA is the identity, which tests nothing)."""
    import jax

    from mednca_jax.nca.rule import Rule, init_level

    rule = Rule(channels=channels, hidden=hidden) if rule is None else rule
    hidden = rule.hidden
    p = init_level(key, rule)
    k = jax.random.fold_in(key, 1)
    p["fc1"]["kernel"] = scale * jax.random.normal(k, p["fc1"]["kernel"].shape) / np.sqrt(hidden)
    return p


def random_params(model_cfg: ModelConfig, seed: int = 0, scale: float = 0.3):
    import jax

    from mednca_jax.nca.levels import level_names

    keys = jax.random.split(jax.random.PRNGKey(seed), model_cfg.n_levels)
    return {n: random_level_params(k, model_cfg.channels, model_cfg.hidden, scale) for n, k in zip(level_names(model_cfg), keys)}


def machine_backend(cfg):
    """The backend the entry points would resolve for ``cfg`` on this machine."""
    from mednca_jax.machine import backend_for

    return backend_for(cfg)


# A run of a few steps on the synthetic task (train.py / trainer.train tests).
TINY_RUN_TOML = """
name = "tiny"
[model]
channels = 6
hidden = 16
steps = [3, 3]
scales = [2, 1]
patch_size = 8
remat = "none"
[data]
image_size = [16, 16]
split = [0.5, 0.17, 0.33]
foreground_fraction = 0.5
[train]
batch_size = 4
num_steps = 6
log_every = 2
eval_every = 3
checkpoint_every = 3
"""


# The 3D counterpart: a two-level volume model on a 32x32x24 grid (the synthetic task's
# volumes fit it unresized), DiceFocal, foreground-placed crops.
TINY_3D_TOML = """
name = "tiny3d"
[model]
channels = 8
hidden = 16
steps = [4, 4]
scales = [4, 1]
kernel_size = [3, 3]
perception = "depthwise"
downscale = "max"
patch_size = 16
patch_foreground = 0.5
[data]
image_size = [32, 32, 24]
split = [0.5, 0.17, 0.33]
[train]
batch_size = 2
num_steps = 6
lr = 3e-3
loss = "dice_focal"
log_every = 2
eval_every = 3
checkpoint_every = 3
"""

def train(cfg, workdir, data_dir=None, **kwargs):
    """:func:`mednca_jax.train.loop.train` with the backend resolved for this machine, as
    ``mednca train`` resolves it."""
    from mednca_jax.machine import backend_for
    from mednca_jax.train.loop import train as train_run

    return train_run(cfg, workdir, data_dir, backend=backend_for(cfg), **kwargs)
