"""List the pretrained models shipped in the package, or show one's model card.

Examples:
  mednca models
  mednca models hippocampus
  mednca predict --model hippocampus --input scan.nii.gz --output scan_label.nii.gz
"""

from __future__ import annotations

import argparse
import sys


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("name", nargs="?", help="a model's name: print its model card (what it is for, its data and licence, "
                                           "how it was trained and scored) and its folder")
    return p.parse_args(argv)


def table() -> str:
    """One line per shipped model: name, task, rank, parameters, test hard Dice."""
    from mednca_jax.models import model_info, model_names

    rows = [("name", "task", "dims", "params", "test Dice (hard, patients)")]
    for name in model_names():
        info = model_info(name)
        t = info["test"]
        rows.append((name, info["task"], f"{info['spatial_dims']}D", f"{info['parameters']:,}",
                     f"{t['dice']['mean']:.3f} ± {t['dice']['std']:.3f} ({t['patients']})"))
    if len(rows) == 1:
        return "no models are shipped with this installation"
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    return "\n".join(lines + ["", "`mednca models NAME` shows a model's card; use one with --model NAME in predict, evaluate and export."])


def main(argv: list[str] | None = None) -> int:
    from mednca_jax.models import MODEL_CARD, ModelError, model_dir

    args = parse_args(argv)
    if args.name is None:
        print(table())
        return 0
    try:
        folder = model_dir(args.name)
    except ModelError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print((folder / MODEL_CARD).read_text().rstrip())
    print(f"\nfolder: {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
