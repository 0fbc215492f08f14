"""Parity without ../shared: JAX and both export runtimes against logits of the independent
PyTorch reference, stored in ``tests/golden/parity_small.npz`` (``tests/golden/make_golden.py``
makes it; see its docstring for the shapes and why they were chosen)."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from mednca_jax.config import Config, DataConfig, ModelConfig, TrainConfig, validate
from mednca_jax.export import export_numpy, export_torch, load_runtime_module, npz_arrays_to_params
from mednca_jax.machine import backend_for
from mednca_jax.nca.levels import forward, segment

GOLDEN_DIR = Path(__file__).resolve().parent / "golden"
# float32 over 12 steps with logits up to |3.4|: the implementations agree to ~1e-6; 1e-4
# leaves room for another summation order while any real mistake (a transposed kernel, a
# missing bias, a swapped level) moves logits by 1e-2 or more (test_a_perturbed_weight...).
ATOL = RTOL = 1e-4


@pytest.fixture(scope="module")
def golden():
    with np.load(GOLDEN_DIR / "parity_small.npz") as z:
        g = {k: z[k] for k in z.files}
    h, w = g["images"].shape[1:3]
    cfg = validate(Config(
        name="golden",
        model=ModelConfig(channels=int(g["channels"]), hidden=int(g["hidden"]), steps=tuple(int(s) for s in g["steps"]),
                          scales=tuple(int(s) for s in g["scales"]), fire_rate=0.5, patch_size=0, remat="none"),
        data=DataConfig(image_size=(int(h), int(w))),
        train=TrainConfig(batch_size=2, num_steps=1),
    ))
    return g, cfg, npz_arrays_to_params(g, cfg)


def _backend(cfg, name: str):
    return backend_for(dataclasses.replace(cfg.model, backend=name))


@pytest.mark.parametrize("backend", ["reference", "cpu_fast"])
def test_golden_jax_forward_matches_the_torch_reference(golden, backend):
    g, cfg, params = golden
    got = np.asarray(forward(params, cfg.model, g["images"], jax.random.PRNGKey(0), 0.0, backend=_backend(cfg, backend)))
    assert got.shape == g["logits"].shape
    np.testing.assert_allclose(got, g["logits"], atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("backend", ["reference", "cpu_fast"])
def test_golden_fixed_fire_masks_match_the_torch_reference(golden, backend):
    """Fire rate 0.5 with the reference's own masks: the stochastic update, minus the PRNG."""
    g, cfg, params = golden
    masks = [jax.numpy.asarray(g["masks0"]), jax.numpy.asarray(g["masks1"])]
    assert 0.3 < float(g["masks1"].mean()) < 0.7
    assert np.abs(g["logits_masked"] - g["logits"]).max() > 10 * ATOL  # the masks matter
    got = np.asarray(forward(params, cfg.model, g["images"], jax.random.PRNGKey(0), 0.5, backend=_backend(cfg, backend),
                             masks=masks))
    np.testing.assert_allclose(got, g["logits_masked"], atol=ATOL, rtol=RTOL)


def test_golden_jax_segment_gives_the_reference_probabilities(golden):
    g, cfg, params = golden
    got = np.asarray(segment(params, cfg, g["images"][..., 0], jax.random.PRNGKey(0), fire_rate=0.0))
    want = 1.0 / (1.0 + np.exp(-g["logits"].astype(np.float64)))
    np.testing.assert_allclose(got, want, atol=ATOL)


def test_golden_numpy_runtime_matches_the_torch_reference(golden, tmp_path):
    g, cfg, params = golden
    export_numpy(params, cfg, tmp_path)
    rt = load_runtime_module(tmp_path / "mednca_numpy.py", "mednca_numpy_golden")
    got = rt.MedNCA.load(tmp_path).segment(g["images"], fire_rate=0.0, return_logits=True)
    np.testing.assert_allclose(got, g["logits"], atol=ATOL, rtol=RTOL)


def test_golden_torch_runtime_matches_the_torch_reference(golden, tmp_path):
    torch = pytest.importorskip("torch")
    g, cfg, params = golden
    export_torch(params, cfg, tmp_path)
    rt = load_runtime_module(tmp_path / "mednca_torch.py", "mednca_torch_golden")
    torch.set_num_threads(1)
    got = rt.MedNCATorch.load(tmp_path).segment(g["images"], fire_rate=0.0, return_logits=True)
    np.testing.assert_allclose(np.asarray(got), g["logits"], atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("where", ["level0.p0.kernel", "level1.fc0.bias", "level1.fc1.kernel"])
def test_golden_a_perturbed_weight_fails_the_tolerance(golden, where):
    """The comparison above can fail: one weight array 5 % off moves the logits past ATOL."""
    g, cfg, _ = golden
    bad = {**g, where: g[where] * np.float32(1.05)}
    got = np.asarray(forward(npz_arrays_to_params(bad, cfg), cfg.model, g["images"], jax.random.PRNGKey(0), 0.0))
    assert np.abs(got - g["logits"]).max() > 10 * ATOL


def test_golden_transposed_image_fails_the_tolerance(golden):
    """Swapping H and W of every kernel (the classic layout mistake) is caught."""
    g, cfg, _ = golden
    bad = {k: (np.swapaxes(v, 0, 1) if k.endswith(("p0.kernel", "p1.kernel")) else v) for k, v in g.items()}
    got = np.asarray(forward(npz_arrays_to_params(bad, cfg), cfg.model, g["images"], jax.random.PRNGKey(0), 0.0))
    assert np.abs(got - g["logits"]).max() > 10 * ATOL


@pytest.mark.slow
def test_golden_file_is_reproduced_by_its_script():
    pytest.importorskip("torch")
    sys.path.insert(0, str(GOLDEN_DIR))
    import make_golden

    assert make_golden.main(["--check"]) == 0
