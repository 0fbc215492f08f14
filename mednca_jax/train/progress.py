"""The training progress bar: in minutes of the budget when the run has one, else in steps.

A run with ``train.time_limit_min`` stops on the clock, so a bar counting to ``num_steps``
(100,000 in the budgeted recipes) would show a meaningless percentage and an ETA of hours. Such
a run's bar fills with the elapsed minutes of its budget instead; both kinds show the step,
steps per second, the loss, the learning rate and the last validation Dice.
"""

from __future__ import annotations

from typing import Any

from mednca_jax.config import TrainConfig


class TrainProgress:
    """A tqdm bar over the budget's minutes (``train.time_limit_min > 0``) or over the steps.

    Args:
        tcfg: the train config (``num_steps``, ``time_limit_min``).
        name: the bar's label (the config name).
        step: the step the run starts from (non-zero after a resume).
        elapsed_s: the run's elapsed seconds at ``step`` (restored with a resume).
        enabled: draw the bar (only process 0 of a data-parallel job, and not with --no-progress).
        file: where to draw it (default: stderr).
    """

    def __init__(self, tcfg: TrainConfig, name: str, step: int, elapsed_s: float, enabled: bool, file: Any = None):
        from tqdm import tqdm

        self.minutes = float(tcfg.time_limit_min)  # 0: no budget, the bar counts steps
        self.num_steps = tcfg.num_steps
        self.step = step
        self.val_dice: float | None = None
        if self.minutes > 0:
            self.bar = tqdm(
                total=self.minutes, initial=min(elapsed_s / 60, self.minutes), disable=not enabled, desc=name,
                unit="min", dynamic_ncols=True, file=file,
                bar_format="{desc}: {percentage:3.0f}%|{bar}| {n:.1f}/{total:g} min [{elapsed}<{remaining}{postfix}]",
            )
        else:
            self.bar = tqdm(total=self.num_steps, initial=step, disable=not enabled, desc=name, unit="step", dynamic_ncols=True, file=file)

    def advance(self, step: int, elapsed_s: float) -> None:
        """The run is at ``step`` after ``elapsed_s`` seconds."""
        if self.minutes > 0:
            self.bar.update(max(0.0, min(elapsed_s / 60, self.minutes) - self.bar.n))
        else:
            self.bar.update(step - self.bar.n)
        self.step = step

    def restart_from(self, step: int, elapsed_s: float) -> None:
        """After a rollback to ``step``: a step bar goes back, a minutes bar keeps the clock."""
        if self.minutes <= 0:
            self.bar.reset(total=self.num_steps)
            self.bar.update(step)
        self.advance(step, elapsed_s)

    def show(self, metrics: dict[str, Any], steps_per_s: float) -> None:
        """Set the text after the bar: step, steps/s, loss, learning rate, last validation Dice."""
        fields = {}
        if self.minutes > 0:
            fields["step"] = str(self.step)
        fields.update(
            steps_s=f"{steps_per_s:.2f}", loss=f"{metrics['loss']:.4f}", lr=f"{metrics['lr']:.2e}",
            val_dice="-" if self.val_dice is None else f"{self.val_dice:.3f}",
        )
        self.bar.set_postfix(fields, refresh=False)

    def validated(self, dice: float | None) -> None:
        """Record the latest validation Dice (``None``: the run has no validation cases)."""
        if dice is not None:
            self.val_dice = dice

    def close(self) -> None:
        self.bar.close()
