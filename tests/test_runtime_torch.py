"""The PyTorch runtime interprets the rule description: its own step against the JAX reference
rollout on the same fire masks (perceptions, norms, ranks, kernel sizes), refusal of rules it
cannot run (at construction and at export, before anything is written), the export folder
end to end, and the benchmarks' PyTorch reference running the same step.

CPU budget: tiny states (C=4, hidden 8, a few steps); torch runs with 1 thread.
"""

from __future__ import annotations

import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPO

from mednca_jax.config import Config, DataConfig, ModelConfig, TrainConfig, validate
from mednca_jax.export import ExportError, export_torch, load_runtime_module
from mednca_jax.nca.levels import forward, init_params, level_rule
from mednca_jax.nca.perceptions import Perception, filters_of, register_perception
from mednca_jax.nca.rollout import rollout
from mednca_jax.nca.rule import Rule, init_level
from mednca_jax.nca.updates import Update, register_update

torch = pytest.importorskip("torch")
from mednca_jax.export import runtime_torch as rt  # noqa: E402  (needs torch)

torch.set_num_threads(1)

SHAPES = {2: (9, 11), 3: (6, 5, 7)}  # unequal sides catch swapped axes
CHANNELS, HIDDEN, STEPS, BATCH = 4, 8, 3, 2


def random_level(rule: Rule, seed: int) -> dict:
    """Fresh params of ``rule`` with a random non-zero fc1 (a fresh NCA is the identity) and,
    with batch norm, a scale and shift away from 1 and 0 (so a dropped term shows)."""
    key = jax.random.PRNGKey(seed)
    p = init_level(key, rule)
    p["fc1"]["kernel"] = jax.random.normal(jax.random.fold_in(key, 1), p["fc1"]["kernel"].shape) / np.sqrt(rule.hidden)
    if "bn" in p:
        p["bn"]["scale"] = 1.0 + 0.5 * jax.random.normal(jax.random.fold_in(key, 2), (rule.hidden,))
        p["bn"]["bias"] = 0.3 * jax.random.normal(jax.random.fold_in(key, 3), (rule.hidden,))
    return p


def export_arrays(rule: Rule, p: dict) -> dict[str, np.ndarray]:
    """One level in the JAX export layout (``weights.npz`` keys without ``level{i}.``)."""
    k, b = filters_of(rule, p)
    out = {"perception.kernel": k, "perception.bias": b, "fc0.kernel": p["fc0"]["kernel"], "fc0.bias": p["fc0"]["bias"],
           "fc1.kernel": p["fc1"]["kernel"]}
    if "bn" in p:
        out["bn.scale"], out["bn.bias"] = p["bn"]["scale"], p["bn"]["bias"]
    return {key: np.asarray(v, np.float32) for key, v in out.items()}


def inputs(rule: Rule, seed: int):
    """``x (B, *S, C)``, ``image (B, *S, 1)``, ``masks (steps, B, *S)`` about half True."""
    rng = np.random.default_rng(seed)
    s = SHAPES[rule.ndim]
    x = rng.normal(size=(BATCH, *s, rule.channels)).astype(np.float32)
    image = rng.random((BATCH, *s, 1), dtype=np.float32)
    masks = rng.random((STEPS, BATCH, *s)) < 0.5
    return x, image, masks


def jax_rollout(rule: Rule, p: dict, x, image, masks) -> np.ndarray:
    out, _ = rollout(p, jnp.asarray(x), jnp.asarray(image), jax.random.PRNGKey(0), STEPS, 0.5, rule=rule,
                     masks=jnp.asarray(masks))
    return np.asarray(out)


def close(got: np.ndarray, want: np.ndarray) -> None:
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * float(np.abs(want).max()))


# Every registered perception x update x norm x rank is tests/test_equivalence.py's table (kernel
# 3); these cases add kernel 5 and the runtime's chunking.
CASES = [("learned", "none", 2, 3), ("depthwise", "batch", 3, 5), ("sobel", "batch", 2, 3), ("learned", "batch", 3, 5)]


@pytest.mark.parametrize("perception,norm,ndim,k", [pytest.param(*c, id="-".join(map(str, c))) for c in CASES])
def test_rollout_level_equals_the_jax_reference(perception, norm, ndim, k):
    rule = Rule(perception, k, "mlp", norm, CHANNELS, HIDDEN, 1, ndim)
    seed = len(CASES) * ndim + k
    p = random_level(rule, seed)
    x, image, masks = inputs(rule, seed)
    want = jax_rollout(rule, p, x, image, masks)
    assert np.abs(want - x).max() > 0.1  # the rule does something
    weights, desc = export_arrays(rule, p), rule.describe()
    close(rt.rollout_level(weights, desc, x, image, masks), want)
    # Small chunks: bands of the state's first axis (norm batch: a statistics pass first).
    close(rt.rollout_level(weights, desc, x, image, masks, chunk_pixels=3), want)


def test_the_fire_masks_and_the_axis_order_matter():
    """The comparison can fail: other masks, or the kernel's spatial axes transposed, give
    other states."""
    rule = Rule("learned", 3, "mlp", "none", CHANNELS, HIDDEN, 1, 2)
    p = random_level(rule, 1)
    x, image, masks = inputs(rule, 1)
    want = jax_rollout(rule, p, x, image, masks)
    weights, desc = export_arrays(rule, p), rule.describe()
    assert np.abs(rt.rollout_level(weights, desc, x, image, ~masks) - want).max() > 1e-2
    flipped = dict(weights, **{"perception.kernel": np.swapaxes(weights["perception.kernel"], 0, 1)})
    assert np.abs(rt.rollout_level(flipped, desc, x, image, masks) - want).max() > 1e-2


def _gated_init(key, rule):
    return {"fc0": {"kernel": jnp.zeros((rule.channels + rule.n_features, rule.channels))}}


def _gated_apply(params, y, rule):
    return jax.nn.sigmoid(y @ params["fc0"]["kernel"])


def _nonlinear_apply(params, x, rule):
    return jnp.tanh(x)


register_update("test_gated_h3", Update(_gated_init, _gated_apply), replace=True)
register_perception("test_tanh_h3", Perception(lambda r: r.channels, lambda key, r: {}, apply=_nonlinear_apply), replace=True)


def test_uninterpretable_rules_are_refused_by_name():
    gated = Rule(update="test_gated_h3", channels=CHANNELS, hidden=HIDDEN).describe()
    with pytest.raises(rt.RuleError, match=r"level 2: cannot interpret update 'test_gated_h3'"):
        rt.NCALevel.from_rule(gated, 2)
    tanh = Rule(perception="test_tanh_h3", channels=CHANNELS, hidden=HIDDEN).describe()
    with pytest.raises(rt.RuleError, match=r"level 0: cannot interpret perception 'test_tanh_h3'.*not linear"):
        rt.NCALevel.from_rule(tanh)
    with pytest.raises(rt.RuleError, match=r"cannot interpret norm 'layer'"):
        rt.NCALevel.from_rule({**Rule(channels=CHANNELS, hidden=HIDDEN).describe(), "norm": "layer"})
    with pytest.raises(rt.RuleError, match=r"cannot interpret spatial rank 1"):
        rt.NCALevel.from_rule({**Rule(channels=CHANNELS, hidden=HIDDEN).describe(), "ndim": 1})
    x, image, masks = inputs(Rule(ndim=2), 0)
    with pytest.raises(rt.RuleError, match="cannot interpret update"):
        rt.rollout_level({}, gated, x, image, masks)


def tiny_cfg(image_size=(16, 12), **model) -> Config:
    m = dict(channels=CHANNELS, hidden=HIDDEN, steps=(2, 3), scales=(2, 1), patch_size=0, fire_rate=0.5, remat="none")
    m.update(model)
    return validate(Config(name="tiny", model=ModelConfig(**m), data=DataConfig(image_size=image_size),
                           train=TrainConfig(batch_size=2, num_steps=1)))


def random_params(cfg: Config, seed: int = 0) -> dict:
    nd = len(cfg.data.image_size)
    return {f"level{i}": random_level(level_rule(cfg.model, i, nd), seed + i) for i in range(cfg.model.n_levels)}


def test_export_refuses_an_uninterpretable_update_before_writing(tmp_path):
    cfg = tiny_cfg(update="test_gated_h3")
    params = init_params(cfg.model, jax.random.PRNGKey(0))
    with pytest.raises(ExportError, match=r"level 0: cannot interpret update 'test_gated_h3'"):
        export_torch(params, cfg, tmp_path / "pt")
    assert not (tmp_path / "pt").exists()


def _export_and_compare(tmp_path, cfg: Config, name: str) -> dict:
    params = random_params(cfg, 3)
    export_torch(params, cfg, tmp_path)
    conf = json.loads((tmp_path / "config.json").read_text())
    model = load_runtime_module(tmp_path / "mednca_torch.py", name).MedNCATorch.load(tmp_path)
    rng = np.random.default_rng(5)
    size = cfg.data.image_size
    images = rng.random((2, *size, 1), dtype=np.float32)
    masks = [rng.random((st, 2, *(s // f for s in size))) < 0.5 for st, f in zip(cfg.model.steps, cfg.model.scales)]
    want = np.asarray(forward(params, cfg.model, jnp.asarray(images), jax.random.PRNGKey(0), 0.5,
                              masks=[jnp.asarray(m) for m in masks]))
    got = model.predict(torch.from_numpy(images), masks=[torch.from_numpy(m) for m in masks]).numpy()
    assert np.abs(want).max() > 0.1
    close(got, want)
    # Chunked in bands of the state's first axis: the same numbers.
    with torch.inference_mode():
        banded = model.forward(torch.from_numpy(images), 0.5, None, [torch.from_numpy(m) for m in masks], 5).numpy()
    close(banded, want)
    return conf


def test_export_writes_the_descriptions_and_runs_them(tmp_path):
    """Depthwise 5x5 then 3x3 with batch norm, 2D, per-level kernel sizes: the folder's
    config carries each level's rule and the runtime equals JAX on the same masks."""
    cfg = tiny_cfg(perception="depthwise", norm="batch", kernel_size=(5, 3))
    conf = _export_and_compare(tmp_path, cfg, "rt_depthwise_batch")
    assert conf["rules"] == [level_rule(cfg.model, i, 2).describe() for i in range(2)]
    sd = torch.load(tmp_path / "model0.pth", weights_only=True)
    assert tuple(sd["perception.weight"].shape) == (CHANNELS, CHANNELS, 5, 5) and "bn.weight" in sd


@pytest.mark.slow
def test_export_3d_volumes(tmp_path):
    """A 3D M3D-NCA-like model (depthwise 3x3x3, batch norm, max downscale) end to end."""
    cfg = tiny_cfg(image_size=(8, 6, 4), perception="depthwise", norm="batch", downscale="max")
    _export_and_compare(tmp_path, cfg, "rt_3d")


def test_old_folders_without_descriptions_still_load(tmp_path):
    """A folder written before descriptions (no ``rules``) is the original 2D 3x3 rule."""
    cfg = tiny_cfg()
    params = random_params(cfg, 1)
    export_torch(params, cfg, tmp_path)
    conf = json.loads((tmp_path / "config.json").read_text())
    del conf["rules"]
    (tmp_path / "config.json").write_text(json.dumps(conf))
    assert set(torch.load(tmp_path / "model0.pth", weights_only=True)) >= {"p0.weight", "p1.weight"}  # original layout
    model = load_runtime_module(tmp_path / "mednca_torch.py", "rt_old").MedNCATorch.load(tmp_path)
    images = np.random.default_rng(0).random((1, 16, 12, 1), dtype=np.float32)
    want = np.asarray(forward(params, cfg.model, jnp.asarray(images), jax.random.PRNGKey(0), 0.0))
    close(model.predict(torch.from_numpy(images), fire_rate=0.0).numpy(), want)


# --------------------------------------------------------------------------- the benchmarks' reference
@pytest.fixture(scope="module")
def torch_reference():
    sys.path.insert(0, str(REPO / "benchmarks"))
    import torch_reference

    return torch_reference


@pytest.mark.parametrize("layout", ["original", "channels-last"])
def test_benchmark_reference_runs_the_runtime_step(torch_reference, layout):
    """The timing reference's level is the runtime's: on the same masks it gives what
    ``rollout_level`` gives, and gradients flow through it (it is trained)."""
    rule = Rule("learned", 3, "mlp", "none", CHANNELS, HIDDEN, 1, 2)
    p = random_level(rule, 7)
    x, image, masks = inputs(rule, 7)
    x[..., :1] = image  # the runtime resets the inputs before the first step, the reference after each
    level = torch_reference.TorchNCA(CHANNELS, HIDDEN, layout=layout).load_jax(jax.device_get(p))
    assert isinstance(level.level, torch_reference.rt.NCALevel)
    xt = torch.from_numpy(x).requires_grad_(True)
    out = level(xt, torch.from_numpy(image), STEPS, 0.5, masks=torch.from_numpy(masks))
    want = rt.rollout_level(export_arrays(rule, p), rule.describe(), x, image, masks)
    np.testing.assert_allclose(out.detach().numpy(), want, rtol=1e-5, atol=1e-5)
    out.sum().backward()
    assert level.level.fc1.weight.grad is not None and float(level.level.fc1.weight.grad.abs().sum()) > 0


def test_benchmark_reference_3d_batch_norm(torch_reference):
    """The M3D-NCA-like 3D variant of the reference (depthwise, batch norm) is the runtime's too."""
    rule = Rule("depthwise", 3, "mlp", "batch", CHANNELS, HIDDEN, 1, 3)
    p = random_level(rule, 9)
    x, image, masks = inputs(rule, 9)
    x[..., :1] = image
    weights = export_arrays(rule, p)
    level = torch_reference.TorchNCA(CHANNELS, HIDDEN, rule=rule.describe()).load_jax(weights)
    with torch.no_grad():
        out = level(torch.from_numpy(x), torch.from_numpy(image), STEPS, 0.5, masks=torch.from_numpy(masks)).numpy()
    close(out, jax_rollout(rule, p, x, image, masks))


def test_benchmark_model_equals_the_exported_runtime(torch_reference, tmp_path):
    """The two-level timing reference and the exported runtime folder, same weights, same masks."""
    cfg = tiny_cfg(scales=(4, 1))
    params = random_params(cfg, 11)
    export_torch(params, cfg, tmp_path)
    model = load_runtime_module(tmp_path / "mednca_torch.py", "rt_bench").MedNCATorch.load(tmp_path)
    ref = torch_reference.TorchMedNCA(CHANNELS, HIDDEN, cfg.model.steps, scale=4).load_jax(jax.device_get(params))
    rng = np.random.default_rng(2)
    images = torch.from_numpy(rng.random((2, 16, 12, 1), dtype=np.float32))
    masks = [torch.from_numpy(rng.random((st, 2, 16 // f, 12 // f)) < 0.5) for st, f in zip(cfg.model.steps, (4, 1))]
    with torch.inference_mode():
        a = ref(images, 0.5, masks=tuple(masks)).numpy()
    b = model.predict(images, masks=masks).numpy()
    assert np.abs(a).max() > 0.1
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_original_m3d_nca_weights_reproduce_the_original_logits():
    """The original M3D-NCA's state dicts (depthwise p0, batch norm; k 7 then 3, max
    downscale x2, 10 + 10 steps) on its fixture volume at fire 0: the 3D axis order, the
    batch statistics and the 7-wide reflect padding as the original computes them."""
    from conftest import REFERENCE, require

    d = require(REFERENCE / "m3d_hippocampus")
    fx = np.load(d / "fixture.npz")
    rules = [Rule("depthwise", k, "mlp", "batch", 16, 64, 1, 3).describe() for k in (7, 3)]
    model = rt.MedNCATorch(16, 64, 1, 1, [10, 10], [2, 1], 0.0, "max", rules)
    for i, level in enumerate(model.levels):
        path = d / f"model{i}.pth"
        level.load_state_dict(rt.check_state_dict(torch.load(path, weights_only=True), level, str(path)))
    z = model.predict(torch.from_numpy(fx["image"][None, ..., None].astype(np.float32)), fire_rate=0.0).numpy()
    assert np.abs(z[0, ..., 0] - fx["logits"]).max() <= 1e-3  # measured 3.9e-5; logits span -20.9 .. 9.4
