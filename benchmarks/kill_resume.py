"""SIGKILL a `jemlab train` run at random moments, resume it each time, and check that nothing was lost.

    OMP_NUM_THREADS=1 python -m benchmarks.kill_resume --kills 20 --epochs 30 \
        --set data.limit=2000 --set data.val_size=1000

Protocol: one training run (default preset, checkpoint every epoch) is started with the CLI and killed with SIGKILL
`--kills` times, each time at a random moment U(`--min-delay`, `--max-delay`) seconds after its (re)start; a
fraction `--during-save` of the kills instead waits for the moment a checkpoint is being written (its temporary
file exists) and kills then. After every kill: every ``step-*.safetensors`` must load, ``latest`` must point to a
complete checkpoint no older than before the kill ("lost" otherwise), and every complete line of metrics.jsonl must
parse. The run is then resumed with ``--resume`` (or started over when it was killed before its first checkpoint:
there is nothing to resume). Finally it runs to the end and its metrics.jsonl is compared with that of an
uninterrupted reference run of the same command: on the CPU every logged value but the timings must be equal.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.common import write_result
from jemlab.errors import JemlabError
from jemlab.training.checkpoint import load_checkpoint

TIME_KEYS = ("elapsed_s", "it_per_s", "images_per_s", "sgld_steps_per_s", "sgld_image_steps_per_s")


def read_records(path: Path) -> tuple[list[dict[str, Any]], int]:
    """Complete JSON lines of metrics.jsonl, and how many lines did not parse."""
    if not path.is_file():
        return [], 0
    records, bad = [], 0
    for line in path.read_text(errors="replace").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            bad += 1
    return records, bad


def check_checkpoints(run_dir: Path) -> dict[str, Any]:
    """Load every checkpoint of the run; report the latest step, how many files are corrupt, and leftovers."""
    folder = run_dir / "checkpoints"
    files = sorted(folder.glob("step-*.safetensors"))
    corrupt = []
    for path in files:
        try:
            load_checkpoint(path)
        except JemlabError as err:
            corrupt.append(f"{path.name}: {err}")
    latest_step = None
    if (folder / "latest").exists():
        try:
            _, meta = load_checkpoint(run_dir)
            latest_step = int(meta["progress"]["step"])
        except JemlabError as err:
            corrupt.append(f"latest: {err}")
    return {
        "checkpoints": [p.name for p in files],
        "latest_step": latest_step,
        "corrupt": corrupt,
        "temporary_files": len(list(folder.glob(".*.tmp"))),
    }


def kill_when_saving(process: subprocess.Popen, run_dir: Path, timeout: float) -> bool:
    """Poll for a checkpoint's temporary file and SIGKILL the run while it exists; False if none appeared."""
    folder = run_dir / "checkpoints"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        if folder.is_dir() and any(folder.glob(".*.tmp")):
            process.send_signal(signal.SIGKILL)
            return True
        time.sleep(0.001)
    return False


def timeless(record: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in record.items() if k not in TIME_KEYS}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill moments")
    parser.add_argument("--preset", default="default")
    parser.add_argument("--dataset", default="fashion-mnist")
    parser.add_argument("--data-dir", type=Path)
    parser.add_argument("--fake", action="store_true", help="a tiny fake Fashion-MNIST (seconds per run)")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--min-delay", type=float, default=3.0, help="seconds after a (re)start")
    parser.add_argument("--max-delay", type=float, default=10.0)
    parser.add_argument("--during-save", type=float, default=0.25, help="fraction of kills during a checkpoint write")
    parser.add_argument("--run-dir", type=Path, default=Path("runs/bench-kill-resume"))
    parser.add_argument("--no-reference", action="store_true", help="skip the uninterrupted reference run")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()

    rng = random.Random(args.seed)
    shutil.rmtree(args.run_dir, ignore_errors=True)
    args.run_dir.mkdir(parents=True)
    data_dir = args.data_dir
    if args.fake:
        from jemlab.data.testing import write_idx_dataset

        data_dir = write_idx_dataset(args.run_dir / "data", n_train=600, n_test=100, seed=0)
        args.overrides += ["data.val_size=100", "data.download=false", "train.batch_size=32", "sampler.steps=3"]
        args.overrides += ["sampler.buffer_size=200"]
    run, reference = args.run_dir / "run", args.run_dir / "reference"

    def command(run_dir: Path) -> list[str]:
        out = [sys.executable, "-m", "jemlab", "train", "--preset", args.preset, "--dataset", args.dataset]
        out += ["--epochs", str(args.epochs), "--run-dir", str(run_dir), "--threads", str(args.threads)]
        out += ["--no-progress"] + (["--data-dir", str(data_dir)] if data_dir else [])
        sets = ["train.checkpoint_every=1", "train.sample_every=1000", "train.tensorboard=false", "train.log_every=5"]
        for item in sets + args.overrides:
            out += ["--set", item]
        return out

    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    started = time.monotonic()
    if not args.no_reference:
        done = subprocess.run(command(reference), capture_output=True, text=True, env=env)
        if done.returncode != 0:
            raise SystemExit(f"reference run failed: {done.stderr.strip().splitlines()[-1:]}")
    reference_s = time.monotonic() - started

    kills: list[dict[str, Any]] = []
    best_step = -1
    lost = corrupt = unparsable = crashes = 0
    finished_early = False
    for k in range(args.kills):
        resume = (run / "checkpoints" / "latest").exists()
        if not resume:  # killed before its first checkpoint: nothing to resume, start over
            shutil.rmtree(run, ignore_errors=True)
        cmd = command(run) + (["--resume"] if resume else [])
        process = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
        delay = rng.uniform(args.min_delay, args.max_delay)
        during_save = rng.random() < args.during_save
        time.sleep(delay)
        hit_save = False
        if process.poll() is None:
            if during_save:
                hit_save = kill_when_saving(process, run, timeout=2 * args.max_delay)
            process.send_signal(signal.SIGKILL)
        code = process.wait()
        if code == 0:
            finished_early = True
        if code not in (0, -signal.SIGKILL):
            crashes += 1  # the run failed by itself (exit code 2: a jemlab error; see its train.log)
        check = check_checkpoints(run)
        records, bad = read_records(run / "metrics.jsonl")
        step = check["latest_step"]
        was_lost = (step is not None and step < best_step) or (step is None and best_step >= 0)
        lost += int(was_lost)
        corrupt += len(check["corrupt"])
        unparsable += max(0, bad - 1)  # one cut-off last line is expected after a kill
        best_step = max(best_step, -1 if step is None else step)
        kills.append(
            {
                "kill": k + 1,
                "resumed": resume,
                "delay_s": round(delay, 3),
                "during_save": hit_save,
                "exit_code": code,
                "latest_step": step,
                "lost": was_lost,
                **{key: check[key] for key in ("corrupt", "temporary_files")},
                "metrics_lines": len(records),
            }
        )
        print(json.dumps(kills[-1]), flush=True)
        if finished_early:
            break

    # The last leg: resume and run to the end.
    if not finished_early:
        resume = (run / "checkpoints" / "latest").exists()
        if not resume:
            shutil.rmtree(run, ignore_errors=True)
        done = subprocess.run(command(run) + (["--resume"] if resume else []), capture_output=True, text=True, env=env)
        if done.returncode != 0:
            raise SystemExit(f"final resume failed: {done.stderr.strip().splitlines()[-1:]}")
    final_check = check_checkpoints(run)
    records, bad = read_records(run / "metrics.jsonl")
    log_steps = [r["step"] for r in records if "loss" in r and "event" not in r]
    steps_continue = log_steps == sorted(set(log_steps))
    comparison: dict[str, Any] = {}
    if not args.no_reference:
        expected, _ = read_records(reference / "metrics.jsonl")
        equal = sum(timeless(a) == timeless(b) for a, b in zip(records, expected, strict=False))
        diffs = [
            abs(a[key] - b[key])
            for a, b in zip(records, expected, strict=False)
            for key in a
            if key not in TIME_KEYS and isinstance(a.get(key), float) and isinstance(b.get(key), float)
        ]
        comparison = {
            "records": len(records),
            "reference_records": len(expected),
            "records_equal": equal,
            "identical": equal == len(records) == len(expected),
            "max_abs_diff": max(diffs, default=0.0),
        }
    metrics = json.loads((run / "metrics.json").read_text()) if (run / "metrics.json").exists() else {}
    result = {
        "protocol": {
            "command": command(run),
            "kills": args.kills,
            "delay_s": [args.min_delay, args.max_delay],
            "during_save_fraction": args.during_save,
            "seed": args.seed,
        },
        "kills_done": len(kills),
        "kills_during_save": sum(k["during_save"] for k in kills),
        "resumes": sum(k["resumed"] for k in kills),
        "lost_checkpoints": lost,
        "crashes": crashes,
        "corrupt_checkpoints": corrupt + len(final_check["corrupt"]),
        "unparsable_metrics_lines": unparsable + bad,
        "temporary_files_left": final_check["temporary_files"],
        "log_steps_strictly_increasing": steps_continue,
        "compared_with_uninterrupted": comparison,
        "final": {k: metrics.get(k) for k in ("stop_reason", "step", "test_accuracy", "recoveries")},
        "reference_s": reference_s,
        "total_s": time.monotonic() - started,
        "kill_log": kills,
    }
    path = write_result("kill_resume", result)
    summary = {k: v for k, v in result.items() if k not in ("kill_log", "protocol")}
    print(json.dumps({"result": str(path), **summary}, indent=2))


if __name__ == "__main__":
    main()
