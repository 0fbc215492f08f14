"""Write a generated task to train on: the synthetic MSD task that ``mednca train`` uses
without ``--data``, or an image folder (``data.format = "images"``) of grey or RGB images.

Examples:
  mednca demo-data --format images runs/shapes
  mednca demo-data --format images --rgb --cases 200 runs/shapes_rgb
  mednca train --config demo --data runs/shapes --set data.format=images --workdir runs/shapes_demo
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

DEFAULT_CASES = {"msd": 24, "images": 100}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("folder", type=Path, metavar="DIR", help="the folder to create (it must not exist, or be empty)")
    p.add_argument("--format", choices=tuple(DEFAULT_CASES), default="msd",
                   help="msd: imagesTr/, labelsTr/, dataset.json (3D NIfTI); images: images/ and masks/ of 2D "
                        "PNG/JPEG/TIFF/BMP files of varying sizes (default msd)")
    p.add_argument("--cases", type=int, metavar="N", help=f"number of cases (default {DEFAULT_CASES['msd']} volumes, "
                                                          f"{DEFAULT_CASES['images']} images)")
    p.add_argument("--rgb", action="store_true", help="--format images: colour images (targets differ from distractors by colour only)")
    p.add_argument("--seed", type=int, default=0, help="seed of the generator (default 0)")
    return p.parse_args(argv)


def write_task(folder: Path, fmt: str, cases: int, rgb: bool, seed: int) -> Path:
    """Generate into a temporary sibling of ``folder``, then rename: never a half-written task."""
    from mednca_jax.data import make_synthetic_task
    from mednca_jax.data.synthetic_images import write_image_task
    from mednca_jax.errors import UsageError

    if cases < (3 if fmt == "msd" else 1):
        raise UsageError(f"--cases must be >= {3 if fmt == 'msd' else 1}, got {cases}")
    if rgb and fmt != "images":
        raise UsageError("--rgb needs --format images")
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise UsageError(f"{folder} exists and is not an empty folder; name a new one")
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.with_name(f".{folder.name}.partial{os.getpid()}")
    try:
        if fmt == "images":
            write_image_task(tmp, n=cases, rgb=rgb, seed=seed)
        else:
            make_synthetic_task(tmp, n_cases=cases, seed=seed)
        if folder.is_dir():
            folder.rmdir()  # empty (checked above)
        os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def main(argv: list[str] | None = None) -> int:
    from mednca_jax.errors import MedNCAError

    args = parse_args(argv)
    cases = args.cases if args.cases is not None else DEFAULT_CASES[args.format]
    try:
        folder = write_task(args.folder, args.format, cases, args.rgb, args.seed)
    except MedNCAError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    hint = " --set data.format=images" if args.format == "images" else ""
    print(f"wrote {cases} {'RGB ' if args.rgb else ''}{'images' if args.format == 'images' else 'volumes'} to {folder}; "
          f"train with: mednca train --config demo --data {folder}{hint}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
