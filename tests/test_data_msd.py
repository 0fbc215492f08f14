"""Reading MSD task folders, and a clear DataError naming the file for every kind of bad input."""

import gzip
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import HIPPOCAMPUS as HIPPO, require

from mednca_jax.config import DataConfig
from mednca_jax.data import DataError, list_cases, load_case, load_slices, write_volume

SHAPE = (8, 9, 6)


def _save(path: Path, arr: np.ndarray, affine: np.ndarray | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(arr, np.eye(4) if affine is None else affine), str(path))
    return path


def make_task(root: Path, n: int = 3, json_file: bool = True, labels: dict | None = None) -> Path:
    rng = np.random.default_rng(0)
    entries = []
    for i in range(n):
        name = f"case_{i:02d}.nii.gz"
        _save(root / "imagesTr" / name, rng.uniform(0, 1000, SHAPE).astype(np.float32))
        lab = np.zeros(SHAPE, np.uint8)
        lab[2:5, 3:6, 1:4] = 1
        lab[3, 4, 2] = 2
        _save(root / "labelsTr" / name, lab)
        entries.append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"})
    if json_file:
        meta = {"name": "T", "labels": labels or {"0": "bg", "1": "a", "2": "b"}, "modality": {"0": "MRI"}, "training": entries}
        (root / "dataset.json").write_text(json.dumps(meta))
    return root


CFG = DataConfig(image_size=(16, 16))


def test_list_cases_json_and_folders(tmp_path):
    a = list_cases(make_task(tmp_path / "a"))
    b = list_cases(make_task(tmp_path / "b", json_file=False))
    assert [c.name for c in a] == [c.name for c in b] == ["case_00", "case_01", "case_02"]
    assert a[0].label_values == (0, 1, 2) and b[0].label_values is None
    assert all(c.image.is_file() and c.label.is_file() for c in a + b)
    image, label, meta = load_case(a[1], CFG)
    assert image.shape == label.shape == meta.shape == SHAPE
    assert image.dtype == np.float32 and label.dtype == np.int16 and meta.affine.shape == (4, 4)


def test_unlabelled_cases(tmp_path):
    root = make_task(tmp_path / "t", json_file=False)
    _save(root / "imagesTs" / "new_01.nii.gz", np.arange(np.prod(SHAPE), dtype=np.uint8).reshape(SHAPE))
    (root / "imagesTr" / "._case_00.nii.gz").write_bytes(b"AppleDouble junk")  # macOS tar artefact: ignored
    cases = list_cases(root)
    assert [c.name for c in cases][-1] == "new_01" and cases[-1].label is None
    image, label, _ = load_case(cases[-1], CFG)
    assert label is None and image.shape == SHAPE
    # json "test" entries are plain strings in MSD
    root2 = make_task(tmp_path / "j")
    _save(root2 / "imagesTs" / "x.nii.gz", np.arange(np.prod(SHAPE), dtype=np.float32).reshape(SHAPE))
    meta = json.loads((root2 / "dataset.json").read_text())
    meta["test"] = ["./imagesTs/x.nii.gz"]
    (root2 / "dataset.json").write_text(json.dumps(meta))
    assert list_cases(root2)[-1].label is None


def test_4d_channels(tmp_path):
    root = make_task(tmp_path / "t", n=1, json_file=False)
    img4 = np.stack([np.full(SHAPE, 1.0), np.arange(np.prod(SHAPE), dtype=np.float64).reshape(SHAPE)], -1)
    img4[0, 0, 0, 0] = 5.0  # not constant
    _save(root / "imagesTr" / "case_00.nii.gz", img4.astype(np.float32))
    case = list_cases(root)[0]
    image, _, meta = load_case(case, DataConfig(channel=1))
    np.testing.assert_array_equal(image, img4[..., 1])
    assert meta.shape == SHAPE and meta.header.get_data_shape() == SHAPE
    with pytest.raises(DataError, match=r"case_00\.nii\.gz.*2 channels.*channel = 2"):
        load_case(case, DataConfig(channel=2))
    # a 3D image with channel 1 asked for
    root3 = make_task(tmp_path / "three", n=1, json_file=False)
    with pytest.raises(DataError, match=r"case_00\.nii\.gz is a 3D image"):
        load_case(list_cases(root3)[0], DataConfig(channel=1))
    # a long 4th axis is a time series, not modalities
    _save(root / "imagesTr" / "case_00.nii.gz", np.random.default_rng(0).normal(size=(4, 4, 3, 100)).astype(np.float32))
    _save(root / "labelsTr" / "case_00.nii.gz", np.zeros((4, 4, 3), np.uint8))
    with pytest.raises(DataError, match="time series"):
        load_case(list_cases(root)[0], CFG)


def test_write_volume_roundtrip(tmp_path):
    case = list_cases(make_task(tmp_path / "t"))[0]
    _, label, meta = load_case(case, CFG)
    out = write_volume(tmp_path / "pred" / "case_00.nii.gz", label > 0, meta)
    back = nib.load(str(out))
    np.testing.assert_array_equal(np.asarray(back.dataobj), label > 0)
    np.testing.assert_allclose(back.affine, meta.affine)


# -- bad input: each raises DataError naming the file ------------------------------------------
def test_not_an_msd_folder(tmp_path):
    (tmp_path / "stuff").mkdir()
    with pytest.raises(DataError, match=r"stuff is not an MSD task folder.*imagesTr"):
        list_cases(tmp_path / "stuff")
    with pytest.raises(DataError, match="does not exist"):
        list_cases(tmp_path / "nowhere")
    (tmp_path / "empty" / "imagesTr").mkdir(parents=True)
    with pytest.raises(DataError, match="no .nii.gz"):
        list_cases(tmp_path / "empty")


def test_dataset_json_malformed(tmp_path):
    root = make_task(tmp_path / "t")
    (root / "dataset.json").write_text('{"training": [')
    with pytest.raises(DataError, match=r"dataset\.json is not valid JSON"):
        list_cases(root)
    (root / "dataset.json").write_text('{"name": "x"}')
    with pytest.raises(DataError, match=r"dataset\.json has no 'training' key"):
        list_cases(root)
    (root / "dataset.json").write_text('{"training": [{"image": "./imagesTr/case_00.nii.gz", "label": "./labelsTr/gone.nii.gz"}]}')
    with pytest.raises(DataError, match=r"dataset\.json.*gone\.nii\.gz.*does not exist"):
        list_cases(root)
    (root / "dataset.json").write_text('{"training": [{"image": "./imagesTr/case_00.nii.gz"}]}')
    with pytest.raises(DataError, match=r"case_00\.nii\.gz\) has no 'label'"):
        list_cases(root)
    (root / "dataset.json").write_text('{"training": ["./imagesTr/case_00.nii.gz"]}')
    with pytest.raises(DataError, match=r"dataset\.json: training entry 0"):
        list_cases(root)


def test_dataset_json_required(tmp_path):
    root = make_task(tmp_path / "t", json_file=False)
    with pytest.raises(DataError, match=r"dataset\.json is missing"):
        list_cases(root, require_dataset_json=True)


def test_image_without_label(tmp_path):
    root = make_task(tmp_path / "t", json_file=False)
    (root / "labelsTr" / "case_01.nii.gz").unlink()
    with pytest.raises(DataError, match=r"imagesTr/case_01\.nii\.gz has no label"):
        list_cases(root)


def test_shape_mismatch(tmp_path):
    root = make_task(tmp_path / "t")
    _save(root / "labelsTr" / "case_01.nii.gz", np.zeros((8, 9, 7), np.uint8))
    case = list_cases(root)[1]
    with pytest.raises(DataError, match=r"labelsTr/case_01\.nii\.gz has shape \(8, 9, 7\)"):
        load_case(case, CFG)


def test_affine_mismatch(tmp_path):
    root = make_task(tmp_path / "t")
    aff = np.eye(4)
    aff[0, 3] = 2.0
    _save(root / "labelsTr" / "case_02.nii.gz", np.zeros(SHAPE, np.uint8), aff)
    with pytest.raises(DataError, match=r"labelsTr/case_02\.nii\.gz has a different affine"):
        load_case(list_cases(root)[2], CFG)
    aff[0, 3] = 1e-5  # round-off is tolerated
    _save(root / "labelsTr" / "case_02.nii.gz", np.zeros(SHAPE, np.uint8), aff)
    load_case(list_cases(root)[2], CFG)


def test_truncated_and_corrupt_gzip(tmp_path):
    root = make_task(tmp_path / "t")
    path = root / "imagesTr" / "case_00.nii.gz"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"image file .*case_00\.nii\.gz .*truncated or corrupt"):
        load_case(list_cases(root)[0], CFG)
    path.write_bytes(b"this is not a gzip file at all" * 20)
    with pytest.raises(DataError, match=r"case_00\.nii\.gz .*truncated or corrupt"):
        load_case(list_cases(root)[0], CFG)
    lpath = root / "labelsTr" / "case_01.nii.gz"
    lpath.write_bytes(gzip.compress(b"\x00" * 100))  # valid gzip, not NIfTI
    with pytest.raises(DataError, match=r"label file .*case_01\.nii\.gz"):
        load_case(list_cases(root)[1], CFG)
    # and through the cached loader
    with pytest.raises(DataError, match=r"case_00\.nii\.gz"):
        load_slices(list_cases(root), CFG, tmp_path / "cache")


def test_nan_and_constant_image(tmp_path):
    root = make_task(tmp_path / "t")
    img = np.ones(SHAPE, np.float32)
    img[1, 2, 3] = np.nan
    _save(root / "imagesTr" / "case_00.nii.gz", img)
    with pytest.raises(DataError, match=r"case_00\.nii\.gz has 1 NaN/inf"):
        load_case(list_cases(root)[0], CFG)
    img[1, 2, 3] = np.inf
    _save(root / "imagesTr" / "case_00.nii.gz", img)
    with pytest.raises(DataError, match=r"case_00\.nii\.gz has 1 NaN/inf"):
        load_case(list_cases(root)[0], CFG)
    _save(root / "imagesTr" / "case_01.nii.gz", np.zeros(SHAPE, np.uint8))
    with pytest.raises(DataError, match=r"case_01\.nii\.gz is constant"):
        load_case(list_cases(root)[1], CFG)


@pytest.mark.parametrize(
    "values, match",
    [
        (np.float32(0.5), "non-integer"),
        (np.int16(-1), "negative"),
        (np.uint8(7), r"values \[7\] not listed in dataset\.json"),
    ],
)
def test_bad_label_values(tmp_path, values, match):
    root = make_task(tmp_path / "t")
    lab = np.zeros(SHAPE, dtype=np.asarray(values).dtype)
    lab[0, 0, 0] = values
    _save(root / "labelsTr" / "case_02.nii.gz", lab)
    with pytest.raises(DataError, match=r"label file .*labelsTr/case_02\.nii\.gz.*" + match):
        load_case(list_cases(root)[2], CFG)


def test_multiclass_label_beyond_n_out_names_file(tmp_path):
    root = make_task(tmp_path / "t")
    with pytest.raises(DataError, match=r"case_00\.nii\.gz.*class 2.*n_out = 1"):
        load_slices(list_cases(root)[:1], DataConfig(image_size=(16, 16), labels="multiclass"), tmp_path / "c", n_out=1)
    s = load_slices(list_cases(root)[:1], DataConfig(image_size=(16, 16), labels="multiclass"), tmp_path / "c", n_out=2)
    assert s.labels.shape == (SHAPE[2], 16, 16, 2) and s.labels[..., 1].sum() > 0


def test_empty_and_constant_slices_give_no_nan(tmp_path):
    root = make_task(tmp_path / "t", n=1)
    img = np.random.default_rng(3).uniform(0, 10, SHAPE).astype(np.float32)
    img[..., 0] = 0  # empty slice
    img[..., 1] = 4  # constant slice
    _save(root / "imagesTr" / "case_00.nii.gz", img)
    s = load_slices(list_cases(root), CFG, tmp_path / "c")
    assert np.isfinite(s.images).all()
    np.testing.assert_array_equal(s.images[:2], 0)
    assert s.images[2].max() == 1


# -- the real data ------------------------------------------------------------------------
def test_real_hippocampus_three_cases(tmp_path):
    require(HIPPO / "imagesTr")
    cases = list_cases(HIPPO)
    assert len(cases) >= 3 and all(c.label is not None for c in cases)
    assert cases[0].label_values == (0, 1, 2)
    s = load_slices(cases[:3], DataConfig(), tmp_path / "cache")
    assert s.images.shape[1:] == (64, 64, 1) and s.labels.shape[1:] == (64, 64, 1)
    assert len(s) == sum(shape[2] for shape in s.native_shapes)
    assert np.isfinite(s.images).all() and s.images.min() >= 0 and s.images.max() <= 1
    assert set(np.unique(s.labels)) == {0.0, 1.0} and s.has_foreground.any()
