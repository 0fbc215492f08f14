"""``mednca``: the command line of the package (``[project.scripts]`` in pyproject.toml).

Each subcommand owns its own argument parser; this module only dispatches, so
``mednca COMMAND --help`` shows that command's flags::

    mednca train     --config demo --workdir runs/demo
    mednca evaluate  --checkpoint runs/demo --split test
    mednca predict   --checkpoint runs/demo --input scan.nii.gz --output label.nii.gz
    mednca export    to-numpy --checkpoint runs/demo --out edge_np
    mednca models
    mednca demo-data --format images runs/shapes
"""

from __future__ import annotations

import sys
from typing import Callable, Sequence

# name -> (module holding ``main(argv) -> int``, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("mednca_jax.cli.train", "train Med-NCA (or the UNet baseline) on an MSD task folder, an image folder or the synthetic demo task"),
    "evaluate": ("mednca_jax.cli.evaluate", "score a checkpoint per patient (Dice, NQM, robustness) and write predictions"),
    "predict": ("mednca_jax.evaluate.predict", "segment new, unlabelled NIfTI scans (or 2D images) in their native grid"),
    "export": ("mednca_jax.export.__main__", "import the original PyTorch weights or export to the NumPy / PyTorch runtimes"),
    "models": ("mednca_jax.cli.models", "list the pretrained models shipped in the package (use one with --model NAME)"),
    "demo-data": ("mednca_jax.cli.demo_data", "write a generated task: the synthetic MSD task, or a folder of 2D images and masks"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [
        "usage: mednca COMMAND [options]",
        "",
        "Med-NCA (neural cellular automata segmentation of 2D medical slices) in JAX.",
        "",
        "commands:",
        *(f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items()),
        "",
        "`mednca COMMAND --help` lists the options of one command. --config of train and",
        "export from-torch takes a TOML path or the name of a shipped config (e.g. demo).",
    ]
    return "\n".join(lines)


def resolve_config_option(argv: Sequence[str]) -> list[str]:
    """Replace the value of ``--config NAME`` (or ``--config=NAME``) by the path of the shipped
    config of that name when NAME is not an existing file. Anything else is left as it is,
    so the command's own parser reports a bad value."""
    from mednca_jax.named_configs import resolve_config_path
    from mednca_jax.config import ConfigError

    def resolve(value: str) -> str:
        try:
            return str(resolve_config_path(value))
        except ConfigError:
            return value  # the command's own error message names the file

    out = list(argv)
    for i, arg in enumerate(out):
        if arg == "--config" and i + 1 < len(out):
            out[i + 1] = resolve(out[i + 1])
        elif arg.startswith("--config="):
            out[i] = "--config=" + resolve(arg.split("=", 1)[1])
    return out


def _command_main(name: str) -> Callable[[Sequence[str]], int]:
    import importlib

    return importlib.import_module(COMMANDS[name][0]).main


def main(argv: Sequence[str] | None = None) -> int:
    """Dispatch to ``COMMAND``'s ``main``. A Ctrl-C before a command takes over (while the
    modules import, or in a command without its own handler) is one line and exit code 130."""
    try:
        return _dispatch(list(sys.argv[1:] if argv is None else argv))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def _dispatch(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"mednca: unknown command {name!r}; choose one of {', '.join(COMMANDS)}\n\n{usage()}", file=sys.stderr)
        return 2
    if name == "train":
        rest = resolve_config_option(rest)
    # argparse names the program after sys.argv[0]: make usage lines read "mednca train ..."
    saved, sys.argv[0] = sys.argv[0], f"mednca {name}"
    try:
        return int(_command_main(name)(rest) or 0)
    finally:
        sys.argv[0] = saved


if __name__ == "__main__":
    sys.exit(main())
