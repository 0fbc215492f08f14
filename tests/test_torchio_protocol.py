"""The torchio artefact protocol: OctreeNCA's parameters, determinism, errors. evaluate.py's
files for it: tests/test_trainer.py::test_evaluate_quality_and_robustness_outputs."""

import numpy as np
import pytest

from mednca_jax.errors import UsageError
from mednca_jax.evaluate.evaluation import EvalOptions
from mednca_jax.evaluate.perturbations_torchio import TORCHIO_LEVELS, TORCHIO_PROTOCOL, apply_torchio, torchio_transform

tio = pytest.importorskip("torchio", reason="the torchio extra is not installed (pip install 'mednca-jax[torchio]')")


def _slices(n=3, size=32, seed=0):
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[:size, :size] / size
    base = 0.2 + 0.6 * np.exp(-((y - 0.5) ** 2 + (x - 0.5) ** 2) / 0.05)
    return np.clip(base[None] + 0.02 * rng.standard_normal((n, size, size)), 0, 1).astype(np.float32)


@pytest.mark.parametrize("s", [1, 3, 5])
def test_transforms_carry_octreenca_parameters(s):
    """torchio reads a single number d as the range (lower bound, d); the protocol's d are OctreeNCA's."""
    ghost = torchio_transform("RandomGhosting", s)
    assert tuple(ghost.num_ghosts_range) == (0, s) and tuple(ghost.intensity_range) == pytest.approx((0, 0.5 * s))
    assert tuple(torchio_transform("RandomAnisotropy", s).downsampling_range) == pytest.approx((1, s))
    assert tuple(torchio_transform("RandomBiasField", s).coefficients_range) == pytest.approx((-0.1 * s, 0.1 * s))
    assert tuple(torchio_transform("RandomNoise", s).std_range) == pytest.approx((0, 0.1 * s))
    assert tuple(torchio_transform("RandomBlur", s).std_ranges) == pytest.approx((0, 0.5 * s) * 3)


@pytest.mark.parametrize("name", list(TORCHIO_PROTOCOL))
def test_apply_is_seeded_clipped_and_changes_the_image(name):
    images = _slices()
    a = apply_torchio(name, images, 5, seed=1)
    b = apply_torchio(name, images, 5, seed=1)
    np.testing.assert_array_equal(a, b)
    assert a.shape == images.shape and a.dtype == np.float32
    assert a.min() >= 0.0 and a.max() <= 1.0
    assert np.abs(a - images).max() > 1e-3  # level 5 visibly perturbs at least one slice
    if name == "RandomNoise":  # the strongest draws differ between seeds
        assert not np.array_equal(a, apply_torchio(name, images, 5, seed=2))


def test_noise_grows_with_level():
    images = _slices(n=16)
    err = [np.abs(apply_torchio("RandomNoise", images, s, seed=0) - images).mean() for s in TORCHIO_LEVELS]
    assert err == sorted(err) and err[-1] > 3 * err[0]


def test_bad_names_and_levels_are_usage_errors():
    with pytest.raises(UsageError, match="valid choices: RandomGhosting"):
        torchio_transform("RandomEarthquake", 1)
    with pytest.raises(UsageError, match="integers 1"):
        torchio_transform("RandomNoise", 6)
    with pytest.raises(UsageError, match="unknown perturbation"):
        EvalOptions(robustness=True, protocols=("ours",), perturbations=["RandomNoise"]).check()
    with pytest.raises(UsageError, match="--protocol must be"):
        EvalOptions(robustness=True, protocols=("nnunet",)).check()
    EvalOptions(robustness=True, protocols=("ours", "torchio"), perturbations=["RandomNoise", "gamma"]).check()


def test_missing_extra_says_how_to_install(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_torchio(name, *args, **kwargs):
        if name == "torchio":
            raise ImportError("No module named 'torchio'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_torchio)
    with pytest.raises(UsageError, match=r"pip install 'mednca-jax\[torchio\]'"):
        EvalOptions(robustness=True, protocols=("torchio",)).check()


# ----------------------------------------------------------------------------- 3D volumes


def _volumes(n=2, shape=(20, 18, 16), seed=0):
    rng = np.random.default_rng(seed)
    g = np.meshgrid(*[np.arange(k) / k for k in shape], indexing="ij")
    base = 0.2 + 0.6 * np.exp(-sum((gi - 0.5) ** 2 for gi in g) / 0.05)
    return np.clip(base[None] + 0.02 * rng.standard_normal((n, *shape)), 0, 1).astype(np.float32)


@pytest.mark.parametrize("name", list(TORCHIO_PROTOCOL))
def test_apply_on_volumes_is_seeded_clipped_and_changes_them(name):
    vols = _volumes()
    a = apply_torchio(name, vols, 5, seed=1, ndim=3)
    np.testing.assert_array_equal(a, apply_torchio(name, vols, 5, seed=1, ndim=3))
    assert a.shape == vols.shape and a.dtype == np.float32
    assert a.min() >= 0.0 and a.max() <= 1.0
    assert np.abs(a - vols).max() > 1e-3


def test_volumes_are_perturbed_in_3d():
    """A volume is one torchio image: blur spreads along Z too, anisotropy may pick Z."""
    vol = np.zeros((1, 16, 16, 16), np.float32)
    vol[0, 8, 8, 8] = 1.0
    blurred = apply_torchio("RandomBlur", vol, 5, seed=0, ndim=3)[0]
    assert blurred[8, 8, 7] > 0 and blurred[8, 8, 9] > 0
    assert tuple(torchio_transform("RandomAnisotropy", 3, ndim=3).axes) == (0, 1, 2)
    assert tuple(torchio_transform("RandomAnisotropy", 3).axes) == (0, 1)
    with pytest.raises(ValueError, match=r"\(B, X, Y, Z\) volumes"):
        apply_torchio("RandomNoise", vol[0], 1, seed=0, ndim=3)
