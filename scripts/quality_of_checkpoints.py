"""Sample quality of every checkpoint of a run, measured as training measures it (training/quality.py).

For runs trained without tracking (or to re-measure with other sizes): each ``checkpoints/step-*.safetensors`` of the
run folder is loaded and scored against the same held-out validation images in the same feature space, with the
same protocol as the live measurement (replay-buffer samples, per-class samples, near-copies, class agreement).

    python scripts/quality_of_checkpoints.py runs/my-run --out runs/my-run/quality-of-checkpoints.jsonl

Each line of the output is one checkpoint's record (``step`` plus the ``quality_*`` keys of metrics.jsonl).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import torch

from jemlab.data import load_dataset
from jemlab.run import load_run
from jemlab.training.quality import QualityTracker


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--out", type=Path, help="JSON-lines output (default: RUN_DIR/quality-of-checkpoints.jsonl)")
    parser.add_argument("--min-step", type=int, default=0, help="skip checkpoints before this iteration")
    parser.add_argument("--stride", type=int, default=1, help="measure every n-th checkpoint")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    paths = sorted((args.run_dir / "checkpoints").glob("step-*.safetensors"))
    paths = [p for p in paths if int(p.stem.split("-")[1]) >= args.min_step][:: args.stride]
    if not paths:
        print(f"no checkpoints in {args.run_dir / 'checkpoints'}", file=sys.stderr)
        return 1
    out = args.out or args.run_dir / "quality-of-checkpoints.jsonl"
    tracker = None
    with out.open("a") as f:
        for path in paths:
            run = load_run(path)
            if tracker is None:
                d = run.config.data
                splits = load_dataset(
                    d.dataset, d.data_dir, val_size=d.val_size, seed=run.config.train.seed, download=False,
                    limit=d.limit, image_size=d.image_size,
                )  # fmt: skip
                tracker = QualityTracker(run.config, splits, run.device, logging.getLogger("jemlab"))
            step = int(run.meta["progress"]["step"])
            quality = tracker.measure(run, step)
            if quality is None:
                print(f"tracking impossible: {tracker.disabled_reason}", file=sys.stderr)
                return 1
            record = {"step": step, "checkpoint": path.name, **quality}
            print(json.dumps(record), flush=True)
            f.write(json.dumps(record) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
