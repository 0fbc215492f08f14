"""Which implementation runs a rule: a static :class:`Backend`, resolved once per entry point.

- ``reference``: the rule as written (:mod:`mednca_jax.nca.rule`), differentiated by JAX
  itself; any registered perception and update, any spatial rank, float32 or bfloat16.
  Runs anywhere (CPU, GPU, TPU) and is what a researcher edits.
- ``cpu_fast``: :mod:`mednca_jax.nca.cpu_fast`, derived from the rule's description (fired
  cells only, a hand-written VJP); it declares what it runs (:func:`cpu_fast.unsupported`).

``model.backend = "auto"`` takes ``cpu_fast`` on a CPU for rules it runs, else ``reference``,
and says once why when it falls back. Naming ``cpu_fast`` for a rule it does not run is an
error that names what it lacks. Nothing here reads the machine: the entry point passes the
platform and core count in (:func:`mednca_jax.machine.backend_for`).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Sequence

from mednca_jax.config import BACKENDS
from mednca_jax.nca import cpu_fast
from mednca_jax.nca.rule import Rule




@dataclass(frozen=True)
class Backend:
    """A resolved backend (static): ``name`` is ``"reference"`` or ``"cpu_fast"``; ``pieces``
    is into how many independent pieces ``cpu_fast`` splits a step (one per usable core, at
    most 2; XLA:CPU runs them side by side); ``group_cells``: inference runs a large batch in
    groups of about this many cells, one group after the other (0: the whole batch at once;
    see :func:`mednca_jax.nca.levels.forward`)."""

    name: str = "reference"
    pieces: int = 1
    group_cells: int = 0


# cpu_fast inference in groups of ~8 slices of 64x64: a step's working set (state, gathered
# neighbourhoods) then stays in the CPU caches. Measured on 2 cores, batch 32 of 64x64 at 2 x 64
# steps: 24.1 ms/slice whole, 15.7 in groups of 8, 15.1 of 4, 17.9 of 2, 23.4 one by one.
CPU_GROUP_CELLS = 8 * 64 * 64

REFERENCE = Backend("reference")

_TOLD: set[str] = set()


def _note_once(text: str) -> None:
    if text not in _TOLD:
        _TOLD.add(text)
        print(f"note: {text}", file=sys.stderr)


def resolve_backend(requested: str, rules: Rule | Sequence[Rule], platform: str, cores: int) -> Backend:
    """The backend for ``model.backend = requested`` running ``rules`` (one per level) on
    ``platform`` (``jax.default_backend()``) with ``cores`` usable CPU cores.

    ``auto``: ``cpu_fast`` on a CPU when it runs every rule, else ``reference`` (with a note
    saying why, once per process). Raises ``ValueError`` for an unknown name, or for
    ``cpu_fast`` asked by name for a rule it does not run (the message names what it lacks).
    """
    if requested not in BACKENDS:
        raise ValueError(f"model.backend must be one of {BACKENDS}, got {requested!r}")
    if requested == "reference":
        return REFERENCE
    rules = (rules,) if isinstance(rules, Rule) else tuple(rules)
    why = next((w for w in map(cpu_fast.unsupported, rules) if w), None)
    if why:
        if requested == "cpu_fast":
            raise ValueError(f"backend 'cpu_fast' cannot run this rule: {why}; use model.backend='reference' or 'auto'")
        if platform == "cpu":
            _note_once(f"model.backend=auto runs the reference backend: cpu_fast {why}")
        return REFERENCE
    if requested == "auto" and platform != "cpu":
        return REFERENCE
    return Backend("cpu_fast", pieces=2 if platform == "cpu" and cores >= 2 else 1, group_cells=CPU_GROUP_CELLS if platform == "cpu" else 0)
