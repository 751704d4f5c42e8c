"""Time to accuracy: train presets for a fixed wall-clock budget and record test accuracy against training time.

    python -m benchmarks.time_to_accuracy --presets default jempp --minutes 20 --target 0.90
    python -m benchmarks.time_to_accuracy --presets course course:sampler.precision=fp32 --minutes 10 --target 0.85

Protocol. One process on an otherwise idle machine; the presets run one after the other on the same data (loaded
once, before any clock starts) with the same seed. A preset's clock counts building the trainer (network, replay
buffer and, for jempp, fitting the class Gaussians) and every training iteration; it stops while the test set is
evaluated, which happens every ``--eval-every`` seconds of training time and once at the end. Time to target is the
training time of the first evaluation at or above ``--target`` (linear interpolation would flatter a sparse curve,
so we do not interpolate). Outputs: ``<out>/time_to_accuracy-<stamp>.csv`` (preset, seconds, step, test accuracy),
a PNG of the curves, and a JSON record with machine facts, torch version and git sha.
"""

from __future__ import annotations

import argparse
import csv
import json
import time
from pathlib import Path

import torch

from benchmarks.common import write_result
from jemlab.allocator import tune_allocator
from jemlab.config import build_config, parse_overrides
from jemlab.data import load_dataset
from jemlab.training.evaluate import evaluate_split
from jemlab.training.loop import Trainer


def run_preset(spec: str, splits, args: argparse.Namespace) -> dict:
    """Train one preset for the budget; return its accuracy curve.

    Args:
        spec: a preset name, optionally with its own overrides: ``jempp:sampler.pyld_steps=5,sampler.steps=10``.
    """
    preset, _, own = spec.partition(":")
    overrides = [
        ("data.dataset", args.dataset),
        ("train.progress", False),
        ("train.tensorboard", False),
        ("train.seed", args.seed),
        *parse_overrides(args.overrides),
        *parse_overrides([pair for pair in own.split(",") if pair]),
    ]
    config = build_config(preset, overrides)
    start = time.perf_counter()
    trainer = Trainer(config, None, splits=splits)
    clock = time.perf_counter() - start  # training seconds so far
    steps_per_epoch = len(trainer.batcher)
    curve = []
    next_eval = args.eval_every

    def evaluate() -> None:
        acc = evaluate_split(trainer.model, splits.test, trainer.device, "test")["test_accuracy"]
        curve.append({"preset": spec, "seconds": clock, "step": trainer.step, "test_accuracy": acc})
        print(f"{spec}: {clock:7.1f} s  step {trainer.step:6d}  test accuracy {acc:.4f}", flush=True)

    while clock < args.minutes * 60:
        start = time.perf_counter()
        x, y = trainer.batcher.next_batch()
        trainer.train_step(x, y, trainer.step // steps_per_epoch)
        clock += time.perf_counter() - start
        if clock >= next_eval:
            evaluate()
            next_eval += args.eval_every
    if not curve or curve[-1]["step"] != trainer.step:
        evaluate()
    reached = next((p["seconds"] for p in curve if p["test_accuracy"] >= args.target), None)
    return {
        "preset": spec,
        "config": config.to_dict(),
        "curve": curve,
        "time_to_target_s": reached,
        "final_test_accuracy": curve[-1]["test_accuracy"],
        "steps": trainer.step,
        "it_per_s": trainer.step / max(clock, 1e-9),
    }


def plot(runs: list[dict], target: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for run in runs:
        seconds = [p["seconds"] / 60 for p in run["curve"]]
        ax.plot(seconds, [p["test_accuracy"] for p in run["curve"]], marker=".", label=run["preset"])
    ax.axhline(target, color="grey", linestyle="--", linewidth=1)
    ax.set_xlabel("training time (min)")
    ax.set_ylabel("test accuracy")
    ax.set_ylim(0.0, 1.0)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    tune_allocator()  # as the jemlab command does (jemlab/allocator.py); recorded in the result's machine facts
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--presets", nargs="+", default=["default", "jempp"], help="preset names, each optionally name:key=v,key=v"
    )
    parser.add_argument("--dataset", default="fashion-mnist")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--minutes", type=float, default=20.0, help="training budget per preset")
    parser.add_argument("--eval-every", type=float, default=30.0, help="seconds of training between test evaluations")
    parser.add_argument("--target", type=float, default=0.90)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--limit", type=int, default=None, help="use only this many training images (smoke tests)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="key=value for every preset")
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    splits = load_dataset(args.dataset, args.data_dir, seed=args.seed, limit=args.limit)
    runs = [run_preset(preset, splits, args) for preset in args.presets]

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    csv_path = out / f"time_to_accuracy-{stamp}.csv"
    with csv_path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["preset", "seconds", "step", "test_accuracy"])
        writer.writeheader()
        for run in runs:
            writer.writerows(run["curve"])
    png_path = out / f"time_to_accuracy-{stamp}.png"
    plot(runs, args.target, png_path)
    summary = {
        run["preset"]: {k: run[k] for k in ("time_to_target_s", "final_test_accuracy", "steps", "it_per_s")}
        for run in runs
    }
    result = {
        "dataset": args.dataset,
        "minutes_per_preset": args.minutes,
        "target": args.target,
        "eval_every_s": args.eval_every,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "overrides": args.overrides,
        "limit": args.limit,
        "summary": summary,
        "runs": runs,
        "csv": str(csv_path),
        "png": str(png_path),
    }
    path = write_result("time_to_accuracy", result, out)
    print(json.dumps({"result": str(path), "csv": str(csv_path), "png": str(png_path), "summary": summary}, indent=2))


if __name__ == "__main__":
    main()
