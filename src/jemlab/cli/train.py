"""`jemlab train`: preset → dotted overrides → config → Trainer (or --resume a run, or --dry-run the config)."""

from __future__ import annotations

import argparse
import json
import os
import re
import time
from pathlib import Path
from typing import Any

from jemlab.cli.arguments import nonneg_int, positive_float, positive_int
from jemlab.errors import ConfigError

# flag → the config key it sets
_FLAG_KEYS = {
    "dataset": "data.dataset",
    "data_dir": "data.data_dir",
    "val_size": "data.val_size",
    "limit": "data.limit",
    "labels_per_class": "data.labels_per_class",
    "minutes": "train.minutes",
    "epochs": "train.epochs",
    "batch_size": "train.batch_size",
    "lr": "optim.lr",
    "sgld_steps": "sampler.steps",
    "sgld_step_size": "sampler.step_size",
    "sgld_noise": "sampler.noise",
    "seed": "train.seed",
    "device": "train.device",
    "threads": "train.threads",
}
# the flags that may change a run being resumed (everything else comes from the run's own config)
_RESUME_FLAG_KEYS = ("minutes", "epochs", "device", "threads")


def add_parser(sub: Any) -> None:
    from jemlab.config import PRESETS

    p = sub.add_parser("train", help="train a model", description="Train a JEM (classifier + energy model).")
    g = p.add_argument_group("what to train")
    g.add_argument(
        "--preset",
        default="default",
        choices=sorted(PRESETS),
        help="recipe to start from (default: %(default)s; `jemlab presets` describes them)",
    )
    g.add_argument("--config", type=Path, help="start from a config JSON file (e.g. a run's config.json) instead")
    g.add_argument(
        "--dataset",
        help="dataset name (fashion-mnist, mnist, mnist-5k, cifar10, cifar100, svhn) or the path of your own images: "
        "a folder of class sub-folders or an .npz (docs/data.md; resize with --set data.image_size=N)",
    )
    g.add_argument("--data-dir", help="folder holding the dataset files (searched before the cache and system)")
    g.add_argument(
        "--val-size",
        type=nonneg_int,
        help="validation images held out of the training set (default: min(5000, a tenth of it))",
    )
    g.add_argument("--limit", type=positive_int, help="train on only this many images (quick runs)")
    g.add_argument(
        "--labels-per-class",
        type=positive_int,
        metavar="N",
        help="few labels: cross-entropy on N seeded images per class, log p(x) on all (docs/semi_supervised.md)",
    )
    g.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override any config key, e.g. --set sampler.steps=10 --set model.width=32 (repeatable)",
    )
    g = p.add_argument_group("how long and how")
    g.add_argument("--minutes", type=positive_float, help="wall-clock budget; stops cleanly and saves")
    g.add_argument("--epochs", type=positive_int, help="number of epochs")
    g.add_argument("--batch-size", type=positive_int, help="training batch size")
    g.add_argument("--lr", type=positive_float, help="learning rate")
    g.add_argument("--sgld-steps", type=nonneg_int, help="SGLD steps K per iteration (JEM: 20)")
    g.add_argument("--sgld-step-size", type=positive_float, help="SGLD step size α (JEM: 1)")
    g.add_argument("--sgld-noise", type=float, help="SGLD noise σ (JEM: 0.01)")
    g.add_argument("--seed", type=nonneg_int, help="random seed")
    g.add_argument("--device", help="auto, cpu, cuda or cuda:N")
    g.add_argument("--threads", type=positive_int, help="CPU threads for torch")
    g = p.add_argument_group("output")
    g.add_argument("--run-dir", type=Path, help="run folder (default: runs/<preset>-<dataset>-<time>)")
    g.add_argument(
        "--resume",
        nargs="?",
        const="latest",
        choices=("latest", "auto"),
        help="continue the run in --run-dir from its latest checkpoint; `--resume auto` also starts the run when the "
        "folder has no checkpoint yet (for restart scripts that always pass it)",
    )
    g.add_argument("--log-file", type=Path, help="also write the log to this file")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    config = _new_config(args)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and args.run_dir is None and not args.dry_run:
        # Each torchrun process would name its own folder after its own clock.
        raise ConfigError("with several processes (torchrun) pass --run-dir, the same for every process")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    run_dir = args.run_dir or Path("runs") / f"{config.preset}-{_slug(config.data.dataset)}-{stamp}"
    resume_from = None
    has_checkpoint = (run_dir / "checkpoints" / "latest").exists()
    if args.resume == "auto":
        if args.run_dir is None:
            raise ConfigError("--resume auto needs --run-dir: the folder to continue, or to start the run in")
        if not has_checkpoint:  # a first start, or a restart before the first checkpoint: start the run afresh
            args.resume = None
    if args.resume:
        if not has_checkpoint:
            raise ConfigError(f"--resume: {run_dir} has no checkpoint (checkpoints/latest); check --run-dir")
        config = _resumed_config(args, run_dir)
        resume_from = run_dir
    elif has_checkpoint and not args.dry_run:
        raise ConfigError(f"{run_dir} already holds a run; pass --resume to continue it or choose another --run-dir")
    if args.dry_run:
        print(config.to_json())
        return 0

    from jemlab import distributed
    from jemlab.training.loop import Trainer

    try:
        trainer = Trainer(config, run_dir)
        result = trainer.fit(resume_from=resume_from, log_file=args.log_file)
    finally:
        distributed.shutdown()  # leave the torchrun process group (nothing to do for one process)
    summary = {k: result[k] for k in ("test_accuracy", "test_nll", "step", "elapsed_s") if k in result}
    if trainer.dist.is_main:
        print(json.dumps(summary))
    return 0


def _new_config(args: argparse.Namespace):
    """The preset (or --config file), then the flags, then --set, validated."""
    from jemlab.config import build_config, load_config_file, parse_overrides, set_value, validate_config
    from jemlab.data import dataset_path

    overrides: list[tuple[str, Any]] = []
    for attr, key in _FLAG_KEYS.items():
        value = getattr(args, attr)
        if value is not None:
            overrides.append((key, value))
    if args.no_progress:
        overrides.append(("train.progress", False))
    overrides += parse_overrides(args.overrides)
    if args.config is not None:
        config = load_config_file(args.config)
        for key, value in overrides:
            set_value(config, key, value)
        validate_config(config)
    else:
        config = build_config(args.preset, overrides)
    # A dataset given by its path is saved as an absolute path, so eval and serve find it from any directory.
    path = dataset_path(config.data.dataset, config.data.data_dir)
    if path is not None:
        config.data.dataset = str(path)
    return config


def _slug(dataset: str) -> str:
    """A dataset name or path as part of a folder name: ``fashion-mnist``, or ``flowers`` for ``~/data/flowers/``."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", Path(dataset).stem).strip("._") or "dataset"


def _resumed_config(args: argparse.Namespace, run_dir: Path):
    """The run's own config, with only what the command line says explicitly on top (e.g. more --minutes)."""
    from jemlab.config import config_from_dict, parse_overrides, set_value, validate_config
    from jemlab.training.checkpoint import load_checkpoint

    _, meta = load_checkpoint(run_dir)
    config = config_from_dict(meta["config"])
    for attr in _RESUME_FLAG_KEYS:
        if getattr(args, attr) is not None:
            set_value(config, _FLAG_KEYS[attr], getattr(args, attr))
    for key, value in parse_overrides(args.overrides):
        set_value(config, key, value)
    validate_config(config)
    return config
