"""Every implementation of the NCA rule against the reference, values and gradients, on the
same fire masks.

**The table** (:func:`test_table`): every registered perception x update x norm x spatial
rank (2, 3), the built-ins and the example plug-in (``examples/custom_rule.py``), against
every implementation: the ``cpu_fast`` backend and the NumPy, ONNX and PyTorch runtimes. An implementation that claims the rule must reproduce the reference
(backends: values and gradients; runtimes: values); one that does not must refuse it by
name. Nothing is skipped.

| implementation                         | test                                               |
| -------------------------------------- | -------------------------------------------------- |
| every rule x implementation            | test_table[perception-update-norm-rank-impl]       |
| cpu_fast, compacted (fired cells only) | test_cpu_fast_equals_reference[rate 0.5 / 0.9]     |
| cpu_fast, dense (traced fire rate)     | test_cpu_fast_dense_path_equals_reference          |
| cpu_fast, overflow chunks              | test_cpu_fast_overflow_chunks_equal_reference      |
| cpu_fast, two pieces                   | test_cpu_fast_pieces_equal_reference               |
| remat step / nested (both backends)    | test_remat_modes_equal_none                        |
| two levels + crops, train loss / grads | test_two_level_training_loss_equals_reference[n_out 1 / 2] |
| data-parallel over 4 virtual devices   | test_data_parallel_step_equals_one_device (3 steps) |
| inference in groups of samples         | test_grouped_inference_equals_whole_batch (n_out 2) |
| exported runtimes, n_out 2 (labels)    | tests/test_classes.py::test_exported_runtimes_segment_two_classes |

The reference is :func:`mednca_jax.nca.rollout.reference_rollout`: :func:`mednca_jax.nca.rule.step`
under ``jax.lax.scan``, differentiated by JAX.
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPO

from mednca_jax.config import Config, DataConfig, ModelConfig, TrainConfig, validate
from mednca_jax.nca import cpu_fast, levels
from mednca_jax.nca.backends import CPU_GROUP_CELLS, REFERENCE, Backend, resolve_backend
from mednca_jax.nca.perceptions import PERCEPTIONS as REGISTERED_PERCEPTIONS
from mednca_jax.nca.rollout import rollout
from mednca_jax.nca.rule import Rule, fire_masks, init_level, sample_keys
from mednca_jax.nca.updates import UPDATES as REGISTERED_UPDATES
from mednca_jax.plugins import load_plugins

C, HID = 6, 16
PERCEPTIONS = ["learned", "sobel"]
FAST = Backend("cpu_fast", pieces=1)

# The example plug-in registers its perception and update here, so the table covers them too.
EXAMPLE = REPO / "examples" / "custom_rule.py"
if EXAMPLE.is_file():
    load_plugins([str(EXAMPLE)])


def rule_of(perception: str, ndim: int = 2, update: str = "mlp", norm: str = "none", kernel: int = 3) -> Rule:
    return Rule(perception, kernel, update, norm, C, HID, 1, ndim)


def level_params(rule: Rule | str, seed: int = 0, scale: float = 0.5):
    """Level params with every leaf random and a non-zero fc1 (a fresh NCA is the identity,
    which tests nothing)."""
    rule = rule_of(rule) if isinstance(rule, str) else rule
    key = jax.random.PRNGKey(seed)
    p = init_level(key, rule)
    leaves, tree = jax.tree_util.tree_flatten(p)
    keys = jax.random.split(jax.random.fold_in(key, 1), len(leaves))
    # Zero-initialised leaves (fc1, a plug-in's residual) get random values; the rest keep theirs.
    leaves = [scale * jax.random.normal(k, a.shape) / np.sqrt(max(a.shape[0], 1)) if not np.any(np.asarray(a)) else a
              for k, a in zip(keys, leaves)]
    return jax.tree_util.tree_unflatten(tree, leaves)


def _loss(rule, backend, rate, steps, remat="none", masks=None):
    def f(p, x):
        out, _ = rollout(p, x, x[..., :1], jax.random.PRNGKey(7), steps, rate, rule=rule, backend=backend, remat=remat, masks=masks)
        return jnp.sum(jnp.sin(out))

    return f


def assert_trees_close(got, want, rtol=1e-4):
    """Leaf by leaf, with an absolute floor scaled to each leaf's largest entry (float32
    sums in another order differ by a few ulps of the largest term)."""
    leaves, ref_leaves = jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)
    assert len(leaves) == len(ref_leaves)
    for a, b in zip(leaves, ref_leaves):
        b = np.asarray(b)
        np.testing.assert_allclose(a, b, rtol=rtol, atol=1e-6 + 2e-6 * float(np.abs(b).max(initial=0.0)))


def _compare(rule, backend, rate, shape=(3, 12, 10, C), steps=5, remat="none", traced=False, rtol=1e-5):
    rule = rule_of(rule, len(shape) - 2) if isinstance(rule, str) else rule
    p = level_params(rule)
    x = jax.random.normal(jax.random.PRNGKey(1), shape)
    ref_v, ref_g = jax.value_and_grad(_loss(rule, REFERENCE, rate, steps), argnums=(0, 1))(p, x)
    if traced:  # the rate as a traced value: cpu_fast cannot size its compaction, runs dense
        f = lambda p, x, r: _loss(rule, backend, r, steps, remat)(p, x)  # noqa: E731
        v, g = jax.jit(jax.value_and_grad(f, argnums=(0, 1)))(p, x, jnp.float32(rate))
    else:
        v, g = jax.jit(jax.value_and_grad(_loss(rule, backend, rate, steps, remat), argnums=(0, 1)))(p, x)
    np.testing.assert_allclose(v, ref_v, rtol=rtol)
    assert_trees_close(g, ref_g)
    return ref_v


# --------------------------------------------------------------------------- the table
SHAPES = {2: (2, 9, 8, C), 3: (2, 6, 5, 4, C)}
TABLE_STEPS = 3


def _table_rules() -> list[Rule]:
    rules = []
    for perception in sorted(REGISTERED_PERCEPTIONS):
        for update in sorted(REGISTERED_UPDATES):
            for norm in REGISTERED_UPDATES[update].norms:
                for ndim in (2, 3):
                    rule = rule_of(perception, ndim, update, norm)
                    rules.append(rule)
    return rules


def _rule_id(rule: Rule) -> str:
    return f"{rule.perception}-{rule.update}-{rule.norm}-{rule.ndim}d"


TABLE_RULES = _table_rules()


def _masks(rule: Rule, rate: float = 0.5) -> jax.Array:
    shape = SHAPES[rule.ndim]
    return fire_masks(sample_keys(jax.random.PRNGKey(4), shape[0]), TABLE_STEPS, shape[1:-1], rate)


def _reference_state(rule: Rule, p, x, masks):
    return rollout(p, x, x[..., :1], jax.random.PRNGKey(0), TABLE_STEPS, 0.5, rule=rule, masks=masks)[0]


def check_cpu_fast(rule: Rule) -> None:
    why = cpu_fast.unsupported(rule)
    if why:  # refused by name when asked for, and auto runs the reference instead
        with pytest.raises(ValueError, match="cpu_fast"):
            resolve_backend("cpu_fast", rule, "cpu", 2)
        assert resolve_backend("auto", rule, "cpu", 2) == REFERENCE
        return
    assert resolve_backend("auto", rule, "cpu", 2).name == "cpu_fast"
    # values and gradients on the same masks (drawn from the same keys by both backends)
    _compare(rule, Backend("cpu_fast", pieces=2), 0.5, shape=SHAPES[rule.ndim], steps=TABLE_STEPS, rtol=1e-5)


@functools.lru_cache(maxsize=None)
def _runtime_case(rule: Rule) -> tuple:
    """``(runtime weights, x, masks, reference final state)`` of ``rule``, computed once for
    all the runtimes' columns."""
    from mednca_jax.export import rule_weights

    p, x = level_params(rule), jax.random.normal(jax.random.PRNGKey(1), SHAPES[rule.ndim])
    masks = _masks(rule)
    want = np.asarray(_reference_state(rule, p, x, masks))
    return rule_weights(rule, p), np.asarray(x), np.asarray(masks), want


def _runtime_check(run_level):
    """A table column for an exported runtime: ``run_level(weights, rule_dict, x, image,
    masks) -> state``; rules it cannot interpret must be refused by name at export."""

    def check(rule: Rule) -> None:
        from mednca_jax.export import ExportError, check_interpretable, uninterpretable

        bad = uninterpretable(rule)
        if bad:
            cfg = validate(Config(model=ModelConfig(perception=rule.perception, update=rule.update, norm=rule.norm, channels=C,
                                                    hidden=HID, steps=(2,), scales=(1,), patch_size=0),
                                  data=DataConfig(image_size=(8,) * rule.ndim)))
            with pytest.raises(ExportError, match=f"cannot interpret {bad[0]}"):
                check_interpretable(cfg)
            return
        weights, x, masks, want = _runtime_case(rule)
        got = run_level(weights, rule.describe(), x, x[..., :1], masks)
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * float(np.abs(want).max()))

    return check


def _numpy_level(weights, rule, x, image, masks):
    from mednca_jax.export import runtime_numpy

    return runtime_numpy.rollout_level(weights, rule, x, image, masks)


def _onnx_level(weights, rule, x, image, masks):
    import onnxruntime as ort

    from mednca_jax.export.onnx_export import level_model

    so = ort.SessionOptions()
    so.intra_op_num_threads = so.inter_op_num_threads = 1
    sess = ort.InferenceSession(level_model(weights, rule, masks.shape[0]).SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x, "image": image, "masks": masks})[0]


def _torch_level(weights, rule, x, image, masks):
    from mednca_jax.export import runtime_torch

    return np.asarray(runtime_torch.rollout_level(weights, rule, x, image, masks))


IMPLEMENTATIONS = {
    "cpu_fast": check_cpu_fast,
    "numpy": _runtime_check(_numpy_level),
    "onnx": _runtime_check(_onnx_level),
    "torch": _runtime_check(_torch_level),
}


@pytest.mark.parametrize("impl", sorted(IMPLEMENTATIONS))
@pytest.mark.parametrize("rule", TABLE_RULES, ids=_rule_id)
def test_table(rule, impl):
    IMPLEMENTATIONS[impl](rule)


def test_table_covers_every_registered_rule():
    assert {"learned", "sobel", "depthwise"} <= {r.perception for r in TABLE_RULES}
    assert {("mlp", "none"), ("mlp", "batch")} <= {(r.update, r.norm) for r in TABLE_RULES}
    assert {r.ndim for r in TABLE_RULES} == {2, 3}
    assert EXAMPLE.is_file() and {"gradient3", "gated"} <= {r.perception for r in TABLE_RULES} | {r.update for r in TABLE_RULES}


def test_cpu_fast_refuses_an_update_it_does_not_implement():
    rule = rule_of("learned", update="gated") if "gated" in REGISTERED_UPDATES else rule_of("learned", norm="batch")
    name = rule.update if rule.update != "mlp" else rule.norm
    assert resolve_backend("auto", rule, "cpu", 2) == REFERENCE
    with pytest.raises(ValueError, match=f"cpu_fast.*{name}"):
        resolve_backend("cpu_fast", rule, "cpu", 2)


@pytest.mark.parametrize("perception", PERCEPTIONS)
@pytest.mark.parametrize("rate", [0.5, 0.9])
def test_cpu_fast_equals_reference(perception, rate):
    assert cpu_fast.fired_capacity(3 * 12 * 10, rate) is not None  # really the compacted path
    _compare(perception, FAST, rate)


@pytest.mark.slow
@pytest.mark.parametrize("perception", PERCEPTIONS)
def test_cpu_fast_dense_path_equals_reference(perception):
    assert cpu_fast.fired_capacity(360, 0.0) is None  # (a traced rate has no capacity either)
    _compare(perception, FAST, 0.5, traced=True)
    _compare(perception, FAST, 0.0)


@pytest.mark.parametrize("perception", PERCEPTIONS)
def test_cpu_fast_overflow_chunks_equal_reference(monkeypatch, perception):
    monkeypatch.setattr(cpu_fast, "SPARSE_SIGMAS", -6.0)  # capacity far below the fired count: extra chunks run
    cap = cpu_fast.fired_capacity(360, 0.5)
    assert cap is not None and cap < 360 * 0.5 * 0.8
    _compare(perception, FAST, 0.5)


@pytest.mark.slow
@pytest.mark.parametrize("perception", PERCEPTIONS)
def test_cpu_fast_pieces_equal_reference(perception):
    shape = (2, 40, 40, C)  # 3200 cells, ~1600 fired: two pieces of >= MIN_ROWS_PER_CHAIN rows
    assert cpu_fast.cell_chains(1600, 2) == 2
    _compare(perception, Backend("cpu_fast", pieces=2), 0.5, shape=shape, steps=3)
    _compare(perception, Backend("cpu_fast", pieces=2), 0.0, shape=shape, steps=3)


@pytest.mark.slow
@pytest.mark.parametrize("perception", PERCEPTIONS)
@pytest.mark.parametrize("backend", [REFERENCE, FAST], ids=["reference", "cpu_fast"])
@pytest.mark.parametrize("remat", ["step", "nested"])
def test_remat_modes_equal_none(perception, backend, remat):
    _compare(perception, backend, 0.5, steps=7, remat=remat)


@pytest.mark.slow
def test_given_masks_are_the_drawn_masks():
    # The masks a rollout draws from its keys are rule.fire_masks of the per-sample keys: the
    # same rollout with those masks passed in gives the same state, on both backends.
    p = level_params("learned")
    rule = rule_of("learned")
    x = jax.random.normal(jax.random.PRNGKey(1), (3, 8, 8, C))
    key = jax.random.PRNGKey(4)
    masks = fire_masks(sample_keys(key, 3), 6, (8, 8), 0.5)
    assert 0.3 < float(masks.mean()) < 0.7
    for backend in (REFERENCE, FAST):
        drawn, _ = rollout(p, x, x[..., :1], key, 6, 0.5, rule=rule, backend=backend)
        given, _ = rollout(p, x, x[..., :1], key, 6, 0.5, rule=rule, backend=backend, masks=masks)
        np.testing.assert_array_equal(drawn, given)


def test_a_shard_of_the_batch_draws_its_own_samples_masks():
    # Per-sample keys: rows 2..3 of a batch of 4 equal a batch of those two samples' keys.
    keys = sample_keys(jax.random.PRNGKey(0), 4)
    whole = fire_masks(keys, 5, (6, 6), 0.5)
    part = fire_masks(keys[2:], 5, (6, 6), 0.5)
    np.testing.assert_array_equal(whole[:, 2:], part)
    assert not np.array_equal(whole[:, 0], whole[:, 1])


# --------------------------------------------------------------------------- two levels
def _cfg(perception: str, backend: str = "auto", n_out: int = 1) -> Config:
    return validate(
        Config(
            name="equiv",
            model=ModelConfig(
                channels=C, hidden=HID, steps=(4, 4), scales=(2, 1), patch_size=8, fire_rate=0.5, perception=perception,
                backend=backend, n_out=n_out,
            ),
            data=DataConfig(image_size=(16, 16), labels="merge" if n_out == 1 else "classes"),
            train=TrainConfig(batch_size=4, num_steps=10),
        )
    )


def _two_level_params(cfg: Config):
    params = levels.init_params(cfg.model, jax.random.PRNGKey(0))
    for i, name in enumerate(levels.level_names(cfg.model)):
        k = jax.random.fold_in(jax.random.PRNGKey(1), i)
        params[name]["fc1"]["kernel"] = jax.random.normal(k, params[name]["fc1"]["kernel"].shape) / np.sqrt(HID)
    return params


@pytest.mark.slow
@pytest.mark.parametrize("n_out", [1, 2], ids=["n_out 1", "n_out 2"])
@pytest.mark.parametrize("perception", PERCEPTIONS)
def test_two_level_training_loss_equals_reference(perception, n_out):
    from mednca_jax.losses import dice_bce_loss

    cfg = _cfg(perception, n_out=n_out)
    params = _two_level_params(cfg)
    images = jax.random.uniform(jax.random.PRNGKey(2), (4, 16, 16, 1))
    # class 1 above 0.5, class 2 (with n_out 2) above 0.75: both channels carry the loss
    labels = (images > jnp.array([0.5, 0.75])[:n_out]).astype(jnp.float32)

    def loss(p, backend):
        logits, lab = levels.forward_train(p, cfg.model, images, labels, jax.random.PRNGKey(3), 0.5, backend=backend)
        return dice_bce_loss(logits, lab)

    ref_v, ref_g = jax.value_and_grad(loss)(params, REFERENCE)
    v, g = jax.jit(jax.value_and_grad(loss), static_argnums=1)(params, Backend("cpu_fast", 2))
    np.testing.assert_allclose(v, ref_v, rtol=1e-5)
    assert_trees_close(g, ref_g)


@pytest.mark.slow
def test_data_parallel_step_equals_one_device():
    # Four virtual CPU devices (a fresh process: the device count is fixed at JAX start-up);
    # the sharded step must give the one-device step's loss and params, on both backends.
    code = """
import jax, jax.numpy as jnp, numpy as np
from mednca_jax.config import Config, DataConfig, ModelConfig, TrainConfig, validate
from mednca_jax.nca import levels
from mednca_jax.nca.backends import REFERENCE, Backend
from mednca_jax.train.step import init_train_state, make_mesh, make_optimizer, make_train_step, put_batch, put_replicated
assert jax.device_count() == 4
for backend in (REFERENCE, Backend("cpu_fast", 1)):
    cfg = validate(Config(model=ModelConfig(channels=6, hidden=16, steps=(3, 3), scales=(2, 1), patch_size=8),
                          data=DataConfig(image_size=(16, 16)), train=TrainConfig(batch_size=8)))
    params = levels.init_params(cfg.model, jax.random.PRNGKey(0))
    params["level1"]["fc1"]["kernel"] = 0.3 * jax.random.normal(jax.random.PRNGKey(5), (16, 6))
    rng = np.random.default_rng(0)
    img = rng.random((8, 16, 16, 1), dtype=np.float32)
    batch = {"image": img, "label": (img > 0.5).astype(np.float32)}
    tx = make_optimizer(cfg.train)
    one, mesh = make_train_step(cfg, tx, backend=backend), make_mesh()
    many = make_train_step(cfg, tx, mesh, backend=backend)
    s1, s4 = init_train_state(params, tx), put_replicated(init_train_state(params, tx), mesh)
    for i in range(3):
        s1, m1 = one(s1, {k: jnp.asarray(v) for k, v in batch.items()}, jax.random.PRNGKey(i))
        s4, m4 = many(s4, put_batch(batch, mesh), jax.random.PRNGKey(i))
    np.testing.assert_allclose(float(m4["loss"]), float(m1["loss"]), rtol=1e-5)
    for a, b in zip(jax.tree_util.tree_leaves(s4.params), jax.tree_util.tree_leaves(s1.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)
    print(backend.name, "ok", float(m1["loss"]))
"""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "reference ok" in res.stdout and "cpu_fast ok" in res.stdout


@pytest.mark.parametrize("backend", [REFERENCE, Backend("cpu_fast", 2)], ids=["reference", "cpu_fast"])
def test_grouped_inference_equals_whole_batch(backend):
    """``levels.forward`` run in groups of samples (``Backend.group_cells``) gives the whole
    batch's logits and states: each sample keeps its own keys."""
    import dataclasses

    cfg = _cfg("learned", n_out=2)
    params = _two_level_params(cfg)
    images = jnp.asarray(np.random.default_rng(0).random((6, 16, 16, 1), dtype=np.float32))
    grouped = dataclasses.replace(backend, group_cells=2 * 16 * 16)  # 3 groups of 2 samples
    assert levels.batch_groups(6, 16 * 16, grouped.group_cells) == 3
    run = jax.jit(lambda b: levels.forward(params, cfg.model, images, jax.random.PRNGKey(3), 0.5, backend=b, return_states=True),
                  static_argnums=0)
    (whole, ws), (parts, ps) = run(backend), run(grouped)
    assert whole.shape == (6, 16, 16, 2)  # two classes: two logit channels
    np.testing.assert_allclose(parts, whole, rtol=1e-5, atol=1e-5)
    for a, b in zip(ps, ws, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    assert np.abs(np.asarray(whole)).max() > 1e-3


def test_batch_groups():
    assert levels.batch_groups(32, 4096, CPU_GROUP_CELLS) == 4
    assert levels.batch_groups(8, 4096, CPU_GROUP_CELLS) == 1  # fits
    assert levels.batch_groups(30, 4096, CPU_GROUP_CELLS) == 5  # groups of 6
    assert levels.batch_groups(31, 4096, CPU_GROUP_CELLS) == 1  # prime: single samples are no faster
    assert levels.batch_groups(4, 256 * 256, CPU_GROUP_CELLS) == 4  # one 256x256 slice per group
    assert levels.batch_groups(32, 4096, 0) == 1


# --------------------------------------------------------------------------- backend choice
def test_auto_backend_takes_cpu_fast_on_a_cpu_and_reference_elsewhere():
    learned, sobel = rule_of("learned"), rule_of("sobel")
    assert resolve_backend("auto", learned, "cpu", 2) == Backend("cpu_fast", 2, CPU_GROUP_CELLS)
    assert resolve_backend("auto", [learned, sobel], "cpu", 1) == Backend("cpu_fast", 1, CPU_GROUP_CELLS)
    assert resolve_backend("auto", learned, "gpu", 16) == REFERENCE
    assert resolve_backend("auto", learned._replace(precision="bfloat16"), "cpu", 2) == REFERENCE
    assert resolve_backend("auto", [learned, learned._replace(norm="batch")], "cpu", 2) == REFERENCE  # one level it cannot run
    assert resolve_backend("reference", learned, "cpu", 2) == REFERENCE
    with pytest.raises(ValueError, match="cpu_fast.*float32"):
        resolve_backend("cpu_fast", learned._replace(precision="bfloat16"), "cpu", 2)
    with pytest.raises(ValueError, match="cpu_fast.*norm 'batch'"):
        resolve_backend("cpu_fast", learned._replace(norm="batch"), "cpu", 2)


def test_auto_says_once_why_it_falls_back(capsys):
    from mednca_jax.nca import backends

    backends._TOLD.clear()
    rule = rule_of("learned", norm="batch")
    for _ in range(3):
        assert resolve_backend("auto", rule, "cpu", 2) == REFERENCE
    err = capsys.readouterr().err
    assert err.count("note: model.backend=auto runs the reference backend") == 1 and "norm 'batch'" in err


@pytest.mark.slow
@pytest.mark.parametrize("perception", PERCEPTIONS)
def test_ten_training_steps_agree_between_backends(perception):
    # The same batches and keys through make_train_step on each backend: the losses of the
    # first 10 optimiser steps agree to 1e-4 relative (the params drift apart by rounding only).
    from mednca_jax.train.step import init_train_state, make_optimizer, make_train_step

    cfg = _cfg(perception)
    rng = np.random.default_rng(0)
    images = rng.random((10, 4, 16, 16, 1), dtype=np.float32)
    batches = [{"image": jnp.asarray(im), "label": jnp.asarray((im > 0.6).astype(np.float32))} for im in images]
    losses = {}
    for backend in (REFERENCE, Backend("cpu_fast", 2)):
        tx = make_optimizer(cfg.train)
        step = make_train_step(cfg, tx, backend=backend)
        state = init_train_state(_two_level_params(cfg), tx)
        out = []
        for i, batch in enumerate(batches):
            state, m = step(state, batch, jax.random.PRNGKey(i))
            out.append(float(m["loss"]))
        losses[backend.name] = np.array(out)
    assert np.ptp(losses["reference"]) > 1e-3  # the loss does move
    np.testing.assert_allclose(losses["cpu_fast"], losses["reference"], rtol=1e-4)
