"""Sampling time per image: EGC with DDIM against JEM with SGLD, from two trained checkpoints, in one process.

    python -m benchmarks.egc_sampling --egc runs/egc-fmnist --jem runs/fashion-mnist
    python -m benchmarks.egc_sampling --egc RUN --jem RUN --ddim-steps 50 --n 100 --rounds 5 --threads 2

Protocol. Both runs are loaded with ``jemlab.run.load_run`` (EGC: its EMA weights) on ``--device``; torch's thread
count is ``--threads``. A *round* times each mode once, in a fixed order, with ``time.perf_counter`` around one
``jemlab.generate.generate`` call that draws ``--n`` images (everything the CLI's ``jemlab sample`` does except
writing the file). The first ``--warmup`` rounds are discarded. Per mode we report the median and interquartile
range over rounds of the seconds per image, and the ratio of medians against EGC's unconditional DDIM.

Modes:
- ``egc-ddim``: unconditional DDIM with ``--ddim-steps`` steps (η = 0), ε̂ = √(1 − ᾱ_t)∇ₓE by back-propagation;
- ``egc-ddim-guided``: the same, class-conditional (labels cycling over the classes), with the run's classifier
  guidance (one more forward pass per step when the network is label-conditioned);
- ``jem-buffer``: JEM's default generation (``jemlab sample``): chains continued from the replay buffer for the
  run's ``sampler.steps`` SGLD steps (cheap, but only because the buffer holds chains trained for many steps);
- ``jem-noise``: JEM chains from the initialiser (noise or per-class Gaussians) for ``--jem-noise-steps`` steps,
  the cost of a sample that does not lean on the buffer.

The result (JSON, via benchmarks.common.write_result) records the machine, torch version, git sha and settings.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from benchmarks.common import write_result
from jemlab.generate import generate
from jemlab.run import LoadedRun, load_run


def _modes(egc: LoadedRun, jem: LoadedRun, args: argparse.Namespace) -> dict[str, Callable[[int], Any]]:
    labels = torch.arange(args.n) % egc.num_classes

    def egc_ddim(seed: int) -> Any:
        return generate(egc, args.n, steps=args.ddim_steps, generator=torch.Generator().manual_seed(seed))

    def egc_guided(seed: int) -> Any:
        gen = torch.Generator().manual_seed(seed)
        return generate(egc, args.n, labels=labels, steps=args.ddim_steps, generator=gen)

    def jem_buffer(seed: int) -> Any:
        return generate(jem, args.n, init="auto", generator=torch.Generator().manual_seed(seed))

    def jem_noise(seed: int) -> Any:
        gen = torch.Generator().manual_seed(seed)
        return generate(jem, args.n, init="noise", steps=args.jem_noise_steps, generator=gen)

    modes = {"egc-ddim": egc_ddim, "egc-ddim-guided": egc_guided, "jem-buffer": jem_buffer}
    if args.jem_noise_steps > 0:
        modes["jem-noise"] = jem_noise
    return modes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--egc", required=True, help="EGC checkpoint file or run directory")
    parser.add_argument("--jem", required=True, help="JEM checkpoint file or run directory (e.g. the default preset)")
    parser.add_argument("--ddim-steps", type=int, default=50, help="DDIM steps of the EGC modes (default: 50)")
    parser.add_argument("--jem-noise-steps", type=int, default=200, help="SGLD steps from noise, 0 = skip (200)")
    parser.add_argument("--n", type=int, default=100, help="images per timed call (default: 100)")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds after warm-up (default: 5)")
    parser.add_argument("--warmup", type=int, default=1, help="rounds discarded first (default: 1)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto (default: cpu)")
    parser.add_argument("--out", default="benchmarks/results", help="folder for the JSON result")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    egc, jem = load_run(args.egc, device=args.device), load_run(args.jem, device=args.device)
    if egc.config.objective.name != "egc" or jem.config.objective.name != "jem":
        raise SystemExit("--egc must be an EGC run (objective egc) and --jem a JEM run (objective jem)")
    modes = _modes(egc, jem, args)
    times: dict[str, list[float]] = {name: [] for name in modes}
    for round_index in range(args.warmup + args.rounds):
        for name, fn in modes.items():
            start = time.perf_counter()
            fn(round_index)
            if torch.cuda.is_available() and args.device != "cpu":
                torch.cuda.synchronize()
            elapsed = time.perf_counter() - start
            if round_index >= args.warmup:
                times[name].append(elapsed / args.n)
        print(f"round {round_index + 1}/{args.warmup + args.rounds} done", flush=True)

    def summary(values: list[float]) -> dict[str, float]:
        q = statistics.quantiles(values, n=4) if len(values) >= 2 else [values[0]] * 3
        return {"median_s_per_image": statistics.median(values), "iqr_s": q[2] - q[0], "rounds": len(values)}

    results = {name: summary(values) for name, values in times.items()}
    base = results["egc-ddim"]["median_s_per_image"]
    for value in results.values():
        value["ratio_to_egc_ddim"] = value["median_s_per_image"] / base
    record = {
        "protocol": {
            "egc_checkpoint": str(egc.path),
            "jem_checkpoint": str(jem.path),
            "ddim_steps": args.ddim_steps,
            "egc_guidance": egc.config.egc.guidance,
            "jem_buffer_steps": jem.config.sampler.steps,
            "jem_noise_steps": args.jem_noise_steps,
            "images_per_call": args.n,
            "warmup_rounds": args.warmup,
            "device": args.device,
        },
        "results": results,
    }
    for name, value in results.items():
        print(f"{name:18s} {1000 * value['median_s_per_image']:8.2f} ms/image (IQR {1000 * value['iqr_s']:.2f})")
    print(f"wrote {write_result('egc_sampling', record, args.out)}")


if __name__ == "__main__":
    main()
