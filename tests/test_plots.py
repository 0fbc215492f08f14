"""Plots and GIF are written and are valid images (opened with Pillow)."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("matplotlib")
Image = pytest.importorskip("PIL.Image")

from mednca_jax.evaluate import plots  # noqa: E402

RESULTS = {
    "Med-NCA": {
        "gaussian_noise": {"0.0": 0.9, "0.5": {"mean": 0.85, "std": 0.03}, "1.0": {"mean": 0.7, "std": 0.05}},
        "scale": {"48": 0.88, "64": 0.9, "96": 0.89},
    },
    "UNet": {
        "gaussian_noise": {"0.0": 0.92, "0.5": 0.8, "1.0": 0.5},
        "blur": {"0.5": 0.9},
    },
}


def _open(path, fmt):
    with Image.open(path) as im:
        im.load()
        assert im.format == fmt
        return im.size, getattr(im, "n_frames", 1)


def test_plot_robustness_png(tmp_path):
    # JSON round trip: string keys as read back from robustness.json
    results = json.loads(json.dumps(RESULTS))
    p = plots.plot_robustness(results, tmp_path / "sub" / "robustness.png", title="test")
    (w, h), _ = _open(p, "PNG")
    assert w > 300 and h > 150
    with pytest.raises(ValueError, match="no perturbations"):
        plots.plot_robustness({"m": {}}, tmp_path / "x.png")
    with pytest.raises(ValueError, match="no perturbations"):  # clean alone is not a curve
        plots.plot_robustness({"m": {"clean": {"0": {"mean": 0.9, "std": 0.0}}}}, tmp_path / "x.png")


def test_plot_nqm_vs_dice_png(tmp_path):
    rng = np.random.default_rng(0)
    q = rng.uniform(0, 0.2, 12)
    d = 0.95 - 2 * q + rng.normal(0, 0.02, 12)
    p = plots.plot_nqm_vs_dice(q, d, tmp_path / "nqm.png", threshold=0.1, dice_threshold=0.7)
    (w, h), _ = _open(p, "PNG")
    assert w > 200 and h > 200
    plots.plot_nqm_vs_dice(q, d, tmp_path / "nqm2.png")  # no thresholds


def test_case_panel_png(tmp_path):
    yy, xx = np.mgrid[:32, :32]
    label = ((yy - 16) ** 2 + (xx - 14) ** 2 < 36).astype(np.float32)
    p = plots.case_panel(label * 0.5 + 0.2, label[..., None] * 0.9, label, np.abs(yy - 16) / 16.0, tmp_path / "case.png", title="case 1")
    (w, h), _ = _open(p, "PNG")
    assert w > 3 * h  # four panels side by side
    with pytest.raises(ValueError, match="one \\(H, W\\) slice"):
        plots.case_panel(np.zeros((2, 4, 4)), label, label, label, tmp_path / "bad.png")


def test_rollout_gif(tmp_path):
    T, H, W, C = 6, 16, 16, 4
    traj = np.zeros((T, H, W, C), np.float32)
    traj[..., 0] = np.linspace(0, 1, W)[None, None, :]
    traj[..., 1] = np.linspace(-5, 5, T)[:, None, None]  # logit grows over the rollout
    p = plots.rollout_gif(traj, tmp_path / "rollout.gif", n_in=1, fps=5)
    size, frames = _open(p, "GIF")
    assert frames == T and size == (256, 256)
    with Image.open(p) as im:
        im.seek(T - 1)
        last = np.asarray(im.convert("RGB"), float)
        im.seek(0)
        first = np.asarray(im.convert("RGB"), float)
    assert last[128:, :, 0].mean() > first[128:, :, 0].mean() + 20  # more red as p -> 1
    with pytest.raises(ValueError, match="C > n_in"):
        plots.rollout_gif(traj[..., :1], tmp_path / "bad.gif", n_in=1)


def test_perturbation_gallery_png(tmp_path):
    yy, xx = np.mgrid[:32, :32]
    img = 0.2 + 0.6 * ((yy - 16) ** 2 + (xx - 16) ** 2 < 64)
    (w, h), _ = _open(plots.plot_perturbation_examples(img, tmp_path / "gallery.png", 0.75), "PNG")
    assert w > h


def test_markdown_table():
    md = plots.markdown_table(RESULTS)
    lines = md.strip().splitlines()
    assert lines[0] == "| perturbation | severity | Med-NCA | UNet |"
    assert "| gaussian_noise | 0.5 | 0.850 ± 0.030 | 0.800 |" in lines
    assert "| scale | 48 px | 0.880 | – |" in lines
    assert "| blur | 0.5 | – | 0.900 |" in lines
    assert len(lines) == 2 + 3 + 3 + 1


def test_training_curves_png(tmp_path):
    from PIL import Image

    from mednca_jax.evaluate.plots import plot_training_curves

    logs = {"nca": [{"minutes": 1.0, "val_dice": 0.5}, {"minutes": 2.0, "loss": 0.3}, {"minutes": 3.0, "val_dice": 0.7}]}
    path = plot_training_curves(logs, tmp_path / "curve.png", title="t")
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size[0] > 200


def test_compared_models_with_one_label_are_all_kept():
    # two runs of one config are both "nca:name" in their robustness.json
    from mednca_jax.evaluate.evaluation import merge_models

    combined = {"nca:m3d": {"clean": {"0": 0.9}}}
    merge_models(combined, {"nca:m3d": {"clean": {"0": 0.8}}, "unet:u": {"clean": {"0": 0.7}}}, "runs/a/rob")
    merge_models(combined, {"nca:m3d": {"clean": {"0": 0.6}}}, "runs/a/rob")
    assert combined == {
        "nca:m3d": {"clean": {"0": 0.9}},
        "nca:m3d (runs/a/rob)": {"clean": {"0": 0.8}},
        "unet:u": {"clean": {"0": 0.7}},
        "nca:m3d (runs/a/rob 2)": {"clean": {"0": 0.6}},
    }
    assert "nca:m3d (runs/a/rob)" in plots.markdown_table(combined)
