"""WRN-28-10 JEM iterations at CIFAR scale on one GPU: seconds per iteration, images/s, projected GPU-hours.

    python -m benchmarks.wrn_gpu                       # needs a CUDA GPU; jem-cifar10 preset, synthetic 32×32 data
    python -m benchmarks.wrn_gpu --cpu-smoke           # tiny WRN-10-1 on the CPU: checks the script, measures nothing

Protocol: the `jem-cifar10` preset (batch 64, 64 persistent chains, K = 20 SGLD steps, augmentation, input noise)
trains on synthetic uint8 images (timing does not depend on pixel values; 50,000 training images are assumed for the
projection). For each precision setting the script builds a fresh Trainer, runs `--warmup` iterations (cuDNN
autotuning, allocator), then times `--iters` iterations with CUDA synchronisation around the clock. Settings:
fp32 (the paper), bf16 (SGLD chains and loss under bfloat16 autocast) and fp16 (float16 autocast, GradScaler).
Projected GPU-hours = seconds/iteration × ⌊50,000 / 64⌋ iterations/epoch × epochs, for 150 and 200 epochs, one
GPU; with torchrun over N GPUs the per-GPU work per iteration is the same and epochs take 1/N as many iterations.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from benchmarks.common import write_result
from jemlab.config import build_config
from jemlab.data import ArrayDataset, DatasetSplits
from jemlab.training.loop import Trainer

SETTINGS = {
    "fp32": [],
    "bf16": [("sampler.precision", "bf16"), ("train.precision", "bf16")],
    "fp16": [("sampler.precision", "fp16"), ("train.precision", "fp16")],
}
TRAIN_IMAGES = 50_000


def synthetic_splits(n: int, image_size: int, classes: int = 10) -> DatasetSplits:
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 3, image_size, image_size), dtype=torch.uint8, generator=gen)
    labels = torch.randint(0, classes, (n,), generator=gen)
    data = ArrayDataset(images, labels)
    empty = ArrayDataset(images[:0], labels[:0])
    return DatasetSplits(
        "synthetic", data, empty, empty, classes, (3, image_size, image_size), [str(c) for c in range(classes)]
    )


def time_setting(name: str, args: argparse.Namespace, device: str) -> dict[str, float]:
    overrides = [("train.device", device), ("train.progress", False), ("train.tensorboard", False), *SETTINGS[name]]
    if args.cpu_smoke:
        overrides += [("model.depth", 10), ("model.widen", 1), ("sampler.steps", 2), ("sampler.buffer_size", 256)]
    config = build_config("jem-cifar10", overrides)
    trainer = Trainer(config, None, splits=synthetic_splits(args.images, 32))
    cuda = trainer.device.type == "cuda"

    def iterate(n: int) -> float:
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(n):
            x, y = trainer.batcher.next_batch()
            trainer.train_step(x, y, epoch=0)
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - start

    iterate(args.warmup)
    times = [iterate(1) for _ in range(args.iters)]
    per_iter = statistics.median(times)
    batch = config.train.batch_size
    iters_per_epoch = TRAIN_IMAGES // batch
    result = {
        "s_per_iter_median": per_iter,
        "s_per_iter_min": min(times),
        "s_per_iter_max": max(times),
        "images_per_s": batch / per_iter,
        "sgld_image_steps_per_s": (config.sampler.batch_size or batch) * config.sampler.steps / per_iter,
        "gpu_hours_150_epochs": per_iter * iters_per_epoch * 150 / 3600,
        "gpu_hours_200_epochs": per_iter * iters_per_epoch * 200 / 3600,
    }
    if cuda:
        result["max_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
        torch.cuda.reset_peak_memory_stats()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--settings", default="fp32,bf16,fp16", help=f"comma-separated, from {', '.join(SETTINGS)}")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--images", type=int, default=2048, help="synthetic training images held in memory")
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny WRN-10-1 on the CPU (checks the script only)")
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()

    if not torch.cuda.is_available() and not args.cpu_smoke:
        print(
            "benchmarks/wrn_gpu.py needs a CUDA GPU: WRN-28-10 with 20 SGLD steps per iteration takes minutes per "
            "iteration on a CPU. Run it on a GPU machine (or pass --cpu-smoke to check the script with a tiny net).",
            file=sys.stderr,
        )
        raise SystemExit(2)
    device = "cpu" if args.cpu_smoke else "cuda"
    torch.backends.cudnn.benchmark = True
    rows = {}
    for name in args.settings.split(","):
        if name == "fp16" and device == "cpu":
            continue  # float16 autocast with GradScaler is a GPU setting
        rows[name] = time_setting(name, args, device)
        print(
            f"{name}: {rows[name]['s_per_iter_median']:.3f} s/it, {rows[name]['images_per_s']:.0f} images/s, "
            f"{rows[name]['gpu_hours_150_epochs']:.1f}-{rows[name]['gpu_hours_200_epochs']:.1f} GPU-hours for "
            f"150-200 epochs"
        )
    result = {
        "protocol": "jem-cifar10 preset, synthetic 32x32 data, median of timed single iterations after warm-up, "
        f"projection for {TRAIN_IMAGES} training images on one device",
        "model": "WRN-10-1 (cpu smoke test)" if args.cpu_smoke else "WRN-28-10",
        "device": device,
        "warmup": args.warmup,
        "iters": args.iters,
        "settings": rows,
    }
    print(f"wrote {write_result('wrn_gpu-smoke' if args.cpu_smoke else 'wrn_gpu', result, args.out)}")


if __name__ == "__main__":
    main()
