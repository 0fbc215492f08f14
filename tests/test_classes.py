"""Several classes (``data.labels = "classes"``): config, label coding, the loss, per-class
Dice in ``metrics.json`` and the tables, training end to end, ``mednca predict`` and the
exported runtimes."""

from __future__ import annotations

import importlib.util
import json

import jax
import jax.numpy as jnp
import nibabel as nib
import numpy as np
import pytest
from conftest import TINY_RUN_TOML, random_params, train

from mednca_jax.config import Config, ConfigError, DataConfig, ModelConfig, TrainConfig, dumps, loads, validate, with_classes
from mednca_jax.data import Case, SliceSet, encode_labels, write_volume
from mednca_jax.data.msd import VolumeMeta
from mednca_jax.evaluate.evaluation import evaluate_cases, format_table
from mednca_jax.losses import dice_bce_loss, dice_hard, dice_soft, probabilities_to_labels


def _cfg(**data) -> Config:
    return validate(Config(model=ModelConfig(channels=6, hidden=8, steps=(2,), scales=(1,), patch_size=0),
                           data=DataConfig(image_size=(8, 8), **data), train=TrainConfig(batch_size=2)))


# --------------------------------------------------------------------------- config
def test_label_modes_and_the_names_of_earlier_versions():
    assert DataConfig().labels == "merge" and _cfg().model.n_out == 1
    assert DataConfig(labels="foreground").labels == "merge"
    old = loads('[model]\nn_out = 2\n[data]\nlabels = "multiclass"\n')  # a run folder of an earlier version
    assert old.data.labels == "classes" and old.data.classes == 2 and old.model.n_out == 2
    new = _cfg(labels="classes", classes=3)
    assert new.model.n_out == 3 and loads(dumps(new)) == new
    assert _cfg(labels="classes").data.classes_from_data
    assert not new.data.classes_from_data
    assert with_classes(_cfg(labels="classes"), 2).model.n_out == 2


@pytest.mark.parametrize("raw, key", [
    ('[model]\nn_out = 3\n[data]\nlabels = "classes"\nclasses = 2\n', "model.n_out"),
    ('[model]\nn_out = 2\n', "model.n_out"),  # merge has one output channel
    ('[data]\nclasses = 2\n', "data.classes"),  # a count without its mode
    ('[data]\nlabels = "softmax"\n', "data.labels"),
    ('[model]\nchannels = 3\n[data]\nlabels = "classes"\nclasses = 3\n', "model.channels"),  # no room for 3 logits
])
def test_inconsistent_class_settings_name_the_key(raw, key):
    with pytest.raises(ConfigError, match=f"'{key}'"):
        loads(raw)


# --------------------------------------------------------------------------- labels
def test_encode_then_decode_gives_the_class_values_back():
    lab = np.random.default_rng(0).integers(0, 3, (2, 5, 7))
    onehot = encode_labels(lab, "classes", 2)
    assert onehot.shape == (2, 5, 7, 2) and onehot.sum(-1).max() == 1
    np.testing.assert_array_equal(probabilities_to_labels(onehot), lab)
    np.testing.assert_array_equal(encode_labels(lab, "merge")[..., 0], lab > 0)


def test_decoding_rule():
    p = np.array([[0.2, 0.4], [0.9, 0.3], [0.6, 0.8], [0.5, 0.5], [0.7, 0.7]])
    # none above 0.5 -> 0; the most probable of those above 0.5; exactly 0.5 is not above; ties: the first
    np.testing.assert_array_equal(probabilities_to_labels(p), [0, 1, 2, 0, 1])
    assert probabilities_to_labels(p).dtype == np.uint8
    np.testing.assert_array_equal(probabilities_to_labels(p[:, :1]), p[:, 0] > 0.5)


def test_runtimes_decode_like_the_project():
    torch = pytest.importorskip("torch")
    from mednca_jax.export import runtime_numpy, runtime_torch

    p = np.random.default_rng(1).random((4, 6, 6, 3)).astype(np.float32)
    want = probabilities_to_labels(p)
    assert set(np.unique(want)) == {0, 1, 2, 3}
    np.testing.assert_array_equal(runtime_numpy.labels_from_probability(p), want)
    np.testing.assert_array_equal(runtime_torch._labels(torch.from_numpy(p)).numpy(), want)


# --------------------------------------------------------------------------- loss
def test_loss_of_two_classes_is_the_mean_of_the_per_class_losses(rng):
    z = jnp.asarray(rng.normal(0, 2, (3, 8, 8, 2)), jnp.float32)
    t = encode_labels(rng.integers(0, 3, (3, 8, 8)), "classes", 2)
    per_class = [float(dice_bce_loss(z[..., c : c + 1], jnp.asarray(t[..., c : c + 1]))) for c in range(2)]
    assert min(per_class) > 0
    np.testing.assert_allclose(float(dice_bce_loss(z, jnp.asarray(t))), np.mean(per_class), rtol=1e-6)
    t[..., 1] = 0  # a class absent from the batch counts 0 in the mean
    np.testing.assert_allclose(float(dice_bce_loss(z, jnp.asarray(t))), per_class[0] / 2, rtol=1e-6)


# --------------------------------------------------------------------------- per-class Dice
# The image of a slice holds a code per pixel, and the fake model maps codes to probabilities:
# 0 nothing, 1 class 1, 2 class 2, 3 both above 0.5 (class 2 the more probable).
CODE_PROBS = np.array([[0.1, 0.2], [0.9, 0.3], [0.3, 0.8], [0.7, 0.9]], np.float32)


def _fake_predict(params, images, key, fire_rate):
    return jnp.asarray(CODE_PROBS)[images[..., 0].astype(jnp.int32)]


def _known_case(tmp_path, name: str, seed: int) -> tuple[np.ndarray, np.ndarray, Case]:
    """Codes and labels ``(S, H, W)`` of one case, and its files (image = noise: only the label is read)."""
    rng = np.random.default_rng(seed)
    codes = rng.integers(0, 4, (3, 8, 8))
    label = np.where(rng.random((3, 8, 8)) < 0.6, codes.clip(0, 2), rng.integers(0, 3, (3, 8, 8)))  # mostly agreeing
    meta = VolumeMeta((8, 8, 3), np.eye(4), nib.Nifti1Header())
    files = {}
    for sub, arr, dtype in (("imagesTr", rng.random((8, 8, 3)), np.float32), ("labelsTr", np.moveaxis(label, 0, -1), np.uint8)):
        files[sub] = write_volume(tmp_path / sub / f"{name}.nii.gz", arr, meta, dtype)
    return codes, label, Case(name, files["imagesTr"], files["labelsTr"])


def _slice_set(codes: list[np.ndarray], labels: list[np.ndarray], names: list[str], n_out: int) -> SliceSet:
    k = len(names)
    mode = "classes" if n_out > 1 else "merge"
    return SliceSet(
        images=np.concatenate(codes).astype(np.float32)[..., None],
        labels=np.concatenate([encode_labels(lab, mode, n_out) for lab in labels]),
        case_index=np.repeat(np.arange(k, dtype=np.int32), [c.shape[0] for c in codes]),
        slice_index=np.concatenate([np.arange(c.shape[0], dtype=np.int32) for c in codes]),
        case_names=tuple(names), native_shapes=((8, 8, 3),) * k, affines=np.stack([np.eye(4)] * k),
        headers=(nib.Nifti1Header(),) * k, image_paths=(None,) * k,
    )


def _expected(codes: np.ndarray, label: np.ndarray, c: int) -> tuple[float, float]:
    """Hard and soft Dice of class ``c``, counted directly from the codes."""
    predicted = {0: 0, 1: 1, 2: 2, 3: 2}
    pred = np.vectorize(predicted.get)(codes) == c
    truth = label == c
    hard = 2 * (pred & truth).sum() / (pred.sum() + truth.sum())
    p = CODE_PROBS[codes, c - 1].astype(np.float64)
    soft = 2 * (p * truth).sum() / (p.sum() + truth.sum())
    return hard, soft


def test_per_class_dice_and_metrics_json(tmp_path):
    cases = [_known_case(tmp_path, f"case{i}", seed=i) for i in range(2)]
    cfg = _cfg(labels="classes", classes=2)
    slices = _slice_set([c[0] for c in cases], [c[1] for c in cases], ["case0", "case1"], 2)
    m = evaluate_cases(None, cfg, slices, [c[2] for c in cases], jax.random.PRNGKey(0), predict=_fake_predict,
                       out_dir=tmp_path / "out", batch_size=4)
    for codes, label, case in cases:
        r = m["cases"][case.name]
        for c in (1, 2):
            hard, soft = _expected(codes, label, c)
            assert 0.2 < hard < 0.95  # a real overlap, neither none nor all
            np.testing.assert_allclose(r["dice_per_class"][str(c)], hard, rtol=1e-12)
            np.testing.assert_allclose(r["dice_soft_per_class"][str(c)], soft, rtol=1e-9)
            np.testing.assert_allclose(r["dice_native_per_class"][str(c)], hard, rtol=1e-12)  # model grid = native grid
        np.testing.assert_allclose(r["dice"], np.mean([_expected(codes, label, c)[0] for c in (1, 2)]), rtol=1e-12)
    saved = json.loads((tmp_path / "out" / "metrics.json").read_text())
    s = saved["summary"]
    for metric in ("dice", "dice_soft", "dice_native"):
        per_class = s[f"{metric}_per_class"]
        assert list(per_class) == ["1", "2"] and set(per_class["1"]) == {"mean", "std", "n"}
        for c in ("1", "2"):
            vals = [saved["cases"][n][f"{metric}_per_class"][c] for n in ("case0", "case1")]
            np.testing.assert_allclose([per_class[c]["mean"], per_class[c]["std"]], [np.mean(vals), np.std(vals)], rtol=1e-12)
        np.testing.assert_allclose(s[metric]["mean"], np.mean([per_class[c]["mean"] for c in ("1", "2")]), rtol=1e-12)
    pred = np.asarray(nib.load(tmp_path / "out" / "predictions" / "case0.nii.gz").dataobj)
    np.testing.assert_array_equal(np.moveaxis(pred, -1, 0), np.vectorize({0: 0, 1: 1, 2: 2, 3: 2}.get)(cases[0][0]))
    table = format_table(m).splitlines()
    assert table[0].split() == ["case", "dice", "dice[1]", "dice[2]", "dice_native", "dice_native[1]", "dice_native[2]",
                                "dice_soft", "dice_soft[1]", "dice_soft[2]"]
    assert len(table) == 4 and all(len(line.split()) == 10 for line in table[1:3])


def test_one_class_gives_exactly_the_pooled_figures(tmp_path):
    codes, label, case = _known_case(tmp_path, "one", seed=3)
    slices = _slice_set([codes], [label], ["one"], 1)
    one = lambda params, images, key, fr: _fake_predict(params, images, key, fr)[..., 1:]  # noqa: E731
    m = evaluate_cases(None, _cfg(), slices, [case], jax.random.PRNGKey(0), predict=one, batch_size=4)
    r, p = m["cases"]["one"], CODE_PROBS[codes][..., 1:]
    assert r["dice"] == dice_hard(p, slices.labels) and r["dice_soft"] == dice_soft(p, slices.labels)
    assert r["dice_per_class"] == {"1": r["dice"]} and m["summary"]["dice"]["mean"] == r["dice"]
    assert "dice[1]" not in format_table(m)  # one class: no per-class columns


# --------------------------------------------------------------------------- end to end
@pytest.mark.slow
def test_train_evaluate_predict_with_two_classes(tmp_path, monkeypatch):
    """The synthetic demo task has classes 1 (head) and 2 (tail): K comes from the data."""
    from mednca_jax.cli import main as cli_main
    from mednca_jax.data import make_synthetic_task

    monkeypatch.setenv("MEDNCA_CACHE", str(tmp_path / "cache"))
    data = make_synthetic_task(tmp_path / "synth", n_cases=6, seed=0, shape=(24, 24, 24))
    (tmp_path / "tiny.toml").write_text(TINY_RUN_TOML)
    run = tmp_path / "run"
    assert cli_main(["train", "--config", str(tmp_path / "tiny.toml"), "--data", str(data), "--workdir", str(run),
                     "--no-progress", "--set", "data.labels=classes"]) == 0
    saved = loads((run / "config.toml").read_text())
    assert saved.data.classes == 2 and saved.model.n_out == 2
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert any(set(r.get("val_dice_per_class", {})) == {"1", "2"} for r in log)
    from mednca_jax.config import load_config

    resumed = train(load_config(tmp_path / "tiny.toml", ["data.labels=classes", "train.num_steps=7"]), run, data,
                    resume=True, progress=False)  # a resume reads the count from the run
    assert resumed["step"] == 7
    out = tmp_path / "eval"
    assert cli_main(["evaluate", "--checkpoint", str(run), "--data", str(data), "--split", "test", "--out", str(out),
                     "--no-progress"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["summary"]["dice_per_class"]) == {"1", "2"}
    assert set(metrics["summary"]["dice_native_per_class"]) == {"1", "2"}
    name = next(iter(metrics["cases"]))
    pred = np.asarray(nib.load(out / "predictions" / f"{name}.nii.gz").dataobj)
    assert set(np.unique(pred)) <= {0, 1, 2}
    labels = tmp_path / "labels.nii.gz"
    assert cli_main(["predict", "--checkpoint", str(run), "--input", str(data / "imagesTr" / f"{name}.nii.gz"),
                     "--output", str(labels)]) == 0
    np.testing.assert_array_equal(np.asarray(nib.load(labels).dataobj), pred)  # one decoding for both commands


def test_predict_writes_the_class_values(tmp_path, capsys):
    from mednca_jax.cli import main as cli_main
    from mednca_jax.train import checkpoint as ckpt

    cfg = validate(Config(name="two", model=ModelConfig(channels=6, hidden=16, steps=(3, 3), scales=(2, 1), patch_size=8),
                          data=DataConfig(image_size=(16, 16), labels="classes", classes=2)))
    ckpt.save_params(tmp_path / "run", random_params(cfg.model, seed=2, scale=1.0), cfg)
    scan = tmp_path / "scan.nii.gz"
    header = nib.Nifti1Header()
    write_volume(scan, np.random.default_rng(0).random((20, 13, 5)).astype(np.float32) * 300,
                 VolumeMeta((20, 13, 5), np.eye(4), header), np.float32)
    out = tmp_path / "out"
    assert cli_main(["predict", "--checkpoint", str(tmp_path / "run"), "--input", str(scan), "--output", str(out),
                     "--runs", "2"]) == 0
    labels = np.asarray(nib.load(out / "scan.nii.gz").dataobj)
    assert labels.dtype == np.uint8 and set(np.unique(labels)) == {0, 1, 2}  # random weights: each value somewhere
    q = json.loads((out / "quality.json").read_text())["scans"]["scan"]
    assert q["class_voxels"] == {"1": int((labels == 1).sum()), "2": int((labels == 2).sum())}


def test_exported_runtimes_segment_two_classes(tmp_path):
    """NumPy, PyTorch and ONNX exports of a two-class model give the JAX model's labels."""
    pytest.importorskip("torch")
    from test_export import jax_logits, small_cfg

    from mednca_jax.export import export_numpy, export_torch, load_runtime_module

    cfg = small_cfg(n_out=2)
    assert cfg.data.labels == "classes" and cfg.data.classes == 2
    params = random_params(cfg.model, seed=3, scale=1.0)
    x = np.random.default_rng(4).random((2, 32, 32, 1), dtype=np.float32)
    p = np.asarray(jax.nn.sigmoid(jax_logits(params, cfg, x)))
    want = probabilities_to_labels(p)
    assert set(np.unique(want)) == {0, 1, 2}
    # pixels where float round-off between implementations could flip the decision
    unsure = (np.abs(p - 0.5) < 1e-3).any(-1) | (np.abs(p[..., 0] - p[..., 1]) < 1e-3)
    export_numpy(params, cfg, tmp_path / "np")
    export_torch(params, cfg, tmp_path / "pt")
    m_np = load_runtime_module(tmp_path / "np" / "mednca_numpy.py", "np_classes").MedNCA.load(tmp_path / "np")
    m_pt = load_runtime_module(tmp_path / "pt" / "mednca_torch.py", "pt_classes").MedNCATorch.load(tmp_path / "pt")
    got = {"numpy": m_np.segment(x, fire_rate=0.0), "torch": m_pt.segment(x, fire_rate=0.0).numpy()}
    if importlib.util.find_spec("onnxruntime") and importlib.util.find_spec("onnx"):  # the optional [onnx] extra
        from mednca_jax.export import export_onnx, onnx_logits

        export_onnx(params, cfg, tmp_path / "onnx")
        z = onnx_logits(tmp_path / "onnx" / "mednca.onnx", x[..., 0], 0.0)
        got["onnx"] = probabilities_to_labels(1 / (1 + np.exp(-z)))
    for name, labels in got.items():
        assert labels.shape == want.shape and labels.dtype == np.uint8, name
        np.testing.assert_array_equal(labels[~unsure], want[~unsure], err_msg=name)
