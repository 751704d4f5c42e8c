"""SGLD step time: a plain eager loop against jemlab's sampler modes, interleaved in one process.

    python -m benchmarks.sgld                                   # course CNN, batch 64, K = 20, all modes
    python -m benchmarks.sgld --model cnn --rounds 30 --train   # default preset's network, plus training it/s

Protocol. One process on an otherwise idle machine, torch's thread count set by ``--threads`` (default: all cores
torch sees). The energy network is built once with a fixed seed and its parameters frozen; every mode refines the
same starting batch (U[−1, 1] noise) with the course preset's sampler settings (K steps of size 10, gradient
clipped to ±0.03, noise 0.005 added first). A *round* runs every mode once, in a fixed order, and times one chain of
K steps per mode (``time.perf_counter`` around the call, so start-up costs inside the call are included). The first
``--warmup`` rounds are discarded (this is where torch.compile compiles; its time is reported separately). glibc
malloc is tuned first (``--malloc tuned``, `jemlab.allocator`), the same for every mode, so that no mode's time
depends on page faults that other modes' frees caused or prevented; each row records its minor page faults. We
report, per mode, the median over rounds of the time per SGLD step, the spread as the interquartile range, the
speed-up over the reference (ratio of medians), and achieved GFLOP/s = FLOPs per step (torch's FLOP counter on one
eager step: forward and input-gradient backward) / median time, also as a fraction of the machine's fp32 peak.

(a) ``reference``: the loop written the way the course code (UvA DL tutorial 8) and JEM's ``sample_q`` write it:
parameters set to ``requires_grad=False``, ``x.requires_grad = True``, ``.backward()`` into ``x.grad``, in-place
updates on ``x.data``, fp32, NCHW.
(b) jemlab's ``run_chains`` with each sampler mode (``impl``, ``precision``, channels-last, ``compile``, and
``gradient``: autograd, or the hand-written backward of ``jemlab.accel.explicit``).

With ``--train`` it also times full training iterations (negatives + loss + backward + Adam) of the course preset
against an eager re-implementation of the course code's training iteration, interleaved the same way; with
``--train-default``, the default preset's training iterations now against the default preset as it was before the
fast-sampling work (reference sampler, uniform-noise chains: ``DEFAULT_BEFORE``), both through jemlab's Trainer.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from benchmarks.common import write_result
from benchmarks.eager_course import reference_sgld
from benchmarks.flops import count_flops, cpu_peak, measured_matmul_gflops
from jemlab.accel import fast
from jemlab.allocator import allocator_status, tune_allocator
from jemlab.config import SamplerConfig, build_config
from jemlab.models import EnergyModel, build_model
from jemlab.sampling import run_chains


@dataclass(frozen=True)
class Mode:
    name: str
    impl: str = "fast"
    precision: str = "fp32"
    channels_last: bool = False
    compile: bool = False
    chain_groups: int = 1  # 0 = one group per torch thread
    gradient: str = "autograd"  # autograd, or explicit (accel/explicit.py: hand-written backward, no autograd)


MODES = {
    m.name: m
    for m in [
        Mode("reference-sgld", impl="reference"),
        Mode("fast-fp32"),
        Mode("fast-fp32-nhwc", channels_last=True),
        Mode("fast-bf16-nhwc", precision="bf16", channels_last=True),
        Mode("fast-fp32-groups", chain_groups=0),
        Mode("fast-bf16-nhwc-groups", precision="bf16", channels_last=True, chain_groups=0),
        Mode("fast-fp32-compile", compile=True),
        Mode("fast-bf16-nhwc-compile", precision="bf16", channels_last=True, compile=True),
        Mode("explicit-fp32-nhwc", channels_last=True, gradient="explicit"),
        Mode("explicit-bf16", precision="bf16", gradient="explicit"),
        Mode("explicit-bf16-nhwc", precision="bf16", channels_last=True, gradient="explicit"),
    ]
}


def jemlab_sampler(model: EnergyModel, mode: Mode, cfg: SamplerConfig) -> Callable[[torch.Tensor], torch.Tensor]:
    """(b) jemlab's `run_chains` in one mode, on its own copy of the model (layouts must not leak between modes)."""
    sampler_cfg = replace(
        cfg,
        impl=mode.impl,
        precision=mode.precision,
        compile=mode.compile,
        chain_groups=mode.chain_groups,
        gradient=mode.gradient,
    )
    if mode.channels_last:
        model = model.to(memory_format=torch.channels_last)
    generator = torch.Generator().manual_seed(0)

    def run(x: torch.Tensor) -> torch.Tensor:
        return run_chains(model, x, sampler_cfg, generator=generator, channels_last=mode.channels_last)[0]

    return run


def summarise(times: list[float], steps: int) -> dict[str, float]:
    per_step = sorted(t / steps * 1e3 for t in times)
    q = statistics.quantiles(per_step, n=4) if len(per_step) >= 2 else [per_step[0]] * 3
    return {"median_ms": q[1], "q1_ms": q[0], "q3_ms": q[2], "min_ms": per_step[0], "n": len(per_step)}


def _minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def time_modes(
    runners: dict[str, Callable[[], object]], rounds: int, warmup: int
) -> tuple[dict[str, list[float]], dict[str, float], dict[str, list[int]]]:
    """Interleaved timing: every round calls every runner once.

    Returns per-runner times, warm-up times and minor page faults per timed call (the process's count: other
    threads of this process are included, nothing else runs meanwhile)."""
    times: dict[str, list[float]] = {name: [] for name in runners}
    faults: dict[str, list[int]] = {name: [] for name in runners}
    warmup_s: dict[str, float] = {name: 0.0 for name in runners}
    for r in range(warmup + rounds):
        for name, run in runners.items():
            faults_before = _minor_faults()
            start = time.perf_counter()
            run()
            elapsed = time.perf_counter() - start
            if r < warmup:
                warmup_s[name] += elapsed
            else:
                times[name].append(elapsed)
                faults[name].append(_minor_faults() - faults_before)
    return times, warmup_s, faults


def step_benchmark(args: argparse.Namespace) -> dict:
    torch.manual_seed(0)
    shape = (1, 28, 28) if args.dataset != "cifar10" else (3, 32, 32)
    config = build_config("course")
    cfg = replace(config.sampler, steps=args.steps)
    options = {} if args.model == "course_cnn" else {"width": 16, "features": 256, "act": "swish"}
    head = "separate" if args.model == "course_cnn" else "logsumexp"
    base = build_model(args.model, shape, 10, head, options).eval()
    x0 = torch.rand((args.batch, *shape), generator=torch.Generator().manual_seed(1)) * 2 - 1

    def one_step() -> None:
        x = x0.clone().requires_grad_(True)
        base.energy(x).sum().backward()  # FlopCounterMode does not support autograd.grad on a leaf

    for p in base.parameters():
        p.requires_grad_(False)
    flops_per_step = count_flops(one_step)
    for p in base.parameters():
        p.requires_grad_(True)

    import copy

    runners: dict[str, Callable[[], object]] = {}
    ref_model = copy.deepcopy(base)
    runners["reference-eager"] = lambda: reference_sgld(ref_model, x0, cfg)
    for name in args.modes:
        sampler = jemlab_sampler(copy.deepcopy(base), MODES[name], cfg)
        runners[name] = lambda sampler=sampler: sampler(x0)
    times, warmup_s, faults = time_modes(runners, args.rounds, args.warmup)

    peak = cpu_peak()
    reference = summarise(times["reference-eager"], cfg.steps)["median_ms"]
    table = {}
    for name, t in times.items():
        row = summarise(t, cfg.steps)
        row["speedup"] = reference / row["median_ms"]
        row["gflops"] = flops_per_step / (row["median_ms"] * 1e-3) / 1e9
        row["fraction_of_fp32_peak"] = row["gflops"] / peak["fp32_peak_gflops"]
        row["warmup_s"] = warmup_s[name]
        row["minor_faults_per_step"] = statistics.median(faults[name]) / cfg.steps
        table[name] = row
    return {
        "model": args.model,
        "image_shape": list(shape),
        "batch": args.batch,
        "steps_per_chain": cfg.steps,
        "sampler": {k: getattr(cfg, k) for k in ("step_size", "noise", "grad_clamp", "noise_first")},
        "rounds": args.rounds,
        "warmup_rounds": args.warmup,
        "flops_per_step": flops_per_step,
        "peak": {**peak, "measured_sgemm_gflops": measured_matmul_gflops()},
        "compile_status": fast.compile_status(),
        "table": table,
    }


def _synthetic_splits(n_train: int):
    """A small synthetic Fashion-MNIST-shaped dataset in a temporary folder (the benchmarks time compute, not data)."""
    import tempfile

    from jemlab.data import load_dataset
    from jemlab.data.testing import write_idx_dataset

    folder = Path(tempfile.mkdtemp()) / "data"
    write_idx_dataset(folder, n_train=n_train, n_test=100, seed=0)
    return load_dataset("fashion-mnist", folder, val_size=100, seed=0, download=False)


def _trainer_runner(trainer, iterations: int) -> Callable[[], None]:
    """`iterations` training steps of a jemlab Trainer (batch drawing included)."""

    def run() -> None:
        for _ in range(iterations):
            x, y = trainer.batcher.next_batch()
            trainer.train_step(x, y, 0)

    return run


def _iteration_rows(
    times: dict[str, list[float]], iterations: int, baseline: str, faults: dict[str, list[int]]
) -> dict[str, dict[str, float]]:
    """Median/min/max iterations per second per runner, minor page faults per iteration, and each runner's
    speed-up over `baseline`."""
    rows = {}
    for name, t in times.items():
        its = sorted(iterations / s for s in t)
        rows[name] = {
            "median_it_per_s": statistics.median(its),
            "min": its[0],
            "max": its[-1],
            "n": len(its),
            "minor_faults_per_iteration": statistics.median(faults[name]) / iterations,
        }
    for name, row in rows.items():
        if name != baseline:
            row["speedup"] = row["median_it_per_s"] / rows[baseline]["median_it_per_s"]
    return rows


QUIET = [("train.progress", False), ("train.tensorboard", False)]


def train_benchmark(args: argparse.Namespace) -> dict:
    """Course preset training iterations/s: jemlab's Trainer against an eager re-implementation of the course code."""
    from benchmarks.eager_course import EagerCourseTrainer
    from jemlab.training.loop import Trainer

    splits = _synthetic_splits(2000)
    overrides = [*QUIET, *[(k, v) for k, v in args.train_set]]
    trainer = Trainer(build_config("course", overrides), None, splits=splits)
    eager = EagerCourseTrainer(trainer.config, splits)
    iterations = args.train_iterations

    def run_eager() -> None:
        for _ in range(iterations):
            eager.train_step()

    runners = {"eager-course": run_eager, "jemlab-course": _trainer_runner(trainer, iterations)}
    times, _, faults = time_modes(runners, args.train_rounds, 1)
    sampler = trainer.config.sampler
    return {
        "iterations_per_round": iterations,
        "rounds": args.train_rounds,
        "course_sampler": {k: getattr(sampler, k) for k in ("steps", "impl", "precision", "compile", "gradient")},
        "channels_last": trainer.config.train.channels_last,
        "table": _iteration_rows(times, iterations, "eager-course", faults),
    }


# The default preset as it was before the fast-sampling work (git f308d48^): the reference sampler from uniform noise.
DEFAULT_BEFORE = [("sampler.impl", "reference"), ("sampler.init", "uniform")]


def default_benchmark(args: argparse.Namespace) -> dict:
    """Default preset training iterations/s (data + SGLD + loss + backward + Adam): now against before this work."""
    from jemlab.training.loop import Trainer

    splits = _synthetic_splits(4000)
    before = Trainer(build_config("default", QUIET + DEFAULT_BEFORE), None, splits=splits)
    now = Trainer(build_config("default", QUIET), None, splits=splits)
    iterations = args.train_iterations
    runners = {"default-before": _trainer_runner(before, iterations), "default-now": _trainer_runner(now, iterations)}
    times, _, faults = time_modes(runners, args.train_rounds, 1)
    rows = _iteration_rows(times, iterations, "default-before", faults)
    images = now.config.train.batch_size + (now.config.sampler.batch_size or 0)
    for row in rows.values():
        row["median_images_per_s"] = row["median_it_per_s"] * images
    return {
        "iterations_per_round": iterations,
        "rounds": args.train_rounds,
        "before_overrides": DEFAULT_BEFORE,
        "table": rows,
    }


def markdown(result: dict) -> str:
    """The README table."""
    step = result["step"]
    lines = [
        f"SGLD step, `{step['model']}`, batch {step['batch']}, {result['threads']} threads, K = "
        f"{step['steps_per_chain']}, {step['rounds']} interleaved rounds ({result['machine_cpu']}, torch "
        f"{result['torch']}); fp32 peak {step['peak']['fp32_peak_gflops']:.0f} GFLOP/s "
        f"({step['peak']['formula']}), sgemm {step['peak']['measured_sgemm_gflops']:.0f} GFLOP/s",
        "",
        f"malloc: {result['malloc']['reason'] if result['malloc']['tuned'] else 'glibc defaults'}",
        "",
        "| mode | ms/step (median) | IQR | speed-up | GFLOP/s | % of fp32 peak | page faults/step |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, row in step["table"].items():
        lines.append(
            f"| {name} | {row['median_ms']:.2f} | {row['q1_ms']:.2f}–{row['q3_ms']:.2f} | {row['speedup']:.2f}× | "
            f"{row['gflops']:.1f} | {100 * row['fraction_of_fp32_peak']:.1f}% | {row['minor_faults_per_step']:.0f} |"
        )
    if "train" in result:
        train = result["train"]["table"]
        lines += [
            "",
            "| course preset training | it/s (median) | speed-up | page faults/it |",
            "| --- | --- | --- | --- |",
        ]
        for name, row in train.items():
            lines.append(
                f"| {name} | {row['median_it_per_s']:.2f} | {row.get('speedup', 1.0):.2f}× | "
                f"{row['minor_faults_per_iteration']:.0f} |"
            )
    if "default_train" in result:
        rows = result["default_train"]["table"]
        lines += ["", "| default preset training | it/s (median) | images/s | speed-up |", "| --- | --- | --- | --- |"]
        for name, row in rows.items():
            lines.append(
                f"| {name} | {row['median_it_per_s']:.2f} | {row['median_images_per_s']:.0f} | "
                f"{row.get('speedup', 1.0):.2f}× |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="course_cnn", choices=["course_cnn", "cnn"])
    parser.add_argument("--dataset", default="fashion-mnist", choices=["fashion-mnist", "cifar10"])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20, help="SGLD steps per timed chain")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    parser.add_argument("--train", action="store_true", help="also time course-preset training iterations")
    parser.add_argument(
        "--train-default", action="store_true", help="also time default-preset training, now against before"
    )
    parser.add_argument("--train-iterations", type=int, default=5)
    parser.add_argument("--train-rounds", type=int, default=5)
    parser.add_argument("--train-set", nargs=2, action="append", default=[], metavar=("KEY", "VALUE"))
    parser.add_argument(
        "--malloc",
        choices=["tuned", "default"],
        default="tuned",
        help="tuned: jemlab.allocator.tune_allocator() at start, as the jemlab command does, for every mode alike; "
        "default: glibc's own settings, under which a mode's page faults depend on what ran before it",
    )
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    malloc = tune_allocator(force=True) if args.malloc == "tuned" else allocator_status()

    result = {
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "malloc": malloc,
        "step": step_benchmark(args),
    }
    if args.train:
        result["train"] = train_benchmark(args)
    if args.train_default:
        result["default_train"] = default_benchmark(args)
    from benchmarks.common import machine_info

    result["machine_cpu"] = machine_info()["cpu"]
    result["markdown"] = markdown(result)
    path = write_result("sgld", result, args.out)
    print(result["markdown"])
    print(json.dumps({"result": str(path)}))


if __name__ == "__main__":
    main()
