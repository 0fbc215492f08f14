"""Slice cache: a second load reads no NIfTI, invalidation, atomic files, read-only data."""

import os
import stat
import warnings

import nibabel
import numpy as np
import pytest

from mednca_jax.config import DataConfig
from mednca_jax.data import (
    DataError,
    cache_key,
    default_cache_dir,
    list_cases,
    load_slices,
    make_synthetic_task,
    resample_to_native,
)

CFG = DataConfig(image_size=(16, 16))
SHAPE = (24, 26, 24)


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    return make_synthetic_task(tmp_path_factory.mktemp("synth") / "Task", n_cases=3, seed=5, shape=SHAPE)


def _no_nifti(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("nibabel.load called on a cache hit")

    monkeypatch.setattr(nibabel, "load", boom)


def test_cache_hit_reads_no_nifti(task, tmp_path, monkeypatch):
    cases = list_cases(task)
    first = load_slices(cases, CFG, tmp_path / "c")
    assert len(list((tmp_path / "c").glob("*.npz"))) == 3
    _no_nifti(monkeypatch)
    second = load_slices(cases, CFG, tmp_path / "c")
    np.testing.assert_array_equal(first.images, second.images)
    np.testing.assert_array_equal(first.labels, second.labels)
    np.testing.assert_array_equal(first.case_index, second.case_index)
    np.testing.assert_array_equal(first.slice_index, second.slice_index)
    assert first.native_shapes == second.native_shapes == (SHAPE,) * 3
    np.testing.assert_allclose(first.affines, second.affines)
    assert second.headers[0].get_data_shape() == SHAPE
    # a different data config misses the cache (and so would need NIfTI)
    with pytest.raises(AssertionError, match="cache hit"):
        load_slices(cases, DataConfig(image_size=(8, 8)), tmp_path / "c")


def test_sliceset_layout(task, tmp_path):
    s = load_slices(list_cases(task), CFG, tmp_path / "c")
    n = 3 * SHAPE[2]
    assert s.images.shape == (n, 16, 16, 1) and s.images.dtype == np.float32
    assert s.labels.shape == (n, 16, 16, 1) and s.labels.dtype == np.float32
    np.testing.assert_array_equal(s.case_index, np.repeat([0, 1, 2], SHAPE[2]))
    np.testing.assert_array_equal(s.slice_index, np.tile(np.arange(SHAPE[2]), 3))
    sub = s.subset([s.case_names[2], s.case_names[0]])
    assert sub.case_names == (s.case_names[2], s.case_names[0])
    np.testing.assert_array_equal(sub.images[: SHAPE[2]], s.images[s.case_slices(2)])
    np.testing.assert_array_equal(sub.case_index, np.repeat([0, 1], SHAPE[2]))
    # predictions written back on the native grid of the right case
    meta = sub.meta(0)
    vol = resample_to_native(sub.labels[sub.case_slices(0), ..., 0], meta.shape, s.slice_axis)
    assert vol.shape == SHAPE


def test_invalidation_on_file_change(task, tmp_path):
    cases = list_cases(task)
    k1 = cache_key(cases[0], CFG)
    assert cache_key(cases[0], CFG) == k1
    assert cache_key(cases[0], DataConfig(image_size=(16, 16), slice_axis=1)) != k1
    assert cache_key(cases[0], CFG, n_out=2) != k1
    st = os.stat(cases[0].label)
    os.utime(cases[0].label, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    try:
        assert cache_key(cases[0], CFG) != k1
    finally:
        os.utime(cases[0].label, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_corrupt_cache_entry_is_recomputed(task, tmp_path):
    cases = list_cases(task)[:1]
    good = load_slices(cases, CFG, tmp_path / "c")
    (entry,) = (tmp_path / "c").glob("*.npz")
    entry.write_bytes(b"garbage")
    again = load_slices(cases, CFG, tmp_path / "c")
    np.testing.assert_array_equal(good.images, again.images)
    with np.load(entry) as z:  # rewritten whole
        assert "images" in z.files


def test_read_only_data_and_cache(task, tmp_path):
    # data folder read-only: loading only reads it
    ro = tmp_path / "ro"
    make_synthetic_task(ro, n_cases=1, seed=1, shape=SHAPE)
    modes = {}
    for p in [ro, *ro.rglob("*")]:
        modes[p] = p.stat().st_mode
        p.chmod(stat.S_IMODE(p.stat().st_mode) & ~0o222)
    try:
        before = sorted(str(p) for p in ro.rglob("*"))
        s = load_slices(list_cases(ro), CFG, tmp_path / "c")
        assert len(s) == SHAPE[2]
        assert sorted(str(p) for p in ro.rglob("*")) == before
        # an unusable cache dir: still works, with a warning (a file where the dir should be)
        blocker = tmp_path / "blocker"
        blocker.write_text("x")
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            s2 = load_slices(list_cases(ro), CFG, blocker / "cache")
        np.testing.assert_array_equal(s.images, s2.images)
        assert any("without caching" in str(x.message) for x in w)
    finally:
        for p, m in modes.items():
            p.chmod(m)


def test_no_temp_files_and_env_dir(task, tmp_path, monkeypatch):
    load_slices(list_cases(task)[:1], CFG, tmp_path / "c")
    assert [p.suffix for p in (tmp_path / "c").iterdir()] == [".npz"]
    monkeypatch.setenv("MEDNCA_CACHE", str(tmp_path / "env"))
    assert default_cache_dir() == tmp_path / "env"
    load_slices(list_cases(task)[:1], CFG)
    assert len(list((tmp_path / "env").glob("*.npz"))) == 1
    monkeypatch.delenv("MEDNCA_CACHE")
    assert default_cache_dir().parts[-2:] == (".cache", "mednca_jax")


def test_mixed_labelled_unlabelled_rejected(task, tmp_path):
    cases = list_cases(task)
    from dataclasses import replace

    mixed = [cases[0], replace(cases[1], label=None)]
    with pytest.raises(DataError, match=r"synth_001\.nii\.gz has no label"):
        load_slices(mixed, CFG, tmp_path / "c")
    unl = load_slices([replace(c, label=None) for c in cases], CFG, tmp_path / "c")
    assert unl.labels is None and not unl.has_foreground.any()

