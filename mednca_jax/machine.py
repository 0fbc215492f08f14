"""Facts about this machine, read once at an entry point and passed down.

The command-line entry points (``mednca train / evaluate / predict / export``), the
benchmarks and the tests read :meth:`Machine.here` once and hand it, or the static
:class:`~mednca_jax.nca.backends.Backend` that :func:`backend_for` derives from it and a
config, to the library, which never reads the machine itself.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mednca_jax.config import Config, ModelConfig
    from mednca_jax.nca.backends import Backend


def usable_cores() -> list[int]:
    """The cores this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return list(range(os.cpu_count() or 1))


@dataclass(frozen=True)
class Machine:
    """What the backend choice depends on: the JAX platform (``cpu``, ``gpu``, ``tpu``) and
    the usable CPU cores of this process."""

    platform: str
    cores: int

    @classmethod
    def here(cls) -> "Machine":
        """This process's machine (for entry points only)."""
        import jax

        return cls(jax.default_backend(), len(usable_cores()))


def backend_for(cfg: "Config | ModelConfig", machine: Machine | None = None, ndim: int | None = None) -> "Backend":
    """The backend for ``model.backend`` on ``machine`` (:meth:`Machine.here` when not given:
    call it at an entry point), for the rules of every level at spatial rank ``ndim``
    (default: ``len(data.image_size)`` of a full config, else 2)."""
    from mednca_jax.config import Config
    from mednca_jax.nca.backends import resolve_backend
    from mednca_jax.nca.levels import level_rules

    model_cfg = cfg.model if isinstance(cfg, Config) else cfg
    if ndim is None:
        ndim = len(cfg.data.image_size) if isinstance(cfg, Config) else 2
    if model_cfg.kind != "nca":
        from mednca_jax.nca.backends import REFERENCE

        return REFERENCE
    machine = Machine.here() if machine is None else machine
    return resolve_backend(model_cfg.backend, level_rules(model_cfg, ndim), machine.platform, machine.cores)
