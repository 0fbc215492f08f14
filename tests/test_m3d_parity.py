"""M3D-NCA (3D) as data: the original's two-level hippocampus model, imported from its state
dicts, reproduces the logits the original code computed (``../shared/reference/m3d_hippocampus``).

The level rule is the registries' ``depthwise`` perception (kernel 7, then 3) and the ``mlp``
update with ``norm = "batch"``, composed by ``levels.forward`` with ``downscale = "max"``:
no 3D-specific model code.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REFERENCE, require

from mednca_jax.config import ModelConfig
from mednca_jax.nca.backends import REFERENCE as REFERENCE_BACKEND
from mednca_jax.nca.levels import forward, init_params, level_rule
from mednca_jax.nca.weights import WeightsError, load_torch_weights, params_to_torch_level, torch_level_to_params

FIXTURE = REFERENCE / "m3d_hippocampus"
M3D = ModelConfig(
    channels=16, hidden=64, steps=(10, 10), scales=(2, 1), kernel_size=(7, 3), perception="depthwise", norm="batch",
    downscale="max", fire_rate=0.5, patch_size=0,
)


def test_m3d_weights_round_trip_through_the_original_layout():
    params = init_params(M3D, jax.random.PRNGKey(0), ndim=3)
    for i in range(2):
        rule = level_rule(M3D, i, 3)
        sd = params_to_torch_level(params[f"level{i}"], rule)
        k = rule.kernel_size
        assert sd["p0.weight"].shape == (16, 1, k, k, k) and sd["bn.weight"].shape == (64,) and sd["fc0.weight"].shape == (64, 32)
        back = torch_level_to_params(sd, rule)
        for a, b in zip(jax.tree_util.tree_leaves(back), jax.tree_util.tree_leaves(params[f"level{i}"])):
            np.testing.assert_array_equal(a, b)
    # the kernel's axes are permuted, not only reshaped: an asymmetric kernel tells them apart
    w = np.arange(16 * 27, dtype=np.float32).reshape(16, 1, 3, 3, 3)
    sd = {"p0.weight": w, "p0.bias": np.zeros(16), "fc0.weight": np.zeros((64, 32)), "fc0.bias": np.zeros(64),
          "bn.weight": np.ones(64), "bn.bias": np.zeros(64), "fc1.weight": np.zeros((16, 64))}
    kernel = torch_level_to_params(sd, level_rule(M3D, 1, 3))["p0"]["kernel"]
    assert kernel.shape == (3, 3, 3, 16, 1)
    assert kernel[2, 0, 1, 5, 0] == w[5, 0, 0, 1, 2]  # ours (x, y, z) = original (y, z, x)
    with pytest.raises(WeightsError, match="bn.weight"):
        torch_level_to_params({k: v for k, v in sd.items() if k != "bn.weight"}, level_rule(M3D, 1, 3))


@pytest.mark.slow
def test_m3d_fixture_logits_of_the_original():
    require(FIXTURE / "fixture.npz", FIXTURE / "model0.pth")
    pytest.importorskip("torch")
    params = load_torch_weights([FIXTURE / "model0.pth", FIXTURE / "model1.pth"], M3D)
    with np.load(FIXTURE / "fixture.npz") as f:
        image, want = f["image"], f["logits"]
    logits = jax.jit(lambda p, x: forward(p, M3D, x, jax.random.PRNGKey(0), 0.0, backend=REFERENCE_BACKEND))(
        params, jnp.asarray(image[None, ..., None], jnp.float32)
    )
    got = np.asarray(logits)[0, ..., 0]
    span = float(want.max() - want.min())
    assert span > 25  # about -21 ... 9
    assert np.abs(got - want).max() <= 1e-3 * span
    np.testing.assert_array_equal(got > 0, want > 0)
