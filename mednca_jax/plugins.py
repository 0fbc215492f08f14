"""Plug-ins: the user's own modules that register perceptions and updates.

``model.plugins = ["my_rules.py", "my_package.rules"]`` names Python files or importable
modules. They are imported when a config is read (:func:`mednca_jax.config.from_dict`),
before its names are checked, so every process that reads the config (``--cpu-processes``
children, ``evaluate``, ``predict``, ``--resume``, ``export``) registers the same rules. A file
is recorded in the run folder's ``config.toml`` with its absolute path, so those commands find
it from any working directory; a module name is recorded as it is and must be importable
where the run is read.

Each plug-in is imported once per process: a file already imported (under any module name,
as a file or as a module) is not executed again, so its registrations are made once however
often a config names it. A missing file, an unknown module, or a plug-in that raises while it
is imported is a :class:`PluginError` (a :class:`~mednca_jax.config.ConfigError`) of one line
that names the file, and for a failed import the line where it failed.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import sys
import traceback
from pathlib import Path
from types import ModuleType
from typing import Sequence

from mednca_jax.errors import ConfigError

KEY = "config key 'model.plugins'"
_PACKAGE_DIR = str(Path(__file__).resolve().parent)


class PluginError(ConfigError):
    """A plug-in cannot be found or failed to import.

    ``problem`` says what happened (naming the file or module); ``fix`` what to do about it,
    which depends on where the name came from (a ``--set`` or a run folder's config), so a
    caller may give its own (:func:`mednca_jax.train.checkpoint.load_run_config` does).
    """

    def __init__(self, problem: str, fix: str, missing: bool = False, source: str | None = None) -> None:
        self.problem, self.fix, self.missing, self.source = problem, fix, missing, source
        super().__init__(f"{source + ': ' if source else ''}{KEY}: {problem}; {fix}")

    def at(self, source: str | Path) -> "PluginError":
        """The same error, said of config file ``source``."""
        return PluginError(self.problem, self.fix, self.missing, str(source))

    def in_run(self, config_file: str | Path) -> str:
        """The message for a run folder's ``config.toml``: every reader of the run (evaluate,
        predict, export, a resumed train's check of the folder) reads the recorded path, so a
        moved file is fixed there, not with ``--set``."""
        fix = f"put the file back, or write its new path into model.plugins in {config_file}" if self.missing else self.fix
        return f"{config_file}: {KEY}: {self.problem}; {fix}"


def _is_file(spec: str) -> bool:
    return spec.endswith(".py") or "/" in spec or "\\" in spec


def _one_line(text: str) -> str:
    """An error message on one line (a plug-in's own message may hold newlines)."""
    return " ".join(str(text).split())


def resolve_plugin_file(spec: str, base_dir: str | Path | None = None) -> Path:
    """The absolute path of plug-in file ``spec``: as given when absolute, else relative to
    the working directory, else to ``base_dir``. :class:`PluginError` when it is in neither."""
    path = Path(spec).expanduser()
    candidates = [path] if path.is_absolute() else [Path.cwd() / path] + ([Path(base_dir) / path] if base_dir else [])
    for c in candidates:
        if c.is_file():
            return c.resolve()
    where = " or ".join(str(c.parent) for c in candidates)
    raise PluginError(
        f"plug-in file {spec!r} not found (looked in {where})",
        "restore the file, or give its current path with --set 'model.plugins=[\"PATH\"]'",
        missing=True,
    )


def _module_of_file(path: Path) -> ModuleType | None:
    """The module already imported from ``path`` in this process, if any (by any name)."""
    for module in list(sys.modules.values()):
        f = getattr(module, "__file__", None)
        # basename first: resolving every loaded module's path would be slow
        if f and os.path.basename(f) == path.name and Path(f).resolve() == path:
            return module
    return None


def _import_file(path: Path) -> None:
    if _module_of_file(path) is not None:  # imported once per process: its registrations stand
        return
    name = "mednca_plugin_" + hashlib.sha1(str(path).encode()).hexdigest()[:12]
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise PluginError(f"plug-in file {str(path)!r} cannot be imported", "name a Python source file (.py)")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # before running it, as a regular import does (dataclasses, pickling need it)
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise


def _import_module(name: str) -> None:
    if name in sys.modules:
        return
    spec = importlib.util.find_spec(name)
    if spec is None:
        raise ModuleNotFoundError(f"No module named {name!r}", name=name)
    origin = Path(spec.origin).resolve() if spec.origin and os.path.isfile(spec.origin) else None
    same = _module_of_file(origin) if origin is not None else None
    if same is not None:  # the same file was imported as a file plug-in: reuse it, do not register twice
        sys.modules[name] = same
        return
    importlib.import_module(name)


def _where(e: BaseException, origin: Path | None) -> str:
    """``FILE, line N`` of the failure: the plug-in's own line when it is in the traceback
    (not the line in mednca_jax that rejected what it passed), else the deepest frame
    outside mednca_jax and the import machinery."""
    if isinstance(e, SyntaxError) and e.filename:
        return f"{e.filename}, line {e.lineno}"
    frames = [f for f in traceback.extract_tb(e.__traceback__) if not f.filename.startswith("<")]
    own = [f for f in frames if origin is not None and Path(f.filename).resolve() == origin]
    outside = [f for f in frames if not f.filename.startswith(_PACKAGE_DIR) and "importlib" not in f.filename]
    pick = (own or outside or frames or [None])[-1]
    return f"{pick.filename}, line {pick.lineno}" if pick is not None else "no traceback"


def _origin_of(spec: str, path: Path | None) -> Path | None:
    if path is not None:
        return path
    module = sys.modules.get(spec)
    f = getattr(module, "__file__", None) if module is not None else None
    if f is None:
        try:
            found = importlib.util.find_spec(spec)
            f = found.origin if found is not None else None
        except (ImportError, ValueError):
            f = None
    return Path(f).resolve() if f and os.path.isfile(f) else None


def load_plugins(specs: Sequence[str], base_dir: str | Path | None = None) -> tuple[str, ...]:
    """Import each plug-in once per process; return the specs as recorded (files absolute).

    Raises:
        PluginError: a file is missing, a module cannot be found, or importing one failed
            (the message holds its error on one line and the file and line where it happened).
    """
    recorded = []
    for spec in specs:
        path = resolve_plugin_file(spec, base_dir) if _is_file(spec) else None
        try:
            if path is not None:
                _import_file(path)
                recorded.append(str(path))
            else:
                _import_module(spec)
                recorded.append(spec)
        except ModuleNotFoundError as e:
            if path is None and e.name is not None and (e.name == spec or spec.startswith(e.name + ".")):
                raise PluginError(
                    f"no module named {spec!r} (looked on sys.path)",
                    "install it, run from the folder that holds it, or name its file (e.g. \"my_rules.py\")",
                    missing=True,
                ) from None
            raise _import_failed(spec, e, _origin_of(spec, path)) from None
        except Exception as e:  # noqa: BLE001 - the plug-in's own error, reported as a config error with its place
            raise _import_failed(spec, e, _origin_of(spec, path)) from None
    return tuple(dict.fromkeys(recorded))  # a file named twice (two spellings of one path) is recorded once


def _import_failed(spec: str, e: BaseException, origin: Path | None) -> PluginError:
    path_given = origin is not None and _is_file(spec)
    what = str(origin) if path_given else spec
    return PluginError(
        f"importing plug-in {what!r} failed: {type(e).__name__}: {_one_line(e)} ({_where(e, origin)})",
        f"fix the plug-in (python {what} shows the whole traceback)" if path_given else "fix the plug-in",
    )
