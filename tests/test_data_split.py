"""Patient-level seeded split: disjoint, complete, deterministic, independent of listing order."""

import json

import pytest

from mednca_jax.config import DataConfig
from mednca_jax.data import DataError, Split, make_split, read_split, split_from_config, write_split

NAMES = [f"hippocampus_{i:03d}" for i in range(1, 41)]


def _check_partition(split: Split, names):
    parts = [split.train, split.val, split.test]
    flat = [n for p in parts for n in p]
    assert sorted(flat) == sorted(names)  # covers all, each exactly once
    assert len(set(flat)) == len(flat)


def test_partition_and_counts():
    s = make_split(NAMES, (0.7, 0.1, 0.2), seed=0)
    _check_partition(s, NAMES)
    assert (len(s.train), len(s.val), len(s.test)) == (28, 4, 8)
    assert list(s.train) == sorted(s.train)
    s24 = make_split(NAMES[:24], (0.7, 0.1, 0.2), 0)
    assert (len(s24.train), len(s24.val), len(s24.test)) == (17, 2, 5)  # largest remainder


def test_seeded_and_order_independent():
    a = make_split(NAMES, (0.6, 0.2, 0.2), seed=3)
    b = make_split(list(reversed(NAMES)), (0.6, 0.2, 0.2), seed=3)
    shuffled = NAMES[::3] + NAMES[1::3] + NAMES[2::3]
    c = make_split(shuffled, (0.6, 0.2, 0.2), seed=3)
    assert a == b == c
    d = make_split(NAMES, (0.6, 0.2, 0.2), seed=4)
    assert d.test != a.test
    # not just the listing order: test cases are spread, not the last names
    assert set(a.test) != set(sorted(NAMES)[-len(a.test):])


def test_small_sets_keep_every_part_nonempty():
    for n in (3, 4, 5):
        s = make_split(NAMES[:n], (0.7, 0.1, 0.2), 0)
        _check_partition(s, NAMES[:n])
        assert len(s.train) >= 1 and len(s.val) >= 1 and len(s.test) >= 1, (n, s)
    s = make_split(NAMES[:2], (0.7, 0.1, 0.2), 0)
    _check_partition(s, NAMES[:2])
    assert len(s.train) >= 1
    s = make_split(NAMES, (0.8, 0.0, 0.2), 0)
    assert s.val == () and len(s.test) == 8


def test_split_from_config_and_errors():
    cfg = DataConfig(split=(0.5, 0.25, 0.25), split_seed=7)
    assert split_from_config(NAMES, cfg) == make_split(NAMES, (0.5, 0.25, 0.25), 7)
    with pytest.raises(DataError, match="unique"):
        make_split(NAMES + NAMES[:1])
    with pytest.raises(DataError, match="empty"):
        make_split([])
    with pytest.raises(DataError, match="summing to 1"):
        make_split(NAMES, (0.5, 0.2, 0.2))


def test_write_read_roundtrip(tmp_path):
    s = make_split(NAMES, (0.7, 0.1, 0.2), 1)
    p = write_split(tmp_path / "run" / "split.json", s)
    assert read_split(p) == s
    raw = json.loads(p.read_text())
    assert raw["seed"] == 1 and len(raw["train"]) == len(s.train)
    assert not [f for f in p.parent.iterdir() if f.name != "split.json"]  # no temp files left
    p.write_text("{not json")
    with pytest.raises(DataError, match="split.json is not valid JSON"):
        read_split(p)
    p.write_text(json.dumps({"train": ["a"], "val": ["a"], "test": []}))
    with pytest.raises(DataError, match="more than one part"):
        read_split(p)
    with pytest.raises(DataError, match="does not exist"):
        read_split(tmp_path / "missing.json")
