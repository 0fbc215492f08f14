"""Train Med-NCA (or the UNet baseline) on an MSD task folder or the embedded synthetic data.

Examples:
  mednca train --config demo
  mednca train --config hippocampus_cpu --data PATH/Task04_Hippocampus --workdir runs/hippo
  mednca train --workdir runs/hippo --resume

Multi-host data parallelism: set train.data_parallel = true and start one process per host
with JAX_COORDINATOR_ADDRESS=host0:port JAX_NUM_PROCESSES=N JAX_PROCESS_ID=i. On a CPU-only
machine, mednca train starts such a job of one process per core by default, which trains
faster than one process; --cpu-processes 1 (or MEDNCA_CPU_PROCESSES=1) opts out.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--config", type=Path, help="TOML config under configs/ (with --resume: defaults to the run's own config.toml)")
    p.add_argument("--data", type=Path, help="MSD task folder (imagesTr/, labelsTr/, dataset.json), or with --set data.format=images a folder of images/ and masks/ (docs/data.md); default: generate the synthetic demo task inside --workdir")
    p.add_argument("--workdir", type=Path, help="run folder for checkpoints, logs, split and config (default: runs/<config name>)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.lr=1e-3 --set model.steps=[32,32]; repeatable")
    p.add_argument("--resume", action="store_true", help="continue the run in --workdir from its latest checkpoint (on its own --data folder unless --data is given)")
    p.add_argument("--cache-dir", type=Path, help="preprocessed-slice cache (default: $MEDNCA_CACHE or ~/.cache/mednca_jax)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (e.g. for log files)")
    p.add_argument("--cpu-processes", type=int, default=None, metavar="N",
                   help="train as one data-parallel job of N processes on this machine (jax.distributed), each on its "
                        "own cores; sets train.data_parallel=true when N > 1. Default ($MEDNCA_CPU_PROCESSES when set): "
                        "on a CPU-only machine one process per usable core (faster than one process, "
                        "docs/performance.md), fewer when the batch size does not divide by the cores; one process "
                        "on a GPU or TPU. 0: one per usable core. 1: a single process. The batch size must divide by N")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Train; a user's mistake (any :class:`~mednca_jax.errors.MedNCAError`) is one
    ``error: ...`` line on stderr and exit code 2, a Ctrl-C before training a clean exit."""
    try:
        return _main(sys.argv[1:] if argv is None else argv)
    except KeyboardInterrupt:  # during start-up (training turns the first Ctrl-C into a save and stop)
        print("interrupted", file=sys.stderr)
        return 130


def _read_config(args: argparse.Namespace):
    """The run's config: ``--config`` with ``--set`` on top, or the run folder's own with
    ``--resume`` (importing its ``model.plugins``)."""
    from mednca_jax.config import ConfigError, load_config
    from mednca_jax.plugins import PluginError
    from mednca_jax.train.checkpoint import CONFIG_FILE

    if args.config is None:
        if not (args.resume and args.workdir):
            raise ConfigError("--config is required (or --resume with --workdir of an existing run)")
        args.config = args.workdir / CONFIG_FILE
    try:
        return load_config(args.config, args.overrides)
    except PluginError as e:
        if args.resume and e.missing:  # the resumed run's own config.toml is read again: it must name the file
            raise ConfigError(e.in_run(args.workdir / CONFIG_FILE)) from None
        raise


def _processes(args: argparse.Namespace, batch_size: int) -> int:
    """``--cpu-processes``, else ``$MEDNCA_CPU_PROCESSES``, else one per core on a CPU-only
    machine (:func:`~mednca_jax.train.launch.auto_processes`); 0 means one per usable core."""
    from mednca_jax.errors import MedNCAError
    from mednca_jax.train.launch import auto_processes, usable_cores

    n = args.cpu_processes
    if n is None and os.environ.get("MEDNCA_CPU_PROCESSES", "").strip():
        text = os.environ["MEDNCA_CPU_PROCESSES"].strip()
        if not text.isdigit():
            raise MedNCAError(f"MEDNCA_CPU_PROCESSES must be a whole number of processes (0: one per core), got {text!r}")
        n = int(text)
    if n is None:
        from mednca_jax.machine import Machine

        machine = Machine.here()
        return auto_processes(machine.platform, machine.cores, batch_size)
    return n or len(usable_cores())


def _main(argv: list[str]) -> int:
    args = parse_args(argv)
    if args.cpu_processes != 1 and "JAX_COORDINATOR_ADDRESS" not in os.environ:
        from mednca_jax.errors import MedNCAError

        try:  # read once here too: a bad config (a missing plug-in) is one error line, not one per process
            n = _processes(args, _read_config(args).train.batch_size)
        except MedNCAError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    else:
        n = 1
    if n != 1:
        from mednca_jax.train.launch import run_local_job, without_option

        child = without_option(argv, "--cpu-processes") + ["--set", "train.data_parallel=true"]
        try:
            # The children import the same mednca_jax as this process (a checkout may sit
            # beside an installed copy): its parent folder goes first on their PYTHONPATH.
            root = str(Path(__file__).resolve().parents[2])
            env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
            return run_local_job([sys.executable, "-m", "mednca_jax.cli.train", *child], n, env=env)
        except ValueError as e:  # more processes than cores, raised before anything starts
            print(f"error: --cpu-processes: {e}", file=sys.stderr)
            return 2
    from mednca_jax.errors import MedNCAError
    from mednca_jax.train.loop import train

    try:
        cfg = _read_config(args)
        from mednca_jax.train.faults import initialize_distributed_from_env

        initialize_distributed_from_env()  # multi-host: JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID
        workdir = args.workdir or Path("runs") / cfg.name
        from mednca_jax.machine import backend_for

        result = train(cfg, workdir, args.data, backend=backend_for(cfg), resume=args.resume, cache_dir=args.cache_dir,
                       progress=not args.no_progress)
    except MedNCAError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from mednca_jax.train.faults import is_primary

    if is_primary():  # every process of a data-parallel job ends with the same result
        best = result["best_val_dice"]
        val = f"best validation Dice {best:.4f}" if best >= 0 else "no validation cases"
        print(f"{result['reason']}: step {result['step']} in {result['minutes']:.1f} min, {val}; run folder {workdir}")
    return 130 if result["reason"] == "interrupted" else 0


if __name__ == "__main__":
    sys.exit(main())
