"""Run configuration: TOML files under ``configs/`` parsed into frozen dataclasses.

A config is data. It is read and validated once (:func:`load_config`); every later
stage receives the resulting :class:`Config` and never re-checks it. Unknown keys and
bad values raise :class:`ConfigError` naming the offending key.

Layout of a config file::

    name = "hippocampus"
    [model]   # the network (NCA levels, or the UNet baseline)
    [data]    # how volumes become 2D training slices
    [train]   # optimiser, schedule, logging, checkpoints
    [augment] # on-device training augmentation (preset "none": the original, none at all)
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from mednca_jax.errors import ConfigError  # noqa: F401 - raised here and part of this module's API

DOWNSCALE_METHODS = ("bilinear", "area", "antialias", "max")
REMAT_MODES = ("none", "step", "nested")
BACKENDS = ("auto", "reference", "cpu_fast")
PRECISIONS = ("float32", "bfloat16")
MODEL_KINDS = ("nca", "unet")
LABEL_MODES = ("merge", "classes")
# the names of earlier versions, still read (old run folders): normalised when a DataConfig is made
LABEL_MODE_ALIASES = {"foreground": "merge", "multiclass": "classes"}
SCHEDULES = ("exponential", "cosine", "budget_cosine", "budget_exponential")
LABEL_INTERPOLATIONS = ("nearest", "bilinear")
DATA_FORMATS = ("msd", "images")
RESIZE_MODES = ("pad", "stretch")
PLACEMENTS = ("keep_original_scale", "resample")  # 3D volumes on the model grid (data/volumes.py)
LOSSES = ("dice_bce", "dice_focal")


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
    patch_foreground: float = 0.0  # share of training crops placed around a foreground voxel (0: uniform)
    remat: str = "none"  # gradient checkpointing of the rollout: none | step | nested
    perception: str = "learned"  # a registered perception: learned (the original) | sobel | depthwise | a plug-in's
    kernel_size: tuple[int, ...] = (3,)  # the perception's odd window: one for every level, or one per level
    update: str = "mlp"  # a registered update: mlp (the original) | a plug-in's
    norm: str = "none"  # normalisation inside the update: none (Med-NCA) | batch (M3D-NCA, see nca/updates.py)
    plugins: tuple[str, ...] = ()  # modules that register perceptions / updates: "file.py" or "package.module"
    backend: str = "auto"  # auto | reference | cpu_fast: which implementation runs the rule
    precision: str = "float32"  # matmul inputs: float32 | bfloat16 (float32 accumulation; reference only)
    unet_width: int = 32  # base width of the UNet baseline (kind = "unet")
    unet_depth: int = 4
    unet_patch_size: int = 0  # UNet training crop, P per axis (a multiple of 2**unet_depth); 0 trains on whole images

    @property
    def n_levels(self) -> int:
        return len(self.steps)

    def kernel_of(self, level: int) -> int:
        """The perception's kernel size at ``level``."""
        return self.kernel_size[level if len(self.kernel_size) > 1 else 0]


@dataclass(frozen=True)
class DataConfig:
    """How an MSD task (or a folder of 2D images, ``format = "images"``) becomes 2D slices
    (docs/design.md, "Preprocessing"; docs/data.md)."""

    image_size: tuple[int, ...] = (64, 64)  # the model grid, one entry per spatial axis
    slice_axis: int = 2
    channel: int = 0  # modality channel of 4D images
    # merge: every label > 0 is one foreground class (the original); classes: one output channel
    # per class value 1..K (background has none; docs/design.md, "Several classes")
    labels: str = "merge"
    classes: int = 0  # K with labels = "classes"; 0: the largest label value of the training cases
    split: tuple[float, float, float] = (0.7, 0.1, 0.2)  # train / val / test fractions, by patient
    split_seed: int = 0
    foreground_fraction: float = 0.0  # share of each batch drawn from slices with foreground (0: uniform)
    synthetic_cases: int = 24  # size of the embedded default data set
    format: str = "msd"  # msd: an MSD NIfTI task folder; images: DIR/images + DIR/masks of 2D images (docs/data.md)
    resize: str = "pad"  # images: pad (keep the aspect ratio, centred, zeros around) | stretch to image_size
    # 3D (three image_size entries): keep_original_scale places each volume unresized in the
    # grid's corner (M3D-NCA); resample resizes it to the grid
    placement: str = "keep_original_scale"

    def __post_init__(self) -> None:
        object.__setattr__(self, "labels", LABEL_MODE_ALIASES.get(self.labels, self.labels))

    @property
    def volumetric(self) -> bool:
        """Whether cases are whole 3D volumes on the model grid (three ``image_size`` entries)
        rather than 2D slices."""
        return len(self.image_size) == 3

    @property
    def classes_from_data(self) -> bool:
        """Whether the number of classes is still to be read from the training labels."""
        return self.labels == "classes" and self.classes == 0


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
    max_rollbacks: int = 3  # on a diverged loss: back to the last good checkpoint at half the lr, this often
    # a logged loss above this counts as diverged, like a non-finite one (DiceBCE of a healthy run
    # stays below ~3; an exploded one reaches 1e5-1e29 while staying finite); 0: non-finite only
    max_loss: float = 100.0
    clip_grad_norm: float = 0.0  # clip the gradient to this global norm before Adam; 0: off
    ema_decay: float = 0.0  # keep an EMA of the params (validated, saved as best, exported); 0: off
    # exponential: lr * lr_decay**step. cosine: warm-up (warmup_steps), then anneal from lr to
    # lr * lr_final over num_steps (reproducible: a function of the step alone). budget_*: the
    # same over the time budget (time_limit_min): cosine, or exponential in the fraction used.
    schedule: str = "exponential"
    lr_final: float = 0.01  # cosine and budget schedules: the final learning rate, as a fraction of lr
    loss: str = "dice_bce"  # dice_bce (Med-NCA) | dice_focal (M3D-NCA; losses.py)


@dataclass(frozen=True)
class AugmentConfig:
    """On-device training augmentation (:mod:`mednca_jax.augment`): one probability ``p_*`` per
    transform, each with its range. The defaults are preset ``"none"`` (every probability 0:
    the original, no augmentation); :data:`AUGMENT_PRESETS` holds the others, and keys given
    explicitly override the preset's values.

    Ranges: ``(lo, hi)`` pairs are drawn uniformly (the scale log-uniformly); single numbers are
    the largest magnitude, drawn uniformly in ``[0, max]`` (or ``[-max, max]`` for signed ones).
    The ranges of the default preset reach severity 1 of the test-time perturbations
    (:mod:`mednca_jax.evaluate.perturbations`).
    """

    preset: str = "none"
    # spatial: applied to image and label together (one affine warp, then the elastic one)
    p_shift: float = 0.0
    shift_fraction: float = 0.25  # max |shift| per axis, as a fraction of the image side
    p_scale: float = 0.0
    scale_range: tuple[float, float] = (0.7, 1.4)  # zoom factor (> 1 enlarges the anatomy)
    p_rotate: float = 0.0
    rotate_deg: float = 45.0  # max |angle|
    p_flip_h: float = 0.0  # mirror along H (rows)
    p_flip_w: float = 0.0  # mirror along W (columns)
    p_flip_d: float = 0.0  # mirror along the third spatial axis (3D volumes only)
    p_elastic: float = 0.0
    elastic_alpha: float = 2.0  # max displacement of a control point, in pixels
    elastic_spacing: int = 8  # control-point spacing in pixels (the field's smoothness)
    label_interp: str = "nearest"  # nearest | bilinear (then thresholded at 0.5)
    # intensity and acquisition (image only), in the order they are applied
    p_bias: float = 0.0
    bias_strength: float = 1.0  # field within [2**-s, 2**s], s up to this
    p_lowres: float = 0.0
    lowres_range: tuple[float, float] = (0.4, 1.0)  # fraction of k-space (resolution) kept per axis
    p_blur: float = 0.0
    blur_sigma: tuple[float, float] = (0.5, 2.0)  # Gaussian sigma in pixels
    p_ghosting: float = 0.0
    ghosting_strength: float = 1.0  # every 4th phase-encode line scaled by 1 - s, s up to this
    p_spike: float = 0.0
    spike_amplitude: float = 0.25  # max amplitude of the stripes (intensity units)
    p_motion: float = 0.0
    motion_shift_fraction: float = 0.1  # max displacement of the moved copy, fraction of the side
    motion_rotate_deg: float = 10.0  # max |rotation| of the moved copy
    motion_moved_fraction: tuple[float, float] = (0.1, 0.4)  # share of k-space lines acquired after the motion
    p_gaussian_noise: float = 0.0
    noise_std: float = 0.2  # max std
    p_rician_noise: float = 0.0
    rician_std: float = 0.2  # max sigma
    p_gamma: float = 0.0
    gamma_log2: float = 1.0  # gamma = 2**u, |u| up to this
    p_brightness: float = 0.0
    brightness: float = 0.1  # max |additive shift|
    p_contrast: float = 0.0
    contrast_range: tuple[float, float] = (0.75, 1.25)  # factor about the image mean
    clip: bool = True  # clip intensity-augmented images to [0, 1], the preprocessed range

    @property
    def enabled(self) -> bool:
        """Whether any transform can fire (otherwise the train step does not augment at all)."""
        return any(getattr(self, f.name) > 0 for f in dataclasses.fields(self) if f.name.startswith("p_"))

    @classmethod
    def from_preset(cls, preset: str = "none", **overrides: Any) -> "AugmentConfig":
        """The preset's values with ``overrides`` on top (unvalidated; see :func:`validate`)."""
        if preset not in AUGMENT_PRESETS:
            raise ConfigError(f"config key 'augment.preset': must be one of {tuple(AUGMENT_PRESETS)}, got {preset!r}")
        return cls(**{**AUGMENT_PRESETS[preset], **overrides, "preset": preset})


# Presets of [augment]. "default" is the recommended recipe: every shift of the robustness suite
# seen in training, each transform rarely enough that most samples stay close to the data
# (about one sample in four is left untouched). "strong" fires every transform twice as often
# (about one sample in sixteen untouched): as robust, but it costs clean accuracy in a short
# budget. The k-space spike and the two noises keep their "strong" probability in "default":
# at half of it, spike alone cost Med-NCA more than 0.05 Dice at severity 1 (docs/results.md).
_STRONG = {
    "p_shift": 0.3, "p_scale": 0.3, "p_rotate": 0.3, "p_elastic": 0.1,
    "p_bias": 0.15, "p_lowres": 0.1, "p_blur": 0.1,
    "p_ghosting": 0.1, "p_spike": 0.1, "p_motion": 0.1,
    "p_gaussian_noise": 0.1, "p_rician_noise": 0.1,
    "p_gamma": 0.3, "p_brightness": 0.15, "p_contrast": 0.15,
}
_KEEP_STRONG = ("p_spike", "p_gaussian_noise", "p_rician_noise")
AUGMENT_PRESETS: dict[str, dict[str, Any]] = {
    "none": {},
    "default": {k: v if k in _KEEP_STRONG else v / 2 for k, v in _STRONG.items()},
    "strong": _STRONG,
}


@dataclass(frozen=True)
class Config:
    name: str = "unnamed"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)

    def to_dict(self) -> dict[str, Any]:
        return _plain(dataclasses.asdict(self))

    def replace(self, **sections: Any) -> "Config":
        """Return a validated copy with whole sections or ``name`` replaced."""
        return validate(dataclasses.replace(self, **sections))


_SECTIONS = {"model": ModelConfig, "data": DataConfig, "train": TrainConfig, "augment": AugmentConfig}


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
        if not default:  # a list that may be empty: of strings (model.plugins)
            if not isinstance(value, (list, tuple)):
                raise ConfigError(f"config key '{key}': expected a list of strings, got {value!r}")
            return tuple(_coerce(f"{key}[{i}]", v, "") for i, v in enumerate(value))
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
    if cls is AugmentConfig:  # the preset's values first, the explicit keys on top
        return AugmentConfig.from_preset(values.pop("preset", "none"), **values)
    return cls(**values)


def _check(cond: bool, key: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"config key '{key}': {msg}")


def _reconcile_classes(cfg: Config) -> Config:
    """With ``data.labels = "classes"`` the output channels are the classes: ``model.n_out =
    data.classes = K``. Either key may name K (``model.n_out`` alone: configs of earlier
    versions); ``model.n_out = 1``, the default, takes ``data.classes``. Both 0 / 1: K is read
    from the training labels when a run starts (:func:`with_classes`)."""
    m, d = cfg.model, cfg.data
    aliases = ", ".join(f"{a!r}" for a in LABEL_MODE_ALIASES)
    _check(m.n_out >= 1, "model.n_out", f"must be >= 1, got {m.n_out}")
    _check(d.labels in LABEL_MODES, "data.labels", f"must be one of {LABEL_MODES} (earlier names {aliases} are read too), got {d.labels!r}")
    _check(d.classes >= 0, "data.classes", f"must be >= 0 (0: the largest label value of the training cases), got {d.classes}")
    if d.labels == "merge":
        _check(d.classes == 0, "data.classes", f"counts the classes of data.labels = 'classes'; 'merge' has one foreground class, got {d.classes}")
        _check(m.n_out == 1, "model.n_out", f"data.labels = 'merge' gives one output channel (every label > 0), got {m.n_out}; "
                                            "set data.labels = 'classes' for one channel per class")
        return cfg
    if d.classes == 0 and m.n_out > 1:
        d = dataclasses.replace(d, classes=m.n_out)
    elif d.classes > 0 and m.n_out == 1:
        m = dataclasses.replace(m, n_out=d.classes)
    _check(m.n_out == max(d.classes, 1), "model.n_out", f"is {m.n_out} but data.classes = {d.classes}: the output channels are "
                                                         f"the classes; leave model.n_out out or set it to {d.classes}")
    return cfg if (m, d) == (cfg.model, cfg.data) else dataclasses.replace(cfg, model=m, data=d)


def with_classes(cfg: Config, k: int) -> Config:
    """``cfg`` with ``k`` classes (``data.classes = model.n_out = k``), validated; for a
    config whose count is read from the training labels (``data.classes_from_data``)."""
    return cfg.replace(data=dataclasses.replace(cfg.data, classes=k), model=dataclasses.replace(cfg.model, n_out=k))


def validate(cfg: Config) -> Config:
    """Check value ranges and cross-field consistency; return ``cfg``, with ``model.n_out``
    and ``data.classes`` made to agree (:func:`_reconcile_classes`), otherwise unchanged."""
    cfg = _reconcile_classes(cfg)
    m, d, t = cfg.model, cfg.data, cfg.train
    _check(m.kind in MODEL_KINDS, "model.kind", f"must be one of {MODEL_KINDS}, got {m.kind!r}")
    _check(m.n_in >= 1, "model.n_in", f"must be >= 1, got {m.n_in}")
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
    _check(
        len(m.kernel_size) in (1, len(m.steps)) and all(k >= 1 and k % 2 for k in m.kernel_size),
        "model.kernel_size",
        f"must be one odd size >= 1 for every level or one per level ({len(m.steps)}), got {list(m.kernel_size)}",
    )
    if m.kind == "nca":
        _validate_rule(m)
    _check(m.patch_size >= 0, "model.patch_size", f"must be >= 0, got {m.patch_size}")
    _check(0.0 <= m.patch_foreground <= 1.0, "model.patch_foreground", f"must be in [0, 1], got {m.patch_foreground}")
    _check(m.unet_width >= 1 and m.unet_depth >= 1, "model.unet_width", "UNet width and depth must be >= 1")

    _check(len(d.image_size) >= 1 and all(s > 0 for s in d.image_size), "data.image_size", f"must be one size > 0 per spatial axis, got {list(d.image_size)}")
    _check(len(d.image_size) in (2, 3), "data.image_size", f"must be [H, W] (2D slices) or [X, Y, Z] (3D volumes), got {list(d.image_size)}")
    size = "x".join(map(str, d.image_size))
    coarsest = m.scales[0]
    _check(all(s % coarsest == 0 for s in d.image_size), "data.image_size", f"{size} is not divisible by the coarsest level scale {coarsest}")
    _check(m.patch_size <= min(d.image_size), "model.patch_size", f"{m.patch_size} is larger than the image {size}")
    if m.kind == "unet":
        f = 2**m.unet_depth
        _check(all(s % f == 0 for s in d.image_size), "data.image_size", f"{size} is not divisible by 2**unet_depth = {f}")
        p = m.unet_patch_size
        _check(
            p == 0 or (p % f == 0 and p <= min(d.image_size)),
            "model.unet_patch_size",
            f"must be 0 (whole images) or a multiple of 2**unet_depth = {f} no larger than the image {size}, got {p}",
        )
    _check(d.slice_axis in (0, 1, 2), "data.slice_axis", f"must be 0, 1 or 2, got {d.slice_axis}")
    _check(d.channel >= 0, "data.channel", f"must be >= 0, got {d.channel}")
    _check(
        len(d.split) == 3 and all(s >= 0 for s in d.split) and math.isclose(sum(d.split), 1.0, abs_tol=1e-6) and d.split[0] > 0,
        "data.split",
        f"must be three fractions [train, val, test] >= 0 summing to 1 with train > 0, got {list(d.split)}",
    )
    _check(0.0 <= d.foreground_fraction <= 1.0, "data.foreground_fraction", f"must be in [0, 1], got {d.foreground_fraction}")
    _check(d.synthetic_cases >= 3, "data.synthetic_cases", f"must be >= 3, got {d.synthetic_cases}")
    _check(d.format in DATA_FORMATS, "data.format", f"must be one of {DATA_FORMATS}, got {d.format!r}")
    _check(d.resize in RESIZE_MODES, "data.resize", f"must be one of {RESIZE_MODES}, got {d.resize!r}")
    _check(d.placement in PLACEMENTS, "data.placement", f"must be one of {PLACEMENTS}, got {d.placement!r}")
    _check(
        d.format != "images" or len(d.image_size) == 2,
        "data.image_size",
        f"data.format = 'images' reads 2D images: needs two sizes [H, W], got {list(d.image_size)}",
    )

    _check(t.batch_size >= 1, "train.batch_size", f"must be >= 1, got {t.batch_size}")
    _check(t.num_steps >= 1, "train.num_steps", f"must be >= 1, got {t.num_steps}")
    _check(math.isfinite(t.lr) and t.lr > 0, "train.lr", f"must be a finite number > 0, got {t.lr}")
    _check(len(t.betas) == 2 and all(0 <= b < 1 for b in t.betas), "train.betas", f"must be two numbers in [0, 1), got {list(t.betas)}")
    _check(math.isfinite(t.eps) and t.eps > 0, "train.eps", f"must be a finite number > 0, got {t.eps}")
    _check(0 < t.lr_decay <= 1, "train.lr_decay", f"must be in (0, 1], got {t.lr_decay}")
    _check(t.warmup_steps >= 0, "train.warmup_steps", f"must be >= 0, got {t.warmup_steps}")
    for key in ("log_every", "eval_every", "checkpoint_every", "keep_checkpoints"):
        _check(getattr(t, key) >= 1, f"train.{key}", f"must be >= 1, got {getattr(t, key)}")
    _check(math.isfinite(t.time_limit_min) and t.time_limit_min >= 0, "train.time_limit_min", f"must be a finite number >= 0, got {t.time_limit_min}")
    _check(t.max_rollbacks >= 0, "train.max_rollbacks", f"must be >= 0, got {t.max_rollbacks}")
    _check(math.isfinite(t.max_loss) and t.max_loss >= 0, "train.max_loss", f"must be a finite number >= 0 (0: off), got {t.max_loss}")
    _check(t.clip_grad_norm >= 0, "train.clip_grad_norm", f"must be >= 0 (0: off), got {t.clip_grad_norm}")
    _check(0 <= t.ema_decay < 1, "train.ema_decay", f"must be in [0, 1) (0: off), got {t.ema_decay}")
    _check(t.schedule in SCHEDULES, "train.schedule", f"must be one of {SCHEDULES}, got {t.schedule!r}")
    _check(
        not t.schedule.startswith("budget_") or t.time_limit_min > 0,
        "train.schedule",
        f"{t.schedule!r} anneals over the time budget: set train.time_limit_min > 0",
    )
    _check(0 < t.lr_final <= 1, "train.lr_final", f"must be in (0, 1], got {t.lr_final}")
    _check(t.loss in LOSSES, "train.loss", f"must be one of {LOSSES}, got {t.loss!r}")
    _validate_augment(cfg.augment)
    _check(
        cfg.augment.p_flip_d == 0 or cfg.data.volumetric,
        "augment.p_flip_d",
        f"mirrors the third spatial axis: needs 3D data (three data.image_size entries), got image_size {list(cfg.data.image_size)}",
    )
    return cfg


def _validate_rule(m: ModelConfig) -> None:
    """The rule's names against the registries (after ``model.plugins`` were imported, see
    :func:`from_dict`), and each level's :class:`~mednca_jax.nca.rule.Rule` as a whole."""
    # Local: the registries live with the rule and grow when plug-ins are imported.
    from mednca_jax.nca.perceptions import PERCEPTIONS
    from mednca_jax.nca.rule import check_rule, level_rule
    from mednca_jax.nca.updates import UPDATES

    hint = " (a plug-in in model.plugins registers more)"
    _check(m.perception in PERCEPTIONS, "model.perception", f"must be one of {sorted(PERCEPTIONS)}{hint}, got {m.perception!r}")
    _check(m.update in UPDATES, "model.update", f"must be one of {sorted(UPDATES)}{hint}, got {m.update!r}")
    for level in range(m.n_levels):
        try:
            check_rule(level_rule(m, level))
        except ValueError as e:
            key = "model.norm" if "norm" in str(e) else "model.kernel_size" if "kernel" in str(e) else "model.perception"
            raise ConfigError(f"config key '{key}': level {level}: {e}") from None


def _validate_augment(a: AugmentConfig) -> None:
    _check(a.preset in AUGMENT_PRESETS, "augment.preset", f"must be one of {tuple(AUGMENT_PRESETS)}, got {a.preset!r}")
    for f in dataclasses.fields(a):
        v = getattr(a, f.name)
        if f.name.startswith("p_"):
            _check(0.0 <= v <= 1.0, f"augment.{f.name}", f"is a probability: must be in [0, 1], got {v}")
        elif isinstance(v, tuple):
            _check(len(v) == 2 and 0 <= v[0] <= v[1], f"augment.{f.name}", f"must be [lo, hi] with 0 <= lo <= hi, got {list(v)}")
        elif isinstance(v, float):
            _check(v >= 0, f"augment.{f.name}", f"must be >= 0, got {v}")
    _check(a.scale_range[0] > 0, "augment.scale_range", f"must be > 0, got {list(a.scale_range)}")
    _check(a.shift_fraction <= 1, "augment.shift_fraction", f"must be in [0, 1], got {a.shift_fraction}")
    _check(a.rotate_deg <= 180, "augment.rotate_deg", f"must be in [0, 180], got {a.rotate_deg}")
    _check(a.elastic_spacing >= 2, "augment.elastic_spacing", f"must be >= 2 pixels, got {a.elastic_spacing}")
    _check(a.label_interp in LABEL_INTERPOLATIONS, "augment.label_interp", f"must be one of {LABEL_INTERPOLATIONS}, got {a.label_interp!r}")
    _check(0 < a.lowres_range[0] and a.lowres_range[1] <= 1, "augment.lowres_range", f"fractions in (0, 1], got {list(a.lowres_range)}")
    _check(a.blur_sigma[0] > 0, "augment.blur_sigma", f"must be > 0, got {list(a.blur_sigma)}")
    _check(a.ghosting_strength <= 1, "augment.ghosting_strength", f"must be in [0, 1], got {a.ghosting_strength}")
    _check(a.motion_shift_fraction <= 1, "augment.motion_shift_fraction", f"must be in [0, 1], got {a.motion_shift_fraction}")
    _check(a.motion_moved_fraction[1] <= 1, "augment.motion_moved_fraction", f"fractions in [0, 1], got {list(a.motion_moved_fraction)}")
    _check(a.contrast_range[0] > 0, "augment.contrast_range", f"must be > 0, got {list(a.contrast_range)}")


def from_dict(raw: Mapping[str, Any], base_dir: str | Path | None = None) -> Config:
    """Build and validate a config from a nested mapping (as parsed from TOML).

    ``model.plugins`` are imported first (so that their perceptions and updates are known to
    the validation); plug-in files named by a relative path are looked up in the working
    directory, then in ``base_dir`` (the folder of the config file), and recorded with their
    absolute path."""
    allowed = {"name", *_SECTIONS}
    unknown = sorted(set(raw) - allowed)
    if unknown:
        raise ConfigError(f"unknown top-level config key(s) {unknown}; valid: {sorted(allowed)}")
    name = raw.get("name", "unnamed")
    if not isinstance(name, str):
        raise ConfigError(f"config key 'name': expected a string, got {name!r}")
    sections = {k: _section(cls, raw.get(k, {}), k) for k, cls in _SECTIONS.items()}
    if sections["model"].plugins:  # registered before the names are checked (see mednca_jax.plugins)
        from mednca_jax.plugins import load_plugins

        sections["model"] = dataclasses.replace(sections["model"], plugins=load_plugins(sections["model"].plugins, base_dir))
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
    from mednca_jax.plugins import PluginError  # local: plugins imports this module

    try:
        return from_dict(apply_overrides(raw, overrides), path.parent)
    except PluginError as e:  # keeps its kind: a run folder's reader rewords what to do
        raise e.at(path) from None
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


def loads(text: str, base_dir: str | Path | None = None) -> Config:
    return from_dict(tomllib.loads(text), base_dir)
