"""Sample quality of one EGC checkpoint under different reverse-process settings, in one process.

    python -m benchmarks.egc_sampler_sweep --checkpoint runs/egc-fmnist --n 500
    python -m benchmarks.egc_sampler_sweep --checkpoint RUN --configs ddim:50 ddim:100:eta=1 ddpm:250 ddim:50:noclip

Protocol. The run is loaded with ``jemlab.run.load_run`` (EMA weights). For each configuration
``sampler:steps[:eta=E][:noclip]`` we draw ``--n`` unconditional samples with ``jemlab.generate.generate`` from the
same seed, embed them with the evaluation's cached reference feature net (the one `jemlab eval --parts samples`
uses), and compute the Fréchet distance to ``--n`` test images, plus the real-vs-real floor (``--n`` test images
against ``--n`` validation images). Seconds per image are wall-clock on ``--threads`` threads. A grid of the first 64
samples of each configuration is written next to the JSON record, so the numbers can be checked by eye.

The point is to separate the sampler from the model: if no reasonable setting moves the Fréchet distance much,
the gap to JEM is the network's (its training budget's), not the sampler's.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace
from pathlib import Path

import torch

from benchmarks.common import write_result
from benchmarks.egc_feature_space import add_arguments, load
from jemlab.generate import generate
from jemlab.quality import metrics as sq


def parse_config(text: str) -> dict:
    """``ddim:50``, ``ddim:100:eta=1``, ``ddpm:250``, ``ddim:50:noclip`` → sampler settings."""
    parts = text.split(":")
    if len(parts) < 2 or parts[0] not in ("ddim", "ddpm"):
        raise SystemExit(f"bad configuration '{text}': write sampler:steps[:eta=E][:noclip], e.g. ddim:50")
    out = {"sampler": parts[0], "sample_steps": int(parts[1]), "eta": 0.0, "clip_x0": True}
    for extra in parts[2:]:
        if extra.startswith("eta="):
            out["eta"] = float(extra[4:])
        elif extra == "noclip":
            out["clip_x0"] = False
        else:
            raise SystemExit(f"bad option '{extra}' in '{text}': use eta=E or noclip")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    parser.add_argument("--n", type=int, default=500)
    parser.add_argument(
        "--configs", nargs="+", default=["ddim:50", "ddim:100", "ddim:50:eta=1", "ddpm:250", "ddim:50:noclip"]
    )
    args = parser.parse_args()
    configs = {text: parse_config(text) for text in args.configs}
    space = load(args.checkpoint, threads=args.threads)
    run = space.run
    floor = space.set_reference(args.n, args.seed)
    print(f"real vs real: {floor:.2f}")
    base = run.config.egc
    rows = {}
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for text, settings in configs.items():
        run.config.egc = replace(base, **settings)
        start = time.perf_counter()
        x, _ = generate(run, args.n, generator=torch.Generator().manual_seed(args.seed))
        seconds = time.perf_counter() - start
        fd = space.frechet(x)
        grid = Path(args.out) / f"egc_sampler_sweep-{stamp}-{text.replace(':', '_').replace('=', '')}.png"
        sq.plot_image_grid(x[:64], grid, title=f"EGC {text}: FD {fd:.1f}")
        rows[text] = {**settings, "frechet": fd, "seconds_per_image": seconds / args.n, "grid": str(grid)}
        print(f"{text}: FD {fd:.2f}, {1e3 * seconds / args.n:.1f} ms/image")
    run.config.egc = base
    path = write_result(
        "egc_sampler_sweep",
        {
            "checkpoint": args.checkpoint,
            "n": args.n,
            "threads": torch.get_num_threads(),
            "table": rows,
            **space.summary(),
        },
        args.out,
    )
    print(path)


if __name__ == "__main__":
    main()
