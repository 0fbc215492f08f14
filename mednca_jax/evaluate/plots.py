"""Figures for the robustness / quality report: PNG plots (matplotlib, Agg) and a GIF (Pillow).

matplotlib and Pillow are optional extras (``pip install mednca-jax[plots]``); they are
imported inside the functions, so the core package never needs them. Figures are built with
``matplotlib.figure.Figure`` directly (no pyplot): no global state, no GUI backend, safe in
threads and on headless machines.

Robustness results (the same structure as ``robustness.json``)::

    results = {
        model_name: {                                 # e.g. "Med-NCA", "UNet"
            perturbation_name: {                      # e.g. "gaussian_noise", "scale"
                severity: dice,                       # float, or {"mean": m, "std": s}
                ...                                   # keys may be strings ("0.25") as in JSON
            },
        },
    }

For ``"scale"`` the keys are image sizes in pixels (48, 64, ...; 3D models: the first side of
the rescaled grid in voxels), and the x axis says so.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

Results = Mapping[str, Mapping[str, Mapping[Any, Any]]]

SIZE_KEYED = ("scale",)  # perturbations whose keys are image sizes, not severities


def _figure(**kwargs: Any):
    try:
        from matplotlib.figure import Figure
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("plots need matplotlib: pip install 'mednca-jax[plots]'") from e
    return Figure(**kwargs)


def _save(fig: Any, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    return path


def _cell(value: Any) -> tuple[float, float | None]:
    """``(mean, std or None)`` of a result cell (a number or ``{"mean", "std"}``)."""
    if isinstance(value, Mapping):
        std = value.get("std")
        return float(value["mean"]), None if std is None else float(std)
    return float(value), None


def _series(cells: Mapping[Any, Any]) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    items = sorted(((float(k), _cell(v)) for k, v in cells.items()), key=lambda kv: kv[0])
    x = np.array([k for k, _ in items])
    y = np.array([m for _, (m, _) in items])
    stds = [s for _, (_, s) in items]
    return x, y, None if any(s is None for s in stds) else np.array(stds)


def _perturbation_names(results: Results) -> list[str]:
    """Perturbations in first-seen order, without ``"clean"``: it is every curve's severity 0
    already, and a panel of its own would hold one point per model."""
    names: list[str] = []
    for per_model in results.values():
        names += [n for n in per_model if n not in names and n != "clean"]
    return names


def plot_robustness(results: Results, path: str | Path, *, title: str | None = None) -> Path:
    """Dice against severity, one small panel per perturbation, every model in each panel.

    Error bands show ``std`` where given. Returns the written PNG's path.
    """
    names = _perturbation_names(results)
    if not names:
        raise ValueError("plot_robustness: results hold no perturbations")
    ncols = min(4, len(names))
    nrows = math.ceil(len(names) / ncols)
    fig = _figure(figsize=(3.2 * ncols, 2.7 * nrows), layout="constrained")
    axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False)).ravel()
    for ax, name in zip(axes, names):
        for model, per_model in results.items():
            if name not in per_model or not per_model[name]:
                continue
            x, y, s = _series(per_model[name])
            (line,) = ax.plot(x, y, marker="o", ms=3, label=model)
            if s is not None:
                ax.fill_between(x, y - s, y + s, color=line.get_color(), alpha=0.15, lw=0)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("image size (px)" if name in SIZE_KEYED else "severity", fontsize=8)
        ax.set_ylabel("Dice", fontsize=8)
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=7)
    for ax in axes[len(names):]:
        ax.set_visible(False)
    handles, labels = axes[0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="outside upper center", ncols=len(handles), fontsize=9)
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def plot_nqm_vs_dice(
    nqm: Sequence[float],
    dice: Sequence[float],
    path: str | Path,
    threshold: float | None = None,
    *,
    dice_threshold: float | None = None,
    title: str | None = None,
) -> Path:
    """Scatter of per-case NQM (x) against Dice (y), Spearman ρ in the title.

    ``threshold``: NQM threshold drawn as a vertical line (cases right of it are flagged);
    ``dice_threshold``: failure Dice drawn as a horizontal line.
    """
    from mednca_jax.evaluate.quality import spearman

    q, d = np.asarray(nqm, float), np.asarray(dice, float)
    if q.shape != d.shape:
        raise ValueError(f"one NQM per Dice value needed, got {q.size} and {d.size}")
    fig = _figure(figsize=(4.5, 3.6), layout="constrained")
    ax = fig.subplots()
    failed = d < dice_threshold if dice_threshold is not None else np.zeros(d.shape, bool)
    ax.scatter(q[~failed], d[~failed], s=18, label="cases")
    if failed.any():
        ax.scatter(q[failed], d[failed], s=18, color="tab:red", label=f"Dice < {dice_threshold:g}")
    if threshold is not None:
        ax.axvline(threshold, color="k", ls="--", lw=1, label=f"NQM threshold {threshold:.3g}")
    if dice_threshold is not None:
        ax.axhline(dice_threshold, color="tab:red", ls=":", lw=1)
    rho = spearman(q, d) if q.size >= 2 else math.nan
    ax.set_title(title or f"NQM vs Dice (Spearman ρ = {rho:.3f}, n = {q.size})", fontsize=10)
    ax.set_xlabel("NQM (Σ std / Σ mean)")
    ax.set_ylabel("Dice")
    ax.grid(alpha=0.3)
    if threshold is not None or failed.any():
        ax.legend(fontsize=8)
    return _save(fig, path)


def _plane(a: Any, what: str) -> np.ndarray:
    x = np.squeeze(np.asarray(a, dtype=np.float32))
    if x.ndim != 2:
        raise ValueError(f"case_panel: {what} must be one (H, W) slice, got shape {np.shape(a)}")
    return x


def case_panel(
    image: Any,
    pred: Any,
    label: Any,
    variance: Any,
    path: str | Path,
    *,
    title: str | None = None,
    variance_title: str = "std over runs",
) -> Path:
    """Four panels of one ``(H, W)`` slice: input, prediction (probabilities, label contour in
    red), label, and the per-pixel spread over stochastic runs (e.g. ``quality.std_map``, own
    colour scale). Singleton axes are squeezed, so ``(H, W, 1)`` works too."""
    img, p, lab, var = (_plane(a, n) for a, n in ((image, "image"), (pred, "pred"), (label, "label"), (variance, "variance")))
    fig = _figure(figsize=(11, 3.0), layout="constrained")
    axes = fig.subplots(1, 4)
    axes[0].imshow(img, cmap="gray")
    axes[0].set_title("input")
    axes[1].imshow(p, cmap="magma", vmin=0, vmax=1)
    if lab.max() > lab.min():
        axes[1].contour(lab, levels=[0.5], colors="red", linewidths=0.8)
    axes[1].set_title("prediction")
    axes[2].imshow(lab, cmap="gray", vmin=0, vmax=1)
    axes[2].set_title("label")
    im = axes[3].imshow(var, cmap="viridis")
    fig.colorbar(im, ax=axes[3], shrink=0.8)
    axes[3].set_title(variance_title)
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def rollout_gif(
    trajectory: Any, path: str | Path, n_in: int, fps: float = 10.0, *, min_side: int = 256
) -> Path:
    """Animated GIF of an NCA rollout: the input image in grey with the first logit channel's
    sigmoid overlaid in red (opacity 0.6·p), one frame per step, step counter top left.

    Args:
        trajectory: ``(T, H, W, C)`` states (channels ``[0, n_in)`` image, ``n_in`` = logit).
        n_in: number of image channels; channel 0 is shown.
        fps: frames per second.
        min_side: frames are enlarged (nearest neighbour) to at least this many pixels.
    """
    try:
        from PIL import Image, ImageDraw
    except ImportError as e:  # pragma: no cover
        raise ImportError("rollout_gif needs Pillow: pip install 'mednca-jax[plots]'") from e
    t = np.asarray(trajectory, dtype=np.float32)
    if t.ndim != 4 or t.shape[-1] <= n_in:
        raise ValueError(f"trajectory must be (T, H, W, C) with C > n_in = {n_in}, got shape {t.shape}")
    if fps <= 0:
        raise ValueError(f"fps must be > 0, got {fps}")
    T, H, W, _ = t.shape
    grey = np.clip(t[..., 0], 0.0, 1.0)[..., None]
    prob = (1.0 / (1.0 + np.exp(-np.clip(t[..., n_in], -60, 60))))[..., None]
    alpha = 0.6 * prob
    rgb = (1 - alpha) * grey + alpha * np.array([1.0, 0.1, 0.1], np.float32)
    frames_u8 = (np.clip(rgb, 0, 1) * 255).round().astype(np.uint8)
    k = max(1, math.ceil(min_side / min(H, W)))
    frames = []
    for i, f in enumerate(frames_u8):
        im = Image.fromarray(np.repeat(np.repeat(f, k, axis=0), k, axis=1), mode="RGB")
        ImageDraw.Draw(im).text((4, 2), f"step {i}/{T - 1}", fill=(255, 255, 0))
        frames.append(im)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    frames[0].save(
        path, save_all=True, append_images=frames[1:], duration=max(20, int(round(1000 / fps))), loop=0, disposal=1
    )
    return path


def plot_perturbation_examples(
    image: Any, path: str | Path, severity: float = 1.0, seed: int = 0, names: Sequence[str] | None = None
) -> Path:
    """One ``(H, W)`` slice under every registered perturbation at ``severity`` (a gallery)."""
    from mednca_jax.evaluate.perturbations import PERTURBATIONS, apply_perturbation

    img = _plane(image, "image")
    names = list(names or PERTURBATIONS)
    ncols = min(6, len(names) + 1)
    nrows = math.ceil((len(names) + 1) / ncols)
    fig = _figure(figsize=(2.0 * ncols, 2.2 * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    panels = [("clean", img)] + [(n, apply_perturbation(n, img, None, severity, seed)[0]) for n in names]
    for ax, (name, x) in zip(axes, panels):
        ax.imshow(x, cmap="gray", vmin=0, vmax=1)
        ax.set_title(name, fontsize=8)
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    fig.suptitle(f"severity {severity:g}", fontsize=9)
    return _save(fig, path)


def _fmt(value: Any) -> str:
    m, s = _cell(value)
    return f"{m:.3f}" if s is None else f"{m:.3f} ± {s:.3f}"


def markdown_table(results: Results) -> str:
    """A Markdown table: one row per (perturbation, severity), one column per model,
    cells ``mean`` or ``mean ± std``; "–" where a model has no value."""
    models = list(results)
    lines = [
        "| perturbation | severity | " + " | ".join(models) + " |",
        "|---|---:|" + "---:|" * len(models),
    ]
    for name in _perturbation_names(results):
        keys: dict[float, Any] = {}
        for m in models:
            for k in results[m].get(name, {}):
                keys.setdefault(float(k), k)
        for sev in sorted(keys):
            row = []
            for m in models:
                cells = {float(k): v for k, v in results[m].get(name, {}).items()}
                row.append(_fmt(cells[sev]) if sev in cells else "–")
            shown = f"{int(sev)} px" if name in SIZE_KEYED else f"{sev:g}"
            lines.append(f"| {name} | {shown} | " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def plot_training_curves(logs: Mapping[str, Sequence[Mapping[str, Any]]], path: str | Path, *, title: str | None = None) -> Path:
    """Validation Dice against wall-clock minutes, one line per run.

    ``logs``: ``{run_name: records}`` with the records of a run's ``log.jsonl`` (those holding
    ``val_dice`` are drawn).
    """
    fig = _figure(figsize=(6, 3.6), layout="constrained")
    ax = fig.subplots()
    for name, records in logs.items():
        pts = [(r["minutes"], r["val_dice"]) for r in records if "val_dice" in r]
        if pts:
            x, y = zip(*pts)
            ax.plot(x, y, marker="o", ms=3, label=name)
    ax.set_xlabel("minutes of training (2-core CPU)")
    ax.set_ylabel("validation hard Dice (per patient, mean)")
    ax.grid(alpha=0.3)
    ax.legend()
    if title:
        ax.set_title(title)
    return _save(fig, path)
