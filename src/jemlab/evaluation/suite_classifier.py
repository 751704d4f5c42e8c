"""The suite's parts that evaluate the classifier p(y|x): accuracy, calibration and adversarial robustness.

Each part takes the :class:`~jemlab.evaluation.suite_context.SuiteContext` and returns its metrics and a log
line (see :data:`~jemlab.evaluation.suite_context.PartResult`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
from torch import Tensor

from jemlab.evaluation import calibration as cal
from jemlab.evaluation import classification as cls
from jemlab.evaluation import robustness as rob
from jemlab.evaluation.suite_context import PartResult, SuiteContext, on_device, split_of

__all__ = ["evaluate_calibration", "evaluate_classification", "evaluate_robustness"]


# ---------------------------------------------------------------- classification


def evaluate_classification(ctx: SuiteContext) -> PartResult:
    """Accuracy, NLL, per-class accuracy and the confusion matrix of the test logits."""
    metrics = cls.classification_metrics(ctx.logits_test, ctx.y_test)
    ctx.figures.append(
        (
            "Confusion matrix (test, row-normalised)",
            cls.plot_confusion_matrix(
                np.asarray(metrics["confusion_matrix"]),
                ctx.fig_dir / "confusion_matrix.png",
            ),
        )
    )
    return metrics, f"classification: accuracy {metrics['accuracy']:.4f}"


# ---------------------------------------------------------------- calibration


def _temperature_scaling(ctx: SuiteContext) -> tuple[float, dict[str, Any], Tensor, Tensor]:
    """Fit the temperature on the validation split, or on the first half of the test subset when there is none.

    Returns:
        ``(temperature, its report entries, logits, labels)``: the last two are what the calibration is
        measured on (the whole test subset, or its second half when the first half fitted the temperature).
    """
    opts = ctx.opts
    logits_eval, y_eval = ctx.logits_test, ctx.y_test
    val = split_of(ctx.splits, "val")
    if val is not None and len(val) > 0 and opts.n_val > 0:
        x_val, y_val = ctx.load(val, opts.n_val)
        logits_val = ctx.logits(x_val)
        fit_src = f"validation split ({len(x_val)} examples)"
    else:
        half = len(ctx.x_test) // 2
        logits_val, y_val = ctx.logits_test[:half], ctx.y_test[:half]
        logits_eval, y_eval = ctx.logits_test[half:], ctx.y_test[half:]
        fit_src = f"first half of the test subset ({half} examples; no validation split)"
        ctx.notes.append(
            "Temperature fitted on half of the test subset because no validation split was "
            "given; calibration metrics use the other half."
        )
    temperature = cal.fit_temperature(logits_val, y_val)
    at_bound = abs(math.log(temperature)) > 4.99
    if at_bound:
        ctx.notes.append(
            f"Temperature scaling hit its search bound (T = {temperature:.3g}): the fitted "
            "NLL keeps falling as T moves further, e.g. because every validation example is "
            "classified correctly; the scaled calibration numbers are not meaningful."
        )
    entries = dict(temperature=temperature, temperature_at_search_bound=at_bound, temperature_fitted_on=fit_src)
    return temperature, entries, logits_eval, y_eval


def evaluate_calibration(ctx: SuiteContext) -> PartResult:
    """ECE/MCE/Brier/NLL before and (optionally) after temperature scaling (Guo et al., 2017), with a
    reliability diagram."""
    opts = ctx.opts
    logits_eval, y_eval = ctx.logits_test, ctx.y_test
    calibration: dict[str, Any] = {}
    temperature = None
    if opts.temperature_scaling:
        temperature, entries, logits_eval, y_eval = _temperature_scaling(ctx)
        calibration.update(entries)
    raw = cal.calibration_metrics(logits_eval, y_eval, opts.calibration_bins)
    calibration["raw"] = {k: v for k, v in raw.items() if k != "reliability"}

    def bins(logits: Tensor) -> Any:
        return cal.reliability_data(*cal.confidence_and_correctness(logits, y_eval), opts.calibration_bins)

    curves = {"raw": bins(logits_eval)}
    summary = f"calibration: ECE {raw['ece']:.4f}"
    if temperature is not None:
        logits_scaled = cal.apply_temperature(logits_eval, temperature)
        scaled = cal.calibration_metrics(logits_scaled, y_eval, opts.calibration_bins)
        calibration["temperature_scaled"] = {k: v for k, v in scaled.items() if k != "reliability"}
        curves[f"T = {temperature:.3g}"] = bins(logits_scaled)
        summary += f" -> {scaled['ece']:.4f} (T = {temperature:.3f})"
    calibration["reliability_raw"] = raw["reliability"]
    title = "Reliability diagram (raw" + (" and temperature-scaled)" if temperature is not None else ")")
    ctx.figures.append((title, cal.plot_reliability_diagram(curves, ctx.fig_dir / "reliability.png")))
    ctx.notes.append(
        f"ECE: {opts.calibration_bins} equal-width confidence bins (JEM++ protocol); "
        "Brier = mean sum_k (p_k - 1[y=k])^2 (range 0-2)"
        + ("." if temperature is not None else "; no temperature scaling.")
    )
    return calibration, summary


# ---------------------------------------------------------------- robustness


def _defended_classifier(ctx: SuiteContext) -> Callable[[Tensor], Tensor] | None:
    """Logits after the JEM SGLD-refinement defence (the caller's ``defend_fn`` or SGLD on ``model.energy``), or
    None when ``defence_steps`` is 0."""
    opts = ctx.opts
    if opts.defence_steps <= 0:
        return None
    defend = ctx.defend_fn or rob.langevin_defence(
        ctx.model.energy,
        steps=opts.defence_steps,
        step_size=opts.defence_step_size,
        noise_std=opts.defence_noise,
        init_noise_std=opts.defence_init_noise,
        generator=None,
    )
    return on_device(rob.defended_logits_fn(ctx.model.logits, defend, opts.defence_chains), ctx.device)


def _robustness_curves(
    ctx: SuiteContext,
    plain: Callable[[Tensor], Tensor],
    defended: Callable[[Tensor], Tensor] | None,
    x: Tensor,
    y: Tensor,
    norm: str,
) -> dict[str, Any]:
    """Robust accuracy vs eps of the plain classifier and, when given, of the defended one (on its fewer images)."""
    opts = ctx.opts
    eps_list = opts.pgd_eps_linf if norm == "linf" else opts.pgd_eps_l2
    attack_kw = dict(
        steps=opts.pgd_steps,
        restarts=opts.pgd_restarts,
        loss=opts.pgd_loss,
        generator=ctx.gen,
        batch_size=opts.batch_size,
    )
    curves = {"undefended": rob.robustness_curve(plain, x, y, eps_list, norm=norm, **attack_kw)}
    if defended is not None and opts.defence_n < len(x):
        # The defence is attacked on fewer images; compare it with the plain classifier on those.
        curves[f"undefended, same {opts.defence_n} images"] = rob.robustness_curve(
            plain, x[: opts.defence_n], y[: opts.defence_n], eps_list, norm=norm, **attack_kw
        )
    if defended is not None:
        curves[f"SGLD defence K={opts.defence_steps}"] = rob.robustness_curve(
            defended,
            x[: opts.defence_n],
            y[: opts.defence_n],
            eps_list,
            norm=norm,
            eot_samples=opts.defence_eot,
            **attack_kw,
        )
    return curves


def evaluate_robustness(ctx: SuiteContext) -> PartResult:
    """PGD robust-accuracy curves per norm, optionally against the JEM defence; skipped when ``pgd_n`` is 0."""
    opts = ctx.opts
    if opts.pgd_n <= 0:
        return None
    x_r, y_r = ctx.x_test[: opts.pgd_n], ctx.y_test[: opts.pgd_n]
    plain = on_device(ctx.model.logits, ctx.device)
    defended = _defended_classifier(ctx)
    rob_metrics: dict[str, Any] = {}
    for norm in opts.pgd_norms:
        curves = _robustness_curves(ctx, plain, defended, x_r, y_r, norm)
        rob_metrics[norm] = curves
        ctx.figures.append(
            (
                f"Robust accuracy vs eps ({norm})",
                rob.plot_robustness_curves(
                    curves,
                    ctx.fig_dir / f"robustness_{norm}.png",
                    title=f"PGD-{opts.pgd_steps} {norm}, {rob.LOSS_NAMES[opts.pgd_loss]} loss",
                ),
            )
        )
    ctx.notes.append(
        f"PGD on the {rob.LOSS_NAMES[opts.pgd_loss]}: {len(x_r)} test "
        f"images, {opts.pgd_steps} steps, step 2.5*eps/steps, "
        f"{opts.pgd_restarts} random restart(s); eps in [0, 1] pixel units (x2 in our "
        "[-1, 1] "
        "range), inputs clipped to [-1, 1]."
    )
    if defended is not None:
        ctx.notes.append(
            f"JEM defence: {opts.defence_steps} SGLD steps (alpha {opts.defence_step_size}, sigma "
            f"{opts.defence_noise}, start noise {opts.defence_init_noise}), {opts.defence_chains} "
            "chain(s) averaged, attacked by differentiating through the refinement with "
            f"{opts.defence_eot} EOT sample(s) per step on {opts.defence_n} images."
        )
    return rob_metrics, "robustness: done"
