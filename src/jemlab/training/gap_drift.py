"""A warning, not a rollback: the data-sample energy gap opening slowly over thousands of iterations."""

from __future__ import annotations

import math


class GapDriftMonitor:
    """The slow-drift warning on the logged data-sample energy gap ``cd`` = mean E(x_data) − E(x_model).

    The explosion check of `DivergenceDetector` fires on sudden jumps (100× the running gap); a gap that opens over
    thousands of iterations while the classifier stays healthy slips past it, and that is what a collapsing replay
    buffer looks like (the samples stop reaching the data's energy). `check` returns a message when |cd| exceeds the
    level, after which the level doubles, so a run gets a few warnings, not one per log line. The monitor is armed
    only once the gap has been at or below the level: a gap that starts large and closes (short-run chains from
    noise early in training) is not a drift. A level of 0 turns it off.
    """

    def __init__(self, level: float) -> None:
        self.level = float(level)
        self.armed = False

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
            f"below 0.3): the replay-buffer samples may be collapsing while the classifier looks fine; keep a "
            f"checkpoint from before the gap opened (recovery.gap_warning sets this level, 0 turns the warning off)"
        )
        self.level = 2 * abs(cd)
        return message
