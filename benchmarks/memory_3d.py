"""Peak memory of a 3D NCA train step versus the rollout length, with and without nested remat.

    .venv/bin/python benchmarks/memory_3d.py [--steps 10 40 160] [--plain-steps 10] [--batch 1] [--json out.json]

One M3D-NCA train step (``jax.value_and_grad`` of Dice+BCE through the two-level forward) at
the hippocampus sizes: C=16, hidden 64, depthwise perception with kernels [7, 3], batch
norm, one 64x64x52 volume per step (``--batch``), level 0 on the volume max-pooled x2 (32x32x26), level 1
on one random 32x32x26 crop per sample (the problem of ``benchmarks/train_step_3d.py``,
with ``--norm batch``). Each setting runs in a fresh subprocess, so its peak RSS
(``ru_maxrss``) is its own; XLA's buffer plan for the compiled step (temp + arguments +
outputs) is reported beside it. Settings: ``model.remat = "nested"`` at ``--steps`` steps
per level (bound: peak RSS at the longest <= ``--max-growth`` x the shortest), and without
remat at ``--plain-steps`` (no bound: the contrast). The loss at the shortest rollout must not
depend on the remat mode (same keys, same masks).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _harness as H  # noqa: E402
import train_step_3d as T  # noqa: E402

QUICK = {"batch": 2, "image": [8, 8, 6], "patch": [8, 8, 6], "kernel_sizes": [3, 3], "channels": 4, "hidden": 8, "steps": [2, 4],
         "plain_steps": [2]}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    T.add_problem_args(p, norm="batch", steps=False)
    # One volume per step: the growth with the rollout length is the figure, and at batch 4 the
    # 160-step setting alone ran for minutes; --batch 4 is M3D-NCA's training batch.
    p.set_defaults(batch=1)
    p.add_argument("--steps", type=int, nargs="+", default=[10, 40, 160], help="NCA steps per level with nested remat")
    p.add_argument("--plain-steps", type=int, nargs="*", default=[10],
                   help="NCA steps per level without remat (no bound; memory grows with the steps)")
    p.add_argument("--backend", default="auto", choices=["auto", "reference", "cpu_fast"],
                   help="model.backend (auto: cpu_fast where it runs the rule, else reference)")
    p.add_argument("--repeats", type=int, default=0, help="timed steps per setting after the first run (which also faults in fresh memory)")
    p.add_argument("--max-growth", type=float, default=2.0, help="bound on peak(longest) / peak(shortest), nested remat")
    p.add_argument("--loss-rtol", type=float, default=1e-5, help="bound on the loss difference nested vs none")
    H.add_quick_arg(p, QUICK, "runs, bounds not enforced")
    H.add_run_args(p, retry_budget=False)
    return H.parse_quick(p, argv, QUICK)


# --------------------------------------------------------------------------- worker
def step_worker(args: argparse.Namespace) -> None:
    """One setting: ``--worker REMAT=STEPS``."""
    import jax
    import jax.numpy as jnp

    from mednca_jax.nca import levels
    from mednca_jax.nca.backends import resolve_backend
    from mednca_jax.train.launch import usable_cores

    remat, steps = args.worker.split("=")
    args.steps = int(steps)
    cfg = T.model_config(args, remat=remat)
    backend = resolve_backend(args.backend, levels.level_rules(cfg, ndim=3), jax.default_backend(), len(usable_cores()))
    params = levels.init_params(cfg, jax.random.PRNGKey(0), ndim=3)
    # fc1 starts at zero (a fresh NCA is the identity): perturb it, so the rollout is not trivial
    params = jax.tree_util.tree_map(lambda a: a + 0.02 * jax.random.normal(jax.random.PRNGKey(a.size), a.shape), params)
    img, lab = T.make_batch(args)
    images, labels = jnp.asarray(img), jnp.asarray(lab)
    grad = jax.jit(jax.value_and_grad(T.make_loss(args, cfg)), static_argnums=4)

    def run() -> dict:
        key = jax.random.PRNGKey(0)
        t = time.perf_counter()
        compiled = grad.lower(params, images, labels, key, backend).compile()
        compile_s = time.perf_counter() - t
        mem = compiled.memory_analysis()
        plan = None if mem is None else (mem.temp_size_in_bytes + mem.argument_size_in_bytes + mem.output_size_in_bytes) / 2**20
        times, loss = [], None
        for _ in range(1 + args.repeats):  # the first run also faults in fresh memory
            t = time.perf_counter()
            value, g = jax.block_until_ready(compiled(params, images, labels, key))
            times.append(time.perf_counter() - t)
            loss = float(value)
        return {"compile_s": compile_s, "xla_plan_mib": plan, "step_s": min(times[1:] or times), "loss": loss,
                "backend": backend.name}

    H.serve({"run": run})


# --------------------------------------------------------------------------- parent
def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.worker:
        step_worker(args)
        return 0

    wargs = H.worker_argv(argv)
    settings = [("nested", s) for s in args.steps] + [("none", s) for s in args.plain_steps]
    res: dict[tuple[str, int], dict] = {}
    foreign = []
    for remat, steps in settings:  # one process per setting: its peak RSS is its own
        w = H.Worker(__file__, f"{remat}={steps}", wargs).wait_ready()
        meter = H.CpuMeter([w.proc.pid]).start()
        res[remat, steps] = w.call("run")
        foreign.append(meter.stop())
        res[remat, steps]["peak_rss_mib"] = w.close()

    lo, hi = min(args.steps), max(args.steps)
    growth = res["nested", hi]["peak_rss_mib"] / res["nested", lo]["peak_rss_mib"]
    backend = res["nested", lo]["backend"]
    print(f"3D train step (value_and_grad, Dice+BCE), C={args.channels} hidden={args.hidden} batch={args.batch} "
          f"{'x'.join(map(str, args.image))} level 0 {'x'.join(str(s // 2) for s in args.image)} patch "
          f"{'x'.join(map(str, args.patch))} {args.perception} k={args.kernel_sizes} norm={args.norm} "
          f"fire={args.fire_rate}, backend {backend}; {H.machine()}")
    rows = [[remat, s, r["peak_rss_mib"], r["xla_plan_mib"], r["compile_s"], r["step_s"], r["loss"]] for (remat, s), r in res.items()]
    print(H.table(rows, ["remat", "steps per level", "peak RSS MiB", "XLA buffers MiB", "compile s", "step s", "loss"]))
    print(f"nested remat: peak({hi}) / peak({lo}) = {growth:.2f} (bound {args.max_growth})")
    failures: list[str] = []
    H.check(failures, growth <= args.max_growth, f"peak memory with nested remat grows {growth:.2f}x from {lo} to {hi} steps")
    same = [s for s in args.steps if ("none", s) in res]
    loss_err = None
    if same:
        a, b = res["nested", same[0]]["loss"], res["none", same[0]]["loss"]
        loss_err = abs(a - b) / max(abs(b), 1e-30)
        print(f"loss at {same[0]} steps, nested vs none: {a:.6f} vs {b:.6f} (relative {loss_err:.1e}, bound {args.loss_rtol})")
        H.check(failures, loss_err <= args.loss_rtol, f"the loss depends on the remat mode ({loss_err:.1e})")
    key = lambda remat, s: f"{remat}={s}"  # noqa: E731
    figures = {
        "peak_rss_mib": {key(*k): r["peak_rss_mib"] for k, r in res.items()},
        "xla_plan_mib": {key(*k): r["xla_plan_mib"] for k, r in res.items()},
        "compile_s": {key(*k): r["compile_s"] for k, r in res.items()},
        "step_s": {key(*k): r["step_s"] for k, r in res.items()},
        "loss": {key(*k): r["loss"] for k, r in res.items()},
        "growth": growth, "loss_rel_err": loss_err, "backend": backend, "foreign_load_cores": max(foreign),
        "machine": H.machine(),
        "config": {k: getattr(args, k) for k in ("batch", "image", "patch", "channels", "hidden", "perception", "kernel_sizes",
                                                 "norm", "fire_rate", "steps", "plain_steps", "quick")},
    }
    # Memory does not depend on the load: no contention verdict.
    print(f"other processes used up to {max(foreign):.2f} cores while compiling/running (memory figures do not depend on it)")
    figures["bounds_met"] = not failures
    H.write_json(args.json, figures)
    return H.finish(failures, enforce=not (args.report_only or args.quick))


if __name__ == "__main__":
    sys.exit(main())
