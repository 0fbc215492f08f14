"""3D train step (forward + backward + Adam) at M3D-NCA's hippocampus config: JAX vs PyTorch.

    .venv/bin/python benchmarks/train_step_3d_torch.py [--repeats 3] [--json out.json]

The problem of ``benchmarks/train_step_3d.py`` with batch norm (M3D-NCA's): C=16, hidden 64,
depthwise perception with kernels [7, 3], batch 4 of 64x64x52 volumes, level 0 on the volume
max-pooled x2 (32x32x26), nearest x2 upsampling, level 1 on one random 32x32x26 crop per
sample, 10 + 10 steps at fire rate 0.5, Dice+BCE, one Adam step (betas 0.5, 0.5).

JAX: the project's two-level forward on the backend ``model.backend = "auto"`` picks for
the rule (``cpu_fast`` runs no batch norm, so ``reference`` here) and its optimiser
(:func:`mednca_jax.train.step.make_optimizer`). PyTorch: ``TorchM3DNCA`` of
``benchmarks/torch_reference.py``, the original's computation (a grouped ``Conv3d``,
``nn.Linear``, ``BatchNorm3d(track_running_stats=False)`` and the original's transposes).
Each framework runs in its own subprocess; timed steps alternate between them, so both see
the same machine load, and rounds in which other processes used the CPU are discarded and
retried (``_harness.sample_quiet``). Exits 1 when JAX / torch > ``--max-ratio`` (unless
--report-only), 3 when the machine was too busy to tell.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _harness as H  # noqa: E402
import train_step_3d as T  # noqa: E402

QUICK = {"batch": 2, "image": [8, 8, 6], "patch": [4, 4, 4], "kernel_sizes": [3, 3], "steps": 2, "channels": 4, "hidden": 8,
         "repeats": 1, "warmup": 0}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=3, help="timed steps per framework (median reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per framework after the first (compiling) call")
    T.add_problem_args(p, norm="batch")
    p.add_argument("--remat", default="none", choices=["none", "step", "nested"], help="JAX rollout checkpointing")
    p.add_argument("--backend", default="auto", choices=["auto", "reference", "cpu_fast"], help="JAX model.backend")
    p.add_argument("--max-ratio", type=float, default=0.5, help="bound on JAX step time / torch step time")
    H.add_quick_arg(p, QUICK)
    H.add_run_args(p)
    return H.parse_quick(p, argv, QUICK)


# --------------------------------------------------------------------------- workers
def jax_worker(args: argparse.Namespace) -> None:
    import jax
    import jax.numpy as jnp
    import optax

    from mednca_jax.config import TrainConfig
    from mednca_jax.nca import levels
    from mednca_jax.nca.backends import resolve_backend
    from mednca_jax.train.launch import usable_cores
    from mednca_jax.train.step import make_optimizer

    cfg = T.model_config(args)
    backend = resolve_backend(args.backend, levels.level_rules(cfg, ndim=3), jax.default_backend(), len(usable_cores()))
    tx = make_optimizer(TrainConfig(lr=1.6e-3, betas=(0.5, 0.5)))  # the original's Adam
    loss = T.make_loss(args, cfg)

    @jax.jit
    def step(params, opt_state, images, labels, key):
        value, grads = jax.value_and_grad(loss)(params, images, labels, key, backend)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, value

    params = levels.init_params(cfg, jax.random.PRNGKey(0), ndim=3)
    img, lab = T.make_batch(args)
    box = {"params": params, "opt": tx.init(params), "images": jnp.asarray(img), "labels": jnp.asarray(lab), "i": 0}

    def step_timed() -> dict:
        key = jax.block_until_ready(jax.random.PRNGKey(box["i"]))  # before the clock
        box["i"] += 1

        def run() -> None:
            box["params"], box["opt"], value = step(box["params"], box["opt"], box["images"], box["labels"], key)
            jax.block_until_ready((box["params"], value))

        return {"s": H.timed(run)}

    def info() -> dict:
        return {"version": jax.__version__, "platform": jax.default_backend(), "backend": backend.name,
                "rules": [r._asdict() for r in levels.level_rules(cfg, ndim=3)]}

    H.serve({"step": step_timed, "info": info})


def torch_worker(args: argparse.Namespace) -> None:
    import torch

    from torch_reference import TorchM3DNCA, make_optimizer, train_step

    torch.manual_seed(0)
    model = TorchM3DNCA(args.channels, args.hidden, (args.steps, args.steps), tuple(args.kernel_sizes))
    opt = make_optimizer(model)
    img, lab = T.make_batch(args)
    images, labels = torch.from_numpy(img), torch.from_numpy(lab)
    gen = torch.Generator().manual_seed(0)
    run = lambda: train_step(model, opt, images, labels, tuple(args.patch), args.fire_rate, gen)  # noqa: E731
    info = lambda: {"version": torch.__version__, "threads": torch.get_num_threads()}  # noqa: E731
    H.serve({"step": lambda: {"s": H.timed(run)}, "info": info})


# --------------------------------------------------------------------------- parent
def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.worker == "jax":
        jax_worker(args)
        return 0
    if args.worker == "torch":
        torch_worker(args)
        return 0

    names = ["jax", "torch"]
    workers = H.start_workers(__file__, names, H.worker_argv(argv))
    info = {n: w.call("info") for n, w in workers.items()}
    first = {n: w.call("step")["s"] for n, w in workers.items()}  # JAX: trace + compile + one step
    for _ in range(args.warmup):
        for w in workers.values():
            w.call("step")
    times, loads, discarded = H.sample_quiet(workers, lambda n, w: w.call("step")["s"], args.repeats, args.max_foreign_load, args.budget_s)
    rss = {n: w.close() for n, w in workers.items()}
    med = {n: H.median(t) for n, t in times.items()}
    ratio = med["jax"] / med["torch"]
    overhead = {n: max(0.0, first[n] - med[n]) for n in names}

    k0, k1 = args.kernel_sizes
    print(f"3D train step (forward, backward, Adam), C={args.channels} hidden={args.hidden} steps={args.steps}x2 "
          f"batch={args.batch} {'x'.join(map(str, args.image))} level 0 {'x'.join(str(s // 2) for s in args.image)} "
          f"patch {'x'.join(map(str, args.patch))} {args.perception} k=[{k0}, {k1}] norm={args.norm} fire={args.fire_rate} "
          f"remat={args.remat}; {H.machine()}")
    labels = {"jax": f"JAX {info['jax']['backend']} (jax {info['jax']['version']})",
              "torch": f"PyTorch, the original's ops ({info['torch']['threads']} threads, torch {info['torch']['version']})"}
    rows = [[labels[n], med[n], min(times[n]), overhead[n], rss[n]] for n in names]
    print(H.table(rows, ["", "step s (median)", "step s (min)", "compile / first-call overhead s", "peak RSS MiB"]))
    print(f"JAX / torch = {ratio:.3f} (bound {args.max_ratio})")
    figures = {
        "step_s_median": med["jax"], "step_s_all": times["jax"], "peak_rss_mib": rss["jax"], "compile_s": overhead["jax"],
        "torch_step_s_median": med["torch"], "torch_step_s_all": times["torch"], "torch_peak_rss_mib": rss["torch"],
        "ratio": ratio, "jax": info["jax"], "torch": info["torch"], "machine": H.machine(),
        "foreign_load_cores": H.median(loads), "rounds_kept": len(loads), "rounds_discarded": discarded,
        "config": {k: getattr(args, k) for k in ("batch", "image", "patch", "steps", "channels", "hidden", "fire_rate", "perception",
                                                 "kernel_sizes", "norm", "remat", "backend", "repeats", "quick")},
    }
    failures: list[str] = []
    H.check(failures, ratio <= args.max_ratio, f"JAX/torch 3D step time {ratio:.3f} > {args.max_ratio}")
    return H.conclude(args, figures, failures, H.median(loads), len(loads), discarded)


if __name__ == "__main__":
    sys.exit(main())
