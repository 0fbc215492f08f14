#!/usr/bin/env python
"""Evaluate a checkpoint per patient: Dice on the model grid and on the native voxel grid,
NIfTI predictions in the input's geometry, optional stochastic runs with variance and NQM.

Examples:
  python evaluate.py --checkpoint runs/demo --split test
  python evaluate.py --checkpoint runs/official --data ../shared/reference/hippocampus_374_msd --runs 10
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--checkpoint", type=Path, required=True, help="run folder written by train.py or 'python -m mednca_jax.export from-torch'")
    p.add_argument("--data", type=Path, help="MSD task folder (default: the run's own synthetic data when it has some)")
    p.add_argument("--cases", type=Path, help="text file with one case name per line to evaluate (default: every case)")
    p.add_argument("--split", choices=["train", "val", "test"], help="evaluate one part of the run's own patient split (split.json)")
    p.add_argument("--out", type=Path, help="output folder for metrics.json and predictions (default: CHECKPOINT/eval-<split or all>)")
    p.add_argument("--runs", type=int, default=1, help="stochastic runs per case; >= 2 adds a variance volume and the NQM quality score")
    p.add_argument("--fire-rate", type=float, help="cell fire rate at inference (default: the config's; 0 is deterministic)")
    p.add_argument("--seed", type=int, default=0, help="PRNG seed of the stochastic fire masks")
    p.add_argument("--which", choices=["best", "latest"], default="best", help="checkpoint to load: best validation Dice (default) or latest")
    p.add_argument("--batch-size", type=int, default=32, help="slices per inference batch")
    p.add_argument("--cache-dir", type=Path, help="preprocessed-slice cache (default: $MEDNCA_CACHE or ~/.cache/mednca_jax)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import jax

    from mednca_jax.checkpoint import CheckpointError, load_params
    from mednca_jax.config import ConfigError
    from mednca_jax.data import DataError, list_cases, load_slices, read_split
    from mednca_jax.evaluation import evaluate_cases, format_table
    from mednca_jax.levels import check_fire_rate, InputError

    try:
        if args.runs < 1:
            raise ValueError(f"--runs must be >= 1, got {args.runs}")
        if args.fire_rate is not None:
            check_fire_rate(args.fire_rate)
        params, cfg = load_params(args.checkpoint, which=args.which)
        data_dir = args.data or args.checkpoint / "synthetic_data"
        if not data_dir.is_dir():
            raise DataError(f"no --data given and {data_dir} does not exist; pass --data MSD_TASK_FOLDER")
        cases = list_cases(data_dir)
        names = [c.name for c in cases]
        if args.cases:
            wanted = [l.strip() for l in args.cases.read_text().splitlines() if l.strip()]
            unknown = sorted(set(wanted) - set(names))
            if unknown:
                raise DataError(f"{args.cases}: cases {unknown[:5]} are not in {data_dir}")
            names = wanted
        if args.split:
            part = read_split(args.checkpoint / "split.json").part(args.split)
            names = [n for n in names if n in set(part)]
            if not names:
                raise DataError(f"the {args.split} part of {args.checkpoint / 'split.json'} has no case in {data_dir}")
        chosen = [c for c in cases if c.name in set(names)]
        labelled = [c for c in chosen if c.label is not None]
        unlabelled = [c for c in chosen if c.label is None]
        out = args.out or args.checkpoint / f"eval-{args.split or 'all'}"
        key = jax.random.PRNGKey(args.seed)
        metrics = {"summary": {}, "cases": {}}
        for group, sub in (("labelled", labelled), ("unlabelled", unlabelled)):
            if not sub:
                continue
            slices = load_slices(sub, cfg.data, args.cache_dir, cfg.model.n_out)
            m = evaluate_cases(params, cfg, slices, sub, key, fire_rate=args.fire_rate, runs=args.runs,
                               batch_size=args.batch_size, out_dir=out)
            metrics["cases"].update(m["cases"])
            if group == "labelled":
                metrics["summary"] = m["summary"]
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    except (ConfigError, DataError, CheckpointError, InputError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_table(metrics))
    print(f"metrics: {out / 'metrics.json'}; predictions: {out / 'predictions'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
