"""Run logging: console + file log, metrics.jsonl, optional TensorBoard, and a tqdm progress bar."""

from __future__ import annotations

import json
import logging
import math
import sys
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm


class _TqdmHandler(logging.StreamHandler):
    """Console handler that prints above an active progress bar instead of through it."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # pragma: no cover - logging must never crash training
            self.handleError(record)


def setup_logger(run_dir: Path | None, name: str = "jemlab", extra_file: str | Path | None = None) -> logging.Logger:
    """Logger writing plain lines to the console and timestamped lines to ``run_dir/train.log``."""
    logger = logging.getLogger(name)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    for handler in list(logger.handlers):
        handler.close()
        logger.removeHandler(handler)
    console = _TqdmHandler()
    console.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(console)
    files = [] if run_dir is None else [run_dir / "train.log"]
    if extra_file is not None:
        files.append(Path(extra_file))
    for path in files:
        path.parent.mkdir(parents=True, exist_ok=True)
        file = logging.FileHandler(path)
        file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        logger.addHandler(file)
    return logger


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf; keep the information as text
    return value


class MetricsWriter:
    """Appends one JSON object per line to ``metrics.jsonl`` and mirrors scalars to TensorBoard if available."""

    def __init__(self, run_dir: Path, tensorboard: bool = True) -> None:
        self.path = run_dir / "metrics.jsonl"
        self._file = open(self.path, "a", buffering=1)  # noqa: SIM115 (kept open for the run)
        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
            except ImportError:
                self._tb = None

    def write(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps({k: _clean(v) for k, v in record.items()}) + "\n")
        if self._tb is not None:
            step = int(record.get("step", 0))
            for key, value in record.items():
                if key not in ("step", "epoch") and isinstance(value, (int, float)) and math.isfinite(value):
                    self._tb.add_scalar(key, value, step)

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()


def progress_bar(total: int | None, enabled: bool, initial: int = 0) -> tqdm:
    """A tqdm bar on a terminal; silent when output is not a terminal or when disabled."""
    return tqdm(
        total=total,
        initial=initial,
        disable=(not enabled) or None,  # None: tqdm turns itself off when stderr is not a TTY
        dynamic_ncols=True,
        unit="it",
        leave=False,
    )
