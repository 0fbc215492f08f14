"""The configs that ship with the package, found by name or by path.

The TOML files live in the repository's top-level ``configs/``; ``mednca_jax/configs`` links
to that folder, and the wheel copies the files into the package (``pyproject.toml``,
``package-data``), so ``mednca train --config demo`` works from a source tree, an editable
install and a non-editable ``pip install .`` alike.
"""

from __future__ import annotations

from pathlib import Path

from mednca_jax.config import ConfigError

PACKAGE_CONFIGS = Path(__file__).resolve().parent / "configs"
# A checkout where the link was not created (e.g. git with core.symlinks=false) still has
# the real folder next to the package.
SOURCE_CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def configs_dir() -> Path:
    """The folder holding the shipped ``*.toml`` configs."""
    for d in (PACKAGE_CONFIGS, SOURCE_CONFIGS):
        if d.is_dir() and any(d.glob("*.toml")):
            return d
    return PACKAGE_CONFIGS


def config_names() -> list[str]:
    """Names of the shipped configs (``demo``, ``hippocampus``, ...), sorted."""
    return sorted(p.stem for p in configs_dir().glob("*.toml"))


def is_config_name(text: str | Path) -> bool:
    """True when ``text`` looks like a bare name (no folder part, no suffix), not a path."""
    p = Path(text)
    return p.suffix == "" and p.parent == Path(".")


def resolve_config_path(config: str | Path) -> Path:
    """An existing file path as given, else the shipped config of that name.

    Raises:
        ConfigError: neither an existing file nor a shipped config name; the message lists
            the names.
    """
    path = Path(config)
    if path.is_file():
        return path
    if is_config_name(config):
        named = configs_dir() / f"{config}.toml"
        if named.is_file():
            return named
    raise ConfigError(
        f"unknown config {str(config)!r}: not a file, and not one of the shipped configs {config_names()}; "
        "pass a TOML path or one of those names"
    )
