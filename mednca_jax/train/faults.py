"""What the training loop does when something goes wrong, and how its processes agree.

- A lock file keeps a second trainer out of a run folder in use (:func:`run_lock`); a
  start-up failure leaves no half-made run folder (:func:`undo_on_failure`).
- Ctrl-C / SIGTERM become a flag the loop checks, so it saves first (:func:`interrupt_flag`).
- A diverged loss is detected by :func:`divergence` (the loop rolls back, see
  :func:`mednca_jax.train.loop.roll_back`); damaged newer checkpoints are set aside on resume.
- A full disk becomes one clear error (:func:`disk_full_error`) and keeps what was saved.
- Processes of one data-parallel job agree on stop flags, the clock and validation figures
  in one small collective each (:func:`agree`, :func:`process0_value`).
"""

from __future__ import annotations

import errno
import os
import shutil
import signal
import socket
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import jax
import numpy as np

from mednca_jax.errors import MedNCAError
from mednca_jax.train import checkpoint as ckpt

LOCK_FILE = "train.lock"
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


class RunError(MedNCAError, RuntimeError):
    """The run folder cannot be used as asked (e.g. it holds another run and no --resume)."""


@contextmanager
def interrupt_flag() -> Iterator[dict[str, bool]]:
    """Turn the first Ctrl-C / SIGTERM into a flag the loop checks, so it can save first."""
    flag = {"stop": False}
    previous = {}

    def handler(signum, frame):
        if flag["stop"]:  # second Ctrl-C: give up immediately
            raise KeyboardInterrupt
        flag["stop"] = True

    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            previous[sig] = signal.signal(sig, handler)
        except ValueError:  # not the main thread
            pass
    try:
        yield flag
    finally:
        for sig, h in previous.items():
            signal.signal(sig, h)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


@contextmanager
def run_lock(workdir: Path, enabled: bool = True) -> Iterator[None]:
    """Hold ``workdir/train.lock`` (``"PID HOST"``) for the body; refuse a folder in use.

    Taken with ``O_CREAT | O_EXCL``, so of two trainers started together exactly one gets
    it. A lock whose process is gone (same host, dead PID) is stale: taken over with a note.

    Raises:
        RunError: another live process holds the lock.
    """
    if not enabled:
        yield
        return
    path = workdir / LOCK_FILE
    host = socket.gethostname()
    for attempt in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            break
        except FileExistsError:
            try:
                pid_text, _, lock_host = path.read_text().strip().partition(" ")
                pid = int(pid_text)
            except (OSError, ValueError):  # being written right now, or gone again
                pid, lock_host = -1, host
            if attempt == 0 and pid != os.getpid() and lock_host == host and pid > 0 and not _pid_alive(pid):
                print(f"note: taking over the stale lock {path} of process {pid}, which no longer runs")
                path.unlink(missing_ok=True)
                continue
            raise RunError(
                f"{workdir} is in use by another trainer (process {pid_text if pid < 0 else pid} on {lock_host}, lock file {path}); "
                "wait for it to finish or choose another --workdir (delete the lock file only if no such process runs)"
            ) from None
    try:
        with os.fdopen(fd, "w") as f:
            f.write(f"{os.getpid()} {host}\n")
    except BaseException:  # e.g. a full disk: no empty lock file left behind
        path.unlink(missing_ok=True)
        raise
    try:
        yield
    finally:
        try:
            if path.read_text().split()[0] == str(os.getpid()):
                path.unlink()
        except (OSError, IndexError):
            pass


@contextmanager
def undo_on_failure(workdir: Path, created: bool, run_files: Sequence[str], enabled: bool = True) -> Iterator[None]:
    """Remove what a failed start-up wrote: the whole folder if this call ``created`` it, else
    the ``run_files`` that were not there before (so a bad ``--data`` leaves nothing behind
    that would make the next run fail)."""
    before = {p.name for p in workdir.iterdir()} if workdir.is_dir() else set()
    try:
        yield
    except BaseException:
        if enabled:
            if created:
                shutil.rmtree(workdir, ignore_errors=True)
            else:
                for name in run_files:
                    p = workdir / name
                    if name not in before and p.exists():
                        shutil.rmtree(p) if p.is_dir() else p.unlink()
        raise


def set_aside_newer_steps(workdir: Path, step: int) -> None:
    """Move checkpoint steps newer than the restored ``step`` (damaged ones: restore skipped
    them) to ``workdir/damaged/``, so the resumed run can write those steps again."""
    folder = workdir / ckpt.LATEST_DIR
    for p in folder.iterdir() if folder.is_dir() else ():
        if p.name.isdigit() and int(p.name) > step:
            target = workdir / "damaged" / f"{ckpt.LATEST_DIR}-{p.name}"
            target.parent.mkdir(exist_ok=True)
            shutil.rmtree(target, ignore_errors=True)
            shutil.move(str(p), target)
            print(f"note: moved the damaged checkpoint {p} to {target}")


def divergence(loss: float, max_loss: float) -> str:
    """Why ``loss`` counts as diverged (``""``: it does not): non-finite, or above ``max_loss``
    (``train.max_loss``; 0 = no bound)."""
    if not np.isfinite(loss):
        return "non-finite loss"
    if max_loss and loss > max_loss:
        return f"loss {loss:.3g} above train.max_loss {max_loss:g}"
    return ""


def unless_failed(fn: Any, after_failure: bool) -> None:
    """``fn()``; after a failure (already being raised) its own errors are dropped, so they
    do not hide the first one."""
    try:
        fn()
    except Exception:  # noqa: BLE001 - see the docstring
        if not after_failure:
            raise


def initialize_distributed_from_env() -> bool:
    """``jax.distributed.initialize`` from the usual variables, when a multi-host run is asked
    for: ``JAX_COORDINATOR_ADDRESS`` (host:port of process 0), ``JAX_NUM_PROCESSES``,
    ``JAX_PROCESS_ID``. Returns whether it initialised."""
    import os

    addr = os.environ.get("JAX_COORDINATOR_ADDRESS")
    if not addr:
        return False
    try:
        n, pid = int(os.environ["JAX_NUM_PROCESSES"]), int(os.environ["JAX_PROCESS_ID"])
    except (KeyError, ValueError):
        raise ValueError("JAX_COORDINATOR_ADDRESS is set: also set JAX_NUM_PROCESSES and JAX_PROCESS_ID (integers)") from None
    jax.distributed.initialize(coordinator_address=addr, num_processes=n, process_id=pid)
    return True


def is_primary() -> bool:
    """Whether this is process 0, the one that writes logs and run files in a multi-host run."""
    return jax.process_index() == 0


def primary_first(fn: Callable[[], Any], name: str) -> Any:
    """Run ``fn`` on process 0, then on the others: what process 0 writes (a split, a synthetic
    data set, a slice cache) is there when they read it. With one process: just ``fn()``."""
    if jax.process_count() == 1:
        return fn()
    from jax.experimental import multihost_utils

    out = fn() if is_primary() else None
    multihost_utils.sync_global_devices(f"mednca_jax:{name}")
    return out if is_primary() else fn()


def agree(flags: Sequence[bool], value: float) -> tuple[tuple[bool, ...], float]:
    """Each flag OR-ed over processes, and process 0's ``value`` (float32), in one collective:
    what the train loop asks after every step. The flags make all processes stop at the same
    step (a time limit or a Ctrl-C seen by one must stop all, or the others would wait in a
    collective); the value is the clock of the budget schedule."""
    if jax.process_count() == 1:
        return tuple(bool(f) for f in flags), float(value)
    from jax.experimental import multihost_utils

    row = np.array([*map(float, flags), value], np.float32)
    seen = np.asarray(multihost_utils.process_allgather(row)).reshape(-1, row.size)  # (processes, flags + 1)
    return tuple(bool(v) for v in seen[:, :-1].any(axis=0)), float(seen[0, -1])


def process0_value(value: float) -> float:
    """Process 0's ``value`` on every process (one small collective; the value itself alone).

    For what each process measures on its own but all must agree on: the elapsed time that
    sets a budget schedule's learning rate (each process has its own clock: without this the
    replicated params drift apart by the differing learning rates) and a validation Dice
    that decides whether every process writes the best checkpoint.
    """
    if jax.process_count() == 1:
        return float(value)
    from jax.experimental import multihost_utils

    return float(multihost_utils.broadcast_one_to_all(np.float32(value)))


def disk_full_error(e: OSError, workdir: Path) -> MedNCAError | None:
    """The error to raise instead of ``e`` when it says the disk is full, else ``None``."""
    if e.errno not in DISK_FULL:
        return None
    return RunError(
        f"the disk of {workdir} is full ({e.strerror}{': ' + str(e.filename) if e.filename else ''}); the checkpoints "
        "written so far are kept: free some space and continue with --resume"
    )
