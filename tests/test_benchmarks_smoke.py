"""The benchmark scripts parse their options and write their JSON (tiny sizes; no timing claims)."""

import json
import os
import subprocess
import sys

import pytest
from conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))

import _harness as H  # noqa: E402
import inference  # noqa: E402
import rollout_memory  # noqa: E402
import train_step  # noqa: E402


def test_benchmarks_measure_the_original_example_config():
    """docs/performance.md's figures are for the original example: the benchmarks' default
    problem must be the one in configs/hippocampus.toml, or the table describes something else."""
    from mednca_jax.config import load_config
    from mednca_jax.named_configs import resolve_config_path

    cfg = load_config(resolve_config_path("hippocampus"))
    m, image = cfg.model, cfg.data.image_size
    assert image[0] == image[1] and m.steps[0] == m.steps[1] and tuple(m.scales) == (4, 1)
    a = train_step.parse_args([])
    assert (a.channels, a.hidden, (a.steps, a.steps), a.fire_rate, a.patch) == (m.channels, m.hidden, tuple(m.steps), m.fire_rate, m.patch_size)
    assert (a.batch, a.image) == (cfg.train.batch_size, image[0])
    b = inference.parse_args([])
    assert (b.channels, b.hidden, b.steps, b.fire_rate, b.image) == (m.channels, m.hidden, m.steps[0], m.fire_rate, image[0])
    c = rollout_memory.parse_args([])
    assert (c.channels, c.hidden, c.image) == (m.channels, m.hidden, image[0])


def test_torch_reference_has_our_parameter_count():
    """The timing reference is the same model: same layers, same sizes (fc1 without bias)."""
    pytest.importorskip("torch")
    import jax
    from torch_reference import TorchMedNCA

    from mednca_jax.config import ModelConfig
    from mednca_jax.nca.levels import init_params
    from mednca_jax.nca.rollout import count_params

    cfg = ModelConfig(channels=16, hidden=128, steps=(64, 64), scales=(4, 1))
    ours = count_params(init_params(cfg, jax.random.PRNGKey(0)))
    theirs = sum(p.numel() for p in TorchMedNCA(16, 128, (64, 64)).parameters())
    assert ours == theirs


def test_parent_only_options_are_not_forwarded_to_workers():
    assert H.worker_argv(["--repeats", "2", "--json", "x.json", "--batch", "4"]) == ["--repeats", "2", "--batch", "4"]
    assert H.worker_argv(["--json=x.json", "--no-torch"]) == ["--no-torch"]


def test_table_and_json(tmp_path):
    t = H.table([["a", 1.23456, 2]], ["name", "x", "n"])
    assert "| a " in t and "1.235" in t
    H.write_json(str(tmp_path / "d" / "f.json"), {"k": 1})
    assert json.loads((tmp_path / "d" / "f.json").read_text()) == {"k": 1}


@pytest.mark.slow
def test_train_step_script_writes_its_json(tmp_path):
    pytest.importorskip("torch")
    out = tmp_path / "train.json"
    cmd = [sys.executable, "benchmarks/train_step.py", "--batch", "2", "--image", "8", "--patch", "4", "--steps", "2",
           "--channels", "4", "--hidden", "4", "--repeats", "1", "--warmup", "0", "--budget-s", "0", "--report-only", "--json", str(out)]
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    fig = json.loads(out.read_text())
    for key in ("step_s_median", "peak_rss_mib", "compile_s", "torch_step_s_median", "torch_peak_rss_mib", "ratio"):
        assert isinstance(fig[key], float) and fig[key] >= 0, key
    # By default one JAX process per usable core (here as on CI: 2 -> the data-parallel group).
    cores = len(os.sched_getaffinity(0))
    assert fig["jax_processes"] == cores
    assert fig["single_process"]["step_s_median"] > 0
    assert fig["jax"]["backend"] == "cpu_fast" and fig["reference"]["step_s_median"] > 0  # the reference row beside it
    assert f"{cores} processes x 1 core, data parallel / torch =" in res.stdout if cores > 1 else "1 process / torch =" in res.stdout


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["original", "channels-last"])
def test_torch_reference_matches_jax_at_fire_0(layout):
    """The timing reference computes what our forward computes (fire 0 is deterministic)."""
    torch = pytest.importorskip("torch")
    import jax
    import numpy as np
    from torch_reference import TorchMedNCA

    from mednca_jax.config import ModelConfig
    from mednca_jax.nca.levels import forward

    args = inference.parse_args(["--channels", "4", "--hidden", "8", "--steps", "3"])
    params = jax.device_get(inference.random_params(args))
    images = inference.make_images(2, 16)
    cfg = ModelConfig(channels=4, hidden=8, steps=(3, 3), scales=(4, 1), fire_rate=0.0)
    want = np.asarray(forward(params, cfg, images, jax.random.PRNGKey(0), 0.0))
    model = TorchMedNCA(4, 8, (3, 3), layout=layout).load_jax(params)
    with torch.inference_mode():
        got = model(torch.from_numpy(images), 0.0).numpy()
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_accelerator_script_runs_every_precision_in_ci_size(tmp_path):
    # The reference backend only: cpu_fast's compile alone took half of this test's three
    # minutes on CI, and cpu_fast is checked against the reference in test_equivalence.
    out = tmp_path / "acc.json"
    res = subprocess.run([sys.executable, "benchmarks/accelerator.py", "--quick", "--backends", "reference", "--json", str(out)], cwd=REPO,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    fig = json.loads(out.read_text())
    assert fig["platform"] == "cpu" and fig["bounds_met"] and f"device: {fig['device']}" in res.stdout
    rows = {(r["backend"], r["precision"]): r for r in fig["rows"]}
    assert set(rows) == {("reference", "float32"), ("reference", "bfloat16")}
    for r in rows.values():
        assert r["train_example_s"] > 0 and r["train_official_s"] > 0 and r["infer_b1_ms_per_slice"] > 0
        assert r["memory_4_compiled_mib"] > 0
    assert 0 < rows[("reference", "bfloat16")]["bf16_logit_error"] < 0.1


@pytest.mark.slow
def test_train_step_3d_script_writes_its_json(tmp_path):
    out = tmp_path / "train3d.json"
    cmd = [sys.executable, "benchmarks/train_step_3d.py", "--quick", "--budget-s", "0", "--report-only", "--json", str(out)]
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    fig = json.loads(out.read_text())
    for name in ("cpu_fast", "reference"):
        assert fig["step_ms_median"][name] > 0 and fig["first_call_s"][name] > 0
    assert fig["speedup"] > 0 and [r["kernel_size"] for r in fig["rules"]] == [7, 3] and fig["rules"][0]["ndim"] == 3
    assert "reference / cpu_fast =" in res.stdout


# --------------------------------------------------------------------------- 3D (M3D-NCA)
def test_3d_benchmarks_measure_m3d_hippocampus():
    """The 3D benchmarks' default problem is M3D-NCA's hippocampus example
    (../shared/reference/REFERENCE.md, "M3D-NCA (3D)"): C=16, hidden 64, kernels [7, 3],
    batch norm, 10 + 10 steps at fire 0.5, batch 4 of 64x64x52, level 0 max-pooled x2, a
    32x32x26 training patch."""
    import memory_3d
    import train_step_3d_torch
    from test_m3d_parity import M3D

    from mednca_jax.nca.levels import level_rules

    m3d = {"channels": 16, "hidden": 64, "kernel_sizes": [7, 3], "norm": "batch", "fire_rate": 0.5, "batch": 4,
           "image": [64, 64, 52], "patch": [32, 32, 26], "perception": "depthwise"}
    for args in (memory_3d.parse_args([]), train_step_3d_torch.parse_args([])):
        assert {k: getattr(args, k) for k in m3d if k != "batch"} == {k: v for k, v in m3d.items() if k != "batch"}
    assert train_step_3d_torch.parse_args([]).batch == 4 and memory_3d.parse_args([]).batch == 1  # memory: one volume, minutes not hours
    assert train_step_3d_torch.parse_args([]).steps == 10 and train_step_3d_torch.parse_args([]).max_ratio == 0.5
    mem = memory_3d.parse_args([])
    assert mem.steps == [10, 40, 160] and mem.max_growth == 2.0 and mem.plain_steps
    cfg = train_step_3d_torch.T.model_config(train_step_3d_torch.parse_args([]))
    assert (tuple(cfg.scales), cfg.downscale, tuple(cfg.steps)) == ((2, 1), "max", (10, 10))
    # the model whose original logits tests/test_m3d_parity.py reproduces, level for level
    assert level_rules(cfg, 3) == level_rules(M3D, 3)
    assert (cfg.steps, cfg.scales, cfg.downscale, cfg.fire_rate) == (M3D.steps, M3D.scales, M3D.downscale, M3D.fire_rate)


def _m3d_tiny():
    import jax
    import numpy as np

    from mednca_jax.config import ModelConfig
    from mednca_jax.nca.levels import init_params

    cfg = ModelConfig(channels=4, hidden=8, steps=(3, 2), scales=(2, 1), kernel_size=(5, 3), perception="depthwise",
                      norm="batch", downscale="max", fire_rate=0.0, patch_size=0)
    params = jax.device_get(jax.jit(lambda k: init_params(cfg, k, ndim=3))(jax.random.PRNGKey(0)))  # one compile
    # fc1 starts at zero (the identity): give it weights, and the batch norm a non-trivial affine map
    rng = np.random.default_rng(1)
    for level in params.values():
        level["fc1"]["kernel"] = 0.3 * rng.standard_normal(level["fc1"]["kernel"].shape, np.float32)
        level["bn"]["scale"] = 1.0 + 0.2 * rng.standard_normal(8, np.float32)
        level["bn"]["bias"] = 0.1 * rng.standard_normal(8, np.float32)
    return cfg, params


def test_torch_m3d_reference_has_our_parameter_count():
    pytest.importorskip("torch")
    from torch_reference import TorchM3DNCA

    from mednca_jax.nca.rollout import count_params

    cfg, params = _m3d_tiny()
    theirs = sum(p.numel() for p in TorchM3DNCA(4, 8, (3, 2), (5, 3)).parameters())
    assert count_params(params) == theirs


def test_torch_m3d_reference_matches_jax_at_fire_0():
    """The PyTorch timing reference computes what our 3D forward computes (fire 0 is
    deterministic; the batch norm normalises over the whole batch on both sides)."""
    torch = pytest.importorskip("torch")
    import jax
    import numpy as np
    from torch_reference import TorchM3DNCA

    from mednca_jax.nca.backends import REFERENCE as REFERENCE_BACKEND
    from mednca_jax.nca.levels import forward, level_rule
    from mednca_jax.nca.weights import params_to_torch_level

    cfg, params = _m3d_tiny()
    images = np.random.default_rng(0).random((2, 8, 6, 10, 1), dtype=np.float32)  # X != Y != Z: catches swapped axes
    want = np.asarray(jax.jit(lambda p, x: forward(p, cfg, x, jax.random.PRNGKey(0), 0.0, backend=REFERENCE_BACKEND))(params, images))
    model = TorchM3DNCA(4, 8, (3, 2), (5, 3))
    for i, level in enumerate((model.level0, model.level1)):
        level.load_original(params_to_torch_level(params[f"level{i}"], level_rule(cfg, i, 3)))
    with torch.inference_mode():
        got = model(torch.from_numpy(images), 0.0).numpy()
    assert got.shape == want.shape == (2, 8, 6, 10, 1)
    assert np.abs(want).max() > 0.1  # the rollout did something
    np.testing.assert_allclose(got, want, atol=1e-4 * float(np.abs(want).max()), rtol=1e-4)


@pytest.mark.slow
def test_memory_3d_script_writes_its_json(tmp_path):
    out = tmp_path / "mem3d.json"
    res = subprocess.run([sys.executable, "benchmarks/memory_3d.py", "--quick", "--json", str(out)], cwd=REPO,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    fig = json.loads(out.read_text())
    assert set(fig["peak_rss_mib"]) == {"nested=2", "nested=4", "none=2"}
    assert all(v > 100 for v in fig["peak_rss_mib"].values()) and fig["growth"] > 0
    assert fig["loss"]["nested=2"] > 0 and fig["loss_rel_err"] <= 1e-5  # the same loss with and without remat
    assert fig["backend"] == "reference" and "peak(4) / peak(2) =" in res.stdout


@pytest.mark.slow
def test_train_step_3d_torch_script_writes_its_json(tmp_path):
    pytest.importorskip("torch")
    out = tmp_path / "torch3d.json"
    cmd = [sys.executable, "benchmarks/train_step_3d_torch.py", "--quick", "--budget-s", "0", "--report-only", "--json", str(out)]
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    fig = json.loads(out.read_text())
    for key in ("step_s_median", "torch_step_s_median", "ratio", "peak_rss_mib", "torch_peak_rss_mib"):
        assert isinstance(fig[key], float) and fig[key] > 0, key
    assert fig["jax"]["backend"] == "reference" and fig["jax"]["rules"][0]["norm"] == "batch"
    assert "JAX / torch =" in res.stdout
