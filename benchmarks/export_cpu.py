"""CPU benchmark of the exported runtimes: NumPy runtime vs torch module vs JAX jit.

For one 64x64 and one 256x256 slice, at 1 thread and at all threads, each runtime runs in its
own subprocess (thread settings are fixed before any import) and reports its median latency
and its peak resident memory (``ru_maxrss``). Also prints the sizes of the exported files.

Model: the official config (C=32, hidden 128, 16 steps per level, 2 levels, x4), with the
official weights when ../shared/reference is present (else random ones), fire rate 0.5.

Bounds (exit status 1 when violated): NumPy latency <= 1.5x torch at 1 thread; NumPy peak RSS
<= 150 MB for the 256x256 slice.

    .venv/bin/python benchmarks/export_cpu.py [--json PATH] [--repeats N] [--sizes 64 256]
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
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import OFFICIAL_NPZ  # noqa: E402
RUNTIMES = ("numpy", "torch", "jax")
MAX_NUMPY_VS_TORCH = 1.5
MAX_NUMPY_RSS_MB = 150.0


# --------------------------------------------------------------------------- child process
def thread_env(threads: int | None) -> dict[str, str]:
    """Environment that pins BLAS/OpenMP (and XLA for 1 thread) to ``threads`` (None: all)."""
    env = dict(os.environ)
    for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "XLA_FLAGS"):
        env.pop(k, None)
    if threads is not None:
        n = str(threads)
        env.update(OMP_NUM_THREADS=n, OPENBLAS_NUM_THREADS=n, MKL_NUM_THREADS=n)
        if threads == 1:
            env["XLA_FLAGS"] = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
    return env


def _runner(runtime: str, export_dir: Path, size: int, threads: int | None) -> Callable[[], Any]:
    """Load one runtime and return a no-argument function that segments one slice."""
    import numpy as np

    x = np.random.default_rng(0).random((1, size, size, 1), dtype=np.float32)
    if runtime == "numpy":
        import importlib.util

        spec = importlib.util.spec_from_file_location("mednca_numpy", export_dir / "numpy" / "mednca_numpy.py")
        rt = importlib.util.module_from_spec(spec)
        sys.modules["mednca_numpy"] = rt
        spec.loader.exec_module(rt)
        model = rt.MedNCA.load(export_dir / "numpy")
        return lambda: model.segment(x, seed=0, return_logits=True)
    if runtime == "torch":
        import importlib.util

        import torch

        if threads is not None:
            torch.set_num_threads(threads)
        spec = importlib.util.spec_from_file_location("mednca_torch", export_dir / "torch" / "mednca_torch.py")
        rt = importlib.util.module_from_spec(spec)
        sys.modules["mednca_torch"] = rt
        spec.loader.exec_module(rt)
        model = rt.MedNCATorch.load(export_dir / "torch")
        xt = torch.from_numpy(x)
        return lambda: model.predict(xt, seed=0)
    import jax

    sys.path.insert(0, str(REPO))
    from mednca_jax.train.checkpoint import load_params
    from mednca_jax.nca.levels import forward

    params, cfg = load_params(export_dir / "run")
    params = jax.device_put(params)
    fn = jax.jit(forward, static_argnums=1)
    key = jax.random.PRNGKey(0)
    xj = jax.device_put(x)
    return lambda: fn(params, cfg.model, xj, key).block_until_ready()


def child(args: argparse.Namespace) -> int:
    threads = None if args.threads == 0 else args.threads
    run = _runner(args.child, Path(args.dir), args.size, threads)
    t0 = time.perf_counter()
    run()  # warm-up: JIT compilation, BLAS buffers, first-touch of memory
    first = time.perf_counter() - t0
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    mods = sorted({m.split(".")[0] for m in sys.modules} & {"jax", "torch", "flax"})
    print(json.dumps(dict(median_ms=1e3 * statistics.median(times), min_ms=1e3 * min(times), first_ms=1e3 * first,
                          peak_rss_mb=rss_mb, frameworks=mods)))
    return 0


# --------------------------------------------------------------------------- parent
def export_all(out: Path, weights: Path) -> str:
    """Official config + ``weights`` (random if absent) -> run folder, NumPy and torch exports."""
    sys.path.insert(0, str(REPO))
    import jax
    import numpy as np

    from mednca_jax.train.checkpoint import save_params
    from mednca_jax.export import export_numpy, export_torch, resolve_config
    from mednca_jax.nca.levels import init_params

    cfg = resolve_config("hippocampus_official")
    if weights.is_file():
        from mednca_jax.nca.weights import load_torch_weights

        params, source = load_torch_weights([weights], cfg.model), "official"
    else:
        params = jax.tree_util.tree_map(np.asarray, init_params(cfg.model, jax.random.PRNGKey(0)))
        rng = np.random.default_rng(0)
        for level in params.values():  # a fresh NCA is the identity: give fc1 real weights
            level["fc1"]["kernel"] = (0.05 * rng.standard_normal(level["fc1"]["kernel"].shape)).astype(np.float32)
        source = "random"
    save_params(out / "run", params, cfg)
    export_numpy(params, cfg, out / "numpy")
    export_torch(params, cfg, out / "torch")
    return source


def measure(runtime: str, export_dir: Path, size: int, threads: int | None, repeats: int) -> dict[str, Any]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", runtime, "--dir", str(export_dir),
           "--size", str(size), "--threads", str(threads or 0), "--repeats", str(repeats)]
    r = subprocess.run(cmd, capture_output=True, text=True, env=thread_env(threads), timeout=1800)
    if r.returncode != 0:
        raise RuntimeError(f"{runtime} {size}x{size} threads={threads} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", metavar="PATH", help="also write all figures to PATH as JSON")
    p.add_argument("--repeats", type=int, default=0, help="timed runs per case (default: 10 at 64x64, 3 at 256x256)")
    p.add_argument("--sizes", type=int, nargs="+", default=[64, 256], help="square slice sizes (default: 64 256)")
    p.add_argument("--weights", type=Path, default=OFFICIAL_NPZ, metavar="NPZ",
                   help="official weights as .npz (default: the shared reference next to the repository; random weights when absent)")
    p.add_argument("--export-to", help=argparse.SUPPRESS)
    p.add_argument("--child", choices=RUNTIMES, help=argparse.SUPPRESS)
    p.add_argument("--dir", help=argparse.SUPPRESS)
    p.add_argument("--size", type=int, help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        return child(args)
    if args.export_to:
        print(export_all(Path(args.export_to), args.weights))
        return 0

    n_cpu = os.cpu_count() or 1
    rows = []
    with tempfile.TemporaryDirectory(prefix="mednca_bench_") as tmp:
        export_dir = Path(tmp)
        # Everything heavy runs in subprocesses: Linux carries ru_maxrss over fork/exec, so a
        # parent that imported JAX would inflate every child's peak RSS.
        r = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--export-to", str(export_dir), "--weights", str(args.weights)],
                           capture_output=True, text=True, timeout=600)
        if r.returncode != 0:
            raise RuntimeError(f"export failed:\n{r.stderr[-3000:]}")
        source = r.stdout.strip().splitlines()[-1]
        sizes = {str(f.relative_to(export_dir)): f.stat().st_size
                 for sub in ("numpy", "torch") for f in sorted((export_dir / sub).iterdir()) if f.is_file()}
        for size in args.sizes:
            repeats = args.repeats or (10 if size <= 64 else 3)
            for threads in (1, None):
                for runtime in RUNTIMES:
                    res = measure(runtime, export_dir, size, threads, repeats)
                    rows.append(dict(runtime=runtime, size=size, threads=threads or n_cpu, repeats=repeats, **res))
                    print(f"  {runtime:6s} {size}x{size} threads={threads or n_cpu}: {res['median_ms']:.1f} ms, "
                          f"{res['peak_rss_mb']:.0f} MB", file=sys.stderr, flush=True)

    print(f"Med-NCA export benchmark: {cpu_name()}, {n_cpu} CPUs, weights: {source}, fire rate 0.5, "
          "official config (C=32, hidden 128, 16+16 steps, x4)")
    print(f"{'size':>9} {'threads':>7} {'runtime':>7} {'median ms':>10} {'min ms':>9} {'first ms':>9} {'peak RSS MB':>12}")
    for r in rows:
        print(f"{r['size']:>4}x{r['size']:<4} {r['threads']:>7} {r['runtime']:>7} {r['median_ms']:>10.1f} "
              f"{r['min_ms']:>9.1f} {r['first_ms']:>9.1f} {r['peak_rss_mb']:>12.0f}")
    print("\nexported files:")
    for name, b in sizes.items():
        print(f"  {name:28s} {b / 1024:8.1f} KiB")

    failures = []
    get = {(r["runtime"], r["size"], r["threads"]): r for r in rows}
    for size in args.sizes:
        a, b = get[("numpy", size, 1)], get[("torch", size, 1)]
        ratio = a["median_ms"] / b["median_ms"]
        print(f"NumPy / torch latency at 1 thread, {size}x{size}: {ratio:.2f} (bound {MAX_NUMPY_VS_TORCH})")
        if ratio > MAX_NUMPY_VS_TORCH:
            failures.append(f"NumPy runtime is {ratio:.2f}x slower than torch at 1 thread for {size}x{size}")
        if size == 256:
            for t in {1, n_cpu}:
                rss = get[("numpy", size, t)]["peak_rss_mb"]
                if rss > MAX_NUMPY_RSS_MB:
                    failures.append(f"NumPy runtime peak RSS {rss:.0f} MB > {MAX_NUMPY_RSS_MB:.0f} MB for 256x256 "
                                    f"at {t} thread(s)")
    numpy_frameworks = {f for r in rows if r["runtime"] == "numpy" for f in r["frameworks"]}
    if numpy_frameworks:
        failures.append(f"the NumPy runtime process imported {sorted(numpy_frameworks)}")
    if args.json:
        Path(args.json).write_text(json.dumps(dict(cpu=cpu_name(), cpus=n_cpu, weights=source, rows=rows,
                                                   file_sizes=sizes, failures=failures), indent=2) + "\n")
    for f in failures:
        print(f"FAIL: {f}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
