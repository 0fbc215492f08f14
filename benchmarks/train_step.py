"""Train step (forward + backward + Adam) at the original example config: JAX vs PyTorch.

    .venv/bin/python benchmarks/train_step.py [--repeats 5] [--json out.json]

Defaults are the original Med-NCA example (C=16, hidden 128, 64 steps per level, batch 48,
64x64 images, level 0 at 16x16, 16x16 patches, fire rate 0.5). The JAX side is the project's
``make_train_step`` on the backend ``model.backend = "auto"`` picks here, and on the
``reference`` backend beside it (what the fast path buys; ``--no-reference`` leaves it out);
the PyTorch side is ``benchmarks/torch_reference.py`` (the original's
structure). Each runs in its own subprocess (peak RSS per framework); timed steps alternate
between them so both see the same machine load. Exits non-zero when JAX/torch > --max-ratio
or the JAX compile time > --max-compile-s (unless --report-only).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _harness as H  # noqa: E402
from mednca_jax.train.launch import usable_cores  # noqa: E402  (the harness put the repo on sys.path)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=5, help="timed steps per framework (median reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps after the first call")
    p.add_argument("--batch", type=int, default=48)
    p.add_argument("--image", type=int, default=64, help="image size (square)")
    p.add_argument("--patch", type=int, default=16, help="level-1 training crop (0: whole images)")
    p.add_argument("--steps", type=int, default=64, help="NCA steps per level")
    p.add_argument("--channels", type=int, default=16)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--fire-rate", type=float, default=0.5)
    p.add_argument("--remat", default="none", choices=["none", "step", "nested"], help="JAX rollout checkpointing")
    p.add_argument("--jax-processes", type=int, default=0,
                   help="also time the data-parallel step over this many local JAX processes (jax.distributed, "
                        "one core each, the global batch split between them); the bound then applies to it. "
                        "0: one per usable core when there are several; 1: single process only")
    H.add_torch_args(p)
    p.add_argument("--max-ratio", type=float, default=0.35, help="bound on JAX step time / torch step time")
    p.add_argument("--no-reference", action="store_true", help="leave out the JAX reference backend's row")
    p.add_argument("--max-compile-s", type=float, default=10.0, help="bound on the JAX compile time")
    H.add_run_args(p)
    return p.parse_args(argv)


def make_batch(args: argparse.Namespace):
    """Images with one bright square each and its label (every sample has foreground)."""
    import numpy as np

    rng = np.random.default_rng(0)
    n, s = args.batch, args.image
    img = rng.random((n, s, s, 1), dtype=np.float32) * 0.3
    lab = np.zeros((n, s, s, 1), np.float32)
    side = max(2, s // 3)
    for i in range(n):
        y, x = rng.integers(0, s - side + 1, 2)
        lab[i, y : y + side, x : x + side] = 1.0
        img[i, y : y + side, x : x + side] += 0.6
    return img, lab


# --------------------------------------------------------------------------- workers
def jax_worker(args: argparse.Namespace, data_parallel: bool = False, backend: str = "auto") -> None:
    import jax

    from mednca_jax.config import Config, DataConfig, ModelConfig, TrainConfig, validate
    from mednca_jax.machine import backend_for
    from mednca_jax.networks import init_network_params
    from mednca_jax.train.step import (
        init_train_state, local_part, make_mesh, make_optimizer, make_train_step, put_batch, put_replicated,
    )

    cfg = validate(
        Config(
            name="bench",
            model=ModelConfig(
                channels=args.channels, hidden=args.hidden, steps=(args.steps, args.steps), scales=(4, 1),
                patch_size=args.patch, fire_rate=args.fire_rate, remat=args.remat, backend=backend,
            ),
            data=DataConfig(image_size=(args.image, args.image)),
            train=TrainConfig(batch_size=args.batch),
        )
    )
    tx = make_optimizer(cfg.train)
    mesh = make_mesh() if data_parallel else None
    resolved = backend_for(cfg.model)
    step = make_train_step(cfg, tx, mesh, backend=resolved)
    img, lab = make_batch(args)
    batch = put_batch(local_part({"image": img, "label": lab}), mesh)
    box = {"state": put_replicated(init_train_state(init_network_params(cfg, jax.random.PRNGKey(0)), tx), mesh), "i": 0}

    def step_timed() -> dict:
        key = jax.block_until_ready(jax.random.PRNGKey(box["i"]))  # before the clock, as in inference.py
        box["i"] += 1

        def run() -> None:
            box["state"], m = step(box["state"], batch, key)
            jax.block_until_ready((box["state"], m))

        return {"s": H.timed(run)}

    def info() -> dict:
        return {"version": jax.__version__, "device": str(jax.devices()[0].device_kind), "platform": jax.default_backend(),
                "backend": resolved.name}

    H.serve({"step": step_timed, "info": info})


def torch_worker(args: argparse.Namespace) -> None:
    import torch

    from torch_reference import TorchMedNCA, make_optimizer, train_step

    torch.manual_seed(0)
    model = TorchMedNCA(args.channels, args.hidden, (args.steps, args.steps), layout=args.torch_layout)
    opt = make_optimizer(model)
    img, lab = make_batch(args)
    images, labels = torch.from_numpy(img), torch.from_numpy(lab)
    gen = torch.Generator().manual_seed(0)
    run = lambda: train_step(model, opt, images, labels, args.patch, args.fire_rate, gen)  # noqa: E731
    info = lambda: {"version": torch.__version__, "threads": torch.get_num_threads()}  # noqa: E731
    H.serve({"step": lambda: {"s": H.timed(run)}, "info": info})


# --------------------------------------------------------------------------- parent
def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.worker == "jax":
        jax_worker(args)
        return 0
    if args.worker == "jax_reference":
        jax_worker(args, backend="reference")
        return 0
    if args.worker and args.worker.startswith("jaxdp"):
        H.join_job()
        jax_worker(args, data_parallel=True)
        return 0
    if args.worker == "torch":
        torch_worker(args)
        return 0

    n_proc = args.jax_processes or len(usable_cores())
    if n_proc > 1 and args.batch % n_proc:
        print(f"--batch {args.batch} must be divisible by the {n_proc} JAX processes (--jax-processes)")
        return 2
    names = ["jax"] + (["jaxdp"] if n_proc > 1 else []) + ([] if args.no_reference else ["jax_reference"])
    names += [] if args.no_torch else ["torch"]
    wargs = H.worker_argv(argv)
    workers = {n: (H.WorkerGroup(__file__, n, wargs, n_proc) if n == "jaxdp" else H.Worker(__file__, n, wargs)) for n in names}
    workers = {n: w.wait_ready() for n, w in workers.items()}
    info = {n: w.call("info") for n, w in workers.items()}
    first = {n: w.call("step")["s"] for n, w in workers.items()}  # JAX: trace + compile + one step
    for _ in range(args.warmup):
        for w in workers.values():
            w.call("step")
    # Interleaved rounds (one step per framework): both see the same load; rounds in which
    # other processes took CPU are discarded and retried (see _harness.sample_quiet).
    times, loads, discarded = H.sample_quiet(workers, lambda n, w: w.call("step")["s"], args.repeats, args.max_foreign_load, args.budget_s)
    foreign = H.median(loads)
    rss = {n: w.close() for n, w in workers.items()}

    med = {n: H.median(t) for n, t in times.items()}
    compile_s = {n: max(0.0, first[n] - med[n]) for n in names}
    best = "jaxdp" if "jaxdp" in names else "jax"  # the bounds apply to the data-parallel step when timed
    figures = {
        "step_s_median": med[best],
        "step_s_all": times[best],
        "peak_rss_mib": rss[best],
        "compile_s": compile_s[best],
        "first_call_s": first[best],
        "jax_processes": n_proc,
        "single_process": {"step_s_median": med["jax"], "step_s_all": times["jax"], "peak_rss_mib": rss["jax"],
                           "compile_s": compile_s["jax"]},
        "foreign_load_cores": foreign,
        "rounds_kept": len(loads),
        "rounds_discarded": discarded,
        "jax": info["jax"],
        "machine": H.machine(),
        "config": {k: getattr(args, k) for k in ("batch", "image", "patch", "steps", "channels", "hidden", "fire_rate", "remat", "repeats", "torch_layout")},
    }
    fast = info["jax"]["backend"]
    labels = {"jax": f"JAX {fast}, 1 process (make_train_step)", "jaxdp": f"JAX {fast}, {n_proc} processes x 1 core, data parallel",
              "jax_reference": "JAX reference backend, 1 process", "torch": f"PyTorch reference ({args.torch_layout})"}
    if "jax_reference" in names:
        figures["reference"] = {"step_s_median": med["jax_reference"], "peak_rss_mib": rss["jax_reference"]}
    rows = [[labels[n], med[n], min(times[n]), compile_s[n], rss[n]] for n in names]
    if "torch" in names:
        figures.update(
            torch_step_s_median=med["torch"], torch_step_s_all=times["torch"], torch_peak_rss_mib=rss["torch"],
            torch=info["torch"], ratio=med[best] / med["torch"],
        )
        figures["single_process"]["ratio"] = med["jax"] / med["torch"]

    print(f"train step, C={args.channels} hidden={args.hidden} steps={args.steps}x2 batch={args.batch} "
          f"{args.image}x{args.image} patch={args.patch} fire={args.fire_rate} remat={args.remat}; {H.machine()}")
    print(H.table(rows, ["", "step s (median)", "step s (min)", "compile / first-call overhead s", "peak RSS MiB (all processes)"]))
    failures: list[str] = []
    if "ratio" in figures:
        if best == "jaxdp":
            print(f"JAX 1 process / torch = {figures['single_process']['ratio']:.3f} (for reference)")
        print(f"{labels[best].split(' (')[0]} / torch = {figures['ratio']:.3f} (bound {args.max_ratio})")
        H.check(failures, figures["ratio"] <= args.max_ratio, f"JAX/torch step time {figures['ratio']:.3f} > {args.max_ratio}")
    for n in [n for n in names if n != "torch"]:
        H.check(failures, compile_s[n] <= args.max_compile_s, f"{labels[n]}: compile {compile_s[n]:.1f} s > {args.max_compile_s} s")
    return H.conclude(args, figures, failures, foreign, len(loads), discarded)


if __name__ == "__main__":
    sys.exit(main())
