"""3D train step (forward + backward, no optimiser) of a two-level NCA: cpu_fast vs reference.

    .venv/bin/python benchmarks/train_step_3d.py [--perception depthwise --kernel-sizes 7 3] [--json out.json]

Defaults are an M3D-NCA-like problem: C=16, hidden 64, norm none, batch 4 of 64x64x52
volumes, level 0 on the volume max-pooled x2 (32x32x26, ``model.scales = [2, 1]``,
``model.downscale = "max"``), level 1 on one random 32x32x26 crop per sample of the
upsampled state, 10 + 10 steps at fire rate 0.5, loss Dice+BCE
(:func:`mednca_jax.losses.dice_bce_loss`), ``jax.value_and_grad`` w.r.t. the parameters. The
crop is taken here (per axis): ``model.patch_size`` crops the same size along every axis.

Both backends run in this one process (the same JAX build and thread pool), alternating one
timed step each, rounds in which other processes used the CPU discarded and retried (see
``_harness.sample_quiet``); compile time is excluded (first call, then ``--warmup`` steps).
Exits non-zero when cpu_fast is not at least ``--min-speedup`` times faster than reference
(unless --report-only), 3 when the machine was too busy to tell.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _harness as H  # noqa: E402
from mednca_jax.train.launch import usable_cores  # noqa: E402  (the harness put the repo on sys.path)

QUICK = {"batch": 1, "image": [8, 8, 6], "patch": [4, 4, 4], "steps": 2, "channels": 4, "hidden": 8, "repeats": 1,
         "warmup": 0}


def add_problem_args(p: argparse.ArgumentParser, norm: str = "none", steps: bool = True) -> None:
    """The 3D problem's options, shared by the 3D benchmarks (defaults: M3D-NCA's hippocampus
    sizes, norm ``norm``; ``steps=False``: the caller defines ``--steps``)."""
    p.add_argument("--batch", type=int, default=4, help="volumes per step")
    p.add_argument("--image", type=int, nargs=3, default=[64, 64, 52], metavar=("X", "Y", "Z"),
                   help="full-resolution volume size (each divisible by the level-0 scale 2)")
    p.add_argument("--patch", type=int, nargs=3, default=[32, 32, 26], metavar=("X", "Y", "Z"),
                   help="level-1 training crop per axis (the image size: no crop)")
    if steps:
        p.add_argument("--steps", type=int, default=10, help="NCA steps per level")
    p.add_argument("--channels", type=int, default=16, help="state channels C")
    p.add_argument("--hidden", type=int, default=64, help="width of the update MLP")
    p.add_argument("--fire-rate", type=float, default=0.5, help="a cell updates where u > fire rate")
    p.add_argument("--perception", default="depthwise", help="a registered linear perception (learned, sobel, depthwise)")
    p.add_argument("--kernel-sizes", type=int, nargs=2, default=[7, 3], metavar=("K0", "K1"),
                   help="the perception's odd window on level 0 and level 1")
    p.add_argument("--norm", default=norm, choices=["none", "batch"], help="normalisation in the update (M3D-NCA: batch)")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=3, help="timed steps per backend (median reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per backend after the first (compiling) call")
    add_problem_args(p)
    p.add_argument("--remat", default="none", choices=["none", "step", "nested"], help="rollout checkpointing (both backends)")
    p.add_argument("--pieces", type=int, default=0,
                   help="cpu_fast's independent pieces per step (0: what model.backend=auto picks for the usable cores)")
    p.add_argument("--min-speedup", type=float, default=5.0, help="bound on reference step time / cpu_fast step time")
    H.add_quick_arg(p, QUICK)
    H.add_run_args(p)
    return H.parse_quick(p, argv, QUICK)


def make_batch(args: argparse.Namespace):
    """Volumes ``(B, X, Y, Z, 1)`` with one bright box each and its label (every sample has foreground)."""
    import numpy as np

    rng = np.random.default_rng(0)
    shape = (args.batch, *args.image, 1)
    img = rng.random(shape, dtype=np.float32) * 0.3
    lab = np.zeros(shape, np.float32)
    side = [max(2, s // 3) for s in args.image]
    for i in range(args.batch):
        corner = [int(rng.integers(0, s - d + 1)) for s, d in zip(args.image, side)]
        box = (i,) + tuple(slice(c, c + d) for c, d in zip(corner, side))
        lab[box] = 1.0
        img[box] += 0.6
    return img, lab


def crops(keys, arrays: tuple, size: tuple[int, ...]) -> tuple:
    """One uniformly placed crop of ``size`` (per axis) per sample, the same window in every
    array ``(B, *S, c)``; ``keys (B,)``."""
    import jax

    spatial = arrays[0].shape[1:-1]

    def corner(k):
        ks = jax.random.split(k, len(spatial))
        return tuple(jax.random.randint(ks[a], (), 0, spatial[a] - size[a] + 1) for a in range(len(spatial)))

    starts = jax.vmap(corner)(keys)

    def one(a, *start):
        return jax.lax.dynamic_slice(a, tuple(start) + (0,), tuple(size) + a.shape[-1:])

    return tuple(jax.vmap(one)(a, *starts) for a in arrays)


def model_config(args: argparse.Namespace, remat: str | None = None):
    """The two-level 3D model of ``args`` (``remat``: instead of ``args.remat``)."""
    from mednca_jax.config import ModelConfig

    return ModelConfig(
        channels=args.channels, hidden=args.hidden, steps=(args.steps, args.steps), scales=(2, 1), downscale="max",
        fire_rate=args.fire_rate, perception=args.perception, kernel_size=tuple(args.kernel_sizes), norm=args.norm,
        remat=args.remat if remat is None else remat, backend="cpu_fast",
    )


def make_loss(args: argparse.Namespace, cfg) -> Callable:
    """``loss(params, images, labels, key, backend)``: the two-level forward (level 1 on one
    ``args.patch`` crop per sample) and Dice+BCE, for ``jax.value_and_grad``."""
    from mednca_jax.losses import dice_bce_loss
    from mednca_jax.nca import levels
    from mednca_jax.nca.rule import fold_keys, sample_keys

    patch = tuple(args.patch)

    # The volumes are arguments, not constants: XLA would constant-fold the max-pooling.
    def loss(p, images, labels, key, backend):
        keys = sample_keys(key, images.shape[0])
        x, small = levels.level_input(None, images, cfg, 0)
        x, _ = levels.run_level(p, cfg, 0, x, small, keys, cfg.fire_rate, backend, cfg.remat)
        x, _ = levels.level_input(x, images, cfg, 1)
        x, im, lb = crops(fold_keys(keys, cfg.n_levels), (x, images, labels), patch) if patch != tuple(args.image) else (x, images, labels)
        x, _ = levels.run_level(p, cfg, 1, x, im, keys, cfg.fire_rate, backend, cfg.remat)
        return dice_bce_loss(x[..., cfg.n_in : cfg.n_in + cfg.n_out], lb)

    return loss


def make_step(args: argparse.Namespace) -> tuple[dict[str, Callable[[], float]], dict[str, Any]]:
    """One timed train step per backend (``{name: () -> seconds}``) and what runs."""
    import jax
    import jax.numpy as jnp

    from mednca_jax.nca import levels
    from mednca_jax.nca.backends import Backend, resolve_backend

    cfg = model_config(args)
    rules = levels.level_rules(cfg, ndim=3)
    fast = resolve_backend("cpu_fast", rules, jax.default_backend(), len(usable_cores()))  # names what it lacks
    if args.pieces:
        fast = Backend("cpu_fast", pieces=args.pieces)
    backends = {"cpu_fast": fast, "reference": Backend("reference")}
    params = levels.init_params(cfg, jax.random.PRNGKey(0), ndim=3)
    img, lab = make_batch(args)
    images, labels = jnp.asarray(img), jnp.asarray(lab)
    loss = make_loss(args, cfg)
    grad = jax.jit(jax.value_and_grad(loss), static_argnums=4)
    counter = [0]

    def timed(backend: Backend) -> Callable[[], float]:
        def run() -> float:
            key = jax.block_until_ready(jax.random.PRNGKey(counter[0]))  # before the clock
            counter[0] += 1
            return H.timed(lambda: jax.block_until_ready(grad(params, images, labels, key, backend)))

        return run

    what = {"backend_pieces": fast.pieces, "rules": [r._asdict() for r in rules], "jax": jax.__version__,
            "platform": jax.default_backend()}
    return {n: timed(b) for n, b in backends.items()}, what


class _InProcess:
    """A backend timed in this process, shaped as a harness worker (no processes of its own)."""

    pids: list[int] = []

    def __init__(self, run: Callable[[], float]):
        self.run = run


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    runs, what = make_step(args)
    first = {n: run() for n, run in runs.items()}  # trace + compile + one step
    for _ in range(args.warmup):
        for run in runs.values():
            run()
    workers = {n: _InProcess(r) for n, r in runs.items()}
    times, loads, discarded = H.sample_quiet(workers, lambda n, w: w.run(), args.repeats, args.max_foreign_load, args.budget_s)
    med = {n: H.median(t) for n, t in times.items()}
    speedup = med["reference"] / med["cpu_fast"]
    k0, k1 = args.kernel_sizes
    print(f"3D train step (value_and_grad, Dice+BCE), C={args.channels} hidden={args.hidden} steps={args.steps}x2 "
          f"batch={args.batch} {'x'.join(map(str, args.image))} level 0 {'x'.join(str(s // 2) for s in args.image)} "
          f"patch {'x'.join(map(str, args.patch))} perception={args.perception} k=[{k0}, {k1}] fire={args.fire_rate} "
          f"remat={args.remat}; {H.machine()}, jax {what['jax']}")
    rows = [[f"{n}" + (f" ({what['backend_pieces']} pieces)" if n == "cpu_fast" else ""), med[n] * 1e3, min(times[n]) * 1e3,
             max(0.0, first[n] - med[n])] for n in runs]
    print(H.table(rows, ["backend", "ms per step (median)", "ms per step (min)", "compile / first-call overhead s"]))
    print(f"reference / cpu_fast = {speedup:.2f} (bound >= {args.min_speedup})")
    figures = {
        "step_ms_median": {n: med[n] * 1e3 for n in runs}, "step_s_all": times, "speedup": speedup,
        "first_call_s": first, "machine": H.machine(), "rounds_kept": len(loads), "rounds_discarded": discarded,
        "foreign_load_cores": H.median(loads), **what,
        "config": {k: getattr(args, k) for k in ("batch", "image", "patch", "steps", "channels", "hidden", "fire_rate",
                                                 "perception", "kernel_sizes", "remat", "repeats", "quick")},
    }
    failures: list[str] = []
    H.check(failures, speedup >= args.min_speedup, f"cpu_fast is {speedup:.2f}x faster than reference, not >= {args.min_speedup}x")
    return H.conclude(args, figures, failures, H.median(loads), len(loads), discarded)


if __name__ == "__main__":
    sys.exit(main())
