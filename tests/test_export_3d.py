"""The exported runtimes (NumPy, PyTorch, ONNX) on 3D checkpoints, against JAX.

- A tiny two-level volume model (depthwise kernels 5 then 3, batch norm, max downscale; the
  random weights of ``tests/test_export.py::volume_case``) at fire rate 0.5 on the ONNX
  graph's own fire masks: the NumPy and PyTorch runtimes given those masks, the ONNX graph
  drawing them from its seed, and the JAX reference given them, all agree.
- The command line on a volume model: original-layout state dicts -> ``from-torch`` ->
  ``to-numpy --verify`` / ``to-torch`` / ``to-onnx --verify``, then the NumPy runtime file as
  a program on a ``.npy`` of volumes.
- The original M3D-NCA hippocampus model, imported from its state dicts and exported through
  ``export_numpy`` / ``export_torch`` / ``export_onnx``, reproduces the original's logits on
  the fixture volume (64x64x52, fire 0) in every runtime (skips without ``../shared``).

CPU budget: torch and onnxruntime run with 1 thread; the tiny case is a few seconds, the
fixture case is marked slow.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import require
from test_export import assert_close_to_reference, volume_case
from test_m3d_parity import FIXTURE as M3D_FIXTURE, M3D

from mednca_jax.config import Config, DataConfig, TrainConfig, validate
from mednca_jax.export import export_numpy, export_torch, load_runtime_module
from mednca_jax.nca.backends import REFERENCE as REFERENCE_BACKEND
from mednca_jax.nca.levels import forward

torch = pytest.importorskip("torch")

# The original hippocampus example (REFERENCE.md, "M3D-NCA (3D)") as a config on its grid.
M3D_CONFIG = Config(name="m3d_hippocampus", model=M3D, data=DataConfig(image_size=(64, 64, 52)),
                    train=TrainConfig(batch_size=1, num_steps=1))


@pytest.fixture(autouse=True)
def torch_one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def load_runtimes(params, cfg: Config, base, name: str) -> dict:
    """Export ``params`` to every runtime under ``base``: ``{"numpy": MedNCA, "torch":
    MedNCATorch, "onnx": path or None}`` (None when onnx/onnxruntime are missing)."""
    export_numpy(params, cfg, base / "np")
    export_torch(params, cfg, base / "pt")
    out = {"numpy": load_runtime_module(base / "np" / "mednca_numpy.py", f"{name}_np").MedNCA.load(base / "np"),
           "torch": load_runtime_module(base / "pt" / "mednca_torch.py", f"{name}_pt").MedNCATorch.load(base / "pt"),
           "onnx": None}
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError:
        return out
    from mednca_jax.export import export_onnx

    export_onnx(params, cfg, base / "onnx")
    out["onnx"] = base / "onnx" / "mednca.onnx"
    return out


def test_3d_runtimes_on_the_same_fire_masks_equal_jax(tmp_path):
    """Fire 0.5 in 3D, two levels: every runtime's logits within 1e-4 (relative to the largest
    logit) of the JAX reference on the same masks; the masks matter (fire 0 differs)."""
    from mednca_jax.export.onnx_export import fire_masks

    cfg, params, x, at_zero = volume_case()
    m = cfg.model
    runtimes = load_runtimes(params, cfg, tmp_path, "vol_masks")
    seed = 3
    masks = fire_masks(seed, 0.5, m.steps, [(x.shape[0],) + tuple(n // f for n in x.shape[1:-1]) for f in m.scales])
    assert all(0.4 < a.mean() < 0.6 for a in masks)
    ref = np.asarray(forward(params, m, jnp.asarray(x), jax.random.PRNGKey(0), 0.5, backend=REFERENCE_BACKEND,
                             masks=[jnp.asarray(a) for a in masks]))
    assert np.abs(ref - at_zero).max() > 1e-2 * np.abs(ref).max()  # the masks change the result
    assert_close_to_reference(runtimes["numpy"].logits(x, masks=masks), ref, "NumPy runtime, 3D, given masks")
    got = runtimes["torch"].predict(torch.from_numpy(x), masks=[torch.from_numpy(a) for a in masks]).numpy()
    assert_close_to_reference(got, ref, "PyTorch runtime, 3D, given masks")
    if runtimes["onnx"] is not None:
        from mednca_jax.export import onnx_logits

        got = onnx_logits(runtimes["onnx"], x[..., 0], 0.5, seed=seed)
        assert_close_to_reference(got, ref, "ONNX export, 3D, its seeded masks")


@pytest.mark.slow
def test_runtimes_reproduce_the_original_m3d_logits(tmp_path):
    """The original M3D-NCA's weights (kernel 7 then 3, depthwise, batch norm, max pool x2,
    10 + 10 steps), imported and exported, on the fixture volume at fire 0: each runtime
    within 1e-4 of the logits' range of the original's logits, same foreground."""
    require(M3D_FIXTURE / "fixture.npz", M3D_FIXTURE / "model0.pth", M3D_FIXTURE / "model1.pth")
    from mednca_jax.nca.weights import load_torch_weights

    cfg = validate(M3D_CONFIG)
    params = load_torch_weights([M3D_FIXTURE / "model0.pth", M3D_FIXTURE / "model1.pth"], cfg.model)
    with np.load(M3D_FIXTURE / "fixture.npz") as f:
        image, want = f["image"].astype(np.float32), f["logits"]
    span = float(want.max() - want.min())
    assert span > 25  # about -21 ... 9
    runtimes = load_runtimes(params, cfg, tmp_path, "m3d_fixture")
    got = {"numpy": runtimes["numpy"].segment(image, fire_rate=0.0, return_logits=True)[..., 0],
           "torch": runtimes["torch"].segment(image, fire_rate=0.0, return_logits=True).numpy()[..., 0]}
    if runtimes["onnx"] is not None:
        from mednca_jax.export import onnx_logits

        got["onnx"] = onnx_logits(runtimes["onnx"], image[None], 0.0)[0, ..., 0]
    # Measured 4-6e-5 for all three; 1e-4 x range (3e-3) also catches the ONNX graph's float32
    # batch-norm means (5.2e-3).
    for name, z in got.items():
        assert z.shape == want.shape, name
        err = float(np.abs(z - want).max())
        assert err <= 1e-4 * span, f"{name}: max |logit difference| {err:.2e} > 1e-4 x range {span:.1f}"
        assert np.array_equal(z > 0, want > 0), name


@pytest.mark.slow
def test_edge_memory_benchmark_volume_row(tmp_path):
    """benchmarks/edge_memory.py --volumes: a 3D row of the NumPy runtime after the slice
    rows, with its figures in the JSON; a malformed shape is one error line, exit 2."""
    import json
    import subprocess
    import sys

    from conftest import REPO

    out = tmp_path / "edge.json"
    cmd = [sys.executable, "benchmarks/edge_memory.py", "--sizes", "64", "--rounds", "1", "--runtimes", "numpy"]
    res = subprocess.run(cmd + ["--volumes", "16x16x12", "--json", str(out)], cwd=REPO, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    fig = json.loads(out.read_text())
    assert [(r["size"], r["runtime"]) for r in fig["rows"]] == [(64, "numpy"), ("16x16x12", "numpy")]
    assert fig["failures"] == [] and fig["volume_weights"]
    assert fig["rows"][1]["segment_s_median"] > 0 and 20 < fig["rows"][1]["peak_rss_mib"] < 150
    assert "| 16×16×12 | numpy |" in res.stdout
    bad = subprocess.run(cmd + ["--volumes", "16x16"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines() == [
        "error: --volumes takes shapes XxYxZ of even sizes (the model's scale 2), e.g. 64x64x52; got ['16x16']"]


VOLUME_TOML = """name = "volume_cli"
[model]
channels = 6
hidden = 8
steps = [3, 3]
scales = [2, 1]
kernel_size = [5, 3]
perception = "depthwise"
norm = "batch"
downscale = "max"
fire_rate = 0.5
patch_size = 0
[data]
image_size = [8, 8, 8]
[train]
batch_size = 2
num_steps = 1
"""


def test_export_cli_round_trip_of_a_volume_model(tmp_path, capsys):
    """Original-layout 3D state dicts -> ``from-torch`` -> ``to-numpy --verify`` / ``to-torch`` /
    ``to-onnx --verify``: every command succeeds, the hints name volumes, and the written
    ``mednca_numpy.py`` segments a ``.npy`` of volumes as a program."""
    import subprocess
    import sys

    from test_export import numpy_params

    from mednca_jax.export.__main__ import main as export_main
    from mednca_jax.nca.weights import params_to_torch_state_dicts

    cfg, _, x, _ = volume_case()
    toml = tmp_path / "volume.toml"
    toml.write_text(VOLUME_TOML)
    pths = []
    for i, sd in enumerate(params_to_torch_state_dicts(numpy_params(cfg, ndim=3), cfg.model, ndim=3)):
        pths.append(tmp_path / f"model{i}.pth")
        torch.save({k: torch.from_numpy(v) for k, v in sd.items()}, pths[-1])
    run = tmp_path / "run"
    assert export_main(["from-torch", "--config", str(toml), "--weights", *map(str, pths), "--out", str(run)]) == 0
    assert export_main(["to-numpy", "--checkpoint", str(run), "--out", str(tmp_path / "np"), "--verify"]) == 0
    out = capsys.readouterr().out
    assert "IN.npy OUT.npy" in out and "volumes (B, X, Y, Z)" in out and "IN.nii.gz" not in out
    assert float(out.split("logits(JAX)| = ")[1].split()[0]) <= 1e-4
    assert export_main(["to-torch", "--checkpoint", str(run), "--out", str(tmp_path / "pt")]) == 0
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError:
        pass
    else:
        assert export_main(["to-onnx", "--checkpoint", str(run), "--out", str(tmp_path / "onnx"), "--verify"]) == 0
        assert "images (B, X, Y, Z) float32" in capsys.readouterr().out
    np.save(tmp_path / "in.npy", x[..., 0])
    res = subprocess.run([sys.executable, str(tmp_path / "np" / "mednca_numpy.py"), str(tmp_path / "np"), str(tmp_path / "in.npy"),
                          str(tmp_path / "out.npy"), "--logits", "--fire-rate", "0"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    model = load_runtime_module(tmp_path / "np" / "mednca_numpy.py", "vol_cli_np").MedNCA.load(tmp_path / "np")
    want = model.segment(x, fire_rate=0.0, return_logits=True)
    assert np.abs(want).max() > 0.1
    np.testing.assert_array_equal(np.load(tmp_path / "out.npy"), want)
