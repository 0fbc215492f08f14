"""Per-patient evaluation: predict every slice, stack to volumes, score, write NIfTI.

Metrics per case (docs/design.md, "Evaluation and quality"): hard Dice (sigmoid > 0.5) and soft Dice on
the model grid, as the original reports them, and hard Dice on the native voxel grid (the
prediction resampled back to the input's shape, against the original label file). Each is
computed per class (``dice_per_class``: ``{"1": .., "2": ..}``, the class values as strings)
and ``dice`` is their mean over classes; with one class (``data.labels = "merge"``) both are
the one figure. With ``runs >= 2`` the stochastic model is run several times: mean
prediction, a variance volume, and the NQM quality score (sum of std / sum of mean of the
sigmoid outputs).
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from mednca_jax.config import Config, DataConfig
from mednca_jax.data import Case, SliceSet
from mednca_jax.data.formats import check_task_cases, list_task_cases, native_label, to_native, write_native
from mednca_jax.data.preprocess import encode_labels
from mednca_jax.errors import UsageError
from mednca_jax.losses import dice_per_class, probabilities_to_labels, soft_dice_per_class
from mednca_jax.machine import Machine, backend_for
from mednca_jax.evaluate.inference import PredictFn, eval_batch_size, make_predict_fn, predict_slices  # noqa: F401  (part of this module's API)
from mednca_jax.nca.rollout import count_params
from mednca_jax.evaluate.quality import nqm, variance_volume
from mednca_jax.evaluate.perturbations import PERTURBATIONS
from mednca_jax.evaluate.perturbations_torchio import TORCHIO_PROTOCOL, import_torchio
from mednca_jax.evaluate.robustness import SCALE, robustness_suite, torchio_suite

def model_facts(predict: PredictFn, params: Any, cfg: Config, fire_rate: float | None, batch_size: int,
                repeats: int = 5) -> dict[str, Any]:
    """Kind, parameter count and inference time (ms per slice, compile excluded: the median of
    ``repeats`` timed batches of ``batch_size`` zero images after one warm-up call)."""
    fr = float(cfg.model.fire_rate if fire_rate is None else fire_rate)
    images = jnp.zeros((batch_size, *cfg.data.image_size, cfg.model.n_in), jnp.float32)
    key = jax.random.PRNGKey(0)
    predict(params, images, key, fr).block_until_ready()
    times = []
    for i in range(repeats):
        t0 = time.perf_counter()
        predict(params, images, jax.random.fold_in(key, i), fr).block_until_ready()
        times.append(time.perf_counter() - t0)
    return {
        "kind": cfg.model.kind,
        "params": count_params(params),
        "ms_per_slice": 1000.0 * float(np.median(times)) / batch_size,  # per volume in 3D ("image")
        "image": "volume" if cfg.data.volumetric else "slice",
        "batch_size": batch_size,
        "device": jax.devices()[0].device_kind,
    }


PER_CLASS = "_per_class"  # suffix of a metric's per-class figures


def _native_dice(pred_labels: np.ndarray, case: Case, cfg: Config, meta_shape: tuple[int, ...], axis: int) -> list[float]:
    """Hard Dice per class on the native grid: predicted labels resampled back vs. the label file."""
    native_pred = to_native(pred_labels, meta_shape, axis, cfg.data)
    label = native_label(case, cfg.data, cfg.model.n_out)
    return dice_per_class(native_pred, encode_labels(label, cfg.data.labels, cfg.model.n_out))


def _put(r: dict[str, Any], metric: str, per_class: Sequence[float]) -> None:
    """``r[metric]``: the mean over classes; ``r[metric + "_per_class"]``: ``{"1": .., ...}``."""
    r[metric] = float(np.mean(per_class))
    r[metric + PER_CLASS] = {str(c + 1): float(v) for c, v in enumerate(per_class)}


def evaluate_cases(
    params: Any,
    cfg: Config,
    slices: SliceSet,
    cases: Sequence[Case],
    key: jax.Array,
    *,
    fire_rate: float | None = None,
    runs: int = 1,
    batch_size: int = 32,
    out_dir: str | Path | None = None,
    native: bool = True,
    predict: PredictFn,
    progress: Callable[[Any], Any] = lambda it: it,
    panels: bool = True,
) -> dict[str, Any]:
    """Score every case of ``slices`` (and write predictions when ``out_dir`` is given).

    Returns ``{"summary": {metric: {"mean", "std", "n"}}, "cases": {name: {metric: value}}}``
    with metrics ``dice``, ``dice_soft`` (of the mean prediction over runs), ``dice_native``
    (when labels exist and ``native``), each the mean over classes of its ``*_per_class``
    figures (``{"1": value, ...}`` per case, ``{"1": {"mean", "std", "n"}, ...}`` in the
    summary), and with ``runs >= 2`` ``dice_run_mean`` (the mean of the single runs' hard
    Dice, the original's figure) and ``nqm``. Unlabelled cases get predictions only.
    """
    if runs < 1:
        raise ValueError(f"runs must be >= 1, got {runs}")
    fire_rate = cfg.model.fire_rate if fire_rate is None else fire_rate
    batch_size = eval_batch_size(cfg, batch_size)
    by_name = {c.name: c for c in cases}
    run_probs = np.stack(
        [predict_slices(predict, params, slices.images, jax.random.fold_in(key, r), fire_rate, batch_size) for r in progress(range(runs))]
    )  # (runs, N, H, W, n_out)
    probs = run_probs.mean(axis=0)
    out = Path(out_dir) if out_dir is not None else None
    results: dict[str, dict[str, Any]] = {}
    for k, name in enumerate(progress(slices.case_names)):
        rows = slices.case_slices(k)
        p = probs[rows]
        pred_labels = probabilities_to_labels(p)
        r: dict[str, Any] = {}
        if slices.labels is not None:
            t = slices.labels[rows]
            _put(r, "dice", dice_per_class(pred_labels, t))
            _put(r, "dice_soft", soft_dice_per_class(p, t))
            if native and name in by_name and by_name[name].label is not None:
                _put(r, "dice_native", _native_dice(pred_labels, by_name[name], cfg, slices.native_shapes[k], slices.slice_axis))
        if runs >= 2:
            if slices.labels is not None:  # what the original reports: the mean of single-run Dice
                r["dice_run_mean"] = float(np.mean([np.mean(dice_per_class(probabilities_to_labels(run_probs[j, rows]), t))
                                                    for j in range(runs)]))
            r["nqm"] = nqm(run_probs[:, rows])
        results[name] = r
        if out is not None and runs >= 2 and slices.labels is not None and panels:
            shown = [as_slices(a, cfg.data) for a in (slices.images[rows], p, slices.labels[rows])]
            _case_panel(out / "panels" / f"{name}.png", *shown, as_slices(run_probs[:, rows], cfg.data, runs=True), name, r)
        if out is not None:
            meta = slices.meta(k)
            write_native(out / "predictions", name, to_native(pred_labels, meta.shape, slices.slice_axis, cfg.data), meta, cfg.data)
            if runs >= 2:
                var = variance_volume(run_probs[:, rows])
                write_native(out / "variance", name, to_native(var, meta.shape, slices.slice_axis, cfg.data), meta, cfg.data, np.float32)
    metrics = {"summary": summarize(results), "cases": results}
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics


def as_slices(a: np.ndarray, data_cfg: DataConfig, runs: bool = False) -> np.ndarray:
    """A case's rows as 2D slices for pictures: unchanged in 2D; a volume ``(1, X, Y, Z, c)``
    becomes its ``(Z, X, Y, c)`` axial slices (with ``runs``: ``(R, 1, X, Y, Z, c)`` ->
    ``(R, Z, X, Y, c)``)."""
    if not data_cfg.volumetric:
        return a
    return np.moveaxis(a[:, 0], 3, 1) if runs else np.moveaxis(a[0], 2, 0)


def _case_panel(path: Path, images: np.ndarray, probs: np.ndarray, labels: np.ndarray, runs: np.ndarray, name: str, r: dict) -> None:
    """PNG of the slice with the most foreground: input, mean prediction, label, std over runs
    (several classes: the largest over the channels, i.e. any foreground class)."""
    from mednca_jax.evaluate.plots import case_panel
    from mednca_jax.evaluate.quality import std_map

    i = int(np.argmax(labels.reshape(labels.shape[0], -1).sum(axis=1)))
    title = f"{name}: Dice {r.get('dice', float('nan')):.3f}, NQM {r.get('nqm', float('nan')):.3f}"
    case_panel(images[i, ..., 0], probs[i].max(-1), labels[i].max(-1), std_map(runs[:, i]).max(-1), path, title=title)


def _metric_order(key: str) -> tuple:
    """Metric names alphabetically; class values ("1", "2", .., "10") by their number."""
    return (0, int(key), "") if key.isdigit() else (1, 0, key)


def summarize(results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Mean and (population) std over cases of every metric present; a per-class metric
    (``{"1": value, ...}`` per case) gets them per class: ``{"1": {"mean", "std", "n"}, ...}``."""
    keys = sorted({k for r in results.values() for k in r}, key=_metric_order)
    summary: dict[str, Any] = {}
    for k in keys:
        vals = [r[k] for r in results.values() if k in r]
        if isinstance(vals[0], dict):
            summary[k] = summarize({str(i): v for i, v in enumerate(vals)})
            continue
        a = np.array(vals, np.float64)
        summary[k] = {"mean": float(a.mean()), "std": float(a.std()), "n": int(a.size)}
    return summary


def _columns(summary: dict[str, Any]) -> list[tuple[str, str, str | None]]:
    """``(header, metric, class)`` of each table column: every metric, followed (with two or
    more classes) by one column per class of its per-class figures."""
    cols: list[tuple[str, str, str | None]] = []
    for k in summary:
        if k.endswith(PER_CLASS):
            continue
        cols.append((k, k, None))
        per_class = summary.get(k + PER_CLASS, {})
        if len(per_class) >= 2:
            cols += [(f"{k}[{c}]", k + PER_CLASS, c) for c in per_class]
    return cols


def format_table(metrics: dict[str, Any]) -> str:
    """A plain-text table: one row per case, then mean ± std; with several classes a column
    per class (``dice[1]``, ``dice[2]``, ...) after each mean over classes."""
    cases = metrics["cases"]
    cols = _columns(metrics["summary"])
    if not cols:
        return f"{len(cases)} case(s) predicted (no labels, no metrics)"
    width = max([len("case")] + [len(n) for n in cases])
    w = [max(11, len(h)) for h, _, _ in cols]

    def cell(d: dict[str, Any], metric: str, c: str | None) -> Any:
        v = d.get(metric)
        return v if c is None or v is None else v.get(c)

    lines = [f"{'case':<{width}}  " + "  ".join(f"{h:>{n}}" for (h, _, _), n in zip(cols, w))]
    for name, r in cases.items():
        vals = [cell(r, k, c) for _, k, c in cols]
        lines.append(f"{name:<{width}}  " + "  ".join(f"{v:>{n}.4f}" if v is not None else f"{'-':>{n}}" for v, n in zip(vals, w)))
    stats = [cell(metrics["summary"], k, c) for _, k, c in cols]
    lines.append(f"{'mean ± std':<{width}}  " + "  ".join(f"{s['mean']:.4f}±{s['std']:.3f}".rjust(n) for s, n in zip(stats, w)))
    return "\n".join(lines)


def select_cases(
    checkpoint: Path, data_dir: Path, cases_file: Path | None, split: str | None, data_cfg: DataConfig | None = None
) -> list[Case]:
    """The cases of ``data_dir`` (of ``data_cfg.format``; MSD when None) to evaluate: all,
    those listed in ``cases_file``, and/or one part of the run's own ``split.json``."""
    from mednca_jax.data import DataError, read_split

    cases = list_task_cases(data_dir, data_cfg)
    names = [c.name for c in cases]
    if cases_file is not None:
        wanted = [l.strip() for l in Path(cases_file).read_text().splitlines() if l.strip()]
        unknown = sorted(set(wanted) - set(names))
        if unknown:
            raise DataError(f"{cases_file}: cases {unknown[:5]} are not in {data_dir}")
        names = wanted
    if split is not None:
        part = set(read_split(Path(checkpoint) / "split.json").part(split))
        names = [n for n in names if n in part]
        if not names:
            raise DataError(f"the {split} part of {Path(checkpoint) / 'split.json'} has no case in {data_dir}")
    keep = set(names)
    return [c for c in cases if c.name in keep]


@dataclass(frozen=True)
class EvalOptions:
    """What ``evaluate.py`` is asked to do (one field per command-line option).

    ``runs >= 2`` adds variance volumes and the quality statistics (NQM, its Spearman
    correlation with Dice, failure detection); ``quality`` requires them (an error when they
    cannot be computed: ``runs < 2`` or fewer than 2 labelled cases).
    """

    cases_file: Path | None = None
    split: str | None = None
    runs: int = 1
    fire_rate: float | None = None
    seed: int = 0
    which: str = "best"
    batch_size: int = 32
    cache_dir: Path | None = None
    failure_dice: float = 0.8
    quality: bool = False
    robustness: bool = False
    perturbations: Sequence[str] | None = None
    severities: Sequence[float] | None = None
    compare_with: Sequence[Path] = ()
    progress: bool = True
    protocols: Sequence[str] = ("ours",)

    def check(self) -> "EvalOptions":
        """Raise :class:`~.errors.UsageError` naming the option that is out of range."""
        from mednca_jax.nca.levels import InputError, check_fire_rate
        from mednca_jax.evaluate.perturbations import check_severities

        if self.runs < 1:
            raise UsageError(f"--runs must be >= 1, got {self.runs}")
        if self.quality and self.runs < 2:
            raise UsageError(f"--quality needs --runs N with N >= 2 stochastic runs (got --runs {self.runs}); e.g. --runs 10")
        if self.batch_size < 1:
            raise UsageError(f"--batch-size must be >= 1, got {self.batch_size}")
        if not 0.0 <= self.failure_dice <= 1.0:
            raise UsageError(f"--failure-dice must be in [0, 1], got {self.failure_dice}")
        try:
            if self.fire_rate is not None:
                check_fire_rate(self.fire_rate)
            check_severities(self.severities or [])
        except (InputError, ValueError) as e:
            raise UsageError(str(e)) from None
        bad = [p for p in self.protocols if p not in ROBUSTNESS_FILES]
        if bad or not self.protocols:
            raise UsageError(f"--protocol must be one or more of {', '.join(ROBUSTNESS_FILES)}, got {list(self.protocols)}")
        if self.perturbations:
            valid = [n for p in self.protocols for n in protocol_perturbations(p)]
            unknown = [n for n in self.perturbations if n not in valid]
            if unknown:
                raise UsageError(f"unknown perturbation(s) {unknown} for --protocol {' '.join(self.protocols)}; valid choices: {', '.join(valid)}")
        if self.robustness and "torchio" in self.protocols:
            import_torchio()  # the install hint now, not after the clean evaluation
        return self


# robustness protocol -> stem of its output files (robustness.json keeps its name and layout)
ROBUSTNESS_FILES = {"ours": "robustness", "torchio": "robustness_torchio"}


def protocol_perturbations(protocol: str) -> list[str]:
    """Every perturbation name of ``protocol``."""
    return list(PERTURBATIONS) + [SCALE] if protocol == "ours" else list(TORCHIO_PROTOCOL)


def protocol_names(protocol: str, requested: Sequence[str] | None) -> list[str] | None:
    """The perturbations of ``protocol`` among ``requested`` (None: all of them)."""
    return None if not requested else [n for n in requested if n in protocol_perturbations(protocol)]


def quality_under_shift(
    params: Any,
    cfg: Config,
    slices: SliceSet,
    key: jax.Array,
    *,
    perturbations: Sequence[str],
    severities: Sequence[float] | None = None,
    runs: int = 10,
    fire_rate: float | None = None,
    seed: int = 0,
    batch_size: int = 32,
    predict: PredictFn,
    progress: Callable[[Any], Any] = lambda it: it,
    clean: dict[str, dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """NQM of ``runs`` stochastic runs and hard Dice of every case, clean and under each
    perturbation at each severity (the robustness suite's images), and their Spearman
    correlation pooled over all of them. A clean test set spans a narrow range of Dice; the
    perturbed copies add the degraded cases a quality score is meant to flag.

    ``slices``: labelled 2D slices or 3D volumes as for :func:`robustness_suite`;
    ``perturbations``: registry names (``"scale"`` is left out: it changes the grid).
    Returns ``{"runs", "spearman_nqm_dice" (pooled), "spearman_by_condition": {condition: rho},
    "cases": {condition: {case: {"dice", "nqm"}}}}`` with conditions ``"clean"`` and
    ``"name@severity"``. ``clean``: the per-case results (``dice``, ``nqm``) of an evaluation
    of these ``slices`` with the same key and runs, to reuse instead of running it again.
    """
    from mednca_jax.evaluate.perturbations import apply_perturbation
    from mednca_jax.evaluate.quality import spearman

    if runs < 2:
        raise ValueError(f"NQM needs runs >= 2, got {runs}")
    if slices.labels is None:
        raise ValueError("quality under perturbation needs labelled cases")
    images = slices.images[..., 0]
    ndim = images.ndim - 1
    conditions: dict[str, tuple[float, str | None]] = {"clean": (0.0, None)}
    for name in perturbations:
        if name != SCALE:
            for sev in severities if severities is not None else PERTURBATIONS[name].severities:
                conditions[f"{name}@{float(sev):g}"] = (float(sev), name)
    cases: dict[str, dict[str, dict[str, float]]] = {}
    if clean is not None:
        cases["clean"] = {n: {"dice": clean[n]["dice"], "nqm": clean[n]["nqm"]} for n in slices.case_names}
    for cond, (sev, name) in progress([c for c in conditions.items() if c[0] not in cases]):
        shifted = slices
        if name is not None:
            imgs, labs = apply_perturbation(name, images, slices.labels, sev, seed, ndim=ndim)
            shifted = dataclasses.replace(slices, images=np.asarray(imgs, np.float32)[..., None], labels=np.asarray(labs, np.float32))
        m = evaluate_cases(params, cfg, shifted, (), key, fire_rate=fire_rate, runs=runs, batch_size=batch_size,
                           native=False, predict=predict)
        cases[cond] = {n: {"dice": r["dice"], "nqm": r["nqm"]} for n, r in m["cases"].items()}
    rho = lambda rs: spearman([r["nqm"] for r in rs], [r["dice"] for r in rs]) if len(rs) >= 2 else None  # noqa: E731
    return {
        "runs": runs,
        "spearman_nqm_dice": rho([r for c in cases.values() for r in c.values()]),
        "spearman_by_condition": {cond: rho(list(c.values())) for cond, c in cases.items()},
        "cases": cases,
    }


def merge_models(combined: dict[str, Any], incoming: dict[str, Any], source: str) -> None:
    """Add ``incoming``'s models (label -> results) to ``combined`` in place. A label already
    there (two runs of one config are both ``kind:name``) gets `` (source)`` appended, and a
    counter if that is taken too, so no model's results replace another's in a plot or table."""
    for label, res in incoming.items():
        new, n = label, 1
        while new in combined:
            new = f"{label} ({source})" if n == 1 else f"{label} ({source} {n})"
            n += 1
        combined[new] = res


def evaluate_checkpoint(
    checkpoint: Path, data_dir: Path | None, out: Path, options: EvalOptions | None = None, *, machine: Machine,
    **overrides: Any
) -> dict[str, Any]:
    """Everything ``evaluate.py`` does; returns the metrics dict also written to ``out``.

    ``options`` (default :class:`EvalOptions`), with ``overrides`` (its field names)
    replacing fields. With ``runs >= 2``: NQM per case, its Spearman correlation with Dice
    and a failure detection summary (``quality``; NQM threshold chosen on the run's
    validation patients when ``split`` is given and the run has some; "not available" with
    fewer than 2 labelled cases), an NQM-Dice plot, case panels and a GIF of one rollout.
    With ``robustness``: ``robustness.json``/``.md``/``.png`` for our suite and
    ``robustness_torchio.*`` for the torchio protocol (``protocols``). ``machine``: where
    it runs (:meth:`mednca_jax.machine.Machine.here`, at the entry point), for the backend.

    Raises:
        UsageError: an option out of range. DataError, CheckpointError: unusable inputs.
    """
    from mednca_jax.train.checkpoint import load_data_dir, load_params
    from mednca_jax.data import DataError, load_slices

    opts = dataclasses.replace(options or EvalOptions(), **overrides).check()
    params, cfg = load_params(checkpoint, which=opts.which)
    if data_dir is None:  # the folder the run was trained on, else its generated task
        data_dir = load_data_dir(checkpoint) or Path(checkpoint) / "synthetic_data"
        if not data_dir.is_dir():
            raise DataError(f"no --data given and the run's data folder {data_dir} does not exist; pass --data TASK_FOLDER")
    if opts.robustness and cfg.model.n_in != 1:
        raise UsageError(f"--robustness perturbs one-channel images; this model reads {cfg.model.n_in} channels (model.n_in)")
    chosen = select_cases(checkpoint, data_dir, opts.cases_file, opts.split, cfg.data)
    check_task_cases(chosen, cfg, data_dir)  # an image folder: every chosen file, before any output
    labelled = [c for c in chosen if c.label is not None]
    unlabelled = [c for c in chosen if c.label is None]
    if opts.robustness and not labelled:
        raise DataError(f"--robustness needs labelled cases; {data_dir} has none among the {len(chosen)} chosen")
    if opts.quality and len(labelled) < 2:
        raise DataError(f"--quality needs >= 2 labelled cases for its statistics; {data_dir} has {len(labelled)} among those chosen")
    key = jax.random.PRNGKey(opts.seed)
    predict = make_predict_fn(cfg, backend_for(cfg, machine))

    def bar(desc: str) -> Callable[[Any], Any]:
        return lambda it: tqdm(it, desc=desc, disable=not opts.progress, leave=False, dynamic_ncols=True)

    metrics: dict[str, Any] = {"summary": {}, "cases": {}}
    if chosen:
        metrics["model"] = model_facts(predict, params, cfg, opts.fire_rate, eval_batch_size(cfg, opts.batch_size))
    test_slices = None
    for sub in (labelled, unlabelled):
        if sub:
            slices = load_slices(sub, cfg.data, opts.cache_dir, cfg.model.n_out)
            m = evaluate_cases(params, cfg, slices, sub, key, fire_rate=opts.fire_rate, runs=opts.runs, batch_size=opts.batch_size,
                               out_dir=out, predict=predict, progress=bar("runs, then cases"))
            metrics["cases"].update(m["cases"])
            if sub is labelled:
                metrics["summary"], test_slices = m["summary"], slices
    if opts.runs >= 2 and test_slices is not None:
        metrics["quality"] = _quality(params, cfg, checkpoint, data_dir, metrics, key, predict, out, opts)
        if cfg.model.kind == "nca" and not cfg.data.volumetric:  # a GIF shows 2D frames
            _rollout_gif(params, cfg, test_slices, key, opts.fire_rate, out / "rollout.gif")
    if opts.robustness:
        from mednca_jax.evaluate.plots import markdown_table, plot_robustness

        label = f"{cfg.model.kind}:{cfg.name}"
        common = dict(fire_rate=opts.fire_rate, seed=opts.seed, batch_size=opts.batch_size, predict=predict)
        for protocol in opts.protocols:
            names = protocol_names(protocol, opts.perturbations)
            if names == []:
                continue  # --perturbations named none of this protocol's
            if protocol == "ours":
                res = robustness_suite(params, cfg, test_slices, key, perturbations=names, severities=opts.severities,
                                       progress=bar("robustness"), **common)
            else:
                res = torchio_suite(params, cfg, test_slices, key, perturbations=names, progress=bar("torchio protocol"), **common)
            stem = ROBUSTNESS_FILES[protocol]
            combined = {label: res}
            for other in opts.compare_with:
                other = Path(other) if protocol == "ours" else Path(other).with_name(f"{stem}.json")
                if other.is_file():  # a model evaluated without this protocol is left out of its plot
                    merge_models(combined, json.loads(other.read_text())["models"], str(other.parent))
            (out / f"{stem}.json").write_text(json.dumps({"models": {label: res}}, indent=2) + "\n")
            (out / f"{stem}.md").write_text(markdown_table(combined) + "\n")
            plot_robustness(combined, out / f"{stem}.png")
            metrics[stem] = res
        ours = protocol_names("ours", opts.perturbations)
        if opts.quality and "ours" in opts.protocols and ours != []:  # NQM under the same perturbations
            from mednca_jax.evaluate.plots import plot_nqm_vs_dice

            q = quality_under_shift(params, cfg, test_slices, key, perturbations=list(PERTURBATIONS) if ours is None else ours,
                                    severities=opts.severities,
                                    runs=opts.runs, fire_rate=opts.fire_rate, seed=opts.seed, batch_size=opts.batch_size,
                                    predict=predict, progress=bar("quality under perturbation"),
                                    clean=metrics["cases"])  # the evaluation above: same slices, key and runs
            out.mkdir(parents=True, exist_ok=True)
            (out / "robustness_quality.json").write_text(json.dumps(q, indent=2) + "\n")
            pooled = [r for c in q["cases"].values() for r in c.values()]
            if len(pooled) >= 2:
                plot_nqm_vs_dice([r["nqm"] for r in pooled], [r["dice"] for r in pooled], out / "robustness_nqm_vs_dice.png",
                                 dice_threshold=opts.failure_dice,
                                 title=f"NQM vs Dice, clean and perturbed (ρ = {q['spearman_nqm_dice']:.3f}, n = {len(pooled)})")
            metrics["robustness_quality"] = {k: v for k, v in q.items() if k != "cases"}
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics


def _quality(params: Any, cfg: Config, checkpoint: Path, data_dir: Path, metrics: dict[str, Any], key: jax.Array,
             predict: PredictFn, out: Path, opts: EvalOptions) -> dict[str, Any]:
    """NQM-Dice statistics of the evaluated cases (threshold from the validation cases when
    evaluating the test split), and ``nqm_vs_dice.png`` when there are >= 2 cases."""
    from mednca_jax.data import load_slices, read_split
    from mednca_jax.evaluate.plots import plot_nqm_vs_dice
    from mednca_jax.evaluate.robustness import quality_summary

    test = {n: r for n, r in metrics["cases"].items() if "nqm" in r and "dice" in r}
    nqm_val = dice_val = None
    split_file = Path(checkpoint) / "split.json"
    if opts.split == "test" and split_file.is_file() and len(test) >= 2:
        val_names = set(read_split(split_file).val)
        val_cases = [c for c in select_cases(checkpoint, data_dir, None, None, cfg.data) if c.name in val_names and c.label is not None]
        if len(val_cases) >= 2:
            vs = load_slices(val_cases, cfg.data, opts.cache_dir, cfg.model.n_out)
            vm = evaluate_cases(params, cfg, vs, val_cases, key, fire_rate=opts.fire_rate, runs=opts.runs,
                                batch_size=opts.batch_size, native=False, predict=predict)
            nqm_val = [r["nqm"] for r in vm["cases"].values()]
            dice_val = [r["dice"] for r in vm["cases"].values()]
    q = quality_summary([r["nqm"] for r in test.values()], [r["dice"] for r in test.values()], nqm_val, dice_val, opts.failure_dice)
    if "nqm_threshold" in q:  # absent (with a note) for fewer than 2 labelled cases or a constant NQM
        plot_nqm_vs_dice([r["nqm"] for r in test.values()], [r["dice"] for r in test.values()], out / "nqm_vs_dice.png",
                         threshold=q["nqm_threshold"], dice_threshold=opts.failure_dice)
    return q


def _rollout_gif(params, cfg: Config, slices: SliceSet, key, fire_rate, path: Path) -> None:
    """GIF of the rollout of the slice with the most foreground of the first case."""
    from mednca_jax.nca.levels import forward_trajectory
    from mednca_jax.evaluate.plots import rollout_gif

    rows = slices.case_slices(0)
    i = rows[int(np.argmax(slices.labels[rows].reshape(len(rows), -1).sum(axis=1)))]
    fr = cfg.model.fire_rate if fire_rate is None else fire_rate
    traj = jax.jit(forward_trajectory, static_argnums=1)(params, cfg.model, jnp.asarray(slices.images[i : i + 1]), key, fr)
    rollout_gif(np.asarray(traj[:, 0]), path, cfg.model.n_in)
