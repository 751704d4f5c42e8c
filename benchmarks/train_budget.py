"""Train a preset for a wall-clock budget and record accuracy, throughput and self-agreement of samples.

    python -m benchmarks.train_budget --preset default --dataset fashion-mnist --minutes 15

Protocol: one process, the machine otherwise idle, torch's default thread count; the budget counts training
iterations, per-epoch validation and sample grids, not data loading or the final test evaluation. Per-class
samples start from the replay buffer (images the classifier assigns to the class) and run the preset's K steps.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from benchmarks.common import write_result
from jemlab.allocator import tune_allocator
from jemlab.config import build_config, parse_overrides
from jemlab.generate import generate
from jemlab.training.loop import Trainer


def main() -> None:
    tune_allocator()  # as the jemlab command does (jemlab/allocator.py); recorded in the result's machine facts
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="default")
    parser.add_argument("--dataset", default="fashion-mnist")
    parser.add_argument("--minutes", type=float, default=15.0)
    parser.add_argument("--run-dir", type=Path)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--per-class", type=int, default=100, help="samples per class for self-agreement")
    args = parser.parse_args()

    overrides = [("data.dataset", args.dataset), ("train.minutes", args.minutes), ("train.progress", False)]
    config = build_config(args.preset, overrides + parse_overrides(args.overrides))
    run_dir = args.run_dir or Path("runs") / f"bench-{args.preset}-{args.dataset}-{args.minutes:g}min"
    trainer = Trainer(config, run_dir)
    final = trainer.fit()

    agreement = None
    if trainer.weights.px > 0:
        labels = torch.arange(trainer.splits.num_classes).repeat_interleave(args.per_class)
        x, protocol = generate(trainer, len(labels), labels=labels, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            predicted = torch.cat([trainer.model.logits(c.to(trainer.device)).argmax(1).cpu() for c in x.split(500)])
        agreement = {"self_agreement": float((predicted == labels).float().mean()), "protocol": protocol}

    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    curve = [
        {"elapsed_s": r["elapsed_s"], "step": r["step"], "val_accuracy": r["val_accuracy"]}
        for r in lines
        if "val_accuracy" in r
    ]
    its = [r["it_per_s"] for r in lines if "it_per_s" in r]
    result = {
        "preset": args.preset,
        "dataset": args.dataset,
        "minutes": args.minutes,
        "overrides": args.overrides,
        "final": {k: final[k] for k in ("test_accuracy", "test_nll", "val_accuracy", "step", "elapsed_s")},
        "median_it_per_s": sorted(its)[len(its) // 2] if its else None,
        "images_per_s": None if not its else sorted(its)[len(its) // 2] * config.train.batch_size,
        "val_curve": curve,
        "per_class_samples": agreement,
        "run_dir": str(run_dir),
    }
    path = write_result(f"train_budget-{args.preset}-{args.dataset}", result)
    print(json.dumps({"result": str(path), **result["final"], "per_class": agreement}, indent=2))


if __name__ == "__main__":
    main()
