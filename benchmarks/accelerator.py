"""Med-NCA on whatever device JAX sees (GPU, TPU or CPU): every backend and precision.

    .venv/bin/python benchmarks/accelerator.py [--json out.json] [--quick]

Rows, for each backend that runs on this device (``reference`` everywhere; ``cpu_fast``
where asked with ``--backends``, by default only on a CPU) and each matmul precision
(float32; bfloat16 inputs with float32 accumulation, ``reference`` only):

- train step (forward + backward + Adam) at the example config (C=16, 64+64 steps, batch 48,
  16x16 patches) and at the official config (C=32, 16+16 steps, batch 40);
- inference per 64x64 slice at batch 1, 32 and 256 (fire rate 0.5, static);
- peak memory of a train step on whole 64x64 images (batch 8) with nested remat at 64, 256
  and 1024 steps per level: the device's ``peak_bytes_in_use`` where it reports one, and
  XLA's compiled estimate (arguments + outputs + temporaries) everywhere.

Times are medians of ``--repeats`` calls after a warm-up call (compile time reported apart).
Prints a table headed by the device's name and writes ``--json``. ``--quick`` shrinks every
size so that the script runs in CI on a CPU in a minute. Exits non-zero when a bound is
missed: nested-remat memory at 1024 steps at most ``--max-memory-growth`` x that at 64
steps, and bfloat16 logits within ``--max-bf16-error`` (relative) of float32.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=5, help="timed calls per row (median reported)")
    p.add_argument("--backends", default="", help="comma-separated backends (default: reference, plus cpu_fast on a CPU)")
    p.add_argument("--precisions", default="float32,bfloat16", help="comma-separated matmul precisions")
    p.add_argument("--batches", default="1,32,256", help="inference batch sizes")
    p.add_argument("--memory-steps", default="64,256,1024", help="steps per level of the nested-remat memory rows")
    p.add_argument("--quick", action="store_true", help="CI-sized: small batches, few steps, one repeat")
    p.add_argument("--max-memory-growth", type=float, default=2.0,
                   help="bound on nested-remat memory at the most steps / at the fewest")
    p.add_argument("--max-bf16-error", type=float, default=0.1,
                   help="bound on max |logits_bf16 - logits_f32| / max |logits_f32| at inference")
    p.add_argument("--json", default="", help="write the figures to this file")
    return p.parse_args(argv)


def _median_time(fn: Callable[[], Any], repeats: int) -> tuple[float, float]:
    """``(median seconds of a call, first-call overhead s)``; ``fn`` must block until done."""
    t = time.perf_counter()
    fn()
    first = time.perf_counter() - t
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    med = statistics.median(times)
    return med, max(0.0, first - med)


def _config(channels: int, steps: int, batch: int, patch: int, precision: str, backend: str, remat: str = "none"):
    from mednca_jax.config import Config, DataConfig, ModelConfig, TrainConfig, validate

    return validate(
        Config(
            name="accelerator",
            model=ModelConfig(
                channels=channels, hidden=128, steps=(steps, steps), scales=(4, 1), patch_size=patch, fire_rate=0.5,
                precision=precision, backend=backend, remat=remat,
            ),
            data=DataConfig(image_size=(64, 64)),
            train=TrainConfig(batch_size=batch),
        )
    )


def _batch(n: int):
    import numpy as np

    rng = np.random.default_rng(0)
    img = rng.random((n, 64, 64, 1), dtype=np.float32) * 0.3
    lab = np.zeros_like(img)
    lab[:, 20:44, 16:40] = 1.0
    img[:, 20:44, 16:40] += 0.6
    return {"image": img, "label": lab}


def _params(cfg):
    import jax

    from mednca_jax.nca.levels import init_params

    params = init_params(cfg.model, jax.random.PRNGKey(0))
    for i, name in enumerate(params):  # a fresh NCA is the identity: give fc1 weights
        k = jax.random.fold_in(jax.random.PRNGKey(1), i)
        params[name]["fc1"]["kernel"] = 0.3 * jax.random.normal(k, params[name]["fc1"]["kernel"].shape) / 128**0.5
    return params


def train_step_row(cfg, repeats: int) -> dict[str, float]:
    import jax
    import jax.numpy as jnp

    from mednca_jax.machine import backend_for
    from mednca_jax.train.step import init_train_state, make_optimizer, make_train_step

    tx = make_optimizer(cfg.train)
    step = make_train_step(cfg, tx, backend=backend_for(cfg.model))
    batch = {k: jnp.asarray(v) for k, v in _batch(cfg.train.batch_size).items()}
    box = {"state": init_train_state(_params(cfg), tx), "i": 0}

    def run():
        box["i"] += 1
        box["state"], m = step(box["state"], batch, jax.random.PRNGKey(box["i"]))
        jax.block_until_ready(m["loss"])

    med, compile_s = _median_time(run, repeats)
    return {"s": med, "compile_s": compile_s}


def inference_row(cfg, batch: int, repeats: int) -> dict[str, Any]:
    import jax
    import jax.numpy as jnp

    from mednca_jax.machine import backend_for
    from mednca_jax.nca.levels import forward

    backend = backend_for(cfg.model)
    params = _params(cfg)
    fwd = jax.jit(lambda p, x, k: forward(p, cfg.model, x, k, 0.5, backend=backend))
    images = jnp.asarray(_batch(batch)["image"])
    med, compile_s = _median_time(lambda: jax.block_until_ready(fwd(params, images, jax.random.PRNGKey(0))), repeats)
    logits = fwd(params, images[:1], jax.random.PRNGKey(0))
    return {"ms_per_slice": 1e3 * med / batch, "compile_s": compile_s, "logits": logits}


def memory_row(cfg) -> dict[str, float | None]:
    """Peak memory of a full-image train step (MiB): compiled estimate and, where the device
    reports it, the measured peak (which is a running maximum over the process)."""
    import jax
    import jax.numpy as jnp

    from mednca_jax.machine import backend_for
    from mednca_jax.train.step import init_train_state, make_optimizer, make_train_step

    tx = make_optimizer(cfg.train)
    step = make_train_step(cfg, tx, backend=backend_for(cfg.model))
    batch = {k: jnp.asarray(v) for k, v in _batch(cfg.train.batch_size).items()}
    state = init_train_state(_params(cfg), tx)
    compiled = step.lower(state, batch, jax.random.PRNGKey(0)).compile()
    mem = compiled.memory_analysis()
    estimate = None
    if mem is not None:
        estimate = (mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes) / 2**20
    state, m = compiled(state, batch, jax.random.PRNGKey(0))
    jax.block_until_ready(m["loss"])
    stats = jax.devices()[0].memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    return {"compiled_mib": estimate, "device_peak_mib": None if peak is None else peak / 2**20}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import jax
    import numpy as np

    device = jax.devices()[0]
    platform = jax.default_backend()
    backends = [b for b in args.backends.split(",") if b] or (["reference", "cpu_fast"] if platform == "cpu" else ["reference"])
    precisions = [p for p in args.precisions.split(",") if p]
    batches = [int(b) for b in args.batches.split(",")]
    mem_steps = [int(s) for s in args.memory_steps.split(",")]
    repeats = args.repeats
    example, official = (16, 64, 48), (32, 16, 40)  # (channels, steps per level, batch)
    mem_batch = 8
    if args.quick:
        batches, mem_steps, repeats = [1, 4], [4, 16], 1
        example, official, mem_batch = (16, 4, 4), (32, 2, 4), 2

    rows: list[dict[str, Any]] = []
    failures: list[str] = []
    f32_logits: dict[str, Any] = {}
    for backend in backends:
        for precision in precisions:
            if backend == "cpu_fast" and precision != "float32":
                continue  # cpu_fast computes in float32 only
            row: dict[str, Any] = {"backend": backend, "precision": precision}
            for name, (c, steps, b) in (("example", example), ("official", official)):
                r = train_step_row(_config(c, steps, b, 16, precision, backend), repeats)
                row[f"train_{name}_s"], row[f"train_{name}_compile_s"] = r["s"], r["compile_s"]
            for b in batches:
                r = inference_row(_config(16, example[1], b, 16, precision, backend), b, repeats)
                row[f"infer_b{b}_ms_per_slice"] = r["ms_per_slice"]
                logits = np.asarray(r["logits"])
                if precision == "float32":
                    f32_logits[backend] = logits
                elif backend in f32_logits:
                    ref = f32_logits[backend]
                    err = float(np.abs(logits - ref).max() / max(np.abs(ref).max(), 1e-6))
                    row["bf16_logit_error"] = err
                    if err > args.max_bf16_error:
                        failures.append(f"{backend} bfloat16 logits differ from float32 by {err:.3g} > {args.max_bf16_error}")
            for steps in mem_steps:
                r = memory_row(_config(16, steps, mem_batch, 0, precision, backend, remat="nested"))
                row[f"memory_{steps}_compiled_mib"] = r["compiled_mib"]
                row[f"memory_{steps}_device_peak_mib"] = r["device_peak_mib"]
            lo, hi = row.get(f"memory_{mem_steps[0]}_compiled_mib"), row.get(f"memory_{mem_steps[-1]}_compiled_mib")
            if lo and hi and hi > args.max_memory_growth * lo:
                failures.append(f"{backend}/{precision}: nested-remat memory grows {hi / lo:.2f}x from {mem_steps[0]} to {mem_steps[-1]} steps")
            rows.append(row)
            print(f"done: {backend} {precision}", flush=True)

    header = ["backend", "precision", "train example s", "train official s"] + [f"infer b{b} ms/slice" for b in batches]
    header += [f"mem {s} steps MiB (compiled / device peak)" for s in mem_steps]
    lines = []
    for r in rows:
        cells = [r["backend"], r["precision"], f"{r['train_example_s']:.4g}", f"{r['train_official_s']:.4g}"]
        cells += [f"{r[f'infer_b{b}_ms_per_slice']:.4g}" for b in batches]
        for s in mem_steps:
            c, d = r[f"memory_{s}_compiled_mib"], r[f"memory_{s}_device_peak_mib"]
            cells.append(f"{'-' if c is None else f'{c:.0f}'} / {'-' if d is None else f'{d:.0f}'}")
        lines.append(cells)
    print(f"device: {device.device_kind} ({platform}); jax {jax.__version__}; {time.strftime('%Y-%m-%d')}")
    widths = [max(len(str(x)) for x in col) for col in zip(header, *lines)]
    for cells in [header, ["-" * w for w in widths]] + lines:
        print("| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |")
    figures = {
        "device": device.device_kind, "platform": platform, "jax": jax.__version__, "date": time.strftime("%Y-%m-%d"),
        "quick": args.quick, "rows": rows, "bounds_met": not failures, "failures": failures,
    }
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))
    for f in failures:
        print(f"bound missed: {f}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
