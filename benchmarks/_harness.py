"""Shared plumbing of the benchmarks: worker subprocesses, interleaved timing, tables, JSON.

Each framework runs in its own worker process (so peak RSS is not mixed and one framework's
thread pools do not disturb the other's); the parent sends one command per timed call and
alternates between the workers, so both see the same machine load (the benchmark machines
are shared). A worker is this same script started with ``--worker NAME``; it answers each
line of stdin with one JSON line on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[1]
# The one place that knows where the shared reference data lives (next to the repository, never
# in it); benchmarks take the path as --weights and fall back to random weights without it.
OFFICIAL_NPZ = REPO.parent / "shared" / "reference" / "mednca_hippocampus_official.npz"
M3D_FIXTURE = REPO.parent / "shared" / "reference" / "m3d_hippocampus"  # the original M3D-NCA's model0/1.pth
sys.path.insert(0, str(REPO))
from mednca_jax.train.launch import free_port, start_job_process, without_option  # noqa: E402


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {len(os.sched_getaffinity(0))} usable cores, {platform.system()}"


# --------------------------------------------------------------------------- contention
# Other processes on the (shared) machine distort the comparison, and not evenly: PyTorch's
# OpenMP barriers slow down far more than XLA's task pool when a core is taken away (measured
# here: torch 1.3 s -> 40 s per train step, JAX 1.0 s -> 1.6 s). So every timed phase measures
# the CPU time used by processes other than the benchmark's own, and a run where that exceeds
# --max-foreign-load cores is reported as inconclusive instead of passing or failing.
def _busy_jiffies() -> int:
    f = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return sum(f) - f[3] - f[4]  # minus idle and iowait


def _pid_jiffies(pid: int) -> int:
    try:
        f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return int(f[11]) + int(f[12])  # utime + stime (all threads)
    except (OSError, IndexError, ValueError):
        return 0


class CpuMeter:
    """Cores used by processes other than ``pids`` (and this one) between start() and stop()."""

    def __init__(self, pids: list[int]):
        self.pids = [os.getpid(), *pids]
        self.hz = os.sysconf("SC_CLK_TCK")

    def start(self) -> "CpuMeter":
        self.t0, self.busy0, self.own0 = time.perf_counter(), _busy_jiffies(), sum(map(_pid_jiffies, self.pids))
        return self

    def stop(self) -> float:
        wall = time.perf_counter() - self.t0
        busy = _busy_jiffies() - self.busy0
        own = sum(map(_pid_jiffies, self.pids)) - self.own0
        return max(0.0, (busy - own) / self.hz / max(wall, 1e-9))


def median(xs: list[float]) -> float:
    return float(statistics.median(xs)) if xs else float("nan")


# --------------------------------------------------------------------------- worker side
_PROTOCOL: list[Any] = []


def protocol_out() -> Any:
    """The worker's reply channel: the original stdout. Everything else written to stdout,
    by Python or by native code (Gloo announces its connections there), goes to stderr so
    that it cannot break the protocol. Idempotent."""
    if not _PROTOCOL:
        sys.stdout.flush()
        _PROTOCOL.append(os.fdopen(os.dup(1), "w"))
        os.dup2(2, 1)
        sys.stdout = sys.stderr
    return _PROTOCOL[0]


def serve(handlers: dict[str, Callable[..., dict[str, Any]]]) -> None:
    """Worker loop: each stdin line is ``{"cmd": name, ...}``; reply with one JSON line.

    ``ready`` is sent first; ``quit`` replies with the peak RSS and exits.
    """
    out = protocol_out()
    out.write(json.dumps({"ready": True}) + "\n")
    out.flush()
    for line in sys.stdin:
        msg = json.loads(line)
        cmd = msg.pop("cmd")
        if cmd == "quit":
            out.write(json.dumps({"peak_rss_mib": peak_rss_mib()}) + "\n")
            out.flush()
            return
        try:
            reply = handlers[cmd](**msg)
        except Exception as e:  # report, let the parent decide
            reply = {"error": f"{type(e).__name__}: {e}"}
        out.write(json.dumps(reply) + "\n")
        out.flush()


def timed(fn: Callable[[], Any]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


# --------------------------------------------------------------------------- options
def add_torch_args(p: Any) -> None:
    """``--no-torch`` and ``--torch-layout``, for benchmarks with a PyTorch side."""
    p.add_argument("--no-torch", action="store_true", help="JAX only (no ratio)")
    p.add_argument("--torch-layout", default="original", choices=["original", "channels-last"],
                   help="PyTorch reference: the original's (B, C, W, H) transposes, or a leaner channels-last variant "
                        "(see benchmarks/torch_reference.py)")


def add_quick_arg(p: Any, quick: dict[str, Any], note: str = "runs, times nothing meaningful") -> None:
    """``--quick``: the CI-sized problem ``quick`` (option name -> value), named in the help."""
    p.add_argument("--quick", action="store_true",
                   help="a tiny problem for CI (" + ", ".join(f"{k}={v}" for k, v in quick.items()) + f"): {note}")


def parse_quick(p: Any, argv: list[str] | None, quick: dict[str, Any]) -> Any:
    """Parse ``argv``; with ``--quick``, the values of ``quick`` replace the parsed ones."""
    args = p.parse_args(argv)
    if args.quick:
        for k, v in quick.items():
            setattr(args, k, v)
    return args


def add_run_args(p: Any, *, retry_budget: bool = True) -> None:
    """The options every benchmark shares: contention limit, exit status, JSON, worker role."""
    p.add_argument("--max-foreign-load", type=float, default=0.25,
                   help="cores other processes may use while timing before the run counts as inconclusive")
    if retry_budget:
        p.add_argument("--budget-s", type=float, default=120.0,
                       help="time allowed for retrying rounds spoiled by other processes (after the first --repeats)")
    p.add_argument("--report-only", action="store_true", help="exit 0 even when a bound is missed")
    p.add_argument("--json", metavar="PATH", help="write the figures here")
    p.add_argument("--worker", help=argparse.SUPPRESS)


# --------------------------------------------------------------------------- parent side
class Worker:
    """A worker subprocess running ``script --worker name *args``."""

    def __init__(self, script: str, name: str, args: list[str], job: tuple[int, int, int] | None = None):
        """``job = (n, i, port)``: process ``i`` of an ``n``-process JAX job (see
        :func:`mednca_jax.train.launch.start_job_process`)."""
        self.name = name
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        cmd = [sys.executable, script, "--worker", name, *args]
        pipes = {"stdin": subprocess.PIPE, "stdout": subprocess.PIPE, "text": True, "cwd": REPO}
        self.proc = subprocess.Popen(cmd, env=env, **pipes) if job is None else start_job_process(cmd, *job, env=env, **pipes)
        self._ready = False

    def wait_ready(self) -> "Worker":
        if not self._ready:
            self._expect("ready")
            self._ready = True
        return self

    def _read(self) -> dict[str, Any]:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"worker {self.name} died (exit code {self.proc.wait()}); see its stderr above")
        return json.loads(line)

    def _expect(self, key: str) -> dict[str, Any]:
        reply = self._read()
        if key not in reply:
            raise RuntimeError(f"worker {self.name}: {reply}")
        return reply

    def call(self, cmd: str, **kw: Any) -> dict[str, Any]:
        self.send(cmd, **kw)
        return self.reply(cmd)

    @property
    def pids(self) -> list[int]:
        return [self.proc.pid]

    def send(self, cmd: str, **kw: Any) -> None:
        self.wait_ready()
        self.proc.stdin.write(json.dumps({"cmd": cmd, **kw}) + "\n")
        self.proc.stdin.flush()

    def reply(self, cmd: str) -> dict[str, Any]:
        reply = self._read()
        if "error" in reply:
            raise RuntimeError(f"worker {self.name}, {cmd}: {reply['error']}")
        return reply

    def close(self) -> float:
        """Stop the worker; returns its peak RSS in MiB."""
        self.send("quit")
        rss = self.reply("quit")["peak_rss_mib"]
        self.proc.wait(timeout=60)
        return rss


class WorkerGroup:
    """The processes of one multi-process JAX job (``jax.distributed``), each on its own cores
    as with ``train.py --cpu-processes``, driven like one worker: every command goes to all of
    them, and a timed command takes as long as the slowest (they wait for each other in their
    collectives). Each worker calls :func:`join_job` first."""

    def __init__(self, script: str, name: str, args: list[str], n: int):
        self.name = name
        port = free_port()
        self.workers = [Worker(script, f"{name}{i}", args, job=(n, i, port)) for i in range(n)]

    @property
    def pids(self) -> list[int]:
        return [w.proc.pid for w in self.workers]

    def wait_ready(self) -> "WorkerGroup":
        for w in self.workers:
            w.wait_ready()
        return self

    def call(self, cmd: str, **kw: Any) -> dict[str, Any]:
        for w in self.workers:
            w.send(cmd, **kw)
        replies = [w.reply(cmd) for w in self.workers]
        out = dict(replies[0])
        if "s" in out:
            out["s"] = max(r["s"] for r in replies)
        return out

    def close(self) -> float:
        """Stop the processes (together: each waits for the others as it shuts down); returns
        the sum of their peak RSS in MiB."""
        for w in self.workers:
            w.send("quit")
        rss = sum(w.reply("quit")["peak_rss_mib"] for w in self.workers)
        for w in self.workers:
            w.proc.wait(timeout=60)
        return rss


def join_job() -> None:
    """In a worker of a :class:`WorkerGroup`: keep native stdout writes off the protocol (Gloo
    prints there) and join the JAX job; call before JAX starts."""
    protocol_out()
    from mednca_jax.train.faults import initialize_distributed_from_env

    initialize_distributed_from_env()


def start_workers(script: str, names: list[str], args: list[str]) -> dict[str, Worker]:
    """Start the workers together (their imports overlap), then wait until each is ready."""
    workers = {n: Worker(script, n, args) for n in names}
    return {n: w.wait_ready() for n, w in workers.items()}


def worker_argv(argv: list[str]) -> list[str]:
    """The command line minus the parent-only ``--json PATH``."""
    return without_option(argv, "--json")


def table(rows: list[list[Any]], header: list[str]) -> str:
    """A Markdown table (also readable in a terminal)."""
    cells = [[str(c) for c in header]] + [[f"{c:.4g}" if isinstance(c, float) else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    fmt = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    return "\n".join([fmt(cells[0]), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [fmt(r) for r in cells[1:]])


def write_json(path: str | None, figures: dict[str, Any]) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(figures, indent=2, sort_keys=True) + "\n")


def check(failures: list[str], ok: bool, message: str) -> None:
    if not ok:
        failures.append(message)


def sample_quiet(
    workers: dict[str, "Worker"], call: Callable[[str, "Worker"], float], repeats: int, limit: float,
    budget_s: float, warm: int = 0,
) -> tuple[dict[str, list[float]], list[float], int]:
    """Time one call per worker, interleaved, ``repeats`` times, keeping only the rounds in
    which other processes used at most ``limit`` cores; noisy rounds are retried while
    ``budget_s`` lasts. ``warm`` untimed calls precede each timed one: a short call timed
    right after another framework's shares the cores with that framework's still-spinning
    worker threads (OpenMP's wait policy), or, after an idle pause, starts on cold cores. Returns ``(times per worker, foreign load of the kept rounds, rounds
    discarded)``; if no round was quiet, all rounds are returned (and the caller reports the
    run as inconclusive)."""
    kept: dict[str, list[float]] = {n: [] for n in workers}
    noisy: dict[str, list[float]] = {n: [] for n in workers}
    loads, noisy_loads, t0 = [], [], time.perf_counter()
    pids = [p for w in workers.values() for p in w.pids]
    while len(loads) < repeats:
        meter = CpuMeter(pids).start()
        got = {}
        for n, w in workers.items():
            for _ in range(warm):
                call(n, w)
            got[n] = call(n, w)
        foreign = meter.stop()
        dest, dl = (kept, loads) if foreign <= limit else (noisy, noisy_loads)
        for n, t in got.items():
            dest[n].append(t)
        dl.append(foreign)
        if len(loads) + len(noisy_loads) >= repeats and time.perf_counter() - t0 > budget_s:
            break
    if not loads:  # nothing quiet: return everything; the load figure shows it
        return noisy, noisy_loads, 0
    return kept, loads, len(noisy_loads)


def contention_note(foreign: float, limit: float) -> str | None:
    """A warning when other processes used more than ``limit`` cores while we measured."""
    if foreign <= limit:
        return None
    return (f"INCONCLUSIVE: other processes used {foreign:.2f} cores on average while this ran "
            f"(limit {limit}); timings and ratios are not reliable, rerun on a quiet machine")


def finish(failures: list[str], enforce: bool = True, inconclusive: str | None = None) -> int:
    """Print the verdict. Exit status: 1 when a bound was missed, 3 when the run was
    inconclusive (a contended machine), 0 otherwise (always 0 with ``enforce=False``)."""
    if inconclusive:
        print("\n" + inconclusive + ("" if not failures else "\n(bounds missed anyway: " + "; ".join(failures) + ")"))
        return 3 if enforce else 0
    if failures:
        print("\nMISSED: " + "; ".join(failures))
        return 1 if enforce else 0
    print("\nall bounds met")
    return 0


def conclude(args: Any, figures: dict[str, Any], failures: list[str], foreign: float, n_rounds: int, discarded: int) -> int:
    """Shared ending of the timing benchmarks: contention verdict, JSON, exit status."""
    note = contention_note(foreign, args.max_foreign_load)
    print(f"other processes used {foreign:.2f} cores (median over the {n_rounds} rounds used; {discarded} noisy rounds discarded)")
    figures["bounds_met"] = None if note else not failures
    figures["contended"] = bool(note)
    write_json(args.json, figures)
    return finish(failures, enforce=not args.report_only, inconclusive=note)
