"""Evaluate a checkpoint per patient: Dice on the model grid and on the native voxel grid,
NIfTI predictions in the input's geometry, optional stochastic runs (variance, NQM quality
score, failure detection) and an optional robustness suite (shifts, scale, MRI artefacts).

Examples:
  mednca evaluate --checkpoint runs/demo --split test
  mednca evaluate --checkpoint runs/official --data MSD_FOLDER --runs 10
  mednca evaluate --checkpoint runs/hippo --data MSD_FOLDER --split test --robustness --severities 0.5 1.0
  mednca evaluate --checkpoint runs/hippo --data MSD_FOLDER --split test --robustness --protocol ours torchio
  mednca evaluate --checkpoint runs/unet --data MSD_FOLDER --split test --robustness --compare-with runs/hippo/eval-test/robustness.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    from mednca_jax.cli.options import add_model_source

    add_model_source(p, "run folder written by mednca train or mednca export from-torch")
    p.add_argument("--data", type=Path, help="MSD task folder, or image folder for a model of data.format = images (default: the folder the run was trained on, else its own synthetic data)")
    p.add_argument("--cases", type=Path, help="text file with one case name per line to evaluate (default: every case)")
    p.add_argument("--split", choices=["train", "val", "test"], help="evaluate one part of the run's own patient split (split.json)")
    p.add_argument("--out", type=Path, help="output folder (default: CHECKPOINT/eval-<split or all>; with --model: eval-NAME-<split or all> here)")
    p.add_argument("--runs", type=int, help="stochastic runs per case (default 1, with --quality 10); >= 2 adds variance volumes, NQM, its Spearman correlation with Dice, failure detection and figures")
    p.add_argument("--fire-rate", type=float, help="cell fire rate at inference, in [0, 1) (default: the config's; 0 is deterministic)")
    p.add_argument("--seed", type=int, default=0, help="PRNG seed of the fire masks and of the perturbations")
    p.add_argument("--which", choices=["best", "latest"], default="best", help="checkpoint to load: best validation Dice (default) or latest")
    p.add_argument("--batch-size", type=int, default=32, help="slices per inference batch")
    p.add_argument("--cache-dir", type=Path, help="preprocessed-slice cache (default: $MEDNCA_CACHE or ~/.cache/mednca_jax)")
    p.add_argument("--quality", action="store_true", help="compute the quality metrics (NQM, Spearman, failure detection) with 10 runs unless --runs says otherwise; an error if they cannot be computed (--runs 1, fewer than 2 labelled cases); with --robustness also NQM and Dice per case under each of our perturbations and severities, with their Spearman correlation over clean and perturbed cases together (robustness_quality.json, robustness_nqm_vs_dice.png)")
    p.add_argument("--failure-dice", type=float, default=0.8, help="with --runs: a case with hard Dice below this counts as a failure to detect")
    p.add_argument("--robustness", action="store_true", help="Dice under each perturbation and severity, and at other image sizes")
    p.add_argument("--protocol", nargs="+", choices=["ours", "torchio"], default=["ours"],
                   help="with --robustness: 'ours' (default; mednca_jax/perturbations.py, written to robustness.json) and/or 'torchio' "
                        "(torchio's RandomGhosting, RandomAnisotropy, RandomBiasField, RandomNoise, RandomBlur at levels 1-5 with the "
                        "parameters of OctreeNCA's out-of-distribution study, written to robustness_torchio.json; needs "
                        "pip install 'mednca-jax[torchio]')")
    p.add_argument("--perturbations", nargs="+", help="with --robustness: which ones (default: all of each protocol; ours: see mednca_jax/perturbations.py, plus 'scale'; torchio: the class names above)")
    p.add_argument("--severities", nargs="+", type=float, help="with --robustness, protocol 'ours': severities in [0, 1] (default: 0.25 0.5 0.75 1.0); the torchio protocol always runs levels 1-5")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (e.g. for log files)")
    p.add_argument("--compare-with", nargs="+", type=Path, default=[], help="with --robustness: robustness.json of other models to draw on the same plot (with --protocol torchio, the robustness_torchio.json beside each)")
    return p.parse_args(argv)


QUALITY_RUNS = 10  # --quality without --runs


def main(argv: list[str] | None = None) -> int:
    """Run the evaluation; a user's mistake is one ``error: ...`` line and exit code 2."""
    try:
        return _main(parse_args(argv))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def _main(args: argparse.Namespace) -> int:
    from mednca_jax.errors import MedNCAError
    from mednca_jax.evaluate.evaluation import EvalOptions, evaluate_checkpoint, format_table
    from mednca_jax.machine import Machine

    from mednca_jax.cli.options import model_source

    try:
        checkpoint = model_source(args)
    except MedNCAError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    # A shipped model's folder is part of the installed package (maybe read-only): its
    # evaluation goes to the current folder.
    default_out = Path(f"eval-{args.model}-{args.split or 'all'}") if args.model else checkpoint / f"eval-{args.split or 'all'}"
    out = args.out or default_out
    runs = args.runs if args.runs is not None else (QUALITY_RUNS if args.quality else 1)
    opts = EvalOptions(
        cases_file=args.cases, split=args.split, runs=runs, fire_rate=args.fire_rate, seed=args.seed, which=args.which,
        batch_size=args.batch_size, cache_dir=args.cache_dir, failure_dice=args.failure_dice, quality=args.quality,
        robustness=args.robustness, perturbations=args.perturbations, severities=args.severities,
        compare_with=args.compare_with, progress=not args.no_progress, protocols=tuple(args.protocol),
    )
    try:
        metrics = evaluate_checkpoint(checkpoint, args.data, out, opts, machine=Machine.here())
    except MedNCAError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_table(metrics))
    if "model" in metrics:
        m = metrics["model"]
        print(f"model: {m['kind']}, {m['params']:,} params, {m['ms_per_slice']:.1f} ms per {m.get('image', 'slice')} at batch {m['batch_size']} "
              f"on {m['device']} (compile excluded)")
    q = metrics.get("quality")
    if q is not None and "nqm_threshold" not in q:
        print(f"NQM statistics not available: {q['note']}")
    elif q is not None:
        fd = q["failure_detection"]
        print(f"NQM vs Dice: Spearman {q['spearman_nqm_dice']:.3f}; NQM threshold {q['nqm_threshold']:.4f} "
              f"(chosen on {q['threshold_chosen_on']}) flags {fd['TP']}/{fd['n_failures']} failures with {fd['FP']} false alarms")
    for stem in ("robustness", "robustness_torchio"):
        if stem in metrics:
            print((out / f"{stem}.md").read_text())
    print(f"metrics: {out / 'metrics.json'}; predictions: {out / 'predictions'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
