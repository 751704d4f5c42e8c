"""Run `jemlab eval --all` (or `--parts`) on a checkpoint, time it, and record its metrics as a benchmark result.

    python -m benchmarks.record_eval --checkpoint runs/fashion-mnist --name fashion-mnist
    python -m benchmarks.record_eval --checkpoint runs/fashion-mnist --name jem-margin --parts robustness -- \
        --pgd-loss margin

The report goes to ``<checkpoint>/report`` (or ``--report``); the JSON record (command, wall-clock seconds, the
report's metrics.json) to ``benchmarks/results/eval-<name>-<time>.json``.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.common import write_result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--name", required=True, help="record name, e.g. fashion-mnist-softmax")
    parser.add_argument("--report", help="report folder (default: CHECKPOINT/report)")
    parser.add_argument("--parts", help="only these parts, comma-separated (default: --all)")
    parser.add_argument("extra", nargs="*", help="further `jemlab eval` flags (after --)")
    args = parser.parse_args()
    report = Path(args.report or Path(args.checkpoint) / "report")
    command = [
        sys.executable, "-m", "jemlab", "eval", "--checkpoint", args.checkpoint,
        *(["--parts", args.parts] if args.parts else ["--all"]), "--report", str(report), *args.extra,
    ]  # fmt: skip
    started = time.monotonic()
    subprocess.run(command, check=True)
    seconds = time.monotonic() - started
    metrics = json.loads((report / "metrics.json").read_text())
    shown = "jemlab " + shlex.join(command[3:])
    path = write_result(f"eval-{args.name}", {"command": shown, "wall_s": seconds, "metrics": metrics})
    print(f"{shown}: {seconds:.0f} s -> {path}")


if __name__ == "__main__":
    main()
