"""``run_suite``: the whole evaluation protocol for one model, writing metrics.json +
report.html/.md.

Parts (each optional): classification (accuracy, NLL, per-class, confusion matrix), calibration
(ECE/MCE/Brier before and after temperature scaling fitted on the validation split), OOD detection
(four scores × user OOD sets + synthetic ones), adversarial robustness (PGD L∞/L2 curves, optionally
against the JEM SGLD-refinement defence with EOT) and sample quality (mode coverage,
class-conditional accuracy, Fréchet distance and KID in a domain feature net's feature space).

The defaults are sized for a small model (MNIST-scale CNN/MLP) to finish in a few minutes on 2 CPU
cores; :meth:`SuiteOptions.quick` is a smoke-test preset and everything scales linearly in the
``n_*`` sizes.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from jemlab.errors import JemlabError
from jemlab.evaluation.report import write_report
from jemlab.evaluation.suite_classifier import evaluate_calibration, evaluate_classification, evaluate_robustness
from jemlab.evaluation.suite_context import (
    PartResult,
    SuiteContext,
    batched_logits,
    has_classifier,
    load_subset,
    model_device,
    split_of,
)
from jemlab.evaluation.suite_ood import evaluate_ood
from jemlab.evaluation.suite_options import SampleFn, SuiteOptions
from jemlab.evaluation.suite_samples import evaluate_samples
from jemlab.quality import metrics as sq

__all__ = ["CLASSIFIER_PARTS", "PARTS", "SampleFn", "SuiteOptions", "run_suite"]

#: The parts that read the model's classifier (logits, energy); a model without one (``has_classifier`` False: the
#: plain ε-prediction control of EGC) skips them with a note and can be evaluated on its samples only.
CLASSIFIER_PARTS: tuple[str, ...] = ("classification", "calibration", "ood", "robustness")

#: The evaluation parts, name -> ``part(context) -> (metrics, log line)`` or None when skipped. They run in this
#: order whatever the order of ``SuiteOptions.parts``: all draw from one seeded generator, so the order is part
#: of the protocol.
PARTS: dict[str, Callable[[SuiteContext], PartResult]] = {
    "classification": evaluate_classification,
    "calibration": evaluate_calibration,
    "ood": evaluate_ood,
    "robustness": evaluate_robustness,
    "samples": evaluate_samples,
}


def run_suite(
    model: Any,
    splits: Any,
    out_dir: str | Path,
    *,
    ood_sets: Mapping[str, Tensor] | None = None,
    sample_fn: SampleFn | None = None,
    feature_net: nn.Module | None = None,
    options: SuiteOptions | None = None,
    defend_fn: Callable[[Tensor], Tensor] | None = None,
    log: Callable[[str], None] | None = None,
    finalize: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Run the evaluation protocol and write ``metrics.json``, ``report.html``, ``report.md`` and
    PNGs.

    Args:
        model: ``nn.Module`` with ``logits(x) -> (N, C)`` and ``energy(x) -> (N,)``; put in eval
            mode during the run and restored afterwards. A model whose ``has_classifier`` is False (and
            which then has ``num_classes``) is evaluated on its samples only: the parts in
            :data:`CLASSIFIER_PARTS` and the samples' statistics under the model are skipped with a note.
        splits: Object (or mapping) with ``test`` and optionally ``val`` datasets exposing ``len()``
            and ``batch(index_tensor) -> (x float in [-1, 1], y int64)``.
        out_dir: Output directory.
        ood_sets: Named OOD image tensors (N, C, H, W) in [-1, 1] (e.g. Fashion-MNIST vs MNIST);
            synthetic sets from ``options.synthetic_ood`` are added.
        sample_fn: ``sample_fn(n, labels | None, generator) -> images``; samples part skipped when
            None.
        feature_net: Module with ``features(x)`` (and ``forward`` logits) for Fréchet distance/KID
            and an independent classifier of the samples; e.g. a
            :class:`~jemlab.quality.feature_net.FeatureNet`.
        options: Sizes and switches (default :class:`SuiteOptions`).
        defend_fn: Differentiable refinement for the JEM defence; default SGLD on ``model.energy``
            with the ``options.defence_*`` settings.
        log: Progress callback (one line per part).
        finalize: Called with the metrics dict just before the files are written, to add entries
            (e.g. protocol details known only to the caller); it may modify the dict in place.

    Returns:
        The nested metrics dict also written to ``out_dir/metrics.json``.
    """
    # ---- options, output folder, random source, eval mode
    opts = options or SuiteOptions()
    say = log or (lambda _msg: None)
    out = Path(out_dir)
    fig_dir = out / "figures"
    fig_dir.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(opts.seed)
    device = model_device(model)
    was_training = bool(getattr(model, "training", False))
    if hasattr(model, "eval"):
        model.eval()
    t_start = time.monotonic()
    metrics: dict[str, Any] = {}
    timing: dict[str, float] = {}
    figures: list[tuple[str, Path]] = []
    notes = _opening_notes(opts)

    try:
        # ---- the test subset and its logits, shared by every part
        x_test, y_test, logits_test, metrics["setup"] = _load_test(model, splits, opts, gen, device)
        ctx = SuiteContext(
            model=model,
            splits=splits,
            opts=opts,
            gen=gen,
            device=device,
            out=out,
            fig_dir=fig_dir,
            x_test=x_test,
            y_test=y_test,
            logits_test=logits_test,
            num_classes=int(metrics["setup"]["num_classes"]),
            ood_sets=ood_sets,
            sample_fn=sample_fn,
            feature_net=feature_net,
            defend_fn=defend_fn,
            figures=figures,
            notes=notes,
        )
        # ---- the parts, in table order; a skipped part records no time
        for name, part in PARTS.items():
            if name not in opts.parts:
                continue
            if name in CLASSIFIER_PARTS and not has_classifier(model):
                notes.append(f"{name.capitalize()} skipped: the model has no classifier (its samples only).")
                continue
            t0 = time.monotonic()
            result = part(ctx)
            if result is None:
                continue
            metrics[name], summary = result
            timing[name] = time.monotonic() - t0
            say(summary)
    finally:
        if was_training and hasattr(model, "train"):
            model.train()

    # ---- closing notes, timing, the caller's additions, then the files
    notes.extend(_closing_notes(opts))
    timing["total"] = time.monotonic() - t_start
    metrics["timing_s"] = {k: round(v, 3) for k, v in timing.items()}
    if finalize is not None:
        finalize(metrics)
    write_report(out, metrics, figures, notes, title=f"jemlab evaluation: {opts.dataset_name or 'model'}")
    return metrics


def _opening_notes(opts: SuiteOptions) -> list[str]:
    """The first protocol notes: dataset, seed, pixel range and the OOD score conventions."""
    return [
        f"dataset: {opts.dataset_name or 'unspecified'}; seed {opts.seed}; images in [-1, 1].",
        "Energy E(x) = model.energy(x); log p(x) score = logsumexp of the logits (= -E(x) for LogSumExp "
        "energies); all OOD scores are higher = more in-distribution; in-distribution is the positive class.",
    ]


def _load_test(
    model: Any, splits: Any, opts: SuiteOptions, gen: torch.Generator, device: torch.device
) -> tuple[Tensor, Tensor, Tensor, dict[str, Any]]:
    """The test subset, its logits and the ``setup`` entries of the metrics.

    Returns:
        ``(x_test, y_test, logits_test, setup)``.
    """
    test = split_of(splits, "test")
    if test is None:
        raise JemlabError("splits has no 'test' dataset; pass splits with .test (and ideally .val)")
    x_test, y_test = load_subset(test, opts.n_test, gen, opts.batch_size)
    if has_classifier(model):
        logits_test = batched_logits(model, x_test, opts.batch_size, device)
        num_classes = int(logits_test.shape[1])
    else:  # no logits to read: an empty (N, 0) tensor, and the class count from the model
        logits_test, num_classes = torch.zeros(len(x_test), 0), int(model.num_classes)
    setup = {
        "n_test": len(x_test),
        "test_split_size": len(test),
        "image_shape": list(x_test.shape[1:]),
        "num_classes": num_classes,
        "options": opts.to_dict(),
    }
    return x_test, y_test, logits_test, setup


def _closing_notes(opts: SuiteOptions) -> list[str]:
    """The last protocol notes: why there is no Inception FID, then the caller's extra notes."""
    available, reason = sq.inception_available()
    return ([] if available else [reason + "."]) + list(opts.extra_notes)
