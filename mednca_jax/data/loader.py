"""Batch iteration over a :class:`SliceSet`: seeded, resumable, prefetched in a thread.

Batch ``b`` of epoch ``e`` is a pure function of ``(seed, e, b)`` (NumPy generators seeded
with ``[seed, e, stream]``), so the position ``{"epoch", "offset", "seed"}`` is all a
checkpoint needs: :meth:`BatchIterator.load_state_dict` resumes with exactly the batches an
uninterrupted run would have produced. The prefetch thread only runs ahead on that pure
sequence; the position reported is that of the batches handed to the consumer.
"""

from __future__ import annotations

import queue
import threading
import weakref
from typing import Any, Callable, Iterator

import numpy as np

from mednca_jax.config import DataConfig
from mednca_jax.data.cache import SliceSet
from mednca_jax.data.msd import DataError

Batch = dict[str, np.ndarray]
Transform = Callable[[Batch, np.random.Generator], Batch]

_STREAM_ALL, _STREAM_FG, _STREAM_MIX, _STREAM_TRANSFORM = 0, 1, 2, 3


class _Failure:
    """An exception raised in the prefetch thread, carried to the consumer."""

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


class BatchIterator:
    """Endless iterator of training batches ``{"image": (B,H,W,n_in), "label": (B,H,W,n_out)}``
    (float32; no "label" when the SliceSet has none).

    Args:
        slices: the data.
        batch_size: B.
        seed: shuffling seed.
        foreground_fraction: share of each batch drawn from slices with foreground (rounded
            to whole slices); the rest is a uniform pass over all slices. 0 = plain epochs.
        prefetch: batches prepared ahead in a background thread (0: no thread).
        shuffle: False iterates slices in order (still epochs of ``N // B`` batches).
        transform: optional ``f(batch, rng) -> batch`` run in the producer (augmentation);
            ``rng`` is seeded by the batch position, so it is resumable too.

    An epoch has ``max(1, N // n_uniform)`` batches (``n_uniform = B - n_fg``; partial last
    batches are dropped; a set smaller than a batch repeats slices).
    """

    def __init__(
        self,
        slices: SliceSet,
        batch_size: int,
        seed: int = 0,
        foreground_fraction: float = 0.0,
        prefetch: int = 2,
        shuffle: bool = True,
        transform: Transform | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0.0 <= foreground_fraction <= 1.0:
            raise ValueError(f"foreground_fraction must be in [0, 1], got {foreground_fraction}")
        if len(slices) == 0:
            raise DataError("cannot iterate over an empty set of slices")
        self.slices = slices
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.shuffle = shuffle
        self.transform = transform
        self.prefetch = int(prefetch)
        self.n_fg = int(round(foreground_fraction * batch_size))
        self.fg_pool = np.flatnonzero(slices.has_foreground)
        if self.n_fg > 0 and self.fg_pool.size == 0:
            raise DataError(
                f"foreground_fraction = {foreground_fraction} but no slice has foreground; "
                "set data.foreground_fraction = 0 or check the labels"
            )
        self.n_all = self.batch_size - self.n_fg
        n = len(slices)
        self.batches_per_epoch = max(1, n // self.n_all) if self.n_all else max(1, self.fg_pool.size // self.n_fg)
        self._epoch, self._offset = 0, 0
        self._queue: queue.Queue | None = None
        self._stop: threading.Event | None = None
        self._thread: threading.Thread | None = None

    @classmethod
    def from_config(cls, slices: SliceSet, data_cfg: DataConfig, batch_size: int, seed: int, **kw: Any) -> "BatchIterator":
        """Iterator with ``data_cfg.foreground_fraction``."""
        return cls(slices, batch_size, seed, data_cfg.foreground_fraction, **kw)

    # -- the pure batch sequence -------------------------------------------------------
    def _rng(self, *stream: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, *stream])

    def batch_indices(self, epoch: int, offset: int) -> np.ndarray:
        """``(B,)`` slice rows of batch ``offset`` of ``epoch`` (deterministic)."""
        n = len(self.slices)
        parts = []
        if self.n_all:
            perm = self._rng(epoch, _STREAM_ALL).permutation(n) if self.shuffle else np.arange(n)
            start = offset * self.n_all
            parts.append(np.resize(perm, max(n, start + self.n_all))[start : start + self.n_all])
        if self.n_fg:
            pool = self.fg_pool
            fperm = self._rng(epoch, _STREAM_FG).permutation(pool.size) if self.shuffle else np.arange(pool.size)
            parts.append(pool[fperm[(offset * self.n_fg + np.arange(self.n_fg)) % pool.size]])
        idx = np.concatenate(parts)
        if self.shuffle and self.n_fg and self.n_all:
            idx = idx[self._rng(epoch, _STREAM_MIX, offset).permutation(idx.size)]  # mix fg/uniform rows
        return idx

    def make_batch(self, epoch: int, offset: int) -> Batch:
        idx = self.batch_indices(epoch, offset)
        batch = {"image": np.ascontiguousarray(self.slices.images[idx], dtype=np.float32)}
        if self.slices.labels is not None:
            batch["label"] = np.ascontiguousarray(self.slices.labels[idx], dtype=np.float32)
        if self.transform is not None:
            batch = self.transform(batch, self._rng(epoch, _STREAM_TRANSFORM, offset))
        return batch

    def _advance(self, epoch: int, offset: int) -> tuple[int, int]:
        offset += 1
        return (epoch + 1, 0) if offset >= self.batches_per_epoch else (epoch, offset)

    # -- position ------------------------------------------------------------------------
    def state_dict(self) -> dict[str, int]:
        """Position of the next batch to be returned (JSON/orbax-serialisable ints)."""
        return {"epoch": self._epoch, "offset": self._offset, "seed": self.seed, "num_slices": len(self.slices)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state`` (from :meth:`state_dict`); discards prefetched batches."""
        if "num_slices" in state and int(state["num_slices"]) != len(self.slices):
            raise DataError(
                f"data iterator state is for {int(state['num_slices'])} slices but the data has "
                f"{len(self.slices)}; resume with the same data, split and data config"
            )
        self._stop_thread()
        self._epoch, self._offset, self.seed = int(state["epoch"]), int(state["offset"]), int(state["seed"])
        if self._offset >= self.batches_per_epoch:
            raise DataError(f"iterator offset {self._offset} >= batches per epoch {self.batches_per_epoch}")

    # -- iteration -----------------------------------------------------------------------
    def __iter__(self) -> "BatchIterator":
        return self

    def __next__(self) -> Batch:
        if self.prefetch <= 0:
            batch = self.make_batch(self._epoch, self._offset)
        else:
            if self._thread is None:
                self._start_thread()
            assert self._queue is not None and self._thread is not None
            while True:
                try:
                    item = self._queue.get(timeout=0.1)
                    break
                except queue.Empty:  # never wait forever on a thread that is gone
                    if not self._thread.is_alive() and self._queue.empty():
                        self._stop_thread()
                        raise RuntimeError("the batch prefetch thread stopped without a batch or an error") from None
            if isinstance(item, _Failure):
                self._stop_thread()
                raise item.exc
            batch = item
        self._epoch, self._offset = self._advance(self._epoch, self._offset)
        return batch

    def _start_thread(self) -> None:
        self._queue = queue.Queue(maxsize=self.prefetch)
        self._stop = threading.Event()
        # the thread holds only a weak reference, so an abandoned iterator is collected
        # (and its thread ends) instead of living forever
        self._thread = threading.Thread(
            target=_produce, args=(weakref.ref(self), self._queue, self._stop, self._epoch, self._offset),
            daemon=True, name="mednca-prefetch",
        )
        self._thread.start()

    def _stop_thread(self) -> None:
        if self._thread is not None:
            assert self._stop is not None
            self._stop.set()
            if self._thread is not threading.current_thread():  # __del__ may run in the thread
                self._thread.join()
        self._thread, self._queue, self._stop = None, None, None

    def close(self) -> None:
        """Stop the prefetch thread (the position is kept; iteration may continue)."""
        self._stop_thread()

    def __enter__(self) -> "BatchIterator":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


def _produce(ref: "weakref.ref[BatchIterator]", q: queue.Queue, stop: threading.Event, epoch: int, offset: int) -> None:
    """Prefetch thread: put batches (epoch, offset), (next...) into ``q`` until stopped."""
    while not stop.is_set():
        it = ref()
        if it is None:
            return
        try:
            item: Any = it.make_batch(epoch, offset)
            epoch, offset = it._advance(epoch, offset)
        except BaseException as e:  # handed to the consumer, never swallowed
            item = _Failure(e)
        del it
        while not stop.is_set():
            try:
                q.put(item, timeout=0.05)
                break
            except queue.Full:
                if ref() is None:
                    return
        if isinstance(item, _Failure):
            return


def eval_batches(slices: SliceSet, batch_size: int) -> Iterator[tuple[np.ndarray, Batch]]:
    """All slices in order, once, last batch partial: yields ``(rows (b,), batch)``."""
    for start in range(0, len(slices), batch_size):
        rows = np.arange(start, min(start + batch_size, len(slices)))
        batch = {"image": slices.images[rows]}
        if slices.labels is not None:
            batch["label"] = slices.labels[rows]
        yield rows, batch
