"""``metrics.jsonl`` across a resume: how many lines a checkpoint saw, and cutting the file back to them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from jemlab.training.checkpoint import atomic_write_bytes


def count_lines(path: Path) -> int:
    """Lines of a file (0 when it does not exist)."""
    if not path.is_file():
        return 0
    with open(path, "rb") as f:
        return sum(1 for _ in f)


def lines_at_checkpoint(path: Path, recorded: Any) -> int | None:
    """Lines metrics.jsonl had when a checkpoint was written (None for checkpoints that did not record it)."""
    if recorded is None:
        return None
    return min(int(recorded), count_lines(path))


def trim_metrics(path: Path, keep_lines: int | None, last_step: int) -> int:
    """Cut ``metrics.jsonl`` back to what it held when the checkpoint being resumed was written.

    A run killed after its last checkpoint logged iterations that the resumed run will log again; without the cut
    they would appear twice. `keep_lines` (recorded in the checkpoint) is exact; older checkpoints fall back to
    keeping the records up to `last_step`. A line cut off by the kill is dropped either way.

    Returns:
        The number of lines removed.
    """
    if not path.is_file():
        return 0
    lines = path.read_text(errors="replace").splitlines()
    kept = []
    for index, line in enumerate(lines):
        if keep_lines is not None and index >= keep_lines:
            break
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if keep_lines is None and isinstance(record, dict) and _step_of(record) > last_step:
            continue
        kept.append(line)
    if len(kept) == len(lines):
        return 0
    atomic_write_bytes(path, "".join(line + "\n" for line in kept).encode())
    return len(lines) - len(kept)


def _step_of(record: dict[str, Any]) -> float:
    try:
        return float(record.get("step", 0))
    except (TypeError, ValueError):
        return 0.0
