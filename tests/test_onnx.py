"""ONNX export (``python -m mednca_jax.export to-onnx``): onnxruntime vs JAX, vs the original's
fixture, the hash-based fire masks vs the NumPy runtime, the graph's structure, CLI errors;
the graph built from the rule description (one level on given masks against the JAX
reference for every built-in perception, both norms, rank 2 and 3, several kernel sizes; a
3D export; refusal of rules it cannot express).

CPU budget: onnxruntime runs with 1 thread; the fire-0.5 Dice uses the same 4 fixture slices
as tests/test_export.py.
"""

from __future__ import annotations

import numpy as np
import pytest

onnx = pytest.importorskip("onnx", reason="the ONNX export needs onnx: pip install 'mednca-jax[onnx]'")
pytest.importorskip("onnxruntime", reason="running the ONNX export needs onnxruntime: pip install 'mednca-jax[onnx]'")

from conftest import REFERENCE, require  # noqa: E402
from test_export import (  # noqa: E402
    DICE_SLICES, N_SEEDS, assert_close_to_reference, hard_dice, jax_logits, level_case, random_params, rule_case_params,
    small_cfg, volume_case,
)

from mednca_jax.export import (  # noqa: E402
    ExportError, export_numpy, export_onnx, load_runtime_module, onnx_logits,
)
from mednca_jax.export.__main__ import main as export_main  # noqa: E402
from mednca_jax.export.onnx_export import fire_masks, fire_uniform, level_model  # noqa: E402

FIXTURE = REFERENCE / "hippocampus_374_fire0.npz"


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """C=8, hidden 16, 2 levels x4, 4 steps, random params: ONNX and NumPy exports."""
    cfg = small_cfg()
    params = random_params(cfg.model, seed=3)
    base = tmp_path_factory.mktemp("onnx_small")
    export_onnx(params, cfg, base / "onnx")
    export_numpy(params, cfg, base / "np")
    m_np = load_runtime_module(base / "np" / "mednca_numpy.py", "onnx_small_numpy").MedNCA.load(base / "np")
    return cfg, params, base / "onnx" / "mednca.onnx", m_np


def test_onnx_matches_jax_at_fire_zero_any_shape(small):
    """Dynamic batch and size (H != W), fire 0: within 1e-3 of JAX; the seed does not matter."""
    cfg, params, path, _ = small
    for shape, seed in (((2, 32, 32), 0), ((1, 48, 24), 5)):
        x = np.random.default_rng(seed).random(shape + (1,), dtype=np.float32)
        ref = jax_logits(params, cfg, x)
        z = onnx_logits(path, x[..., 0], 0.0, seed=seed)
        assert z.shape == shape + (1,) and np.abs(ref).max() > 0.5
        assert np.abs(z - ref).max() <= 1e-3
        assert np.array_equal(z, onnx_logits(path, x[..., 0], 0.0, seed=seed + 1))


def test_onnx_three_levels_two_channels_area(tmp_path):
    cfg = small_cfg(channels=10, n_in=2, n_out=2, steps=(3, 2, 3), scales=(4, 2, 1), downscale="area")
    params = random_params(cfg.model, seed=5)
    export_onnx(params, cfg, tmp_path)
    x = np.random.default_rng(2).random((2, 32, 32, 2), dtype=np.float32)
    z = onnx_logits(tmp_path / "mednca.onnx", x, 0.0)
    assert z.shape == (2, 32, 32, 2)
    assert np.abs(z - jax_logits(params, cfg, x)).max() <= 1e-3


def test_onnx_masks_are_the_documented_hash(small):
    """At fire 0.5 the graph's masks are :func:`fire_masks` exactly: the NumPy runtime given
    those masks reproduces the ONNX logits; a seed repeats, another seed differs."""
    cfg, _, path, m_np = small
    x = np.random.default_rng(1).random((2, 32, 32), dtype=np.float32)
    s = m_np.spec
    z = onnx_logits(path, x, 0.5, seed=7)
    masks = fire_masks(7, 0.5, s.steps, [(2, 32 // f, 32 // f) for f in s.scales])
    assert all(0.4 < m.mean() < 0.6 for m in masks)
    want = m_np.logits(x, masks=masks)
    assert np.abs(z - want).max() <= 1e-4
    assert np.abs(z - m_np.logits(x, fire_rate=0.0)).max() > 1e-2  # the masks matter
    assert np.array_equal(z, onnx_logits(path, x, 0.5, seed=7))
    assert np.abs(z - onnx_logits(path, x, 0.5, seed=8)).max() > 1e-2
    u = fire_uniform(7, 0, 0, (2, 8, 8))
    assert u.dtype == np.float32 and 0.0 < u.min() and u.max() <= 1.0


def test_onnx_graph_uses_loops_reflect_pad_and_dynamic_inputs(small):
    _, _, path, _ = small
    model = onnx.load(str(path))
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("Loop") == 2  # one per level, steps not unrolled
    assert len(ops) < 60
    body = next(a.g for n in model.graph.node if n.op_type == "Loop" for a in n.attribute if a.name == "body")
    pads = [n for n in body.node if n.op_type == "Pad"]
    assert len(pads) == 1 and [a.s for a in pads[0].attribute if a.name == "mode"] == [b"reflect"]
    ins = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in model.graph.input}
    assert ins == {"images": ["B", "H", "W"], "fire_rate": [], "seed": []}


def test_onnx_export_errors(tmp_path, capsys):
    cfg = small_cfg(downscale="antialias")
    with pytest.raises(ExportError, match="antialias"):
        export_onnx(random_params(cfg.model), cfg, tmp_path / "o")
    assert export_main(["to-onnx", "--checkpoint", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 2
    assert "missing" in capsys.readouterr().err


# --------------------------------------------------------------------------- official weights
@pytest.fixture(scope="module")
def official(tmp_path_factory):
    require(REFERENCE / "model0.pth")
    require(REFERENCE / "model1.pth")
    base = tmp_path_factory.mktemp("onnx_official")
    pths = [str(REFERENCE / "model0.pth"), str(REFERENCE / "model1.pth")]
    assert export_main(["from-torch", "--config", "hippocampus_official", "--weights", *pths, "--out", str(base / "run")]) == 0
    assert export_main(["to-onnx", "--checkpoint", str(base / "run"), "--out", str(base / "onnx"), "--verify"]) == 0
    from mednca_jax.train.checkpoint import load_params

    params, cfg = load_params(base / "run")
    return cfg, params, base / "onnx" / "mednca.onnx"


@pytest.fixture(scope="module")
def fixture_npz():
    require(FIXTURE)
    with np.load(FIXTURE) as z:
        return {k: z[k] for k in z.files}


@pytest.mark.slow
def test_onnx_official_matches_original_fixture(official, fixture_npz):
    """All 39 slices of hippocampus_374 at fire 0: within 1e-2 of the original's logits."""
    z = onnx_logits(official[2], fixture_npz["image"], 0.0)
    assert np.abs(z[..., 0] - fixture_npz["logits"]).max() <= 1e-2


@pytest.mark.slow
def test_onnx_official_fire_half_dice_matches_jax(official, fixture_npz):
    """Mean hard Dice over 10 seeds at fire 0.5 within 0.01 of JAX's (DICE_SLICES)."""
    cfg, params, path = official
    x = fixture_npz["image"][DICE_SLICES]
    lab = fixture_npz["label"][DICE_SLICES] > 0
    jax_dice = [hard_dice(jax_logits(params, cfg, x[..., None], seed=s, fire_rate=0.5)[..., 0] > 0, lab)
                for s in range(N_SEEDS)]
    onnx_dice = [hard_dice(onnx_logits(path, x, 0.5, seed=s)[..., 0] > 0, lab) for s in range(N_SEEDS)]
    assert 0.8 < float(np.mean(jax_dice)) < 1.0
    assert abs(float(np.mean(onnx_dice)) - float(np.mean(jax_dice))) <= 0.01, (onnx_dice, jax_dice)


# --------------------------------------------------------------------------- the rule description, as a graph
def run_level_model(weights: dict, rule: dict, x: np.ndarray, image: np.ndarray, masks: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    model = level_model(weights, rule, masks.shape[0])
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x, "image": image, "masks": masks})[0]


@pytest.mark.parametrize("perception, norm, ndim, kernel", rule_case_params())
def test_onnx_level_rollout_equals_reference(perception, norm, ndim, kernel):
    """``level_model`` (one level, explicit masks, the Loop of the export) run by onnxruntime
    equals the JAX reference on the same masks (tests/test_export.py::level_case)."""
    weights, rule, x, image, masks, ref = level_case(perception, norm, ndim, kernel)
    assert_close_to_reference(run_level_model(weights, rule, x, image, masks), ref, "ONNX level graph")


def test_onnx_export_of_a_volume_model_matches_jax(tmp_path):
    """3D, depthwise kernels 5 then 3, batch norm, max downscale: the whole exported graph at
    fire 0 against JAX; its input is (B, X, Y, Z) and it normalises over the batch."""
    cfg, params, x, ref = volume_case()
    export_onnx(params, cfg, tmp_path)
    model = onnx.load(str(tmp_path / "mednca.onnx"))
    ins = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in model.graph.input}
    assert ins["images"] == ["B", "X", "Y", "Z"]
    assert "MaxPool" in [n.op_type for n in model.graph.node]
    got = onnx_logits(tmp_path / "mednca.onnx", x[..., 0], 0.0)
    assert_close_to_reference(got, ref, "ONNX export, 3D")


def test_onnx_level_graph_refuses_a_rule_it_cannot_interpret():
    # the export's refusal: tests/test_export.py::test_export_refuses_a_rule_it_cannot_interpret
    with pytest.raises(ValueError, match="cannot interpret"):
        level_model({}, {"perception": "learned", "update": "gated", "norm": "none", "linear": True}, 2)
