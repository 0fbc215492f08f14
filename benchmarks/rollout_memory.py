"""Peak memory and compile time of a train step versus the rollout length (nested remat).

    .venv/bin/python benchmarks/rollout_memory.py [--steps 64 256 1024] [--json out.json]

Train step on whole 64x64 images (patch size 0), batch 8, C=16, hidden 128, with 64 / 256 /
1024 NCA steps per level and ``remat="nested"``; each setting runs in its own subprocess, so its
peak RSS is its own. Also reported: XLA's own buffer plan for the compiled step (temp +
arguments + outputs, deterministic, unlike RSS) and a gradient check of nested against no remat
at a small step count. Bounds: peak RSS at the longest rollout <= --max-growth x the shortest,
compile time <= --max-compile-s for every setting, gradients equal (rtol --grad-rtol).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _harness as H  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, nargs="+", default=[64, 256, 1024], help="NCA steps per level")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--image", type=int, default=64)
    p.add_argument("--channels", type=int, default=16)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--remat", default="nested", choices=["none", "step", "nested"])
    p.add_argument("--repeats", type=int, default=1, help="timed steps per setting after the compiled one")
    p.add_argument("--grad-steps", type=int, default=10, help="steps per level of the gradient check (0: skip)")
    p.add_argument("--grad-rtol", type=float, default=1e-4)
    p.add_argument("--max-growth", type=float, default=2.0, help="bound on peak(longest) / peak(shortest)")
    p.add_argument("--max-compile-s", type=float, default=10.0)
    H.add_run_args(p, retry_budget=False)
    return p.parse_args(argv)


def make_config(args: argparse.Namespace, steps: int, remat: str):
    from mednca_jax.config import Config, DataConfig, ModelConfig, TrainConfig, validate

    return validate(
        Config(
            name="rollout-memory",
            model=ModelConfig(channels=args.channels, hidden=args.hidden, steps=(steps, steps), scales=(4, 1), patch_size=0, remat=remat),
            data=DataConfig(image_size=(args.image, args.image)),
            train=TrainConfig(batch_size=args.batch),
        )
    )


def make_batch(args: argparse.Namespace):
    import numpy as np

    rng = np.random.default_rng(0)
    img = rng.random((args.batch, args.image, args.image, 1), dtype=np.float32) * 0.3
    lab = np.zeros_like(img)
    s = args.image // 4
    lab[:, s : 2 * s, s : 3 * s] = 1.0
    img += 0.6 * lab
    return {"image": img, "label": lab}


def rss_now_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024.0
    return float("nan")


# --------------------------------------------------------------------------- workers
def step_worker(args: argparse.Namespace) -> None:
    """One setting: ``--worker steps=S``."""
    import jax

    from mednca_jax.networks import init_network_params
    from mednca_jax.machine import backend_for
    from mednca_jax.train.step import init_train_state, make_optimizer, make_train_step, put_batch

    steps = int(args.worker.split("=")[1])
    cfg = make_config(args, steps, args.remat)
    tx = make_optimizer(cfg.train)
    batch = put_batch(make_batch(args), None)
    state = init_train_state(init_network_params(cfg, jax.random.PRNGKey(0)), tx)
    jax.block_until_ready(state)
    base = rss_now_mib()

    def run() -> dict:
        t = time.perf_counter()
        compiled = make_train_step(cfg, tx, backend=backend_for(cfg)).lower(state, batch, jax.random.PRNGKey(0)).compile()
        compile_s = time.perf_counter() - t
        mem = compiled.memory_analysis()
        plan = None if mem is None else (mem.temp_size_in_bytes + mem.argument_size_in_bytes + mem.output_size_in_bytes) / 2**20
        st, times = state, []
        for i in range(1 + args.repeats):  # the first run also faults in fresh memory
            t = time.perf_counter()
            st, m = compiled(st, batch, jax.random.PRNGKey(i))
            jax.block_until_ready((st, m))
            times.append(time.perf_counter() - t)
        return {"compile_s": compile_s, "xla_plan_mib": plan, "step_s": min(times[1:] or times), "loss": float(m["loss"]),
                "rss_before_mib": base}

    H.serve({"run": run})


def grad_worker(args: argparse.Namespace) -> None:
    """Gradients of the training loss with remat="nested" vs "none" at a small step count."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from mednca_jax.networks import init_network_params
    from mednca_jax.train.step import loss_fn

    def grads(remat: str):
        cfg = make_config(args, args.grad_steps, remat)
        params = init_network_params(cfg, jax.random.PRNGKey(0))
        params = jax.tree_util.tree_map(lambda a: a + 0.05 * jax.random.normal(jax.random.PRNGKey(a.size), a.shape), params)
        batch = {k: jnp.asarray(v[:2]) for k, v in make_batch(args).items()}
        return jax.jit(jax.grad(lambda p: loss_fn(p, cfg, batch, jax.random.PRNGKey(3))[0]))(params)

    def run() -> dict:
        a, b = grads(args.remat), grads("none")
        err = max(float(np.max(np.abs(x - y)) / (np.max(np.abs(y)) + 1e-30)) for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))
        return {"max_rel_err": err}

    H.serve({"run": run})


# --------------------------------------------------------------------------- parent
def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.worker:
        (grad_worker if args.worker == "grad" else step_worker)(args)
        return 0

    fwd_args = H.worker_argv(argv)
    res: dict[int, dict] = {}
    foreign = []
    for s in args.steps:  # one process per setting: its peak RSS is its own
        w = H.Worker(__file__, f"steps={s}", fwd_args).wait_ready()
        meter = H.CpuMeter([w.proc.pid]).start()
        res[s] = w.call("run")
        foreign.append(meter.stop())
        res[s]["peak_rss_mib"] = w.close()
    grad_err = None
    if args.grad_steps:
        w = H.Worker(__file__, "grad", fwd_args)
        grad_err = w.call("run")["max_rel_err"]
        w.close()

    lo, hi = min(args.steps), max(args.steps)
    growth = res[hi]["peak_rss_mib"] / res[lo]["peak_rss_mib"]
    figures = {
        "peak_mib": {str(s): r["peak_rss_mib"] for s, r in res.items()},
        "xla_plan_mib": {str(s): r["xla_plan_mib"] for s, r in res.items()},
        "compile_s": {str(s): r["compile_s"] for s, r in res.items()},
        "step_s": {str(s): r["step_s"] for s, r in res.items()},
        "rss_before_compile_mib": {str(s): r["rss_before_mib"] for s, r in res.items()},
        "growth": growth,
        "foreign_load_cores": max(foreign),
        "grad_max_rel_err": grad_err,
        "machine": H.machine(),
        "config": {k: getattr(args, k) for k in ("batch", "image", "channels", "hidden", "remat", "grad_steps")},
    }
    print(f"train step on whole {args.image}x{args.image} images, batch {args.batch}, C={args.channels} "
          f"hidden={args.hidden}, remat={args.remat}; {H.machine()}")
    rows = [[s, r["peak_rss_mib"], r["xla_plan_mib"], r["compile_s"], r["step_s"]] for s, r in res.items()]
    print(H.table(rows, ["steps per level", "peak RSS MiB", "XLA buffers MiB", "compile s", "step s"]))
    print(f"peak({hi}) / peak({lo}) = {growth:.2f} (bound {args.max_growth})")
    failures: list[str] = []
    H.check(failures, growth <= args.max_growth, f"peak memory grows {growth:.2f}x from {lo} to {hi} steps")
    for s, r in res.items():
        H.check(failures, r["compile_s"] <= args.max_compile_s, f"compile {r['compile_s']:.1f} s > {args.max_compile_s} s at {s} steps")
    if grad_err is not None:
        print(f"gradients {args.remat} vs none at {args.grad_steps} steps: max relative error {grad_err:.2e} (rtol {args.grad_rtol})")
        H.check(failures, grad_err <= args.grad_rtol, f"gradient mismatch {grad_err:.2e}")
    # Memory figures do not depend on the load; compile times do.
    compile_failed = any("compile" in f for f in failures)
    note = H.contention_note(max(foreign), args.max_foreign_load) if compile_failed else None
    print(f"other processes used up to {max(foreign):.2f} cores while compiling/running")
    figures["bounds_met"] = None if note else not failures
    figures["contended"] = max(foreign) > args.max_foreign_load
    H.write_json(args.json, figures)
    return H.finish(failures, enforce=not args.report_only, inconclusive=note)


if __name__ == "__main__":
    sys.exit(main())
