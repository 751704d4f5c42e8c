"""quality.png in the run directory: sample quality, variety and accuracy over the iterations of a run.

Drawn from metrics.jsonl (so a resumed run's curve continues), after each sample-quality measurement: the Fréchet
distance of the run's samples, of fresh chains and of its class-conditional samples against held-out images (log
scale), the
fraction of class-conditional samples with a near-copy in their class, the validation accuracy, and a vertical
line at every recovery (red) and drift warning (orange). Iterations that a recovery rolled back over are left out.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from jemlab.training.checkpoint import atomic_write_bytes


def _records(metrics: Path) -> list[dict[str, Any]]:
    """The run's records as training saw them: what a recovery rolled back over is dropped (its event is kept)."""
    out: list[dict[str, Any]] = []
    if not metrics.is_file():
        return out
    for line in metrics.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line cut by a kill: skip it
            continue
        if not (isinstance(record, dict) and isinstance(record.get("step"), int)):
            continue
        if record.get("event") == "recovery" and isinstance(record.get("rollback_to"), int):
            out = [r for r in out if r["step"] <= record["rollback_to"] or "event" in r]
        out.append(record)
    return out


def _series(records: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    pairs = [
        (r["step"], float(r[key]))
        for r in records
        if isinstance(r.get(key), (int, float)) and math.isfinite(float(r[key]))
    ]
    return [s for s, _ in pairs], [v for _, v in pairs]


def plot_quality(metrics: str | Path, out: str | Path) -> Path | None:
    """Draw the quality curves of the run whose metrics.jsonl is `metrics` into `out` (PNG, written atomically).

    Returns the path, or None when there is no measurement to draw yet.
    """
    records = _records(Path(metrics))
    steps_fd, fd = _series(records, "quality_fd")
    if not steps_fd:
        return None
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7.5, 6.0), sharex=True, constrained_layout=True)
    top.plot(steps_fd, fd, "o-", color="tab:blue", label="samples shown (replay buffer / fresh)")
    steps_f, fd_f = _series(records, "quality_fresh_fd")
    if steps_f:
        top.plot(steps_f, fd_f, "^:", color="tab:orange", label="fresh chains from the initialiser")
    steps_c, fd_c = _series(records, "quality_class_fd")
    if steps_c:
        top.plot(steps_c, fd_c, "s--", color="tab:purple", label="class-conditional samples")
    top.set_yscale("log")
    top.set_ylabel("Fréchet distance vs held-out\n(domain features, lower is better)")
    top.grid(True, which="both", alpha=0.3)

    steps_acc, acc = _series(records, "val_accuracy")
    if steps_acc:
        bottom.plot(steps_acc, [100 * a for a in acc], ".-", color="tab:green", label="validation accuracy (%)")
    steps_nc, nc = _series(records, "quality_near_copies")
    if steps_nc:
        bottom.plot(steps_nc, [100 * v for v in nc], "o-", color="tab:red", label="near-copies in class (%)")
    steps_ca, ca = _series(records, "quality_class_agreement")
    if steps_ca:
        bottom.plot(steps_ca, [100 * v for v in ca], "^-", color="tab:gray", label="class agreement (%)")
    bottom.set_ylim(0, 100)
    bottom.set_xlabel("iteration")
    bottom.set_ylabel("%")
    bottom.grid(True, alpha=0.3)

    for r in records:
        colour = {"recovery": "tab:red", "warning": "tab:orange"}.get(r.get("event", ""))
        if colour is not None:
            for ax in (top, bottom):
                ax.axvline(r["step"], color=colour, alpha=0.5, lw=1)
    for ax, where in ((top, "upper right"), (bottom, "lower right")):
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc=where, fontsize=8)
    top.set_title("sample quality while training (red lines: recoveries, orange: drift warnings)", fontsize=10)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    out = Path(out)
    atomic_write_bytes(out, buf.getvalue())
    return out
