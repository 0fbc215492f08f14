"""The robustness suites on 3D models: each case one volume ``(X, Y, Z)``, perturbed whole,
scored by its per-volume Dice, inferred one volume per call; the ``"scale"`` entry on the model
grid times 0.75 / 1 / 1.5. The CLI on a trained 3D run: tests/test_volumes_pipeline.py."""

from __future__ import annotations

import jax
import nibabel as nib
import numpy as np
import pytest
from conftest import machine_backend

from mednca_jax.config import Config, DataConfig, ModelConfig, TrainConfig, validate
from mednca_jax.data import SliceSet
from mednca_jax.evaluate.inference import make_predict_fn
from mednca_jax.evaluate.perturbations import PERTURBATIONS, apply_perturbation
from mednca_jax.evaluate.robustness import SCALE, per_case_dice, robustness_suite, torchio_suite
from mednca_jax.networks import init_network_params

GRID = (16, 16, 12)


def volume_cfg() -> Config:
    return validate(Config(
        name="tiny3d",
        model=ModelConfig(channels=8, hidden=16, steps=(2, 2), scales=(2, 1), patch_size=0, fire_rate=0.5, remat="none",
                          perception="depthwise", kernel_size=(3,), downscale="max"),
        data=DataConfig(image_size=GRID),
        train=TrainConfig(batch_size=1, num_steps=1),
    ))


def volume_set(k: int = 3, seed: int = 0) -> SliceSet:
    """``k`` cases, each one ball volume on the grid: images ``(k, *GRID, 1)``, labels alike."""
    rng = np.random.default_rng(seed)
    g = np.meshgrid(*[np.arange(n, dtype=np.float64) for n in GRID], indexing="ij")
    images, labels = [], []
    for _ in range(k):
        c = rng.uniform(5, 7, 3) * np.array(GRID) / 12
        d = np.sqrt(sum((gi - ci) ** 2 for gi, ci in zip(g, c)))
        r = rng.uniform(3.0, 4.0)
        labels.append((d < r).astype(np.float32))
        images.append((0.1 + 0.8 / (1 + np.exp(3 * (d - r)))).astype(np.float32))
    return SliceSet(
        images=np.stack(images)[..., None], labels=np.stack(labels)[..., None],
        case_index=np.arange(k, dtype=np.int32), slice_index=np.zeros(k, np.int32),
        case_names=tuple(f"case_{i}" for i in range(k)), native_shapes=(GRID,) * k, affines=np.stack([np.eye(4)] * k),
        headers=(nib.Nifti1Header(),) * k, image_paths=(None,) * k,
    )


def test_per_case_dice_is_the_dice_of_each_volume():
    slices = volume_set()
    probs = slices.labels.copy()
    probs[1] = 0.0  # case 1 predicts nothing
    probs[2, :8] = 1.0 - probs[2, :8]  # case 2: half of the grid inverted
    t, p = slices.labels[2] > 0.5, probs[2] > 0.5
    want = 2 * (t & p).sum() / (t.sum() + p.sum())
    np.testing.assert_allclose(per_case_dice(probs, slices.labels, slices), [1.0, 0.0, want])


def test_suite_on_volumes_with_an_intensity_threshold_model():
    """The "model" segments voxels brighter than 0.5, so Dice measures the perturbations
    themselves: 1 clean, 1 under translation (the label moves with the image), high under
    rotation, lower under strong noise; every call gets one whole volume."""
    cfg, slices = volume_cfg(), volume_set()
    seen = []

    def predict(params, images, key, fire_rate):
        seen.append(tuple(images.shape))
        return images

    res = robustness_suite(None, cfg, slices, jax.random.PRNGKey(0), severities=[0.5, 1.0], batch_size=32, predict=predict)
    assert set(res) == {"clean", *PERTURBATIONS, SCALE}
    for name in PERTURBATIONS:
        assert set(res[name]) == {"0", "0.5", "1.0"} and res[name]["0"] == res["clean"]["0"]
        for cell in res[name].values():
            assert 0.0 <= cell["mean"] <= 1.0 and cell["std"] >= 0.0
    assert res["clean"]["0"]["mean"] == 1.0
    assert res["translation"]["1.0"]["mean"] == 1.0
    assert res["rotation"]["1.0"]["mean"] > 0.85
    assert res["gaussian_noise"]["1.0"]["mean"] < res["gaussian_noise"]["0.5"]["mean"] < 1.0
    # scale: grid x 0.75 / 1 / 1.5, sides multiples of the coarsest scale (2), keyed by X
    assert set(res[SCALE]) == {"12", "16", "24"} and res[SCALE]["16"] == res["clean"]["0"]
    assert all(cell["mean"] > 0.75 for cell in res[SCALE].values())  # small balls: resampling edges
    assert {s[0] for s in seen} == {1} and {s[1:] for s in seen} == {(*GRID, 1), (12, 12, 8, 1), (24, 24, 18, 1)}
    # a cell is the per-volume Dice of the perturbed volumes, perturbed as volumes (ndim=3)
    imgs, labs = apply_perturbation("rotation", slices.images[..., 0], slices.labels, 1.0, 0, ndim=3)
    d = per_case_dice(imgs[..., None], labs, slices)
    assert res["rotation"]["1.0"] == {"mean": float(d.mean()), "std": float(d.std())}


def test_suite_on_a_tiny_3d_nca():
    """Random weights: what matters is that the suite runs the compiled 3D model on every
    perturbation, severity and grid and reports Dice per case."""
    cfg, slices = volume_cfg(), volume_set(k=2)
    params = init_network_params(cfg, jax.random.PRNGKey(1))
    predict = make_predict_fn(cfg, machine_backend(cfg))
    res = robustness_suite(params, cfg, slices, jax.random.PRNGKey(0), perturbations=list(PERTURBATIONS) + [SCALE],
                           severities=[1.0], predict=predict)
    assert set(res) == {"clean", *PERTURBATIONS, SCALE}
    assert all(set(res[n]) == {"0", "1.0"} for n in PERTURBATIONS) and set(res[SCALE]) == {"12", "16", "24"}
    cells = [c for n in res.values() for c in n.values()]
    assert all(0.0 <= c["mean"] <= 1.0 and np.isfinite(c["std"]) for c in cells)


def test_torchio_suite_on_volumes():
    pytest.importorskip("torchio", reason="the torchio extra is not installed (pip install 'mednca-jax[torchio]')")
    cfg, slices = volume_cfg(), volume_set()
    seen = []

    def predict(params, images, key, fire_rate):
        seen.append(tuple(images.shape))
        return images

    res = torchio_suite(None, cfg, slices, jax.random.PRNGKey(0), perturbations=["RandomNoise", "RandomBlur", "RandomAnisotropy"],
                        levels=(1, 5), predict=predict)
    assert set(res) == {"clean", "RandomNoise", "RandomBlur", "RandomAnisotropy"}
    assert all(set(res[n]) == {"0", "1", "5"} for n in res if n != "clean")
    assert res["clean"]["0"]["mean"] == 1.0 and res["RandomNoise"]["5"]["mean"] < 1.0
    assert set(seen) == {(1, *GRID, 1)}
