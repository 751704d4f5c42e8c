"""Denoising error per timestep of EGC runs (or the ε-prediction control): where along the schedule a model is weak.

    python -m benchmarks.egc_denoising_profile runs/i16/noce-8ep/checkpoints/step-0000859.safetensors RUN2 ...

Protocol. Each checkpoint is loaded with ``jemlab.run.load_run`` (its EMA weights) on the CPU. The first ``--n`` test
images of the run's dataset, in [−1, 1], are noised to each timestep of ``--timesteps`` with the run's schedule
(noise from one generator seeded ``--seed``, drawn in the same order for every run, so every run sees the same noisy
images), and the mean squared error between ε and the model's ε̂ (`model.eps`, the call the samplers make) is
reported twice: without a label ("free": what unconditional sampling and the classifier read) and, for a
label-conditioned network, with the true label ("label": what class-conditional sampling reads).

The result (JSON, via benchmarks.common.write_result) records the machine, torch version, git sha and settings.
"""

from __future__ import annotations

import argparse

import torch

from benchmarks.common import write_result
from jemlab.data.registry import load_dataset
from jemlab.generate.egc import schedule_from_config
from jemlab.run import load_run


def profile(checkpoint: str, timesteps: list[int], n: int, seed: int) -> dict[str, dict[str, float]]:
    """{"free": {t: mse}, "label": {t: mse}} for one checkpoint ("label" only for a label-conditioned network)."""
    run = load_run(checkpoint, device="cpu")
    model, schedule = run.model, schedule_from_config(run.config)
    test = load_dataset(run.config.data.dataset, run.config.data.data_dir).test
    x0, y = test.batch(slice(0, n))
    readings = {"free": None, "label": y} if model.label_embed is not None else {"free": None}
    result: dict[str, dict[str, float]] = {}
    for name, labels in readings.items():
        generator = torch.Generator().manual_seed(seed)
        result[name] = {}
        for t_value in timesteps:
            t = torch.full((n,), t_value)
            noise = torch.randn(x0.shape, generator=generator)
            x_t = schedule.q_sample(x0, t, noise)
            eps = model.eps(x_t, t, schedule.sigma(t, x0), labels)
            result[name][str(t_value)] = (eps - noise).pow(2).mean().item()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoints", nargs="+", help="EGC checkpoint files or run directories")
    parser.add_argument("--timesteps", default="1,10,50,100,250,500,750,999")
    parser.add_argument("--n", type=int, default=128, help="test images")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    timesteps = [int(t) for t in args.timesteps.split(",")]
    runs = {}
    for checkpoint in args.checkpoints:
        runs[checkpoint] = profile(checkpoint, timesteps, args.n, args.seed)
        for name, row in runs[checkpoint].items():
            print(f"{checkpoint} [{name}] " + " ".join(f"t={t}: {v:.4f}" for t, v in row.items()))
    settings = {"timesteps": timesteps, "n": args.n, "seed": args.seed, "threads": args.threads}
    path = write_result("egc_denoising_profile", {"settings": settings, "runs": runs})
    print(f"-> {path}")


if __name__ == "__main__":
    main()
