"""``mednca export {from-torch, to-numpy, to-torch, to-onnx, to-model}``: move Med-NCA weights
between the original PyTorch files, this project's run folders and the edge runtimes."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

from mednca_jax.cli.options import add_model_source, model_source
from mednca_jax.export import (
    ExportError, export_numpy, export_onnx, export_torch, import_torch, load_checkpoint, resolve_config, verify_numpy,
    verify_onnx,
)
from mednca_jax.models import ModelError


def _size(paths: Sequence[Path]) -> str:
    return ", ".join(f"{p.name} ({p.stat().st_size / 1024:.1f} KiB)" for p in paths)


def cmd_from_torch(args: argparse.Namespace) -> int:
    cfg = resolve_config(args.config, args.set)
    out = import_torch(cfg, args.weights, args.out, force=args.force)
    print(f"wrote run folder {out} (config {cfg.name!r}, {cfg.model.n_levels} levels) from {', '.join(args.weights)}")
    return 0


def _report_verify(diff: float, runtime: str, tolerance: float = 1e-3) -> int:
    """Print the fire-0 logit difference of an export against JAX; exit status 1 beyond ``tolerance``."""
    print(f"verify: max |logits({runtime}) - logits(JAX)| = {diff:.3g} at fire rate 0")
    if diff > tolerance:
        print(f"error: the {runtime} export disagrees with JAX beyond {tolerance:g}", file=sys.stderr)
        return 1
    return 0


def cmd_to_numpy(args: argparse.Namespace) -> int:
    params, cfg = load_checkpoint(model_source(args), args.which)
    files = export_numpy(params, cfg, args.out)
    print(f"wrote {args.out}: {_size(files)}")
    runtime = Path(args.out) / files[0].name
    if len(cfg.data.image_size) == 2:
        print(f"run it with: python {runtime} {args.out} IN.nii.gz OUT.nii.gz")
    else:  # the runtime's NIfTI path is slice based
        print(f"run it with: python {runtime} {args.out} IN.npy OUT.npy (preprocessed volumes (B, X, Y, Z))")
    return _report_verify(verify_numpy(args.out, params, cfg), "NumPy") if args.verify else 0


def cmd_to_model(args: argparse.Namespace) -> int:
    import datetime
    import json

    from mednca_jax.models import write_model

    try:
        metrics = json.loads(args.metrics.read_text())
        log = [json.loads(line) for line in (args.checkpoint / "log.jsonl").read_text().splitlines() if line.strip()]
    except (OSError, ValueError) as e:
        raise ExportError(f"cannot read the run's metrics or log: {e}") from None
    last = [r for r in log if "loss" in r][-1]
    training = {"command": args.command, "steps": last["step"], "minutes": round(last["minutes"], 1), "machine": args.machine,
                "date": datetime.date.today().isoformat()}
    out = write_model(args.checkpoint, args.out, name=args.name, task=args.task, metrics=metrics, training=training,
                      which=args.which)
    print(f"wrote model folder {out}; write its MODEL_CARD.md")
    return 0


def cmd_to_torch(args: argparse.Namespace) -> int:
    params, cfg = load_checkpoint(model_source(args), args.which)
    files = export_torch(params, cfg, args.out)
    print(f"wrote {args.out}: {_size(files)}")
    return 0


def cmd_to_onnx(args: argparse.Namespace) -> int:
    params, cfg = load_checkpoint(model_source(args), args.which)
    files = export_onnx(params, cfg, args.out)
    print(f"wrote {args.out}: {_size(files)}")
    dims = "H, W" if len(cfg.data.image_size) == 2 else "X, Y, Z"
    chans = "" if cfg.model.n_in == 1 else f", {cfg.model.n_in}"
    print(f"inputs: images (B, {dims}{chans}) float32, fire_rate () float32, seed () int64; output: logits (B, {dims}, n_out)")
    return _report_verify(verify_onnx(args.out, params, cfg), "onnxruntime") if args.verify else 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m mednca_jax.export",
        description="Import the original Med-NCA weights, or export trained params to edge runtimes: a NumPy-only "
                    "module (no JAX/torch needed) or a PyTorch module with the original state-dict layout.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    f = sub.add_parser("from-torch", help="original .pth/.npz weights -> a run folder (checkpoint)",
                       description="Convert the original Med-NCA weights into a run folder that train/evaluate/"
                                   "to-numpy/to-torch read. The kernel layout is converted exactly (only transposes).")
    f.add_argument("--config", required=True,
                   help="TOML config describing the model (a path, or the name of a file in configs/, "
                        "e.g. hippocampus_official)")
    f.add_argument("--weights", required=True, nargs="+", metavar="PATH",
                   help="one .pth state dict per level, coarse to fine (model0.pth model1.pth), or one .npz with "
                        "keys model0.p0.weight ...")
    f.add_argument("--out", required=True, metavar="DIR", help="run folder to create (must be new or empty)")
    f.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set model.fire_rate=0.5 (repeatable)")
    f.add_argument("--force", action="store_true", help="replace the contents of a non-empty --out folder")
    f.set_defaults(func=cmd_from_torch)

    for name, func, what in (
        ("to-numpy", cmd_to_numpy, "mednca_numpy.py + weights.npz + config.json (needs only numpy; nibabel for NIfTI)"),
        ("to-torch", cmd_to_torch, "mednca_torch.py + model0.pth, model1.pth, ... (original layout) + config.json"),
        ("to-onnx", cmd_to_onnx, "mednca.onnx (whole inference, steps as ONNX Loops; needs onnx) + config.json"),
    ):
        s = sub.add_parser(name, help=f"run folder -> {what}", description=f"Export a checkpoint as {what}.")
        add_model_source(s, "run folder written by training or from-torch (holds config.toml and checkpoints)")
        s.add_argument("--out", required=True, metavar="DIR2", help="folder to write (created; existing files replaced)")
        s.add_argument("--which", choices=("best", "latest"), default="best",
                       help="checkpoint to export: best by validation Dice (falls back to latest) or latest")
        if name in ("to-numpy", "to-onnx"):
            s.add_argument("--verify", action="store_true",
                           help="after writing, run the exported runtime (onnxruntime for to-onnx) and JAX at fire rate 0 "
                                "on a random image and fail if the logits differ by more than 1e-3")
        s.set_defaults(func=func)

    m = sub.add_parser("to-model", help="run folder + its test evaluation -> a shipped-model folder (mednca_jax/models/NAME)",
                       description="Write a pretrained-model folder for the package (config.toml, params.npz, split.json, "
                                   "model.json) from a run folder and the metrics.json of its test evaluation. The model "
                                   "card (MODEL_CARD.md) is written by hand beside it.")
    m.add_argument("--checkpoint", required=True, type=Path, metavar="DIR", help="the run folder")
    m.add_argument("--metrics", required=True, type=Path, metavar="JSON", help="metrics.json of mednca evaluate --split test")
    m.add_argument("--out", required=True, type=Path, metavar="DIR2", help="the model folder, e.g. mednca_jax/models/hippocampus")
    m.add_argument("--name", required=True, help="the model's name (what --model takes)")
    m.add_argument("--task", required=True, help="one line: what it segments, in which images")
    m.add_argument("--command", required=True, help="the command that trained it, for model.json")
    m.add_argument("--machine", required=True, help="where it was trained, for model.json")
    m.add_argument("--which", choices=("best", "latest"), default="best", help="checkpoint to ship (default best)")
    m.set_defaults(func=cmd_to_model)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ExportError, ModelError) as e:  # ModelError: --model names no shipped model, or --out is taken
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
