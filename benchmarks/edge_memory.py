"""Wall time and peak memory of the exported edge runtimes on large slices, one process each.

For every size (default 256, 512, 1024, 2048) and runtime (numpy, torch, onnx) a fresh
subprocess with 1 thread (OMP/OpenBLAS/MKL = 1, torch.set_num_threads(1), onnxruntime
intra-op 1) loads the exported runtime, segments one random slice at fire rate 0.5 and
reports its peak RSS (``ru_maxrss`` of the whole process, read by a small launcher process:
interpreter, libraries, image, state and temporaries) and the time of the segmentation; the parent also times the whole
process. Rounds are interleaved (size by size, runtime by runtime) so that every runtime sees
the same machine load.

Model: the official config (C=32, hidden 128, 16 + 16 steps, x4) with the official weights
when ../shared/reference is present, else random weights of the same shapes.

``--baseline PATH`` adds a row ``numpy-baseline`` running another ``mednca_numpy.py`` (e.g.
the one before chunking: ``git show REV:mednca_jax/export/runtime_numpy.py > old.py``) on the
same weights, written in the layout it reads (format 1: p0/p1).

``--volumes 64x64x52`` adds a 3D row per shape: the NumPy runtime on one random volume at
fire 0.5 with the original M3D-NCA hippocampus model (C=16, hidden 64, depthwise kernels 7
then 3, batch norm, max pool x2, 10 + 10 steps), its weights from ../shared/reference/
m3d_hippocampus when present, else random weights of the same shapes.

Bounds (exit status 1 when one is missed): numpy peak RSS <= 400 MiB at 1024x1024 and
<= 1200 MiB at 2048x2048, <= 150 MiB on a 64x64x52 volume; with --baseline, numpy's median
segmentation time at 1024x1024 <= 1.10 x the baseline's. Sizes that are not run are not checked.

    .venv/bin/python benchmarks/edge_memory.py [--sizes 256 1024] [--runtimes numpy torch onnx]
        [--volumes 64x64x52] [--rounds 2] [--baseline old.py] [--max-memory-mb MB] [--json PATH]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import M3D_FIXTURE, OFFICIAL_NPZ, machine  # noqa: E402
RUNTIMES = ("numpy", "torch", "onnx")
RSS_BOUNDS_MIB = {1024: 400.0, 2048: 1200.0, "64x64x52": 150.0}
MAX_TIME_VS_BASELINE = 1.10

CHILD = r"""
import json, sys, time
kind, folder, size, max_mb = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
max_mb = None if max_mb == "none" else float(max_mb)
shape = tuple(int(n) for n in size.split("x"))  # "256": a 256x256 slice; "64x64x52": a volume
sys.path.insert(0, folder)
import numpy as np
x = np.random.default_rng(0).random(shape * 2 if len(shape) == 1 else shape, dtype=np.float32)
if kind in ("numpy", "numpy-baseline"):
    import mednca_numpy as rt
    m = rt.MedNCA.load(folder) if max_mb is None else rt.MedNCA.load(folder, max_memory_mb=max_mb)
    t = time.perf_counter()
    out = m.segment(x, seed=0, fire_rate=0.5)
elif kind == "torch":
    import torch
    torch.set_num_threads(1)
    import mednca_torch as rt
    m = rt.MedNCATorch.load(folder)
    t = time.perf_counter()
    out = m.segment(x, seed=0, fire_rate=0.5, max_memory_mb=max_mb).numpy()
else:
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    s = ort.InferenceSession(folder + "/mednca.onnx", so, providers=["CPUExecutionProvider"])
    t = time.perf_counter()
    z = s.run(None, {"images": x[None], "fire_rate": np.array(0.5, np.float32), "seed": np.array(0, np.int64)})[0]
    out = (z[0, ..., 0] > 0).astype(np.uint8)
dt = time.perf_counter() - t
print(json.dumps(dict(segment_s=dt, foreground=int(out.sum()))))
"""


# Peak RSS must come from a process forked by a small one: Linux carries a parent's high-water
# RSS into a forked child's ru_maxrss (recorded again at exec), and this script has imported
# JAX. So each child is started by this launcher (a bare interpreter, ~10 MiB), which reports
# the child's ru_maxrss from RUSAGE_CHILDREN.
LAUNCHER = r"""
import json, resource, subprocess, sys
r = subprocess.run(sys.argv[1:], capture_output=True, text=True)
sys.stderr.write(r.stderr)
if r.returncode:
    sys.exit(r.returncode)
out = json.loads(r.stdout.strip().splitlines()[-1])
out["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024.0
print(json.dumps(out))
"""


def thread_env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
    env.pop("PYTHONPATH", None)  # the runtimes are self-contained: nothing of the repository is importable
    return env


def build_folders(base: Path, runtimes: list[str], baseline: Optional[str], weights: Path = OFFICIAL_NPZ) -> tuple[dict[str, Path], str]:
    """Export the model once per runtime into ``base``; returns the folders and the weights' origin."""
    from mednca_jax.export import export_numpy, export_torch, resolve_config

    cfg = resolve_config("hippocampus_official")
    if weights.is_file():
        from mednca_jax.nca.weights import load_torch_weights

        params, origin = load_torch_weights([weights], cfg.model), "official weights"
    else:
        import jax

        from mednca_jax.nca.levels import init_params

        params, origin = init_params(cfg.model, jax.random.PRNGKey(0)), f"random weights ({weights} not found)"
    folders: dict[str, Path] = {}
    if "numpy" in runtimes or baseline:
        export_numpy(params, cfg, base / "numpy")
        folders["numpy"] = base / "numpy"
    if "torch" in runtimes:
        export_torch(params, cfg, base / "torch")
        folders["torch"] = base / "torch"
    if "onnx" in runtimes:
        from mednca_jax.export import export_onnx

        export_onnx(params, cfg, base / "onnx")
        folders["onnx"] = base / "onnx"
    if baseline:
        import numpy as np

        d = base / "numpy-baseline"
        d.mkdir()
        (d / "mednca_numpy.py").write_text(Path(baseline).read_text())
        (d / "config.json").write_text((base / "numpy" / "config.json").read_text())
        with np.load(base / "numpy" / "weights.npz") as z:
            arrays = {k: z[k] for k in z.files}
        old = {}
        for i in range(cfg.model.n_levels):  # format 1: the perception kernel split back into p0/p1
            k, b = arrays.pop(f"level{i}.perception.kernel"), arrays.pop(f"level{i}.perception.bias")
            c = k.shape[2]
            old.update({f"level{i}.p0.kernel": k[..., :c], f"level{i}.p1.kernel": k[..., c:],
                        f"level{i}.p0.bias": b[:c], f"level{i}.p1.bias": b[c:]})
        np.savez(d / "weights.npz", **old, **arrays)
        folders["numpy-baseline"] = d
    if "numpy" not in runtimes:
        folders.pop("numpy", None)
    return folders, origin


def build_volume_folder(base: Path, fixture: Path = M3D_FIXTURE) -> tuple[Path, str]:
    """Export the original M3D-NCA hippocampus model (3D) for the NumPy runtime into
    ``base/numpy-3d``; returns the folder and the weights' origin."""
    from mednca_jax.config import Config, DataConfig, ModelConfig, validate
    from mednca_jax.export import export_numpy

    # REFERENCE.md, "M3D-NCA (3D)": the original's hippocampus example on its 64x64x52 grid.
    model = ModelConfig(channels=16, hidden=64, steps=(10, 10), scales=(2, 1), kernel_size=(7, 3), perception="depthwise",
                        norm="batch", downscale="max", fire_rate=0.5, patch_size=0)
    cfg = validate(Config(name="m3d_hippocampus", model=model, data=DataConfig(image_size=(64, 64, 52))))
    paths = [fixture / "model0.pth", fixture / "model1.pth"]
    if all(p.is_file() for p in paths):
        from mednca_jax.nca.weights import load_torch_weights

        params, origin = load_torch_weights(paths, cfg.model), "the original M3D-NCA's fixture weights"
    else:
        import jax

        from mednca_jax.nca.levels import init_params

        params, origin = init_params(cfg.model, jax.random.PRNGKey(0), ndim=3), f"random weights ({fixture} not found)"
    export_numpy(params, cfg, base / "numpy-3d")
    return base / "numpy-3d", origin


def size_label(size: "int | str") -> str:
    """``256`` -> ``256²``; a volume ``64x64x52`` -> ``64×64×52``."""
    return f"{size}²" if isinstance(size, int) else str(size).replace("x", "×")


def run_child(kind: str, folder: Path, size: "int | str", max_mb: Optional[float], timeout: float) -> dict[str, Any]:
    t = time.perf_counter()
    res = subprocess.run([sys.executable, "-c", LAUNCHER, sys.executable, "-c", CHILD, kind, str(folder), str(size), "none" if max_mb is None else str(max_mb)],
                         capture_output=True, text=True, env=thread_env(), timeout=timeout)
    wall = time.perf_counter() - t
    if res.returncode != 0:
        raise RuntimeError(f"{kind} at {size_label(size)} failed (exit {res.returncode}):\n{res.stderr[-3000:]}")
    out = json.loads(res.stdout.strip().splitlines()[-1])
    out["process_s"] = wall
    return out


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[256, 512, 1024, 2048], help="square slice sizes (multiples of 4)")
    p.add_argument("--runtimes", nargs="+", default=list(RUNTIMES), choices=RUNTIMES)
    p.add_argument("--volumes", nargs="*", default=[], metavar="XxYxZ",
                   help="3D rows: the NumPy runtime with the M3D-NCA model on one volume of each shape (e.g. 64x64x52)")
    p.add_argument("--rounds", type=int, default=2, help="interleaved repetitions per size and runtime")
    p.add_argument("--baseline", default=None, metavar="PATH", help="another mednca_numpy.py to compare with")
    p.add_argument("--max-memory-mb", type=float, default=None, help="passed to the numpy and torch runtimes")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per child process")
    p.add_argument("--json", default=None, metavar="PATH", help="write the figures here")
    p.add_argument("--weights", type=Path, default=OFFICIAL_NPZ, metavar="NPZ",
                   help="official weights as .npz (default: the shared reference next to the repository; random weights when absent)")
    return p.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    if any(s % 4 for s in args.sizes):
        print(f"error: sizes must be multiples of 4 (the coarsest level's scale), got {args.sizes}", file=sys.stderr)
        return 2
    bad = [v for v in args.volumes if len(v.split("x")) != 3 or not all(n.isdigit() and int(n) % 2 == 0 for n in v.split("x"))]
    if bad:
        print(f"error: --volumes takes shapes XxYxZ of even sizes (the model's scale 2), e.g. 64x64x52; got {bad}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        folders, origin = build_folders(Path(tmp), list(args.runtimes), args.baseline, args.weights)
        volume_folder, volume_origin = build_volume_folder(Path(tmp)) if args.volumes else (None, None)
        kinds = [k for k in ("numpy-baseline", "numpy", "torch", "onnx") if k in folders]
        runs: dict[tuple[int | str, str], list[dict[str, Any]]] = {}
        for _ in range(args.rounds):
            for size in args.sizes:
                for kind in kinds:
                    runs.setdefault((size, kind), []).append(run_child(kind, folders[kind], size, args.max_memory_mb, args.timeout))
            for volume in args.volumes:
                runs.setdefault((volume, "numpy"), []).append(
                    run_child("numpy", volume_folder, volume, args.max_memory_mb, args.timeout))
    rows = []
    for (size, kind), rs in runs.items():
        rows.append(dict(size=size, runtime=kind, rounds=len(rs),
                         segment_s_median=statistics.median(r["segment_s"] for r in rs),
                         segment_s_min=min(r["segment_s"] for r in rs),
                         process_s_median=statistics.median(r["process_s"] for r in rs),
                         peak_rss_mib=max(r["peak_rss_mib"] for r in rs),
                         foreground=[r["foreground"] for r in rs]))
    # Slices by size, then the volumes in the order given.
    rows.sort(key=lambda r: (isinstance(r["size"], str), r["size"] if isinstance(r["size"], int) else args.volumes.index(r["size"]),
                             kinds.index(r["runtime"]) if r["runtime"] in kinds else 0))
    volumes = f"; volumes: {volume_origin}" if args.volumes else ""
    print(f"{machine()}; {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; {origin}{volumes}; 1 thread; "
          f"fire 0.5; {args.rounds} round(s); max_memory_mb={args.max_memory_mb}")
    print("| size | runtime | segment s (median) | segment s (min) | process s (median) | peak RSS MiB |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {size_label(r['size'])} | {r['runtime']} | {r['segment_s_median']:.2f} | {r['segment_s_min']:.2f} | "
              f"{r['process_s_median']:.2f} | {r['peak_rss_mib']:.0f} |")
    failures = []
    by = {(r["size"], r["runtime"]): r for r in rows}
    for size, bound in RSS_BOUNDS_MIB.items():
        r = by.get((size, "numpy"))
        if r and r["peak_rss_mib"] > bound:
            failures.append(f"numpy peak RSS {r['peak_rss_mib']:.0f} MiB at {size_label(size)} > {bound:.0f} MiB")
    ratio = None
    if (1024, "numpy") in by and (1024, "numpy-baseline") in by:
        ratio = by[(1024, "numpy")]["segment_s_median"] / by[(1024, "numpy-baseline")]["segment_s_median"]
        print(f"numpy / baseline segmentation time at 1024²: {ratio:.3f} (bound {MAX_TIME_VS_BASELINE})")
        if ratio > MAX_TIME_VS_BASELINE:
            failures.append(f"numpy is {ratio:.2f}x the baseline's time at 1024² (> {MAX_TIME_VS_BASELINE})")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(dict(machine=machine(), weights=origin, volume_weights=volume_origin, rows=rows, ratio_vs_baseline=ratio,
                                                   max_memory_mb=args.max_memory_mb, failures=failures), indent=2) + "\n")
    for f in failures:
        print(f"bound missed: {f}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
