"""`jemlab sample`: a trained run → SGLD (or, for EGC runs, DDIM/DDPM) samples as .npz, .png and/or a chain .gif."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from jemlab.cli.arguments import apply_egc_flags, nonneg_float, nonneg_int, positive_int, unit_float
from jemlab.errors import ConfigError


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "sample",
        help="draw samples from a trained model",
        description="Draw SGLD samples; FILE.npz (images in [0,1], labels) or FILE.png (grid).",
    )
    p.add_argument("--checkpoint", required=True, type=Path, help="checkpoint file or run directory")
    p.add_argument(
        "--num",
        type=positive_int,
        default=64,
        help="number of samples (with --per-class: per class) (default: %(default)s)",
    )
    p.add_argument("--per-class", action="store_true", help="class-conditional samples, one row per class")
    p.add_argument(
        "--steps", type=nonneg_int, help="SGLD steps (default: the run's sampler.steps); EGC runs: sampler steps"
    )
    p.add_argument(
        "--init",
        choices=["auto", "buffer", "noise"],
        default="auto",
        help="start chains from the replay buffer or from noise (default: buffer when there is one)",
    )
    p.add_argument("--seed", type=nonneg_int, default=0, help="random seed (default: %(default)s)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--out", type=Path, help="output .npz or .png")
    p.add_argument("--animate", type=Path, metavar="FILE.gif", help="also (or only) write the chain as an animated GIF")
    p.add_argument("--frames", type=positive_int, default=20, help="GIF frames after the start (default: %(default)s)")
    g = p.add_argument_group("EGC runs (objective egc)")
    g.add_argument("--sampler", choices=["ddim", "ddpm"], help="diffusion sampler (default: the run's egc.sampler)")
    g.add_argument(
        "--eta",
        type=unit_float,
        help="DDIM noise η in [0, 1] (default: the run's egc.eta; 0 = deterministic; ddpm is always 1)",
    )
    g.add_argument(
        "--guidance",
        type=nonneg_float,
        help="classifier-guidance scale of --per-class samples (default: the run's egc.guidance)",
    )
    g.add_argument(
        "--label-guidance",
        type=nonneg_float,
        help="classifier-free guidance weight of --per-class samples, label-conditioned runs "
        "(default: the run's egc.label_guidance; 1 = off)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from jemlab.api import Samples, load
    from jemlab.images import save_grid, save_npz

    if args.out is None and args.animate is None:
        raise ConfigError("pass --out FILE.npz|FILE.png, --animate FILE.gif, or both")
    suffix = None if args.out is None else args.out.suffix.lower()
    if suffix not in (None, ".npz", ".png"):
        raise ConfigError(f"--out must end in .npz or .png, got '{args.out}'")
    if args.animate is not None and args.animate.suffix.lower() != ".gif":
        raise ConfigError(f"--animate must end in .gif, got '{args.animate}'")
    model = load(args.checkpoint, device=args.device)  # the Python API's Model (jemlab.api)
    apply_egc_flags(args, model.config)
    labels = None
    n = args.num
    if args.per_class:
        labels = torch.arange(model.num_classes).repeat_interleave(args.num)
        n = len(labels)
    nrow = args.num if args.per_class else None
    if args.animate is not None:
        from jemlab.animate import record_chain, save_gif

        generator = torch.Generator().manual_seed(args.seed)
        x, snapshots, protocol = record_chain(
            model.run, n, labels=labels, steps=args.steps, frames=args.frames, init=args.init, generator=generator
        )
        save_gif(snapshots, args.animate, nrow=nrow)
        samples = Samples.from_network_scale(x, labels, protocol)
    else:
        samples = model.draw(n, labels=labels, steps=args.steps, seed=args.seed, init=args.init)
    if suffix == ".npz":
        save_npz(args.out, samples.x, samples.labels)
    elif suffix == ".png":
        save_grid(samples.x, args.out, nrow=nrow)
    report: dict[str, Any] = {"out": None if args.out is None else str(args.out), **samples.protocol}
    if args.animate is not None:
        report["animate"] = str(args.animate)
    if labels is not None:  # None for a model without a classifier (EGC's plain ε-prediction control)
        classifier = getattr(model.run.model, "has_classifier", True)
        report["self_agreement"] = model.self_agreement(samples) if classifier else None
    print(json.dumps(report))
    return 0
