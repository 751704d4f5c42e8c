"""The data-sample energy gap opening slowly over thousands of iterations: a drift, not an explosion."""

from __future__ import annotations

import math


class GapDriftMonitor:
    """Watches the logged data-sample energy gap ``cd`` = mean E(x_data) − E(x_model) for a slow drift.

    The explosion check of `DivergenceDetector` fires on sudden jumps (100× the running gap); a gap that opens over
    thousands of iterations while the classifier stays healthy slips past it, and that is what a collapsing replay
    buffer looks like (the samples stop reaching the data's energy). `check` returns a message when |cd| exceeds the
    level, after which the level doubles, so a run that only warns gets a few warnings, not one per log line; after
    a rollback, `reset` puts the level back. The monitor is armed only once the gap has been at or below the level:
    a gap that starts large and closes (short-run chains from noise early in training) is not a drift. A level of 0
    turns it off.
    """

    def __init__(self, level: float) -> None:
        self.initial = float(level)
        self.level = float(level)
        self.armed = False

    def reset(self) -> None:
        """Back to the configured level (the run was rolled back to before the drift)."""
        self.level = self.initial

    def healthy(self, cd: float | None) -> bool:
        """The gap is well inside the level (half of it): a state worth rolling back to. True when off or unknown."""
        if self.initial <= 0 or cd is None:
            return True
        return math.isfinite(cd) and abs(cd) <= self.initial / 2

    def check(self, cd: float) -> str | None:
        if self.level <= 0 or not math.isfinite(cd):
            return None
        if abs(cd) <= self.level:
            self.armed = True
            return None
        if not self.armed:
            return None
        message = (
            f"the data-sample energy gap is {cd:+.3g} (|gap| > {self.level:g}; healthy default and jempp runs stay "
            f"below 0.3): the replay-buffer samples may be collapsing while the classifier looks fine "
            f"(recovery.gap_warning sets this level, 0 turns the check off)"
        )
        self.level = 2 * abs(cd)
        return message
