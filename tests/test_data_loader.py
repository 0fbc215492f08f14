"""Batch iterator: seeded determinism, exact resume, foreground oversampling, prefetch errors."""

import gc
import threading

import numpy as np
import pytest

from mednca_jax.config import DataConfig
from mednca_jax.data import BatchIterator, DataError, SliceSet, eval_batches


def make_slices(n=23, fg_every=4, h=4, w=5):
    """Slice i holds the value i everywhere (so batches reveal their rows); every
    ``fg_every``-th slice has foreground."""
    images = np.broadcast_to(np.arange(n, dtype=np.float32)[:, None, None, None], (n, h, w, 1)).copy()
    labels = np.zeros((n, h, w, 1), np.float32)
    labels[::fg_every, 1, 1, 0] = 1
    return SliceSet(
        images=images,
        labels=labels,
        case_index=np.zeros(n, np.int32),
        slice_index=np.arange(n, dtype=np.int32),
        case_names=("c",),
        native_shapes=((h, w, n),),
        affines=np.eye(4)[None],
        headers=(None,),
        image_paths=(None,),
    )


def rows(batch):
    return batch["image"][:, 0, 0, 0].astype(int).tolist()


def take(it, k):
    return [rows(next(it)) for _ in range(k)]


@pytest.mark.parametrize("prefetch", [0, 3])
def test_batches_shape_and_epochs(prefetch):
    s = make_slices()
    with BatchIterator(s, batch_size=5, seed=1, prefetch=prefetch) as it:
        b = next(it)
        assert b["image"].shape == (5, 4, 5, 1) and b["label"].shape == (5, 4, 5, 1)
        assert b["image"].dtype == np.float32 and set(b) == {"image", "label"}
        assert it.batches_per_epoch == 4
        epoch = [rows(b)] + take(it, 3)
        flat = [r for bb in epoch for r in bb]
        assert len(set(flat)) == 20  # an epoch has no repeats (the 3 left over are dropped)
        assert it.state_dict()["epoch"] == 1 and it.state_dict()["offset"] == 0
        nxt = take(it, 4)
    assert nxt != epoch  # reshuffled per epoch


def test_seeded_determinism_and_prefetch_equivalence():
    s = make_slices()
    a = take(BatchIterator(s, 4, seed=7, prefetch=0), 12)
    b = take(BatchIterator(s, 4, seed=7, prefetch=2), 12)
    c = take(BatchIterator(s, 4, seed=8, prefetch=2), 12)
    assert a == b and a != c


@pytest.mark.parametrize("fg", [0.0, 0.5])
def test_resume_reproduces_batches(fg):
    s = make_slices()
    full = BatchIterator(s, 6, seed=3, foreground_fraction=fg, prefetch=2)
    ref = take(full, 15)
    part = BatchIterator(s, 6, seed=3, foreground_fraction=fg, prefetch=2)
    first = take(part, 7)  # crosses an epoch boundary (3-6 batches per epoch)
    state = dict(part.state_dict())
    part.close()
    assert first == ref[:7]
    resumed = BatchIterator(s, 6, seed=999, foreground_fraction=fg, prefetch=3)
    take(resumed, 2)  # any position; the state overrides it (and the seed)
    resumed.load_state_dict(state)
    assert resumed.seed == 3
    assert take(resumed, 8) == ref[7:]
    full.close()
    resumed.close()


def test_state_is_plain_and_checked():
    s = make_slices()
    it = BatchIterator(s, 4, seed=0, prefetch=0)
    take(it, 3)
    st = it.state_dict()
    assert all(type(v) is int for v in st.values()) and {"epoch", "offset", "seed"} <= set(st)
    with pytest.raises(DataError, match="slices"):
        BatchIterator(make_slices(n=30), 4, prefetch=0).load_state_dict(st)


def test_foreground_oversampling():
    s = make_slices(n=40, fg_every=10)  # 4 of 40 slices have foreground
    it = BatchIterator(s, 8, seed=0, foreground_fraction=0.5, prefetch=0)
    for _ in range(10):
        b = next(it)
        assert (b["label"].reshape(8, -1).max(1) > 0).sum() >= 4
    uni = BatchIterator(s, 8, seed=0, prefetch=0)
    fg_uni = sum((next(uni)["label"].reshape(8, -1).max(1) > 0).sum() for _ in range(5))
    assert fg_uni < 20  # uniform sampling sees far fewer (4 per epoch of 5 batches)
    with pytest.raises(DataError, match="no slice has foreground"):
        empty = make_slices()
        empty.labels[:] = 0
        BatchIterator(empty, 4, foreground_fraction=0.5)
    it = BatchIterator.from_config(s, DataConfig(foreground_fraction=1.0), 4, seed=0, prefetch=0)
    assert all(set(rows(next(it))) <= {0, 10, 20, 30} for _ in range(5))


def test_small_set_repeats_slices():
    s = make_slices(n=3)
    b = next(BatchIterator(s, 8, seed=0, prefetch=0))
    assert b["image"].shape[0] == 8 and set(rows(b)) == {0, 1, 2}


def test_prefetch_error_is_reraised_in_consumer():
    s = make_slices()
    where = []

    def transform(batch, rng):
        where.append(threading.current_thread().name)
        if len(where) == 3:
            raise RuntimeError("augmentation exploded")
        return batch

    it = BatchIterator(s, 4, seed=0, prefetch=2, transform=transform)
    next(it)
    next(it)
    with pytest.raises(RuntimeError, match="augmentation exploded"):
        next(it)
    assert where[0] == "mednca-prefetch"  # it really ran in the thread
    it.close()


def test_transform_rng_is_positional():
    s = make_slices()

    def noisy(batch, rng):
        return {**batch, "image": batch["image"] + rng.normal(size=batch["image"].shape).astype(np.float32)}

    a = [next(BatchIterator(s, 4, seed=2, transform=noisy, prefetch=1))["image"] for _ in range(2)]
    np.testing.assert_array_equal(a[0], a[1])


def test_close_stops_thread():
    it = BatchIterator(make_slices(), 4, seed=0, prefetch=2)
    next(it)
    t = it._thread
    it.close()
    assert t is not None and not t.is_alive()
    next(it)  # iteration can go on after close (restarts the thread)
    it.close()


def test_abandoned_iterator_thread_ends():
    it = BatchIterator(make_slices(), 4, seed=0, prefetch=2)
    next(it)
    t = it._thread
    del it
    gc.collect()
    t.join(timeout=2)
    assert not t.is_alive()


def test_eval_batches_cover_in_order():
    s = make_slices(n=11)
    got = list(eval_batches(s, 4))
    assert [len(r) for r, _ in got] == [4, 4, 3]
    assert [x for _, b in got for x in rows(b)] == list(range(11))
