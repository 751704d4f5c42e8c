"""`jemlab eval`: test accuracy and NLL of a run (fast path), or with --all/--parts the full evaluation and report."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from jemlab.cli.arguments import (
    apply_egc_flags,
    comma_list,
    nonneg_float,
    nonneg_int,
    positive_float,
    positive_int,
    say,
    unit_float,
)
from jemlab.errors import ConfigError

# Flags that only the full evaluation reads (the fast path refuses them rather than ignoring them).
_SUITE_FLAGS = (
    "n_test", "n_val", "n_ood", "batch_size", "pgd_n", "pgd_steps", "pgd_restarts", "pgd_loss", "pgd_norms", "eps_linf",
    "eps_l2", "defence_steps", "defence_n", "defence_chains", "defence_eot", "n_samples", "sample_steps",
    "sample_init", "kid_subsets", "kid_subset_size", "bins", "temperature_scaling", "ood_datasets", "cache_dir",
    "no_train_feature_net", "feature_net_minutes", "seed", "report", "eta", "guidance", "label_guidance",
)  # fmt: skip


# --- the parser: one function per argument group ------------------------------------------------------------------


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "eval",
        help="evaluate a trained model",
        description=(
            "Test accuracy and NLL of a checkpoint (fast path), or with --all/--parts the full evaluation: "
            "classification, calibration, OOD detection, PGD robustness (plain and SGLD-defended) and sample "
            "quality, written as metrics.json + a self-contained report.html + report.md."
        ),
    )
    _add_what(p)
    _add_sizes(p)
    _add_protocol(p)
    g = p.add_argument_group("run")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: %(default)s)")
    g.add_argument("--seed", type=nonneg_int, help="seed for subsets, noise sets, attacks and sampling (default: 0)")
    g.add_argument("--threads", type=positive_int, help="CPU threads for torch (default: torch's choice)")
    p.set_defaults(func=run)


def _add_what(p: argparse.ArgumentParser) -> None:
    from jemlab.evaluation.defaults import PARTS

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


def _add_sizes(p: argparse.ArgumentParser) -> None:
    from jemlab.evaluation.defaults import EGC_EVAL_DEFAULTS as E
    from jemlab.evaluation.defaults import EVAL_DEFAULTS as D

    g = p.add_argument_group("sizes (cost grows linearly in each; defaults fit 10 minutes on 2 CPU cores)")
    g.add_argument("--n-test", type=positive_int, help=f"test images scored (default: {D['n_test']}, capped)")
    g.add_argument("--n-val", type=nonneg_int, help=f"validation images for the temperature (default: {D['n_val']})")
    g.add_argument("--n-ood", type=positive_int, help=f"images per OOD set (default: {D['n_ood']})")
    g.add_argument("--batch-size", type=positive_int, help=f"forward batch size (default: {D['batch_size']})")
    g.add_argument(
        "--pgd-n",
        type=nonneg_int,
        help=f"test images attacked, 0 = no attack (default: {D['pgd_n']}; EGC runs: {E['pgd_n']})",
    )
    g.add_argument("--pgd-steps", type=positive_int, help=f"PGD steps (default: {D['pgd_steps']})")
    g.add_argument("--pgd-restarts", type=positive_int, help=f"PGD random restarts (default: {D['pgd_restarts']})")
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
        type=nonneg_int,
        help=f"SGLD refinement steps K of the JEM defence, 0 = not evaluated (default: {D['defence_steps']}; JEM: 10)",
    )
    g.add_argument(
        "--defence-n",
        type=nonneg_int,
        help=f"images attacked through the defence (default: {D['defence_n']}; EGC runs: {E['defence_n']})",
    )
    g.add_argument(
        "--defence-chains",
        type=positive_int,
        help=f"refinement chains averaged (default: {D['defence_chains']}; JEM: 5)",
    )
    g.add_argument(
        "--defence-eot", type=positive_int, help=f"EOT gradient samples per PGD step (default: {D['defence_eot']})"
    )
    g.add_argument(
        "--n-samples", type=nonneg_int, help=f"samples drawn, and again per-class (default: {D['n_samples']})"
    )
    g.add_argument(
        "--sample-steps", type=nonneg_int, help="SGLD steps per sample chain (default: the run's sampler.steps)"
    )
    g.add_argument(
        "--sample-init",
        choices=["auto", "buffer", "noise"],
        help="sample chains start from the replay buffer or from noise (default: auto = buffer when the run has one)",
    )
    g.add_argument(
        "--eta",
        type=unit_float,
        help="EGC runs: DDIM noise η in [0, 1] of every sample (default: the run's egc.eta; 0 = deterministic)",
    )
    g.add_argument(
        "--guidance",
        type=nonneg_float,
        help="EGC runs: classifier-guidance scale of the per-class samples (default: the run's egc.guidance)",
    )
    g.add_argument(
        "--label-guidance",
        type=nonneg_float,
        help="EGC runs: classifier-free guidance weight of the per-class samples (default: the run's "
        "egc.label_guidance; 1 = off)",
    )
    g.add_argument("--kid-subsets", type=positive_int, help=f"KID subsets (default: {D['kid_subsets']})")
    g.add_argument("--kid-subset-size", type=positive_int, help=f"KID subset size (default: {D['kid_subset_size']})")


def _add_protocol(p: argparse.ArgumentParser) -> None:
    from jemlab.evaluation.defaults import EVAL_DEFAULTS as D

    g = p.add_argument_group("protocol")
    g.add_argument("--bins", type=positive_int, help=f"equal-width ECE bins (default: {D['bins']})")
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
        type=positive_float,
        help=f"time cap when the feature net must be trained now (default: {D['feature_net_minutes']})",
    )


# --- argument types ----------------------------------------------------------------------------------------------


def _parts_list(text: str) -> tuple[str, ...]:
    from jemlab.evaluation.defaults import PARTS

    items = comma_list(text)
    unknown = [item for item in items if item not in PARTS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown part(s) {', '.join(unknown)}; choose from {','.join(PARTS)}")
    return tuple(part for part in PARTS if part in items)


def _norms_list(text: str) -> tuple[str, ...]:
    items = comma_list(text)
    if set(items) - {"linf", "l2"}:
        raise argparse.ArgumentTypeError(f"norms must be linf and/or l2, got '{text}'")
    return tuple(dict.fromkeys(items))


def _eps_list(text: str) -> tuple[float, ...]:
    values = []
    for item in comma_list(text):
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
    items = comma_list(text)
    unknown = [item for item in items if item not in available_datasets()]
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown dataset(s) {', '.join(unknown)}; choose from {', '.join(available_datasets())}, auto or none"
        )
    return tuple(items)


# --- the command ---------------------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> int:
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
    trained = load_run(args.checkpoint, device=args.device)
    apply_egc_flags(args, trained.config)
    if not getattr(trained.model, "has_classifier", True):
        _check_parts_without_classifier(args)
    d = trained.config.data
    splits = load_dataset(
        d.dataset,
        args.data_dir or d.data_dir,
        val_size=d.val_size,
        seed=trained.config.train.seed,
        download=d.download,
        limit=d.limit,
        image_size=d.image_size,
    )
    if full:
        return _run_full(args, trained, splits)
    split = args.split or "test"
    metrics = evaluate_split(trained.model, getattr(splits, split), trained.device, prefix=split)
    metrics = {"checkpoint": str(trained.path), "dataset": splits.name, **metrics}
    if d.labels_per_class is not None:  # the label budget of a semi-supervised run
        metrics["labels_per_class"] = d.labels_per_class
    text = json.dumps(metrics, indent=2)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")
    print(text)
    return 0


def _check_parts_without_classifier(args: argparse.Namespace) -> None:
    """A checkpoint without a classifier (EGC's plain ε-prediction control) has only samples to evaluate: the fast
    path and explicitly requested classifier parts are one-line errors; --all evaluates the samples and notes the
    rest as skipped."""
    from jemlab.evaluation.suite import CLASSIFIER_PARTS

    what = "this checkpoint is the plain ε-prediction control (egc.parameterisation=epsilon) and has no classifier"
    if not (args.all or args.parts is not None):
        raise ConfigError(f"{what} to score; evaluate its samples with --parts samples --report DIR")
    asked = [part for part in args.parts or () if part in CLASSIFIER_PARTS]
    if asked:
        raise ConfigError(f"--parts {','.join(asked)}: {what}; evaluate its samples with --parts samples")
    if args.all:
        say(f"eval: {what}: only the samples part runs ({', '.join(CLASSIFIER_PARTS)} are skipped)")


def _run_full(args: argparse.Namespace, trained: Any, splits: Any) -> int:
    import torch

    from jemlab.evaluation.command import evaluate_run, reference_feature_net
    from jemlab.evaluation.defaults import EVAL_DEFAULTS
    from jemlab.evaluation.report import write_metrics_json

    seed = 0 if args.seed is None else args.seed
    torch.manual_seed(seed)
    options = _suite_options(args, trained, seed)
    feature_net, feature_info = None, None
    if "samples" in options.parts and options.n_samples > 0:
        feature_net, feature_info = reference_feature_net(
            splits,
            cache_dir=args.cache_dir,
            train_if_missing=not args.no_train_feature_net,
            epochs=EVAL_DEFAULTS["feature_net_epochs"],
            max_minutes=_pick(args, _defaults(trained), "feature_net_minutes"),
            seed=seed,
            log=say,
        )
        say(f"eval: {feature_info['note']}")
    ood_datasets = None if args.ood_datasets in (None, ("auto",)) else args.ood_datasets
    metrics = evaluate_run(
        trained,
        splits,
        args.report,
        options,
        ood_datasets=ood_datasets,
        data_dir=args.data_dir or trained.config.data.data_dir,
        sample_steps=args.sample_steps,
        sample_init=args.sample_init or "auto",
        feature_net=feature_net,
        feature_net_info=feature_info,
        log=lambda message: say(f"eval: {message}"),
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


def _defaults(trained: Any) -> dict[str, Any]:
    """The size defaults for this run: EGC runs attack through a double back-propagation, so they get smaller ones."""
    from jemlab.evaluation.defaults import EGC_EVAL_DEFAULTS, EVAL_DEFAULTS

    defaults = dict(EVAL_DEFAULTS)
    if trained.config.objective.name == "egc":
        defaults.update(EGC_EVAL_DEFAULTS)
    return defaults


def _pick(args: argparse.Namespace, defaults: dict[str, Any], name: str) -> Any:
    """The flag's value, or its default when not given."""
    value = getattr(args, name)
    return defaults[name] if value is None else value


def _suite_options(args: argparse.Namespace, trained: Any, seed: int):
    """The flags, with this run's defaults for those not given, as the suite's options."""
    from jemlab.evaluation.defaults import EVAL_DEFAULTS, PARTS
    from jemlab.evaluation.suite_options import SuiteOptions

    defaults = _defaults(trained)

    def pick(name: str) -> Any:
        return _pick(args, defaults, name)

    return SuiteOptions(
        n_test=pick("n_test"),
        n_val=pick("n_val"),
        n_ood=pick("n_ood"),
        batch_size=pick("batch_size"),
        seed=seed,
        parts=tuple(PARTS if args.all else args.parts),
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
        # one sample_fn call for all n: jemlab.generate batches the chains itself, and its JEM starts are distinct
        # within a call only (calls of 250 drew the same buffer images again: ~15% near-copies among 100 per class)
        sample_batch=pick("n_samples") or 1,
        kid_subsets=pick("kid_subsets"),
        kid_subset_size=pick("kid_subset_size"),
    )
