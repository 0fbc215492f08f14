"""Evaluate a checkpoint per patient: Dice on the model grid and on the native voxel grid,
NIfTI predictions in the input's geometry, optional stochastic runs (variance, NQM quality
score, failure detection) and an optional robustness suite (shifts, scale, MRI artefacts).

Examples:
  python evaluate.py --checkpoint runs/demo --split test
  python evaluate.py --checkpoint runs/official --data MSD_FOLDER --runs 10
  python evaluate.py --checkpoint runs/hippo --data MSD_FOLDER --split test --robustness --severities 0.5 1.0
  python evaluate.py --checkpoint runs/unet --data MSD_FOLDER --split test --robustness --compare-with runs/hippo/eval-test/robustness.json
"""

from __future__ import annotations

import argparse
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
    p.add_argument("--out", type=Path, help="output folder (default: CHECKPOINT/eval-<split or all>)")
    p.add_argument("--runs", type=int, default=1, help="stochastic runs per case; >= 2 adds variance volumes, NQM, its Spearman correlation with Dice, failure detection and figures")
    p.add_argument("--fire-rate", type=float, help="cell fire rate at inference, in [0, 1) (default: the config's; 0 is deterministic)")
    p.add_argument("--seed", type=int, default=0, help="PRNG seed of the fire masks and of the perturbations")
    p.add_argument("--which", choices=["best", "latest"], default="best", help="checkpoint to load: best validation Dice (default) or latest")
    p.add_argument("--batch-size", type=int, default=32, help="slices per inference batch")
    p.add_argument("--cache-dir", type=Path, help="preprocessed-slice cache (default: $MEDNCA_CACHE or ~/.cache/mednca_jax)")
    p.add_argument("--quality", action="store_true", help="require the quality metrics (NQM, Spearman, failure detection): an error unless --runs >= 2")
    p.add_argument("--failure-dice", type=float, default=0.8, help="with --runs: a case with hard Dice below this counts as a failure to detect")
    p.add_argument("--robustness", action="store_true", help="Dice under each perturbation and severity, and at other image sizes")
    p.add_argument("--perturbations", nargs="+", help="with --robustness: which ones (default: all; see mednca_jax/perturbations.py, plus 'scale')")
    p.add_argument("--severities", nargs="+", type=float, help="with --robustness: severities in [0, 1] (default: 0.25 0.5 0.75 1.0)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (e.g. for log files)")
    p.add_argument("--compare-with", nargs="+", type=Path, default=[], help="with --robustness: robustness.json of other models to draw on the same plot")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from mednca_jax.checkpoint import CheckpointError
    from mednca_jax.config import ConfigError
    from mednca_jax.data import DataError
    from mednca_jax.evaluation import evaluate_checkpoint, format_table
    from mednca_jax.levels import InputError

    out = args.out or args.checkpoint / f"eval-{args.split or 'all'}"
    try:
        if args.quality and args.runs < 2:
            raise ValueError(f"--quality needs --runs N with N >= 2 stochastic runs (got --runs {args.runs}); e.g. --runs 10")
        if args.robustness:
            from mednca_jax.perturbations import check_severities
            from mednca_jax.robustness import check_perturbation_names

            check_perturbation_names(args.perturbations or [])
            check_severities(args.severities or [])
        metrics = evaluate_checkpoint(
            args.checkpoint, args.data, out, cases_file=args.cases, split=args.split, runs=args.runs,
            fire_rate=args.fire_rate, seed=args.seed, which=args.which, batch_size=args.batch_size,
            cache_dir=args.cache_dir, failure_dice=args.failure_dice, robustness=args.robustness,
            perturbations=args.perturbations, severities=args.severities, compare_with=args.compare_with,
            progress=not args.no_progress,
        )
    except (ConfigError, DataError, CheckpointError, InputError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_table(metrics))
    if "model" in metrics:
        m = metrics["model"]
        print(f"model: {m['kind']}, {m['params']:,} params, {m['ms_per_slice']:.1f} ms per slice at batch {m['batch_size']} "
              f"on {m['device']} (compile excluded)")
    if metrics.get("quality", {}).get("spearman_nqm_dice") is None and "quality" in metrics:
        print(f"NQM: {metrics['quality']['note']}")
    elif "quality" in metrics:
        q = metrics["quality"]
        fd = q["failure_detection"]
        print(f"NQM vs Dice: Spearman {q['spearman_nqm_dice']:.3f}; NQM threshold {q['nqm_threshold']:.4f} "
              f"(chosen on {q['threshold_chosen_on']}) flags {fd['TP']}/{fd['n_failures']} failures with {fd['FP']} false alarms")
    if "robustness" in metrics:
        print((out / "robustness.md").read_text())
    print(f"metrics: {out / 'metrics.json'}; predictions: {out / 'predictions'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
