"""Stopping a run cleanly: SIGTERM and a first Ctrl-C become "stop after this iteration"."""

from __future__ import annotations

import signal
import threading
from types import FrameType
from typing import Any


class StopRequest:
    """Within its ``with`` block, SIGTERM and a first Ctrl-C (SIGINT) only set `reason`; the training loop checks
    it between iterations, saves a consistent state and returns. A second Ctrl-C raises KeyboardInterrupt at once.
    The previous handlers come back on exit. Outside the main thread (where Python allows no handlers) it does
    nothing."""

    def __init__(self) -> None:
        self.reason: str | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGTERM, signal.SIGINT):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.reason = "terminated" if signum == signal.SIGTERM else "interrupted"
        if signum == signal.SIGINT:
            signal.signal(signal.SIGINT, signal.default_int_handler)

    def __exit__(self, *exc: object) -> None:
        for signum, previous in self._previous.items():
            # None: the previous handler was not installed from Python; the default is the closest equivalent.
            signal.signal(signum, signal.SIG_DFL if previous is None else previous)
        self._previous.clear()
