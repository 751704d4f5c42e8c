"""`jemlab fid-ref`: train and cache the domain feature net that `jemlab eval` uses for FD and KID."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from jemlab.cli.arguments import nonneg_int, positive_float, positive_int, say


def add_parser(sub: Any) -> None:
    from jemlab.evaluation.defaults import EVAL_DEFAULTS as D

    p = sub.add_parser(
        "fid-ref",
        help="train and cache the feature net for FD/KID",
        description=(
            "Train the domain classifier whose features `jemlab eval` uses for Fréchet distance and KID (Inception "
            "weights are unavailable offline), once per dataset, and cache it under "
            "<cache>/feature_nets/<dataset>/<fingerprint of its test split>/."
        ),
    )
    p.add_argument("--dataset", default="fashion-mnist", help="dataset name (default: %(default)s)")
    p.add_argument("--data-dir", help="folder holding the dataset files")
    p.add_argument("--cache-dir", type=Path, help="jemlab cache root (default: $JEMLAB_DATA or ~/.cache/jemlab)")
    p.add_argument(
        "--epochs", type=positive_int, default=D["feature_net_epochs"], help="training passes (default: %(default)s)"
    )
    p.add_argument("--minutes", type=positive_float, help="wall-clock cap on training (default: none)")
    p.add_argument("--seed", type=nonneg_int, default=0, help="training seed (default: %(default)s)")
    p.add_argument("--threads", type=positive_int, help="CPU threads for torch (default: torch's choice)")
    p.add_argument("--force", action="store_true", help="retrain even when a cached net exists")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from jemlab.data import load_dataset
    from jemlab.quality.reference import feature_net_path, reference_feature_net

    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    splits = load_dataset(args.dataset, args.data_dir, val_size=0, seed=args.seed)
    cached = feature_net_path(splits, args.cache_dir).is_file() and not args.force
    _, info = reference_feature_net(
        splits,
        cache_dir=args.cache_dir,
        force=args.force,
        epochs=args.epochs,
        max_minutes=args.minutes,
        seed=args.seed,
        log=say,
    )
    print(json.dumps({"dataset": splits.name, "cached": cached, **info}))
    return 0
