"""One data-parallel JAX job of N processes on this machine, each kept to its own cores.

XLA:CPU keeps a second core only partly busy within one process (the NCA's per-step matmuls
are small), while processes of one core each run side by side at full speed. So on a CPU
machine a job of one process per core, joined by ``jax.distributed`` and split by
``jax.shard_map`` (see :func:`mednca_jax.train.step.make_train_step`), trains faster than one
process. This module only starts the processes with the usual ``JAX_COORDINATOR_ADDRESS`` /
``JAX_NUM_PROCESSES`` / ``JAX_PROCESS_ID`` variables and waits for them; JAX does the rest.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from typing import Sequence

from mednca_jax.machine import usable_cores


def core_blocks(n: int, cores: Sequence[int] | None = None) -> list[list[int]]:
    """``cores`` split into ``n`` contiguous, near-equal, non-empty blocks (one per process)."""
    cores = list(usable_cores() if cores is None else cores)
    if not 1 <= n <= len(cores):
        raise ValueError(f"cannot run {n} processes on {len(cores)} usable cores; use 1 to {len(cores)}")
    return [cores[i * len(cores) // n : (i + 1) * len(cores) // n] for i in range(n)]


def auto_processes(platform: str, cores: int, batch_size: int) -> int:
    """How many data-parallel processes ``mednca train`` starts when ``--cpu-processes`` is
    not given: on a CPU-only machine one per usable core (XLA:CPU leaves a second core partly
    idle within one process, docs/performance.md), or the most that divide the batch, with at
    least 2 cores; 1 elsewhere (an accelerator does the work, the processes would share it)."""
    if platform != "cpu" or cores < 2:
        return 1
    return max(d for d in range(1, cores + 1) if batch_size % d == 0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def without_option(argv: Sequence[str], name: str) -> list[str]:
    """``argv`` minus ``name VALUE`` and ``name=VALUE`` (to pass a command line on)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == name:
            skip = True
        elif not a.startswith(name + "="):
            out.append(a)
    return out


def start_job_process(
    cmd: Sequence[str], n: int, i: int, port: int, env: dict[str, str] | None = None, **popen_kwargs
) -> subprocess.Popen:
    """Start process ``i`` of an ``n``-process ``jax.distributed`` job whose coordinator is
    ``localhost:port``, kept to the ``i``-th block of :func:`core_blocks`."""
    env = dict(os.environ if env is None else env)
    env.update(JAX_COORDINATOR_ADDRESS=f"localhost:{port}", JAX_NUM_PROCESSES=str(n), JAX_PROCESS_ID=str(i))
    proc = subprocess.Popen(list(cmd), env=env, **popen_kwargs)
    # Pinned from here rather than in a preexec_fn (which forces a fork of this possibly
    # multithreaded process): the child is still starting Python, and the threads JAX starts
    # later inherit the affinity.
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(proc.pid, core_blocks(n)[i])
    return proc


def run_local_job(cmd: Sequence[str], n: int, env: dict[str, str] | None = None, poll_s: float = 0.2) -> int:
    """Run ``cmd`` as processes ``0 .. n-1`` of one ``jax.distributed`` job on this machine
    (:func:`start_job_process`). Returns 0 when all succeed, else the first non-zero exit
    status (the other processes are then stopped: they would wait for the failed one in their
    next collective). Ctrl-C reaches every process (same process group); this waits for them
    to stop and returns their status. Raises ``ValueError`` (before starting anything) when
    there are fewer usable cores than ``n``.
    """
    core_blocks(n)
    port = free_port()
    procs = [start_job_process(cmd, n, i, port, env) for i in range(n)]
    try:
        while True:
            codes = [p.poll() for p in procs]
            failed = [c for c in codes if c not in (None, 0)]
            if failed:
                for p in procs:
                    if p.poll() is None:
                        p.send_signal(signal.SIGTERM)
                for p in procs:
                    p.wait()
                return failed[0] if failed[0] > 0 else 128 - failed[0]  # killed by signal s: 128 + s
            if all(c == 0 for c in codes):
                return 0
            time.sleep(poll_s)
    except KeyboardInterrupt:
        return max(p.wait() for p in procs) or 130
