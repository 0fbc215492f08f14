"""Cost of on-device augmentation: the jitted train step with ``[augment] preset = "default"``
against the same step without augmentation.

    PYTHONPATH=. python benchmarks/augment_cost.py [--config configs/hippocampus.toml] [--rounds 5]
    PYTHONPATH=. python benchmarks/augment_cost.py --quick   # smoke test: tiny, bound not enforced

Both steps (``mednca_jax.train.step.make_train_step``) are compiled in one process and timed in
adjacent pairs (one call each, the order alternating), so the two calls of a pair see the
same machine load; the bound applies to the median of the pairs' ratios, which drifting load
from other jobs moves far less than a ratio of medians. The table gives the step times, the
compile times and the augmentation alone (``augment_batch`` jitted by itself). Exits non-zero
when the median paired ratio exceeds ``1 + --max-overhead`` (default 10 %), unless
``--report-only``.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _harness as H  # noqa: E402  (puts the repository on sys.path)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(H.REPO / "configs" / "hippocampus.toml"), help="model and batch size of the step")
    p.add_argument("--preset", default="default", help="the [augment] preset to time against none")
    p.add_argument("--batch", type=int, default=0, help="batch size (0: the config's)")
    p.add_argument("--rounds", type=int, default=15, help="timed pairs (one step of each)")
    p.add_argument("--max-overhead", type=float, default=0.10, help="bound on augmented / plain - 1")
    p.add_argument("--report-only", action="store_true", help="print the figures, never fail on the bound")
    p.add_argument("--quick", action="store_true", help="smoke test: demo config, batch 4, 2 rounds of 1 step, report only")
    p.add_argument("--json", default=None, help="also write the figures to this file")
    a = p.parse_args(argv)
    if a.quick:
        a.config, a.batch, a.rounds, a.report_only = str(H.REPO / "configs" / "demo.toml"), 4, 2, True
    return a


def make_batch(n: int, size: tuple[int, int]):
    """Images with a bright rectangle each and its label (every sample has foreground)."""
    import numpy as np

    rng = np.random.default_rng(0)
    h, w = size
    img = rng.random((n, h, w, 1), dtype=np.float32) * 0.3
    lab = np.zeros((n, h, w, 1), np.float32)
    for i in range(n):
        y, x = rng.integers(0, h // 2, 2)
        lab[i, y : y + h // 3, x : x + w // 3] = 1.0
        img[i, y : y + h // 3, x : x + w // 3] += 0.6
    return {"image": img, "label": lab}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import jax

    from mednca_jax.augment import augment_batch, augment_keys
    from mednca_jax.config import AugmentConfig, load_config
    from mednca_jax.networks import init_network_params
    from mednca_jax.machine import backend_for
    from mednca_jax.train.step import init_train_state, make_optimizer, make_train_step, put_batch

    base = load_config(args.config)
    if args.batch:
        base = base.replace(train=dataclasses.replace(base.train, batch_size=args.batch))
    acfg = AugmentConfig.from_preset(args.preset)
    cfgs = {"none": base.replace(augment=AugmentConfig()), args.preset: base.replace(augment=acfg)}
    batch = put_batch(make_batch(base.train.batch_size, base.data.image_size), None)
    params = init_network_params(base, jax.random.PRNGKey(0))

    steps, states, compile_s, times = {}, {}, {}, {}
    for name, cfg in cfgs.items():
        tx = make_optimizer(cfg.train)
        steps[name] = make_train_step(cfg, tx, backend=backend_for(cfg))
        states[name] = init_train_state(params, tx)
        t = time.perf_counter()
        states[name], m = steps[name](states[name], batch, jax.random.PRNGKey(0))
        jax.block_until_ready(m["loss"])
        compile_s[name] = time.perf_counter() - t
        times[name] = []
    aug_only = jax.jit(lambda b, k: augment_batch(b, augment_keys(k, base.train.batch_size), acfg))
    t = time.perf_counter()
    jax.block_until_ready(aug_only(batch, jax.random.PRNGKey(0)))
    compile_s["augment alone"] = time.perf_counter() - t
    times["augment alone"] = []

    pair_ratios = []
    for r in range(args.rounds):
        order = list(steps) if r % 2 == 0 else list(steps)[::-1]  # alternate who goes first
        for name in order:
            t = time.perf_counter()
            states[name], m = steps[name](states[name], batch, jax.random.PRNGKey(r + 1))
            jax.block_until_ready(m["loss"])
            times[name].append(time.perf_counter() - t)
        pair_ratios.append(times[args.preset][-1] / times["none"][-1])
        times["augment alone"].append(H.timed(lambda: jax.block_until_ready(aug_only(batch, jax.random.PRNGKey(r)))))

    med = {k: statistics.median(v) for k, v in times.items()}
    ratio = statistics.median(pair_ratios)
    m = base.model
    print(f"train step of {Path(args.config).name}: batch {base.train.batch_size}, {base.data.image_size[0]}x{base.data.image_size[1]}, "
          f"steps {list(m.steps)}, patch {m.patch_size}; {args.rounds} pairs of steps, order alternating")
    print(f"machine: {H.machine()}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    rows = [[k, med[k] * 1e3, min(times[k]) * 1e3, max(times[k]) * 1e3, compile_s[k], med[k] / med["none"]] for k in times]
    print(H.table(rows, ["step", "median ms", "min ms", "max ms", "compile s", "median / none's"]))
    bound = 1.0 + args.max_overhead
    print(f"augmented / plain step, median of {len(pair_ratios)} pairs: {ratio:.3f} (bound {bound:.2f}; "
          f"pairs {min(pair_ratios):.3f}-{max(pair_ratios):.3f}; ratio of medians {med[args.preset] / med['none']:.3f})")
    H.write_json(args.json, {"ratio": ratio, "pair_ratios": pair_ratios, "median_s": med, "compile_s": compile_s, "machine": H.machine()})
    if ratio > bound and not args.report_only:
        print(f"FAIL: augmentation costs {100 * (ratio - 1):.1f} % of the train step (> {100 * args.max_overhead:.0f} %)")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
