"""Command line: parse → config → build → call. Nothing here trains, samples or scores by itself.

jemlab train  [--preset NAME] [--dataset NAME] [--minutes M] [--epochs N] --run-dir DIR [--set key=value ...]
jemlab sample --checkpoint PATH --num N [--per-class] [--steps K] --out FILE.(npz|png)
jemlab eval   --checkpoint PATH [--json FILE]
jemlab presets
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from jemlab.errors import ConfigError, JemlabError


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got '{text}'") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _nonneg_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got '{text}'") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got '{text}'") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    from jemlab import __version__
    from jemlab.config import PRESETS

    parser = argparse.ArgumentParser(
        prog="jemlab", description="Joint Energy-Based Models: train, sample and evaluate."
    )
    parser.add_argument("--version", action="version", version=f"jemlab {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    # train ----------------------------------------------------------------------------------------------------
    p = sub.add_parser("train", help="train a model", description="Train a JEM (classifier + energy model).")
    g = p.add_argument_group("what to train")
    g.add_argument(
        "--preset",
        default="default",
        choices=sorted(PRESETS),
        help="recipe to start from (default: %(default)s; `jemlab presets` describes them)",
    )
    g.add_argument("--config", type=Path, help="start from a config JSON file (e.g. a run's config.json) instead")
    g.add_argument("--dataset", help="dataset name (fashion-mnist, mnist, mnist-5k, cifar10, cifar100, svhn)")
    g.add_argument("--data-dir", help="folder holding the dataset files (searched before the cache and system)")
    g.add_argument(
        "--val-size",
        type=_nonneg_int,
        help="validation images held out of the training set (default: min(5000, a tenth of it))",
    )
    g.add_argument("--limit", type=_positive_int, help="train on only this many images (quick runs)")
    g.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override any config key, e.g. --set sampler.steps=10 --set model.width=32 (repeatable)",
    )
    g = p.add_argument_group("how long and how")
    g.add_argument("--minutes", type=_positive_float, help="wall-clock budget; stops cleanly and saves")
    g.add_argument("--epochs", type=_positive_int, help="number of epochs")
    g.add_argument("--batch-size", type=_positive_int, help="training batch size")
    g.add_argument("--lr", type=_positive_float, help="learning rate")
    g.add_argument("--sgld-steps", type=_nonneg_int, help="SGLD steps K per iteration (JEM: 20)")
    g.add_argument("--sgld-step-size", type=_positive_float, help="SGLD step size α (JEM: 1)")
    g.add_argument("--sgld-noise", type=float, help="SGLD noise σ (JEM: 0.01)")
    g.add_argument("--seed", type=_nonneg_int, help="random seed")
    g.add_argument("--device", help="auto, cpu, cuda or cuda:N")
    g.add_argument("--threads", type=_positive_int, help="CPU threads for torch")
    g = p.add_argument_group("output")
    g.add_argument("--run-dir", type=Path, help="run folder (default: runs/<preset>-<dataset>-<time>)")
    g.add_argument("--resume", action="store_true", help="continue the run in --run-dir from its latest checkpoint")
    g.add_argument("--log-file", type=Path, help="also write the log to this file")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    p.set_defaults(func=cmd_train)

    # sample ---------------------------------------------------------------------------------------------------
    p = sub.add_parser(
        "sample",
        help="draw samples from a trained model",
        description="Draw SGLD samples; FILE.npz (images in [0,1], labels) or FILE.png (grid).",
    )
    p.add_argument("--checkpoint", required=True, type=Path, help="checkpoint file or run directory")
    p.add_argument(
        "--num",
        type=_positive_int,
        default=64,
        help="number of samples (with --per-class: per class) (default: %(default)s)",
    )
    p.add_argument("--per-class", action="store_true", help="class-conditional samples, one row per class")
    p.add_argument("--steps", type=_nonneg_int, help="SGLD steps (default: the run's sampler.steps)")
    p.add_argument(
        "--init",
        choices=["auto", "buffer", "noise"],
        default="auto",
        help="start chains from the replay buffer or from noise (default: buffer when there is one)",
    )
    p.add_argument("--seed", type=_nonneg_int, default=0, help="random seed (default: %(default)s)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--out", required=True, type=Path, help="output .npz or .png")
    p.set_defaults(func=cmd_sample)

    # eval -----------------------------------------------------------------------------------------------------
    p = sub.add_parser("eval", help="evaluate a trained model", description="Test accuracy and NLL of a checkpoint.")
    p.add_argument("--checkpoint", required=True, type=Path, help="checkpoint file or run directory")
    p.add_argument("--data-dir", help="folder holding the dataset files")
    p.add_argument("--split", choices=["test", "val"], default="test", help="split to score (default: %(default)s)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--json", type=Path, help="also write the metrics to this JSON file")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("presets", help="list the presets and what they set")
    p.set_defaults(func=cmd_presets)
    return parser


# --- commands --------------------------------------------------------------------------------------------------


def _train_config(args: argparse.Namespace):
    from jemlab.config import build_config, load_config_file, parse_overrides, set_value, validate_config

    overrides: list[tuple[str, Any]] = []
    flag_keys = {
        "dataset": "data.dataset",
        "data_dir": "data.data_dir",
        "val_size": "data.val_size",
        "limit": "data.limit",
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
    for attr, key in flag_keys.items():
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
        return config
    return build_config(args.preset, overrides)


def cmd_train(args: argparse.Namespace) -> int:
    from jemlab.config import config_from_dict, parse_overrides, set_value, validate_config

    config = _train_config(args)
    run_dir = args.run_dir or Path("runs") / f"{config.preset}-{config.data.dataset}-{time.strftime('%Y%m%d-%H%M%S')}"
    resume_from = None
    has_checkpoint = (run_dir / "checkpoints" / "latest").exists()
    if args.resume:
        if not has_checkpoint:
            raise ConfigError(f"--resume: {run_dir} has no checkpoint (checkpoints/latest); check --run-dir")
        from jemlab.training.checkpoint import load_checkpoint

        _, meta = load_checkpoint(run_dir)
        # The run's own config, with only what the command line says explicitly on top (e.g. more --minutes).
        config = config_from_dict(meta["config"])
        for attr, key in (
            ("minutes", "train.minutes"),
            ("epochs", "train.epochs"),
            ("device", "train.device"),
            ("threads", "train.threads"),
        ):
            if getattr(args, attr) is not None:
                set_value(config, key, getattr(args, attr))
        for key, value in parse_overrides(args.overrides):
            set_value(config, key, value)
        validate_config(config)
        resume_from = run_dir
    elif has_checkpoint and not args.dry_run:
        raise ConfigError(f"{run_dir} already holds a run; pass --resume to continue it or choose another --run-dir")
    if args.dry_run:
        print(config.to_json())
        return 0

    from jemlab.training.loop import Trainer

    trainer = Trainer(config, run_dir)
    result = trainer.fit(resume_from=resume_from, log_file=args.log_file)
    summary = {k: result[k] for k in ("test_accuracy", "test_nll", "step", "elapsed_s") if k in result}
    print(json.dumps(summary))
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    import torch

    from jemlab.generate import generate
    from jemlab.images import save_grid, save_npz
    from jemlab.run import load_run

    suffix = args.out.suffix.lower()
    if suffix not in (".npz", ".png"):
        raise ConfigError(f"--out must end in .npz or .png, got '{args.out}'")
    run = load_run(args.checkpoint, device=args.device)
    labels = None
    n = args.num
    if args.per_class:
        labels = torch.arange(run.num_classes).repeat_interleave(args.num)
        n = len(labels)
    generator = torch.Generator().manual_seed(args.seed)
    x, protocol = generate(run, n, labels=labels, steps=args.steps, init=args.init, generator=generator)
    if suffix == ".npz":
        save_npz(args.out, x, labels)
    else:
        save_grid(x, args.out, nrow=args.num if args.per_class else None)
    report: dict[str, Any] = {"out": str(args.out), **protocol}
    if labels is not None:
        with torch.no_grad():
            predicted = torch.cat([run.model.logits(c.to(run.device)).argmax(1).cpu() for c in x.split(256)])
        report["self_agreement"] = float((predicted == labels).float().mean())
    print(json.dumps(report))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from jemlab.data import load_dataset
    from jemlab.run import load_run
    from jemlab.training.loop import evaluate_split

    run = load_run(args.checkpoint, device=args.device)
    d = run.config.data
    splits = load_dataset(
        d.dataset,
        args.data_dir or d.data_dir,
        val_size=d.val_size,
        seed=run.config.train.seed,
        download=d.download,
        limit=d.limit,
    )
    metrics = evaluate_split(run.model, getattr(splits, args.split), run.device, prefix=args.split)
    metrics = {"checkpoint": str(run.path), "dataset": splits.name, **metrics}
    text = json.dumps(metrics, indent=2)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")
    print(text)
    return 0


def cmd_presets(args: argparse.Namespace) -> int:
    from jemlab.config import PRESETS

    for name, values in PRESETS.items():
        print(f"{name}:")
        for key, value in values.items():
            print(f"    {key} = {value}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except JemlabError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
