"""Data-parallel scaling on the CPU: training images/s with 1 and with 2 processes (one thread each).

    python -m benchmarks.ddp_scaling                      # Fashion-MNIST, default preset, 3 minutes per world size
    python -m benchmarks.ddp_scaling --minutes 0.3 --limit 2000 --data-dir DIR   # a quick check that it runs

Protocol: for each world size N the same command, ``torchrun --standalone --nproc_per_node N -m jemlab train
--threads 1 --minutes M``, runs in a fresh run folder on an otherwise idle machine. Every process trains on a batch of
``train.batch_size`` images (the preset's 128) with its own SGLD chains, so the global batch grows with N (weak
scaling, as in data-parallel JEM training on several GPUs). Throughput is the median of the ``images_per_s`` records
of metrics.jsonl (all ranks together) after the first `--skip` records (warm-up); the SGLD rate likewise. Scaling
efficiency = images/s(N) / (N · images/s(1)). Numbers depend on the cores being free: run nothing else meanwhile.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from benchmarks.common import write_result


def run_world(world: int, args: argparse.Namespace, run_dir: Path) -> dict[str, Any]:
    """Train with `world` processes and summarise the throughput records of its metrics.jsonl."""
    src = Path(__file__).resolve().parents[1] / "src"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{src}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(world),
        "-m", "jemlab", "train", "--preset", args.preset, "--dataset", args.dataset, "--minutes", str(args.minutes),
        "--threads", "1", "--device", "cpu", "--run-dir", str(run_dir), "--no-progress",
        "--set", f"train.log_every={args.log_every}", "--set", "train.tensorboard=false",
    ]  # fmt: skip
    if args.data_dir:
        command += ["--data-dir", args.data_dir]
    if args.limit:
        command += ["--limit", str(args.limit)]
    for override in args.overrides:
        command += ["--set", override]
    print(f"[world {world}] {' '.join(command)}", file=sys.stderr)
    subprocess.run(command, env=env, check=True)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rates = [r for r in records if "images_per_s" in r][args.skip :]
    if not rates:
        raise SystemExit(f"world {world}: no throughput records after skipping {args.skip}; raise --minutes")
    final = json.loads((run_dir / "metrics.json").read_text())
    return {
        "processes": world,
        "images_per_s": statistics.median(r["images_per_s"] for r in rates),
        "sgld_image_steps_per_s": statistics.median(r.get("sgld_image_steps_per_s", 0.0) for r in rates),
        "it_per_s": statistics.median(r["it_per_s"] for r in rates),
        "records": len(rates),
        "steps": final["step"],
        "test_accuracy": final.get("test_accuracy"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="default")
    parser.add_argument("--dataset", default="fashion-mnist")
    parser.add_argument("--data-dir", help="dataset folder (default: jemlab's usual search)")
    parser.add_argument("--limit", type=int, help="train on this many images only (quick checks)")
    parser.add_argument("--minutes", type=float, default=3.0, help="training budget per world size")
    parser.add_argument("--worlds", default="1,2", help="comma-separated process counts")
    parser.add_argument("--log-every", type=int, default=20, help="iterations per throughput record")
    parser.add_argument("--skip", type=int, default=1, help="throughput records dropped as warm-up")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="extra config overrides")
    parser.add_argument("--out", default="benchmarks/results", help="folder for the JSON result")
    args = parser.parse_args()

    rows = []
    with tempfile.TemporaryDirectory(prefix="ddp_scaling-") as tmp:
        for world in (int(w) for w in args.worlds.split(",")):
            rows.append(run_world(world, args, Path(tmp) / f"world{world}"))
    base = rows[0]["images_per_s"] / rows[0]["processes"]
    for row in rows:
        row["efficiency"] = row["images_per_s"] / (row["processes"] * base)
    result = {
        "protocol": "torchrun --standalone, 1 thread per process, weak scaling (per-process batch fixed), "
        "median images_per_s over metrics.jsonl records after warm-up",
        "preset": args.preset,
        "dataset": args.dataset,
        "minutes": args.minutes,
        "limit": args.limit,
        "overrides": args.overrides,
        "rows": rows,
    }
    path = write_result("ddp_scaling", result, args.out)
    for row in rows:
        print(
            f"{row['processes']} process(es): {row['images_per_s']:.0f} images/s, "
            f"{row['sgld_image_steps_per_s']:.0f} SGLD image-steps/s, efficiency {row['efficiency']:.2f}"
        )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
