"""Plug-ins: the user's own modules that register perceptions and updates.

``model.plugins = ["my_rules.py", "my_package.rules"]`` names Python files or importable
modules. They are imported when a config is read (:func:`mednca_jax.config.from_dict`),
before its names are checked, so every process that reads the config (``--cpu-processes``
children, ``evaluate``, ``predict``, ``--resume``, ``export``) registers the same rules. A file
is recorded in the run folder's ``config.toml`` with its absolute path; when it is gone, the
config names it and says what to do.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import sys
import traceback
from pathlib import Path
from typing import Sequence

from mednca_jax.errors import ConfigError


def _is_file(spec: str) -> bool:
    return spec.endswith(".py") or "/" in spec or "\\" in spec


def resolve_plugin_file(spec: str, base_dir: str | Path | None = None) -> Path:
    """The absolute path of plug-in file ``spec``: as given when absolute, else relative to
    the working directory, else to ``base_dir``. ``ConfigError`` when it is in neither."""
    path = Path(spec).expanduser()
    candidates = [path] if path.is_absolute() else [Path.cwd() / path] + ([Path(base_dir) / path] if base_dir else [])
    for c in candidates:
        if c.is_file():
            return c.resolve()
    where = " or ".join(str(c.parent) for c in candidates)
    raise ConfigError(
        f"config key 'model.plugins': plug-in file {spec!r} not found (looked in {where}); "
        "restore the file, or give its current path with --set 'model.plugins=[\"PATH\"]'"
    )


def _import_file(path: Path) -> None:
    name = "mednca_plugin_" + hashlib.sha1(str(path).encode()).hexdigest()[:12]
    if name in sys.modules:  # imported once per process: its registrations stand
        return
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise


def load_plugins(specs: Sequence[str], base_dir: str | Path | None = None) -> tuple[str, ...]:
    """Import each plug-in once per process; return the specs as recorded (files absolute).

    Raises:
        ConfigError: a file is missing, a module cannot be found, or importing one failed
            (the message holds the last line of its error and where it happened).
    """
    recorded = []
    for spec in specs:
        try:
            if _is_file(spec):
                path = resolve_plugin_file(spec, base_dir)
                _import_file(path)
                recorded.append(str(path))
            else:
                importlib.import_module(spec)
                recorded.append(spec)
        except ConfigError:
            raise
        except ModuleNotFoundError as e:
            if _is_file(spec) or e.name != spec.split(".")[0] and e.name != spec:
                raise ConfigError(f"config key 'model.plugins': importing plug-in {spec!r} failed: {e}") from None
            raise ConfigError(
                f"config key 'model.plugins': no module named {spec!r}; install it, or name a file (e.g. \"my_rules.py\")"
            ) from None
        except Exception as e:  # noqa: BLE001 - the plug-in's own error, reported as a config error with its place
            where = traceback.extract_tb(e.__traceback__)[-1]
            raise ConfigError(
                f"config key 'model.plugins': importing plug-in {spec!r} failed: {type(e).__name__}: {e} "
                f"({where.filename}, line {where.lineno})"
            ) from None
    return tuple(recorded)
