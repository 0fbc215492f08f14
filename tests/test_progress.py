"""The training progress bar: minutes of the budget for a budgeted run, steps otherwise."""

from __future__ import annotations

import dataclasses
import io

from mednca_jax.config import TrainConfig
from mednca_jax.train.progress import TrainProgress


def _drawn(tcfg: TrainConfig, moves: list[tuple[int, float]], val: float | None = None) -> str:
    out = io.StringIO()
    bar = TrainProgress(tcfg, "run", 0, 0.0, enabled=True, file=out)
    for step, seconds in moves:
        bar.advance(step, seconds)
    bar.validated(val)
    bar.show({"loss": 0.25, "lr": 1e-3}, steps_per_s=4.0)
    bar.bar.refresh()
    bar.close()
    return out.getvalue().replace("\r", "\n").strip().splitlines()[-1]


def test_a_budgeted_run_counts_minutes_of_its_budget_not_steps():
    tcfg = TrainConfig(num_steps=100_000, time_limit_min=30.0, schedule="budget_cosine")
    line = _drawn(tcfg, [(100, 120.0), (450, 540.0)], val=0.8123)
    assert "9.0/30 min" in line and " 30%|" in line, line
    assert "100000" not in line and "step=450" in line and "steps_s=4.00" in line, line
    assert "val_dice=0.812" in line and "loss=0.2500" in line, line


def test_the_minutes_bar_stops_at_the_budget():
    tcfg = TrainConfig(num_steps=100_000, time_limit_min=1.0, schedule="budget_cosine")
    line = _drawn(tcfg, [(10, 30.0), (20, 95.0)])
    assert "1.0/1 min" in line and "100%" in line, line


def test_without_a_budget_the_bar_counts_steps():
    tcfg = TrainConfig(num_steps=200)
    line = _drawn(tcfg, [(50, 10.0)])
    assert "50/200" in line and " 25%|" in line and "val_dice=-" in line, line


def test_a_rollback_moves_a_step_bar_back_and_leaves_the_clock():
    out = io.StringIO()
    bar = TrainProgress(TrainConfig(num_steps=100), "run", 0, 0.0, enabled=True, file=out)
    bar.advance(60, 10.0)
    bar.restart_from(40, 11.0)
    assert bar.bar.n == 40
    bar.close()
    budget = TrainProgress(dataclasses.replace(TrainConfig(), time_limit_min=10.0, schedule="budget_cosine"), "run", 0, 0.0,
                           enabled=True, file=io.StringIO())
    budget.advance(60, 120.0)
    budget.restart_from(40, 126.0)
    assert abs(budget.bar.n - 2.1) < 1e-9
    budget.close()
