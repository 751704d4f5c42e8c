"""The suite's OOD-detection part: every requested score on the test images and on every OOD set.

The OOD sets are the caller's (e.g. Fashion-MNIST vs MNIST) plus the synthetic ones of
:func:`~jemlab.evaluation.ood_sets.build_ood_sets`; fitted scores (:data:`~jemlab.evaluation.ood_scores.FITTED_SCORES`)
are fitted on the training split and standardised on validation images, never on OOD data.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from jemlab.errors import JemlabError
from jemlab.evaluation.ood_metrics import ood_metrics, plot_score_histogram
from jemlab.evaluation.ood_scores import FITTED_SCORES, SCORE_FUNCTIONS, compute_scores, fit_scores, has_features
from jemlab.evaluation.ood_sets import build_ood_sets
from jemlab.evaluation.suite_context import PartResult, SuiteContext, split_of

__all__ = ["evaluate_ood"]

ScoreFn = Callable[[Any, Tensor], Tensor]


def _ood_sets(ctx: SuiteContext, n_in: int) -> dict[str, Tensor]:
    """The caller's OOD sets (checked against the test image shape, cut to ``n_ood``), then the synthetic ones
    whose names they do not already use."""
    opts = ctx.opts
    sets: dict[str, Tensor] = {}
    for name, xs in (ctx.ood_sets or {}).items():
        xs = torch.as_tensor(xs).float()
        if tuple(xs.shape[1:]) != tuple(ctx.x_test.shape[1:]):
            raise JemlabError(
                f"OOD set {name!r} has image shape {tuple(xs.shape[1:])} but the test "
                "images are "
                f"{tuple(ctx.x_test.shape[1:])}; resize/convert it to the model's input shape"
            )
        sets[name] = xs[: opts.n_ood]
    for name, xs in build_ood_sets(ctx.x_test, n_in, ctx.gen, opts.synthetic_ood).items():
        sets.setdefault(name, xs)
    return sets


def _fitted_score_functions(ctx: SuiteContext, fitted: list[str]) -> dict[str, ScoreFn]:
    """The fitted scores: class means and covariance from the training split (else validation), the summed
    score standardised on validation images (else test images)."""
    opts = ctx.opts
    fit_split = split_of(ctx.splits, "train") or split_of(ctx.splits, "val")
    if fit_split is None:
        raise JemlabError(f"OOD scores {fitted} need a train or val split to fit on; drop them")
    x_fit, y_fit = ctx.load(fit_split, opts.ood_fit_n)
    ref_split = split_of(ctx.splits, "val") or split_of(ctx.splits, "test")
    x_ref, _ = ctx.load(ref_split, opts.n_ood)
    score_fns = fit_scores(
        fitted, ctx.model, x_fit.to(ctx.device), y_fit, x_ref.to(ctx.device), ctx.num_classes, opts.batch_size
    )
    ctx.notes.append(
        f"OOD scores {', '.join(fitted)}: class means and shared covariance of the penultimate features "
        f"fitted on {len(x_fit)} training images; the summed score standardises each part on "
        f"{len(x_ref)} validation images (no OOD data is used)."
    )
    return score_fns


def _score_functions(ctx: SuiteContext) -> tuple[list[str], dict[str, ScoreFn]]:
    """The scores to run (fitted ones dropped, with a note, when the model has no penultimate features) and a
    function for each."""
    score_fns: dict[str, ScoreFn] = dict(SCORE_FUNCTIONS)
    score_names = list(ctx.opts.ood_scores)
    fitted = [name for name in score_names if name in FITTED_SCORES]
    if fitted and not has_features(ctx.model):
        ctx.notes.append(f"OOD scores {', '.join(fitted)} skipped: the model exposes no penultimate features.")
        return [name for name in score_names if name not in fitted], score_fns
    if fitted:
        score_fns.update(_fitted_score_functions(ctx, fitted))
    return score_names, score_fns


def _evaluate_score(
    ctx: SuiteContext, score_name: str, score_fn: ScoreFn, x_in: Tensor, sets: dict[str, Tensor]
) -> tuple[Tensor, dict[str, Any]]:
    """One score on the in-distribution images and on every OOD set, with its histogram figure.

    Returns:
        ``(in-distribution scores, {set name: OOD metrics})``.
    """
    batch_size, device = ctx.opts.batch_size, ctx.device
    s_in = compute_scores(score_fn, ctx.model, x_in.to(device), batch_size)
    per_set: dict[str, Any] = {}
    outs: dict[str, Tensor] = {}
    for set_name, xs in sets.items():
        s_out = compute_scores(score_fn, ctx.model, xs.to(device), batch_size)
        outs[set_name] = s_out
        per_set[set_name] = ood_metrics(s_in, s_out)
    ctx.figures.append(
        (
            f"OOD score histogram: {score_name}",
            plot_score_histogram(
                s_in,
                outs,
                ctx.fig_dir / f"ood_hist_{score_name.replace('+', '_plus_')}.png",
                title=f"OOD score: {score_name}",
                score_name=score_name,
            ),
        )
    )
    return s_in, per_set


def evaluate_ood(ctx: SuiteContext) -> PartResult:
    """AUROC, AUPR-In/Out and FPR95 of every score on every OOD set, plus a score × set AUROC table."""
    opts = ctx.opts
    n_in = min(opts.n_ood, len(ctx.x_test))
    x_in = ctx.x_test[:n_in]
    sets = _ood_sets(ctx, n_in)
    score_names, score_fns = _score_functions(ctx)
    results: dict[str, Any] = {}
    scores_in: dict[str, Tensor] = {}
    for score_name in score_names:
        scores_in[score_name], results[score_name] = _evaluate_score(
            ctx, score_name, score_fns[score_name], x_in, sets
        )
    if "log_px" in scores_in and "energy" in scores_in:
        same = bool(torch.allclose(scores_in["log_px"], scores_in["energy"], rtol=1e-4, atol=1e-4))
        results["energy_equals_log_px"] = same
        if not same:
            ctx.notes.append(
                "model.energy differs from -logsumexp(logits) (separate energy head): the "
                "'energy' and 'log_px' OOD scores are different functions."
            )
    results["auroc_table"] = {s: {k: v["auroc"] for k, v in results[s].items()} for s in score_names}
    ctx.notes.append(
        f"OOD: {n_in} in-distribution test images vs up to {opts.n_ood} per OOD set; "
        "AUROC via "
        "Mann-Whitney (ties = 1/2); FPR95 = FPR at 95% TPR; synthetic sets: "
        f"{', '.join(opts.synthetic_ood) or 'none'}."
    )
    return results, f"ood: {len(sets)} sets x {len(score_names)} scores"
