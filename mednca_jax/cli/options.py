"""Command-line options shared by several ``mednca`` commands."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_model_source(p: argparse.ArgumentParser, checkpoint_help: str, metavar: str = "DIR") -> None:
    """``--checkpoint DIR`` or ``--model NAME`` (a shipped pretrained model), exactly one."""
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--checkpoint", type=Path, metavar=metavar, help=checkpoint_help)
    g.add_argument("--model", metavar="NAME",
                   help="a pretrained model shipped in the package instead of --checkpoint (`mednca models` lists them)")


def model_source(args: argparse.Namespace) -> Path:
    """The folder ``--checkpoint`` names, or the shipped model ``--model`` names.

    Raises:
        mednca_jax.models.ModelError: ``--model`` names no shipped model.
    """
    if getattr(args, "model", None):
        from mednca_jax.models import model_dir

        return model_dir(args.model)
    return args.checkpoint
