"""Run configuration: TOML files under ``configs/`` parsed into frozen dataclasses.

A config is data. It is read and validated once (:func:`load_config`); every later
stage receives the resulting :class:`Config` and never re-checks it. Unknown keys and
bad values raise :class:`ConfigError` naming the offending key.

Layout of a config file::

    name = "hippocampus"
    [model]   # the network (NCA levels, or the UNet baseline)
    [data]    # how volumes become 2D training slices
    [train]   # optimiser, schedule, logging, checkpoints
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

DOWNSCALE_METHODS = ("bilinear", "area", "antialias")
REMAT_MODES = ("none", "step", "nested")
BACKENDS = ("auto", "reference", "cpu_fast")
PRECISIONS = ("float32", "bfloat16")
MODEL_KINDS = ("nca", "unet")
LABEL_MODES = ("foreground", "multiclass")


class ConfigError(ValueError):
    """A config file or override is malformed; the message names the key."""


@dataclass(frozen=True)
class ModelConfig:
    """The network. Defaults are the original Med-NCA example (src/examples).

    ``steps[i]`` and ``scales[i]`` describe level ``i``, coarse to fine: level ``i`` runs
    on the image downscaled by ``scales[i]`` for ``steps[i]`` NCA steps. The last scale
    must be 1 (full resolution); each scale must be a multiple of the next one.
    """

    kind: str = "nca"
    channels: int = 16
    hidden: int = 128
    n_in: int = 1
    n_out: int = 1
    fire_rate: float = 0.5
    steps: tuple[int, ...] = (64, 64)
    scales: tuple[int, ...] = (4, 1)
    downscale: str = "bilinear"
    patch_size: int = 16  # training crop at full resolution; 0 trains on whole images
    remat: str = "none"  # gradient checkpointing of the rollout: none | step | nested
    perception: str = "learned"  # the rule's perception: learned (the original) | sobel (see rule.py)
    backend: str = "auto"  # auto | reference | cpu_fast: which implementation runs the rule
    precision: str = "float32"  # matmul inputs: float32 | bfloat16 (float32 accumulation; reference only)
    unet_width: int = 32  # base width of the UNet baseline (kind = "unet")
    unet_depth: int = 4

    @property
    def n_levels(self) -> int:
        return len(self.steps)


@dataclass(frozen=True)
class DataConfig:
    """How an MSD task becomes 2D slices (REFERENCE.md, "Data")."""

    image_size: tuple[int, int] = (64, 64)
    slice_axis: int = 2
    channel: int = 0  # modality channel of 4D images
    labels: str = "foreground"  # foreground: every label > 0 is 1; multiclass: one channel per class
    split: tuple[float, float, float] = (0.7, 0.1, 0.2)  # train / val / test fractions, by patient
    split_seed: int = 0
    foreground_fraction: float = 0.0  # share of each batch drawn from slices with foreground (0: uniform)
    synthetic_cases: int = 24  # size of the embedded default data set


@dataclass(frozen=True)
class TrainConfig:
    """Optimiser and loop. Defaults follow the original (Adam, betas 0.5, decay 0.9999)."""

    batch_size: int = 48
    num_steps: int = 10_000
    lr: float = 1.6e-3
    betas: tuple[float, float] = (0.5, 0.5)
    eps: float = 1e-8
    lr_decay: float = 0.9999  # multiplied into the learning rate after every batch
    warmup_steps: int = 0
    seed: int = 0
    log_every: int = 20
    eval_every: int = 500
    checkpoint_every: int = 500
    keep_checkpoints: int = 3
    time_limit_min: float = 0.0  # stop (with a checkpoint) after this many minutes; 0: no limit
    data_parallel: bool = False  # shard the batch over all devices (jax.sharding)


@dataclass(frozen=True)
class Config:
    name: str = "unnamed"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        return _plain(dataclasses.asdict(self))

    def replace(self, **sections: Any) -> "Config":
        """Return a validated copy with whole sections or ``name`` replaced."""
        return validate(dataclasses.replace(self, **sections))


_SECTIONS = {"model": ModelConfig, "data": DataConfig, "train": TrainConfig}


def _plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


def _coerce(key: str, value: Any, default: Any) -> Any:
    """Convert a TOML value to the type of the field's default, or raise naming ``key``."""
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"config key '{key}': expected true or false, got {value!r}")
        return value
    if isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"config key '{key}': expected an integer, got {value!r}")
        return value
    if isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config key '{key}': expected a number, got {value!r}")
        return float(value)
    if isinstance(default, str):
        if not isinstance(value, str):
            raise ConfigError(f"config key '{key}': expected a string, got {value!r}")
        return value
    if isinstance(default, tuple):
        if not isinstance(value, (list, tuple)) or len(value) == 0:
            raise ConfigError(f"config key '{key}': expected a non-empty list, got {value!r}")
        return tuple(_coerce(f"{key}[{i}]", v, default[0]) for i, v in enumerate(value))
    raise ConfigError(f"config key '{key}': unsupported type")  # pragma: no cover


def _section(cls: type, raw: Mapping[str, Any], prefix: str) -> Any:
    if not isinstance(raw, Mapping):
        raise ConfigError(f"config section '[{prefix}]' must be a table, got {raw!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise ConfigError(
            f"unknown config key(s) {', '.join(prefix + '.' + k for k in unknown)}; "
            f"valid keys in [{prefix}]: {', '.join(sorted(fields))}"
        )
    defaults = cls()
    values = {k: _coerce(f"{prefix}.{k}", v, getattr(defaults, k)) for k, v in raw.items()}
    return cls(**values)


def _check(cond: bool, key: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"config key '{key}': {msg}")


def validate(cfg: Config) -> Config:
    """Check value ranges and cross-field consistency; return ``cfg`` unchanged."""
    m, d, t = cfg.model, cfg.data, cfg.train
    _check(m.kind in MODEL_KINDS, "model.kind", f"must be one of {MODEL_KINDS}, got {m.kind!r}")
    _check(m.n_in >= 1, "model.n_in", f"must be >= 1, got {m.n_in}")
    _check(m.n_out >= 1, "model.n_out", f"must be >= 1, got {m.n_out}")
    _check(m.hidden >= 1, "model.hidden", f"must be >= 1, got {m.hidden}")
    _check(
        m.channels >= m.n_in + m.n_out,
        "model.channels",
        f"must be >= n_in + n_out = {m.n_in + m.n_out}, got {m.channels}",
    )
    _check(0.0 <= m.fire_rate < 1.0, "model.fire_rate", f"must be in [0, 1), got {m.fire_rate}")
    _check(
        len(m.steps) == len(m.scales),
        "model.scales",
        f"needs one entry per level: steps has {len(m.steps)}, scales has {len(m.scales)}",
    )
    _check(all(s >= 1 for s in m.steps), "model.steps", f"every level needs >= 1 step, got {list(m.steps)}")
    _check(m.scales[-1] == 1, "model.scales", f"the last (finest) level must have scale 1, got {list(m.scales)}")
    for i in range(len(m.scales) - 1):
        a, b = m.scales[i], m.scales[i + 1]
        _check(
            b >= 1 and a % b == 0 and a > b,
            "model.scales",
            f"must decrease, each a multiple of the next, got {list(m.scales)}",
        )
    _check(m.downscale in DOWNSCALE_METHODS, "model.downscale", f"must be one of {DOWNSCALE_METHODS}, got {m.downscale!r}")
    _check(m.remat in REMAT_MODES, "model.remat", f"must be one of {REMAT_MODES}, got {m.remat!r}")
    _check(m.backend in BACKENDS, "model.backend", f"must be one of {BACKENDS}, got {m.backend!r}")
    _check(m.precision in PRECISIONS, "model.precision", f"must be one of {PRECISIONS}, got {m.precision!r}")
    if m.kind == "nca":
        from .rule import PERCEPTIONS  # local: the registry lives with the rule (and may grow at run time)

        _check(m.perception in PERCEPTIONS, "model.perception", f"must be one of {sorted(PERCEPTIONS)}, got {m.perception!r}")
    _check(m.patch_size >= 0, "model.patch_size", f"must be >= 0, got {m.patch_size}")
    _check(m.unet_width >= 1 and m.unet_depth >= 1, "model.unet_width", "UNet width and depth must be >= 1")

    _check(len(d.image_size) == 2 and all(s > 0 for s in d.image_size), "data.image_size", f"must be [H, W] > 0, got {list(d.image_size)}")
    H, W = d.image_size
    coarsest = m.scales[0]
    _check(
        H % coarsest == 0 and W % coarsest == 0,
        "data.image_size",
        f"{H}x{W} is not divisible by the coarsest level scale {coarsest}",
    )
    _check(m.patch_size <= min(H, W), "model.patch_size", f"{m.patch_size} is larger than the image {H}x{W}")
    if m.kind == "unet":
        f = 2**m.unet_depth
        _check(H % f == 0 and W % f == 0, "data.image_size", f"{H}x{W} is not divisible by 2**unet_depth = {f}")
    _check(d.slice_axis in (0, 1, 2), "data.slice_axis", f"must be 0, 1 or 2, got {d.slice_axis}")
    _check(d.channel >= 0, "data.channel", f"must be >= 0, got {d.channel}")
    _check(d.labels in LABEL_MODES, "data.labels", f"must be one of {LABEL_MODES}, got {d.labels!r}")
    _check(
        len(d.split) == 3 and all(s >= 0 for s in d.split) and math.isclose(sum(d.split), 1.0, abs_tol=1e-6) and d.split[0] > 0,
        "data.split",
        f"must be three fractions [train, val, test] >= 0 summing to 1 with train > 0, got {list(d.split)}",
    )
    _check(0.0 <= d.foreground_fraction <= 1.0, "data.foreground_fraction", f"must be in [0, 1], got {d.foreground_fraction}")
    _check(d.synthetic_cases >= 3, "data.synthetic_cases", f"must be >= 3, got {d.synthetic_cases}")

    _check(t.batch_size >= 1, "train.batch_size", f"must be >= 1, got {t.batch_size}")
    _check(t.num_steps >= 1, "train.num_steps", f"must be >= 1, got {t.num_steps}")
    _check(t.lr > 0, "train.lr", f"must be > 0, got {t.lr}")
    _check(len(t.betas) == 2 and all(0 <= b < 1 for b in t.betas), "train.betas", f"must be two numbers in [0, 1), got {list(t.betas)}")
    _check(t.eps > 0, "train.eps", f"must be > 0, got {t.eps}")
    _check(0 < t.lr_decay <= 1, "train.lr_decay", f"must be in (0, 1], got {t.lr_decay}")
    _check(t.warmup_steps >= 0, "train.warmup_steps", f"must be >= 0, got {t.warmup_steps}")
    for key in ("log_every", "eval_every", "checkpoint_every", "keep_checkpoints"):
        _check(getattr(t, key) >= 1, f"train.{key}", f"must be >= 1, got {getattr(t, key)}")
    _check(t.time_limit_min >= 0, "train.time_limit_min", f"must be >= 0, got {t.time_limit_min}")
    return cfg


def from_dict(raw: Mapping[str, Any]) -> Config:
    """Build and validate a config from a nested mapping (as parsed from TOML)."""
    allowed = {"name", *_SECTIONS}
    unknown = sorted(set(raw) - allowed)
    if unknown:
        raise ConfigError(f"unknown top-level config key(s) {unknown}; valid: {sorted(allowed)}")
    name = raw.get("name", "unnamed")
    if not isinstance(name, str):
        raise ConfigError(f"config key 'name': expected a string, got {name!r}")
    sections = {k: _section(cls, raw.get(k, {}), k) for k, cls in _SECTIONS.items()}
    return validate(Config(name=name, **sections))


def parse_override(text: str) -> tuple[list[str], Any]:
    """Parse ``section.key=value`` (value in TOML syntax; bare words are strings)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value, e.g. train.lr=1e-3")
    key, value = text.split("=", 1)
    key = key.strip()
    try:
        parsed = tomllib.loads(f"v = {value.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        parsed = value.strip()
    return key.split("."), parsed


def apply_overrides(raw: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    raw = {k: dict(v) if isinstance(v, Mapping) else v for k, v in raw.items()}
    for text in overrides:
        path, value = parse_override(text)
        if len(path) == 1 and path[0] == "name":
            raw["name"] = value
        elif len(path) == 2 and path[0] in _SECTIONS:
            raw.setdefault(path[0], {})[path[1]] = value
        else:
            raise ConfigError(
                f"override {text!r}: key must be 'name' or section.key with section in {sorted(_SECTIONS)}"
            )
    return raw


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> Config:
    """Read a TOML config, apply ``--set`` style overrides, validate.

    Raises:
        ConfigError: the file is missing, is not valid TOML, or holds a bad key or value.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist; see configs/ for examples")
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {path} is not valid TOML: {e}") from None
    try:
        return from_dict(apply_overrides(raw, overrides))
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {v!r} as TOML")


def dumps(cfg: Config) -> str:
    """Serialise a config to TOML text that :func:`loads` reads back to an equal config."""
    d = cfg.to_dict()
    lines = [f"name = {_toml_value(d['name'])}"]
    for sec in _SECTIONS:
        lines.append(f"\n[{sec}]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in d[sec].items()]
    return "\n".join(lines) + "\n"


def loads(text: str) -> Config:
    return from_dict(tomllib.loads(text))


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(dumps(cfg))
