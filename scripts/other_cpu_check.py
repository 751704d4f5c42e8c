"""Train, sample, evaluate and serve every CPU preset on another CPU, as a user of that machine would.

Each `jemlab` command runs as its own process behind a prefix, by default QEMU's user-mode emulation of an
x86-64 CPU with AVX2 and FMA but no AVX-512, AVX512_BF16 or AMX (``qemu-x86_64 -cpu Haswell``): torch detects that
CPU and no other, so oneDNN's bf16 paths that need AVX-512 fail there as they fail on such a machine. On a tiny
generated dataset each preset trains a few steps, then ``sample``, ``eval`` and ``serve`` (one prediction and one
chain over HTTP) run on its checkpoint. The run headers must say that bf16 is not native and which precision and
gradient path were chosen.

    python scripts/other_cpu_check.py                       # every preset under qemu-x86_64 -cpu Haswell
    python scripts/other_cpu_check.py --presets default mlp
    python scripts/other_cpu_check.py --prefix ""           # the same checks on this CPU, unemulated

Exits 0 when every check passed; prints each command's time. `tests/test_other_cpu.py` runs it where QEMU exists.
"""

from __future__ import annotations

import argparse
import json
import shlex
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

PRESETS = ("default", "course", "jempp", "mlp", "egc")
QEMU = f"qemu-x86_64 -cpu Haswell {sys.executable}"

# a few steps at toy size: the point is which paths run, not what they learn
TINY = {
    "default": ["sampler.steps=2", "sampler.buffer_size=64"],
    "course": ["sampler.steps=2", "sampler.buffer_size=64"],
    "jempp": ["sampler.steps=2", "sampler.buffer_size=64"],
    "mlp": ["sampler.steps=2"],
    "egc": ["egc.sample_steps=2"],
}


def run(prefix: list[str], args: list[str], timings: list[tuple[str, float]], label: str) -> str:
    """Run ``prefix + python -m jemlab args``; fail loudly with its output if it fails."""
    start = time.monotonic()
    result = subprocess.run([*prefix, "-m", "jemlab", *args], capture_output=True, text=True)
    timings.append((label, time.monotonic() - start))
    print(f"  {timings[-1][1]:7.1f} s  {label}", flush=True)
    output = result.stdout + result.stderr
    if result.returncode != 0:
        raise SystemExit(f"FAILED: {label} (exit {result.returncode})\n{output[-4000:]}")
    return output


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_check(prefix: list[str], run_dir: Path, timings: list[tuple[str, float]], label: str) -> None:
    """Start ``jemlab serve``, ask for one prediction and one chain step, stop it."""
    port = free_port()
    start = time.monotonic()
    server = subprocess.Popen(
        [*prefix, "-m", "jemlab", "serve", "--checkpoint", str(run_dir), "--port", str(port), "--threads", "1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(600):
            if server.poll() is not None:
                raise SystemExit(f"FAILED: {label}: the server exited\n{server.stdout.read()[-4000:]}")
            try:
                info = json.load(urllib.request.urlopen(f"{url}/api/info", timeout=5))
                break
            except OSError:
                time.sleep(0.5)
        else:
            raise SystemExit(f"FAILED: {label}: the server did not answer in 5 minutes")
        pixels = 1
        for size in info["image_shape"]:
            pixels *= size
        body = json.dumps({"pixels": [0.0] * pixels}).encode()
        request = urllib.request.Request(f"{url}/api/predict", body, {"Content-Type": "application/json"})
        prediction = json.load(urllib.request.urlopen(request, timeout=300))
        assert len(prediction["probs"]) == len(info["class_names"]), prediction
        if info["kind"] == "jem":
            body = json.dumps({"mode": "unconditional", "n": 2, "steps": 1}).encode()
            request = urllib.request.Request(f"{url}/api/chains", body, {"Content-Type": "application/json"})
            json.load(urllib.request.urlopen(request, timeout=300))
    finally:
        server.terminate()
        server.wait(timeout=30)
    timings.append((label, time.monotonic() - start))
    print(f"  {timings[-1][1]:7.1f} s  {label}", flush=True)


def check_preset(preset: str, prefix: list[str], data_dir: Path, work: Path, timings: list) -> None:
    run_dir = work / preset
    common = ["--dataset", "fashion-mnist", "--data-dir", str(data_dir), "--no-progress", "--threads", "1"]
    sets = [x for item in ["data.download=false", "data.val_size=32", "train.sample_every=1000", *TINY[preset]]
            for x in ("--set", item)]
    output = run(
        prefix,
        ["train", "--preset", preset, *common, "--limit", "64", "--epochs", "1", "--batch-size", "32",
         "--run-dir", str(run_dir), *sets],
        timings,
        f"{preset}: train",
    )
    header = [line for line in output.splitlines() if line.startswith(("hardware:", "choices:"))]
    print("\n".join(f"  {line}" for line in header))
    metrics = json.loads((run_dir / "metrics.json").read_text())
    hardware = metrics["hardware"]
    if preset != "egc":
        chosen = hardware["choices"]["sampler.precision"]
        expected = "bf16" if hardware["capabilities"]["bf16_native"]["ok"] else "fp32"
        assert chosen["value"] == expected, f"{preset}: sampler.precision {chosen} on a CPU where bf16 is {expected}"
    out = work / f"{preset}-samples.npz"
    run(prefix, ["sample", "--checkpoint", str(run_dir), "--num", "4", "--out", str(out), "--steps", "2"],
        timings, f"{preset}: sample")
    run(prefix, ["eval", "--checkpoint", str(run_dir), "--data-dir", str(data_dir), "--threads", "1"],
        timings, f"{preset}: eval")
    serve_check(prefix, run_dir, timings, f"{preset}: serve")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", nargs="+", default=list(PRESETS), choices=PRESETS)
    parser.add_argument("--prefix", default=QEMU, help=f"command that runs Python (default: {QEMU!r})")
    parser.add_argument("--expect-no-bf16", action="store_true", help="fail unless the probe finds bf16 emulated")
    args = parser.parse_args(argv)
    prefix = shlex.split(args.prefix) if args.prefix else [sys.executable]
    timings: list[tuple[str, float]] = []
    from jemlab.data.testing import write_idx_dataset

    with tempfile.TemporaryDirectory(prefix="jemlab-other-cpu-") as tmp:
        work = Path(tmp)
        write_idx_dataset(work / "data", n_train=200, n_test=64, seed=0)
        probe = subprocess.run(
            [*prefix, "-c", "import json, jemlab.accel as a; print(json.dumps(a.probe('cpu').summary()))"],
            capture_output=True, text=True,
        )
        if probe.returncode != 0:
            raise SystemExit(f"FAILED: the probe\n{probe.stderr[-4000:]}")
        summary = json.loads(probe.stdout.strip().splitlines()[-1])
        native = summary["capabilities"]["bf16_native"]
        print(f"CPU as torch sees it: {summary['torch_cpu_capability']}, isa {summary['isa']}; bf16 native: {native}")
        if args.expect_no_bf16 and native["ok"]:
            raise SystemExit("FAILED: this CPU has native bf16; the check is meant for one without")
        for preset in args.presets:
            print(f"{preset}:", flush=True)
            check_preset(preset, prefix, work / "data", work, timings)
    print(f"all checks passed in {sum(s for _, s in timings):.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
