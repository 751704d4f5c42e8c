"""Command line: parse → config → build → call. Nothing here trains, samples or scores by itself.

jemlab train  [--preset NAME] [--dataset NAME] [--minutes M] [--epochs N] --run-dir DIR [--set key=value ...]
jemlab sample --checkpoint PATH --num N [--per-class] [--steps K] --out FILE.(npz|png) [--animate FILE.gif]
jemlab eval   --checkpoint PATH [--json FILE] [--all | --parts LIST] [--report DIR] [size flags ...]
jemlab fid-ref --dataset NAME [--cache-dir DIR] [--force]
jemlab serve  --checkpoint PATH [--port P] [--host H]
jemlab presets
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, NoReturn

from jemlab.allocator import tune_allocator
from jemlab.errors import ConfigError, JemlabError


def _number(kind: type, minimum: float, inclusive: bool, what: str):
    """An argparse type: parse `kind` and check it against a lower bound, with a message naming the rule."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got '{text}'") from None
        if not (value >= minimum if inclusive else value > minimum):
            raise argparse.ArgumentTypeError(f"expected {what}, got {value}")
        return value

    return parse


_positive_int = _number(int, 1, True, "a positive integer")
_nonneg_int = _number(int, 0, True, "an integer >= 0")
_positive_float = _number(float, 0.0, False, "a positive number")


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
    p.add_argument(
        "--steps", type=_nonneg_int, help="SGLD steps (default: the run's sampler.steps); EGC runs: sampler steps"
    )
    p.add_argument(
        "--init",
        choices=["auto", "buffer", "noise"],
        default="auto",
        help="start chains from the replay buffer or from noise (default: buffer when there is one)",
    )
    p.add_argument("--seed", type=_nonneg_int, default=0, help="random seed (default: %(default)s)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--out", type=Path, help="output .npz or .png")
    p.add_argument("--animate", type=Path, metavar="FILE.gif", help="also (or only) write the chain as an animated GIF")
    p.add_argument("--frames", type=_positive_int, default=20, help="GIF frames after the start (default: %(default)s)")
    g = p.add_argument_group("EGC runs (objective egc)")
    g.add_argument("--sampler", choices=["ddim", "ddpm"], help="diffusion sampler (default: the run's egc.sampler)")
    g.add_argument(
        "--guidance",
        type=_number(float, 0.0, True, "a number >= 0"),
        help="classifier-guidance scale of --per-class samples (default: the run's egc.guidance)",
    )
    p.set_defaults(func=cmd_sample)

    _add_serve_parser(sub)

    # eval -----------------------------------------------------------------------------------------------------
    from jemlab.evaluation.defaults import EGC_EVAL_DEFAULTS as E
    from jemlab.evaluation.defaults import EVAL_DEFAULTS as D
    from jemlab.evaluation.defaults import PARTS

    p = sub.add_parser(
        "eval",
        help="evaluate a trained model",
        description=(
            "Test accuracy and NLL of a checkpoint (fast path), or with --all/--parts the full evaluation: "
            "classification, calibration, OOD detection, PGD robustness (plain and SGLD-defended) and sample "
            "quality, written as metrics.json + a self-contained report.html + report.md."
        ),
    )
    g = p.add_argument_group("what to evaluate")
    g.add_argument("--checkpoint", required=True, type=Path, help="checkpoint file or run directory")
    g.add_argument("--data-dir", help="folder holding the dataset files (and <name>/ folders of OOD datasets)")
    g.add_argument("--split", choices=["test", "val"], help="fast path only: split to score (default: test)")
    g.add_argument("--json", type=Path, help="also write the metrics to this JSON file")
    what = g.add_mutually_exclusive_group()
    what.add_argument("--all", action="store_true", help="run every part of the evaluation (needs --report)")
    what.add_argument(
        "--parts",
        type=_parts_list,
        metavar="LIST",
        help=f"comma-separated subset of {','.join(PARTS)} (needs --report)",
    )
    g.add_argument("--report", type=Path, metavar="DIR", help="folder for metrics.json, report.html, report.md, PNGs")
    g = p.add_argument_group("sizes (cost grows linearly in each; defaults fit 10 minutes on 2 CPU cores)")
    g.add_argument("--n-test", type=_positive_int, help=f"test images scored (default: {D['n_test']}, capped)")
    g.add_argument("--n-val", type=_nonneg_int, help=f"validation images for the temperature (default: {D['n_val']})")
    g.add_argument("--n-ood", type=_positive_int, help=f"images per OOD set (default: {D['n_ood']})")
    g.add_argument("--batch-size", type=_positive_int, help=f"forward batch size (default: {D['batch_size']})")
    g.add_argument(
        "--pgd-n",
        type=_nonneg_int,
        help=f"test images attacked, 0 = no attack (default: {D['pgd_n']}; EGC runs: {E['pgd_n']})",
    )
    g.add_argument("--pgd-steps", type=_positive_int, help=f"PGD steps (default: {D['pgd_steps']})")
    g.add_argument("--pgd-restarts", type=_positive_int, help=f"PGD random restarts (default: {D['pgd_restarts']})")
    g.add_argument("--pgd-norms", type=_norms_list, metavar="LIST", help="linf, l2 or linf,l2 (default: linf,l2)")
    g.add_argument(
        "--pgd-loss",
        choices=["ce", "margin"],
        help="loss PGD ascends: ce (cross-entropy) or margin (best other logit minus the true one; checks for "
        f"gradient masking by a saturated softmax) (default: {D['pgd_loss']})",
    )
    g.add_argument(
        "--eps-linf",
        type=_eps_list,
        metavar="LIST",
        help="L-inf budgets in [0, 1] pixel units (default: 0,2/255,...,0.1)",
    )
    g.add_argument(
        "--eps-l2", type=_eps_list, metavar="LIST", help="L2 budgets in [0, 1] pixel units (default: 0,.25,.5,1)"
    )
    g.add_argument(
        "--defence-steps",
        type=_nonneg_int,
        help=f"SGLD refinement steps K of the JEM defence, 0 = not evaluated (default: {D['defence_steps']}; JEM: 10)",
    )
    g.add_argument(
        "--defence-n",
        type=_nonneg_int,
        help=f"images attacked through the defence (default: {D['defence_n']}; EGC runs: {E['defence_n']})",
    )
    g.add_argument(
        "--defence-chains",
        type=_positive_int,
        help=f"refinement chains averaged (default: {D['defence_chains']}; JEM: 5)",
    )
    g.add_argument(
        "--defence-eot", type=_positive_int, help=f"EOT gradient samples per PGD step (default: {D['defence_eot']})"
    )
    g.add_argument(
        "--n-samples", type=_nonneg_int, help=f"samples drawn, and again per-class (default: {D['n_samples']})"
    )
    g.add_argument(
        "--sample-steps", type=_nonneg_int, help="SGLD steps per sample chain (default: the run's sampler.steps)"
    )
    g.add_argument(
        "--sample-init",
        choices=["auto", "buffer", "noise"],
        help="sample chains start from the replay buffer or from noise (default: auto = buffer when the run has one)",
    )
    g.add_argument(
        "--guidance",
        type=_number(float, 0.0, True, "a number >= 0"),
        help="EGC runs: classifier-guidance scale of the per-class samples (default: the run's egc.guidance)",
    )
    g.add_argument("--kid-subsets", type=_positive_int, help=f"KID subsets (default: {D['kid_subsets']})")
    g.add_argument("--kid-subset-size", type=_positive_int, help=f"KID subset size (default: {D['kid_subset_size']})")
    g = p.add_argument_group("protocol")
    g.add_argument("--bins", type=_positive_int, help=f"equal-width ECE bins (default: {D['bins']})")
    g.add_argument(
        "--temperature-scaling",
        action="store_true",
        default=None,
        help="also fit a temperature on the validation split and report the scaled calibration",
    )
    g.add_argument(
        "--ood-datasets",
        type=_dataset_list,
        metavar="LIST",
        help="related datasets used as OOD sets, or 'none' (default: auto, e.g. mnist or mnist-5k for fashion-mnist)",
    )
    g.add_argument(
        "--cache-dir",
        type=Path,
        help="jemlab cache root holding feature_nets/<dataset>/ (default: $JEMLAB_DATA or ~/.cache/jemlab)",
    )
    g.add_argument(
        "--no-train-feature-net",
        action="store_true",
        default=None,
        help="skip FD/KID when no feature net is cached instead of training one now",
    )
    g.add_argument(
        "--feature-net-minutes",
        type=_positive_float,
        help=f"time cap when the feature net must be trained now (default: {D['feature_net_minutes']})",
    )
    g = p.add_argument_group("run")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: %(default)s)")
    g.add_argument("--seed", type=_nonneg_int, help="seed for subsets, noise sets, attacks and sampling (default: 0)")
    g.add_argument("--threads", type=_positive_int, help="CPU threads for torch (default: torch's choice)")
    p.set_defaults(func=cmd_eval)

    # fid-ref --------------------------------------------------------------------------------------------------
    p = sub.add_parser(
        "fid-ref",
        help="train and cache the feature net for FD/KID",
        description=(
            "Train the domain classifier whose features `jemlab eval` uses for Fréchet distance and KID (Inception "
            "weights are unavailable offline), once per dataset, and cache it under <cache>/feature_nets/<dataset>/."
        ),
    )
    p.add_argument("--dataset", default="fashion-mnist", help="dataset name (default: %(default)s)")
    p.add_argument("--data-dir", help="folder holding the dataset files")
    p.add_argument("--cache-dir", type=Path, help="jemlab cache root (default: $JEMLAB_DATA or ~/.cache/jemlab)")
    p.add_argument(
        "--epochs", type=_positive_int, default=D["feature_net_epochs"], help="training passes (default: %(default)s)"
    )
    p.add_argument("--minutes", type=_positive_float, help="wall-clock cap on training (default: none)")
    p.add_argument("--seed", type=_nonneg_int, default=0, help="training seed (default: %(default)s)")
    p.add_argument("--threads", type=_positive_int, help="CPU threads for torch (default: torch's choice)")
    p.add_argument("--force", action="store_true", help="retrain even when a cached net exists")
    p.set_defaults(func=cmd_fid_ref)

    p = sub.add_parser("presets", help="list the presets and what they set")
    p.set_defaults(func=cmd_presets)
    for command in sub.choices.values():  # every subcommand reports a bad flag in one line
        _one_line_errors(command)
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
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and args.run_dir is None and not args.dry_run:
        # Each torchrun process would name its own folder after its own clock.
        raise ConfigError("with several processes (torchrun) pass --run-dir, the same for every process")
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


def cmd_sample(args: argparse.Namespace) -> int:
    import torch

    from jemlab.generate import generate
    from jemlab.images import save_grid, save_npz
    from jemlab.run import load_run

    if args.out is None and args.animate is None:
        raise ConfigError("pass --out FILE.npz|FILE.png, --animate FILE.gif, or both")
    suffix = None if args.out is None else args.out.suffix.lower()
    if suffix not in (None, ".npz", ".png"):
        raise ConfigError(f"--out must end in .npz or .png, got '{args.out}'")
    if args.animate is not None and args.animate.suffix.lower() != ".gif":
        raise ConfigError(f"--animate must end in .gif, got '{args.animate}'")
    run = load_run(args.checkpoint, device=args.device)
    _egc_sample_flags(args, run.config)
    labels = None
    n = args.num
    if args.per_class:
        labels = torch.arange(run.num_classes).repeat_interleave(args.num)
        n = len(labels)
    generator = torch.Generator().manual_seed(args.seed)
    nrow = args.num if args.per_class else None
    if args.animate is not None:
        from jemlab.animate import record_chain, save_gif

        x, snapshots, protocol = record_chain(
            run, n, labels=labels, steps=args.steps, frames=args.frames, init=args.init, generator=generator
        )
        save_gif(snapshots, args.animate, nrow=nrow)
    else:
        x, protocol = generate(run, n, labels=labels, steps=args.steps, init=args.init, generator=generator)
    if suffix == ".npz":
        save_npz(args.out, x, labels)
    elif suffix == ".png":
        save_grid(x, args.out, nrow=nrow)
    report: dict[str, Any] = {"out": None if args.out is None else str(args.out), **protocol}
    if args.animate is not None:
        report["animate"] = str(args.animate)
    if labels is not None:
        with torch.no_grad():
            predicted = torch.cat([run.model.logits(c.to(run.device)).argmax(1).cpu() for c in x.split(256)])
        report["self_agreement"] = float((predicted == labels).float().mean())
    print(json.dumps(report))
    return 0


def _egc_sample_flags(args: argparse.Namespace, config: Any) -> None:
    """Apply the EGC-only flags of `sample` and `eval` to the loaded run's config (an error for JEM runs)."""
    from jemlab.config import set_value, validate_config

    given = {name: value for name in ("sampler", "guidance") if (value := getattr(args, name, None)) is not None}
    if not given:
        return
    if config.objective.name != "egc":
        raise ConfigError(f"--{next(iter(given))} applies to EGC runs only; this run's objective is jem")
    for name, value in given.items():
        set_value(config, f"egc.{name}", value)
    validate_config(config)


# --- eval and fid-ref: argument types and commands ---------------------------------------------------------------


def _one_line_errors(parser: argparse.ArgumentParser) -> None:
    """Make argparse report a bad flag in one line (its default prints the whole usage block first)."""

    def error(message: str) -> NoReturn:
        parser.exit(2, f"error: {parser.prog}: {message} (see `{parser.prog} --help`)\n")

    parser.error = error  # type: ignore[method-assign]


def _comma_list(text: str) -> list[str]:
    items = [item.strip() for item in text.split(",") if item.strip()]
    if not items:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list, got '{text}'")
    return items


def _parts_list(text: str) -> tuple[str, ...]:
    from jemlab.evaluation.defaults import PARTS

    items = _comma_list(text)
    unknown = [item for item in items if item not in PARTS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown part(s) {', '.join(unknown)}; choose from {','.join(PARTS)}")
    return tuple(part for part in PARTS if part in items)


def _norms_list(text: str) -> tuple[str, ...]:
    items = _comma_list(text)
    if set(items) - {"linf", "l2"}:
        raise argparse.ArgumentTypeError(f"norms must be linf and/or l2, got '{text}'")
    return tuple(dict.fromkeys(items))


def _eps_list(text: str) -> tuple[float, ...]:
    values = []
    for item in _comma_list(text):
        try:
            num, _, den = item.partition("/")  # 8/255 is how budgets are written in papers
            value = float(num) / float(den) if den else float(num)
        except (ValueError, ZeroDivisionError):
            raise argparse.ArgumentTypeError(f"expected numbers like 0.1 or 8/255, got '{item}'") from None
        if not 0 <= value <= 1:
            raise argparse.ArgumentTypeError(f"budgets are in [0, 1] pixel units, got {value:g}")
        values.append(value)
    return tuple(values)


def _dataset_list(text: str) -> tuple[str, ...]:
    from jemlab.data.registry import available_datasets

    if text.strip().lower() == "none":
        return ()
    if text.strip().lower() == "auto":
        return ("auto",)
    items = _comma_list(text)
    unknown = [item for item in items if item not in available_datasets()]
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown dataset(s) {', '.join(unknown)}; choose from {', '.join(available_datasets())}, auto or none"
        )
    return tuple(items)


# Flags that only the full evaluation reads (the fast path refuses them rather than ignoring them).
_SUITE_FLAGS = (
    "n_test", "n_val", "n_ood", "batch_size", "pgd_n", "pgd_steps", "pgd_restarts", "pgd_loss", "pgd_norms", "eps_linf",
    "eps_l2", "defence_steps", "defence_n", "defence_chains", "defence_eot", "n_samples", "sample_steps",
    "sample_init", "kid_subsets", "kid_subset_size", "bins", "temperature_scaling", "ood_datasets", "cache_dir",
    "no_train_feature_net", "feature_net_minutes", "seed", "report", "guidance",
)  # fmt: skip


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def cmd_eval(args: argparse.Namespace) -> int:
    from jemlab.data import load_dataset
    from jemlab.run import load_run
    from jemlab.training.evaluate import evaluate_split

    full = args.all or args.parts is not None
    if full and args.report is None:
        raise ConfigError("--all/--parts write a report: pass --report DIR")
    if full and args.split is not None:
        raise ConfigError("--split applies to the fast path only; the full evaluation always scores the test split")
    if not full:
        given = [name for name in _SUITE_FLAGS if getattr(args, name) is not None]
        if given:
            flag = "--" + given[0].replace("_", "-")
            raise ConfigError(f"{flag} only applies to the full evaluation; add --all or --parts")
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    run = load_run(args.checkpoint, device=args.device)
    _egc_sample_flags(args, run.config)
    d = run.config.data
    splits = load_dataset(
        d.dataset,
        args.data_dir or d.data_dir,
        val_size=d.val_size,
        seed=run.config.train.seed,
        download=d.download,
        limit=d.limit,
    )
    if full:
        return _eval_full(args, run, splits)
    split = args.split or "test"
    metrics = evaluate_split(run.model, getattr(splits, split), run.device, prefix=split)
    metrics = {"checkpoint": str(run.path), "dataset": splits.name, **metrics}
    text = json.dumps(metrics, indent=2)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")
    print(text)
    return 0


def _eval_full(args: argparse.Namespace, run: Any, splits: Any) -> int:
    import torch

    from jemlab.evaluation.command import evaluate_run, reference_feature_net
    from jemlab.evaluation.defaults import EGC_EVAL_DEFAULTS, EVAL_DEFAULTS, PARTS
    from jemlab.evaluation.report import write_metrics_json
    from jemlab.evaluation.suite import SuiteOptions

    defaults = dict(EVAL_DEFAULTS)
    if run.config.objective.name == "egc":  # attacks through a double back-propagation: smaller default sizes
        defaults.update(EGC_EVAL_DEFAULTS)

    def pick(name: str, default_key: str | None = None) -> Any:
        value = getattr(args, name)
        return defaults[default_key or name] if value is None else value

    seed = 0 if args.seed is None else args.seed
    torch.manual_seed(seed)
    parts = PARTS if args.all else args.parts
    options = SuiteOptions(
        n_test=pick("n_test"),
        n_val=pick("n_val"),
        n_ood=pick("n_ood"),
        batch_size=pick("batch_size"),
        seed=seed,
        parts=tuple(parts),
        calibration_bins=pick("bins"),
        temperature_scaling=bool(args.temperature_scaling),
        pgd_n=pick("pgd_n"),
        pgd_norms=tuple(pick("pgd_norms")),
        pgd_eps_linf=tuple(pick("eps_linf")),
        pgd_eps_l2=tuple(pick("eps_l2")),
        pgd_steps=pick("pgd_steps"),
        pgd_restarts=pick("pgd_restarts"),
        pgd_loss=pick("pgd_loss"),
        defence_steps=pick("defence_steps"),
        defence_n=pick("defence_n"),
        defence_chains=pick("defence_chains"),
        defence_eot=pick("defence_eot"),
        defence_init_noise=EVAL_DEFAULTS["defence_init_noise"],
        n_samples=pick("n_samples"),
        sample_batch=min(pick("n_samples") or 1, 250),
        kid_subsets=pick("kid_subsets"),
        kid_subset_size=pick("kid_subset_size"),
    )
    feature_net, feature_info = None, None
    if "samples" in options.parts and options.n_samples > 0:
        feature_net, feature_info = reference_feature_net(
            splits,
            cache_dir=args.cache_dir,
            train_if_missing=not args.no_train_feature_net,
            epochs=EVAL_DEFAULTS["feature_net_epochs"],
            max_minutes=pick("feature_net_minutes"),
            seed=seed,
            log=_say,
        )
        _say(f"eval: {feature_info['note']}")
    ood_datasets = None if args.ood_datasets in (None, ("auto",)) else args.ood_datasets
    metrics = evaluate_run(
        run,
        splits,
        args.report,
        options,
        ood_datasets=ood_datasets,
        data_dir=args.data_dir or run.config.data.data_dir,
        sample_steps=args.sample_steps,
        sample_init=args.sample_init or "auto",
        feature_net=feature_net,
        feature_net_info=feature_info,
        log=lambda message: _say(f"eval: {message}"),
    )
    if args.json:
        write_metrics_json(metrics, args.json)
    summary = {
        "report": str(args.report / "report.html"),
        **{k: metrics[k] for k in ("test_accuracy", "test_nll") if k in metrics},
        "timing_s": metrics.get("timing_s"),
    }
    print(json.dumps(summary))
    return 0


def cmd_fid_ref(args: argparse.Namespace) -> int:
    from jemlab.data import load_dataset
    from jemlab.evaluation.command import feature_net_path, reference_feature_net

    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    splits = load_dataset(args.dataset, args.data_dir, val_size=0, seed=args.seed)
    cached = feature_net_path(splits.name, args.cache_dir).is_file() and not args.force
    _, info = reference_feature_net(
        splits,
        cache_dir=args.cache_dir,
        force=args.force,
        epochs=args.epochs,
        max_minutes=args.minutes,
        seed=args.seed,
        log=_say,
    )
    print(json.dumps({"dataset": splits.name, "cached": cached, **info}))
    return 0


def _add_serve_parser(sub: Any) -> None:
    p = sub.add_parser(
        "serve",
        help="a local web page: draw, classify, see the energy, refine with SGLD, watch chains",
        description=(
            "Serve a demo page for one checkpoint (standard-library HTTP server, no build step). The checkpoint is "
            "read once at start-up; the page never names files. Binds to 127.0.0.1 unless --host says otherwise."
        ),
    )
    p.add_argument("--checkpoint", required=True, type=Path, help="checkpoint file or run directory")
    p.add_argument("--port", type=_nonneg_int, default=8000, help="port, 0 = any free one (default: %(default)s)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s, this machine only)")
    p.add_argument("--data-dir", help="where the run's dataset lives, if not where its config says")
    p.add_argument(
        "--reference-size",
        type=_nonneg_int,
        default=1000,
        help="test images scored at start-up for the OOD verdict, 0 = none (default: %(default)s, at most 10000)",
    )
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (default: %(default)s)")
    p.add_argument("--threads", type=_positive_int, help="CPU threads for torch (default: torch's choice)")
    p.set_defaults(func=cmd_serve)


def cmd_serve(args: argparse.Namespace) -> int:
    import torch

    from jemlab.serve.server import create_app, make_server

    if args.reference_size > 10000:
        raise ConfigError(f"--reference-size is at most 10000, got {args.reference_size}")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    _say(f"serve: loading {args.checkpoint} and scoring the reference test images ...")
    app = create_app(args.checkpoint, data_dir=args.data_dir, reference_size=args.reference_size, device=args.device)
    if app.reference_note:
        _say(f"serve: {app.reference_note}")
    try:
        server = make_server(app, args.host, args.port)
    except OSError as err:
        raise ConfigError(f"cannot listen on {args.host}:{args.port} ({err.strerror}); try another --port") from None
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        _say(f"serve: warning: listening on {args.host}: anyone who can reach this address can use the page")
    _say(f"serve: open {server.url} (Ctrl-C stops)")
    try:
        server.serve_forever()
    finally:
        server.server_close()
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
        tune_allocator()  # freed tensors stay in the process: no page faults per step (jemlab/allocator.py)
        return args.func(args)
    except JemlabError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
