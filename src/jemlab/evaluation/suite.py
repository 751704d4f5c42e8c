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

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from jemlab.errors import JemlabError
from jemlab.evaluation import calibration as cal
from jemlab.evaluation import classification as cls
from jemlab.evaluation import robustness as rob
from jemlab.evaluation import sample_quality as sq
from jemlab.evaluation.ood_metrics import ood_metrics, plot_score_histogram
from jemlab.evaluation.ood_scores import FITTED_SCORES, SCORE_FUNCTIONS, compute_scores, fit_scores, has_features
from jemlab.evaluation.ood_sets import build_ood_sets
from jemlab.evaluation.report import write_report

__all__ = ["SampleFn", "SuiteOptions", "run_suite"]

#: ``sample_fn(n, labels or None, generator) -> (n, C, H, W)`` images in [-1, 1].
SampleFn = Callable[[int, Tensor | None, torch.Generator], Tensor]

_PARTS = ("classification", "calibration", "ood", "robustness", "samples")


@dataclass
class SuiteOptions:
    """Sizes and switches of the evaluation suite.

    Attributes:
        n_test: Test examples used for classification/calibration (and the pool for the other
            parts).
        n_val: Validation examples used to fit the temperature.
        n_ood: Examples per OOD set (and in-distribution examples scored).
        batch_size: Forward batch size.
        seed: Seed for subsets, noise sets, attack starts and sampling.
        parts: Which parts to run (subset of classification, calibration, ood, robustness, samples).
        calibration_bins: Equal-width ECE bins (20 as in JEM++).
        temperature_scaling: Also fit a temperature on the validation split and report the scaled
            calibration (Guo et al., 2017); False reports the raw calibration only.
        ood_scores: Scores from :data:`jemlab.evaluation.ood_scores.SCORE_FUNCTIONS`.
        synthetic_ood: Synthetic OOD sets to add (see :func:`jemlab.evaluation.ood_sets.build_ood_sets`).
        pgd_n: Test examples attacked.
        pgd_norms: ``linf`` and/or ``l2``.
        pgd_eps_linf: L∞ budgets in [0, 1] pixel units (converted ×2 internally).
        pgd_eps_l2: L2 budgets in [0, 1] pixel units.
        pgd_steps: PGD steps.
        pgd_restarts: PGD random restarts.
        pgd_loss: ``"ce"`` (cross-entropy, as the JEM paper attacks) or ``"margin"`` (max_{j≠y} f_j − f_y,
            Carlini & Wagner, 2017), which keeps a useful gradient where a saturated softmax makes the
            cross-entropy's vanish (a check for gradient masking).
        defence_steps: K SGLD refinement steps for the JEM defence (0 = do not evaluate the
            defence).
        defence_n: Examples attacked through the defence (it costs K× more per step).
        defence_chains: Refinement chains averaged per input (JEM uses 5).
        defence_eot: Extra EOT gradient samples per PGD step.
        defence_step_size: SGLD step α of the refinement.
        defence_noise: SGLD noise σ of the refinement.
        defence_init_noise: Gaussian noise added before refining (JEM: 0.03).
        n_samples: Generated samples (unconditional, and again class-conditional).
        sample_batch: Samples per ``sample_fn`` call.
        conditional_samples: Also ask ``sample_fn`` for class-conditional samples.
        kid_subsets: KID subsets.
        kid_subset_size: KID subset size (capped by the set sizes).
        dataset_name: Recorded in the report.
    """

    n_test: int = 2000
    n_val: int = 1000
    n_ood: int = 1000
    batch_size: int = 250
    seed: int = 0
    parts: tuple[str, ...] = _PARTS
    calibration_bins: int = cal.DEFAULT_N_BINS
    temperature_scaling: bool = True
    ood_scores: tuple[str, ...] = (
        "log_px",
        "max_softmax",
        "energy",
        "grad_norm",
        "mahalanobis",
        "grad_norm+mahalanobis",
    )
    ood_fit_n: int = 10000
    synthetic_ood: tuple[str, ...] = ("uniform", "gaussian", "interp", "vflip", "hflip", "invert")
    pgd_n: int = 200
    pgd_norms: tuple[str, ...] = ("linf", "l2")
    pgd_eps_linf: tuple[float, ...] = (0.0, 2 / 255, 4 / 255, 8 / 255, 16 / 255, 0.1)
    pgd_eps_l2: tuple[float, ...] = (0.0, 0.25, 0.5, 1.0)
    pgd_steps: int = 10
    pgd_restarts: int = 1
    pgd_loss: str = "ce"
    defence_steps: int = 0
    defence_n: int = 50
    defence_chains: int = 1
    defence_eot: int = 1
    defence_step_size: float = 1.0
    defence_noise: float = 0.01
    defence_init_noise: float = 0.03
    n_samples: int = 500
    sample_batch: int = 100
    conditional_samples: bool = True
    kid_subsets: int = 10
    kid_subset_size: int = 500
    dataset_name: str = ""
    extra_notes: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        unknown = set(self.parts) - set(_PARTS)
        if unknown:
            raise JemlabError(f"unknown suite parts {sorted(unknown)}; choose from {list(_PARTS)}")
        known = {*SCORE_FUNCTIONS, *FITTED_SCORES}
        bad = set(self.ood_scores) - known
        if bad:
            raise JemlabError(f"unknown OOD scores {sorted(bad)}; choose from {sorted(known)}")
        if self.pgd_loss not in rob.LOSS_NAMES:
            raise JemlabError(f"pgd_loss must be one of {', '.join(rob.LOSS_NAMES)}, got {self.pgd_loss!r}")
        if set(self.pgd_norms) - {"linf", "l2"}:
            raise JemlabError(f"pgd_norms must be 'linf' and/or 'l2', got {list(self.pgd_norms)}")
        for name in ("n_test", "n_ood", "batch_size", "pgd_steps", "pgd_restarts", "sample_batch", "ood_fit_n"):
            if int(getattr(self, name)) < 1:
                raise JemlabError(f"SuiteOptions.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("n_val", "pgd_n", "n_samples", "defence_steps", "defence_n"):
            if int(getattr(self, name)) < 0:
                raise JemlabError(f"SuiteOptions.{name} must be >= 0, got {getattr(self, name)}")
        if any(e < 0 for e in (*self.pgd_eps_linf, *self.pgd_eps_l2)):
            raise JemlabError("PGD eps values must be >= 0 ([0, 1] pixel units)")

    @classmethod
    def quick(cls, **overrides: Any) -> SuiteOptions:
        """Tiny sizes for smoke tests (seconds on a CPU for a small model)."""
        base: dict[str, Any] = dict(
            n_test=200,
            n_val=200,
            n_ood=100,
            pgd_n=32,
            pgd_steps=5,
            pgd_eps_linf=(0.0, 8 / 255, 0.1),
            pgd_eps_l2=(0.0, 0.5),
            defence_n=8,
            n_samples=64,
            sample_batch=64,
            kid_subsets=3,
            kid_subset_size=50,
        )
        base.update(overrides)
        return cls(**base)

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form."""
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}


def _split(splits: Any, name: str) -> Any:
    if isinstance(splits, Mapping):
        return splits.get(name)
    return getattr(splits, name, None)


def _load(dataset: Any, n: int, gen: torch.Generator, batch_size: int) -> tuple[Tensor, Tensor]:
    total = len(dataset)
    if total == 0:
        raise JemlabError("evaluation split is empty; check the dataset files")
    idx = torch.randperm(total, generator=gen)[: min(n, total)].sort().values
    xs, ys = [], []
    for xb, yb in cls.iterate_dataset(dataset, idx, batch_size):
        xs.append(torch.as_tensor(xb).float())
        ys.append(torch.as_tensor(yb).long())
    return torch.cat(xs), torch.cat(ys)


def _device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _logits(model: Any, x: Tensor, batch_size: int, device: torch.device) -> Tensor:
    batches = (x[i : i + batch_size] for i in range(0, len(x), batch_size))
    logits, _ = cls.collect_logits(model.logits, batches, device=device)
    return logits


def _on(fn: Callable[[Tensor], Tensor], device: torch.device) -> Callable[[Tensor], Tensor]:
    return lambda x: fn(x.to(device)).cpu()


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
            mode during the run and restored afterwards.
        splits: Object (or mapping) with ``test`` and optionally ``val`` datasets exposing ``len()``
            and ``batch(index_tensor) -> (x float in [-1, 1], y int64)``.
        out_dir: Output directory.
        ood_sets: Named OOD image tensors (N, C, H, W) in [-1, 1] (e.g. Fashion-MNIST vs MNIST);
            synthetic sets from ``options.synthetic_ood`` are added.
        sample_fn: ``sample_fn(n, labels | None, generator) -> images``; samples part skipped when
            None.
        feature_net: Module with ``features(x)`` (and ``forward`` logits) for Fréchet distance/KID
            and an independent classifier of the samples; e.g. a
            :class:`~jemlab.evaluation.feature_net.FeatureNet`.
        options: Sizes and switches (default :class:`SuiteOptions`).
        defend_fn: Differentiable refinement for the JEM defence; default SGLD on ``model.energy``
            with the ``options.defence_*`` settings.
        log: Progress callback (one line per part).
        finalize: Called with the metrics dict just before the files are written, to add entries
            (e.g. protocol details known only to the caller); it may modify the dict in place.

    Returns:
        The nested metrics dict also written to ``out_dir/metrics.json``.
    """
    opts = options or SuiteOptions()
    say = log or (lambda _msg: None)
    out = Path(out_dir)
    fig_dir = out / "figures"
    fig_dir.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(opts.seed)
    device = _device(model)
    was_training = bool(getattr(model, "training", False))
    if hasattr(model, "eval"):
        model.eval()
    t_start = time.monotonic()

    metrics: dict[str, Any] = {}
    figures: list[tuple[str, Path]] = []
    timing: dict[str, float] = {}
    notes: list[str] = [
        f"dataset: {opts.dataset_name or 'unspecified'}; seed {opts.seed}; images in [-1, 1].",
        "Energy E(x) = model.energy(x); log p(x) score = logsumexp of the logits (= -E(x) for LogSumExp "
        "energies); all OOD scores are higher = more in-distribution; in-distribution is the positive class.",
    ]

    try:
        test = _split(splits, "test")
        if test is None:
            raise JemlabError("splits has no 'test' dataset; pass splits with .test (and ideally .val)")
        x_test, y_test = _load(test, opts.n_test, gen, opts.batch_size)
        logits_test = _logits(model, x_test, opts.batch_size, device)
        num_classes = int(logits_test.shape[1])
        metrics["setup"] = {
            "n_test": len(x_test),
            "test_split_size": len(test),
            "image_shape": list(x_test.shape[1:]),
            "num_classes": num_classes,
            "options": opts.to_dict(),
        }

        # ---------------------------------------------------------------- classification
        if "classification" in opts.parts:
            t0 = time.monotonic()
            metrics["classification"] = cls.classification_metrics(logits_test, y_test)
            figures.append(
                (
                    "Confusion matrix (test, row-normalised)",
                    cls.plot_confusion_matrix(
                        np.asarray(metrics["classification"]["confusion_matrix"]),
                        fig_dir / "confusion_matrix.png",
                    ),
                )
            )
            timing["classification"] = time.monotonic() - t0
            say(f"classification: accuracy {metrics['classification']['accuracy']:.4f}")

        # ---------------------------------------------------------------- calibration
        if "calibration" in opts.parts:
            t0 = time.monotonic()
            logits_eval, y_eval = logits_test, y_test
            calibration: dict[str, Any] = {}
            temperature = None
            if opts.temperature_scaling:
                val = _split(splits, "val")
                if val is not None and len(val) > 0 and opts.n_val > 0:
                    x_val, y_val = _load(val, opts.n_val, gen, opts.batch_size)
                    logits_val = _logits(model, x_val, opts.batch_size, device)
                    fit_src = f"validation split ({len(x_val)} examples)"
                else:
                    half = len(x_test) // 2
                    logits_val, y_val = logits_test[:half], y_test[:half]
                    logits_eval, y_eval = logits_test[half:], y_test[half:]
                    fit_src = f"first half of the test subset ({half} examples; no validation split)"
                    notes.append(
                        "Temperature fitted on half of the test subset because no validation split was "
                        "given; calibration metrics use the other half."
                    )
                temperature = cal.fit_temperature(logits_val, y_val)
                at_bound = abs(math.log(temperature)) > 4.99
                if at_bound:
                    notes.append(
                        f"Temperature scaling hit its search bound (T = {temperature:.3g}): the fitted "
                        "NLL keeps falling as T moves further, e.g. because every validation example is "
                        "classified correctly; the scaled calibration numbers are not meaningful."
                    )
                calibration.update(
                    temperature=temperature, temperature_at_search_bound=at_bound, temperature_fitted_on=fit_src
                )
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
            metrics["calibration"] = calibration
            title = "Reliability diagram (raw" + (" and temperature-scaled)" if temperature is not None else ")")
            figures.append((title, cal.plot_reliability_diagram(curves, fig_dir / "reliability.png")))
            notes.append(
                f"ECE: {opts.calibration_bins} equal-width confidence bins (JEM++ protocol); "
                "Brier = mean sum_k (p_k - 1[y=k])^2 (range 0-2)"
                + ("." if temperature is not None else "; no temperature scaling.")
            )
            timing["calibration"] = time.monotonic() - t0
            say(summary)

        # ---------------------------------------------------------------- OOD
        if "ood" in opts.parts:
            t0 = time.monotonic()
            n_in = min(opts.n_ood, len(x_test))
            x_in = x_test[:n_in]
            sets: dict[str, Tensor] = {}
            for name, xs in (ood_sets or {}).items():
                xs = torch.as_tensor(xs).float()
                if tuple(xs.shape[1:]) != tuple(x_test.shape[1:]):
                    raise JemlabError(
                        f"OOD set {name!r} has image shape {tuple(xs.shape[1:])} but the test "
                        "images are "
                        f"{tuple(x_test.shape[1:])}; resize/convert it to the model's input shape"
                    )
                sets[name] = xs[: opts.n_ood]
            for name, xs in build_ood_sets(x_test, n_in, gen, opts.synthetic_ood).items():
                sets.setdefault(name, xs)
            results: dict[str, Any] = {}
            score_cache: dict[str, Tensor] = {}
            score_fns: dict[str, Any] = dict(SCORE_FUNCTIONS)
            score_names = list(opts.ood_scores)
            fitted = [name for name in score_names if name in FITTED_SCORES]
            if fitted and not has_features(model):
                notes.append(f"OOD scores {', '.join(fitted)} skipped: the model exposes no penultimate features.")
                score_names = [name for name in score_names if name not in fitted]
                fitted = []
            if fitted:
                # Fitted on the training split (class means, covariance) and standardised on validation images.
                fit_split = _split(splits, "train") or _split(splits, "val")
                if fit_split is None:
                    raise JemlabError(f"OOD scores {fitted} need a train or val split to fit on; drop them")
                x_fit, y_fit = _load(fit_split, opts.ood_fit_n, gen, opts.batch_size)
                ref_split = _split(splits, "val") or test
                x_ref, _ = _load(ref_split, opts.n_ood, gen, opts.batch_size)
                score_fns.update(
                    fit_scores(
                        fitted, model, x_fit.to(device), y_fit, x_ref.to(device), num_classes, opts.batch_size
                    )
                )
                notes.append(
                    f"OOD scores {', '.join(fitted)}: class means and shared covariance of the penultimate features "
                    f"fitted on {len(x_fit)} training images; the summed score standardises each part on "
                    f"{len(x_ref)} validation images (no OOD data is used)."
                )
            for score_name in score_names:
                s_in = compute_scores(score_fns[score_name], model, x_in.to(device), opts.batch_size)
                score_cache[score_name] = s_in
                per_set: dict[str, Any] = {}
                outs: dict[str, Tensor] = {}
                for set_name, xs in sets.items():
                    s_out = compute_scores(score_fns[score_name], model, xs.to(device), opts.batch_size)
                    outs[set_name] = s_out
                    per_set[set_name] = ood_metrics(s_in, s_out)
                results[score_name] = per_set
                figures.append(
                    (
                        f"OOD score histogram: {score_name}",
                        plot_score_histogram(
                            s_in,
                            outs,
                            fig_dir / f"ood_hist_{score_name.replace('+', '_plus_')}.png",
                            title=f"OOD score: {score_name}",
                            score_name=score_name,
                        ),
                    )
                )
            if "log_px" in score_cache and "energy" in score_cache:
                same = bool(torch.allclose(score_cache["log_px"], score_cache["energy"], rtol=1e-4, atol=1e-4))
                results["energy_equals_log_px"] = same
                if not same:
                    notes.append(
                        "model.energy differs from -logsumexp(logits) (separate energy head): the "
                        "'energy' and 'log_px' OOD scores are different functions."
                    )
            results["auroc_table"] = {s: {k: v["auroc"] for k, v in results[s].items()} for s in score_names}
            metrics["ood"] = results
            notes.append(
                f"OOD: {n_in} in-distribution test images vs up to {opts.n_ood} per OOD set; "
                "AUROC via "
                "Mann-Whitney (ties = 1/2); FPR95 = FPR at 95% TPR; synthetic sets: "
                f"{', '.join(opts.synthetic_ood) or 'none'}."
            )
            timing["ood"] = time.monotonic() - t0
            say(f"ood: {len(sets)} sets x {len(score_names)} scores")

        # ---------------------------------------------------------------- robustness
        if "robustness" in opts.parts and opts.pgd_n > 0:
            t0 = time.monotonic()
            x_r, y_r = x_test[: opts.pgd_n], y_test[: opts.pgd_n]
            plain = _on(model.logits, device)
            rob_metrics: dict[str, Any] = {}
            defended = None
            if opts.defence_steps > 0:
                defend = defend_fn or rob.langevin_defence(
                    model.energy,
                    steps=opts.defence_steps,
                    step_size=opts.defence_step_size,
                    noise_std=opts.defence_noise,
                    init_noise_std=opts.defence_init_noise,
                    generator=None,
                )
                defended = _on(rob.defended_logits_fn(model.logits, defend, opts.defence_chains), device)
            for norm in opts.pgd_norms:
                eps_list = opts.pgd_eps_linf if norm == "linf" else opts.pgd_eps_l2
                attack_kw = dict(
                    steps=opts.pgd_steps,
                    restarts=opts.pgd_restarts,
                    loss=opts.pgd_loss,
                    generator=gen,
                    batch_size=opts.batch_size,
                )
                curves = {"undefended": rob.robustness_curve(plain, x_r, y_r, eps_list, norm=norm, **attack_kw)}
                if defended is not None and opts.defence_n < len(x_r):
                    # The defence is attacked on fewer images; compare it with the plain classifier on those.
                    curves[f"undefended, same {opts.defence_n} images"] = rob.robustness_curve(
                        plain, x_r[: opts.defence_n], y_r[: opts.defence_n], eps_list, norm=norm, **attack_kw
                    )
                if defended is not None:
                    curves[f"SGLD defence K={opts.defence_steps}"] = rob.robustness_curve(
                        defended,
                        x_r[: opts.defence_n],
                        y_r[: opts.defence_n],
                        eps_list,
                        norm=norm,
                        eot_samples=opts.defence_eot,
                        **attack_kw,
                    )
                rob_metrics[norm] = curves
                figures.append(
                    (
                        f"Robust accuracy vs eps ({norm})",
                        rob.plot_robustness_curves(
                            curves,
                            fig_dir / f"robustness_{norm}.png",
                            title=f"PGD-{opts.pgd_steps} {norm}, {rob.LOSS_NAMES[opts.pgd_loss]} loss",
                        ),
                    )
                )
            metrics["robustness"] = rob_metrics
            notes.append(
                f"PGD on the {rob.LOSS_NAMES[opts.pgd_loss]}: {len(x_r)} test "
                f"images, {opts.pgd_steps} steps, step 2.5*eps/steps, "
                f"{opts.pgd_restarts} random restart(s); eps in [0, 1] pixel units (x2 in our "
                "[-1, 1] "
                "range), inputs clipped to [-1, 1]."
            )
            if defended is not None:
                notes.append(
                    f"JEM defence: {opts.defence_steps} SGLD steps (alpha {opts.defence_step_size}, sigma "
                    f"{opts.defence_noise}, start noise {opts.defence_init_noise}), {opts.defence_chains} "
                    "chain(s) averaged, attacked by differentiating through the refinement with "
                    f"{opts.defence_eot} EOT sample(s) per step on {opts.defence_n} images."
                )
            timing["robustness"] = time.monotonic() - t0
            say("robustness: done")

        # ---------------------------------------------------------------- samples
        if "samples" in opts.parts and sample_fn is not None and opts.n_samples > 0:
            t0 = time.monotonic()
            metrics["samples"] = _evaluate_samples(
                model,
                sample_fn,
                feature_net,
                x_test,
                y_test,
                num_classes,
                opts,
                gen,
                device,
                fig_dir,
                out,
                figures,
                notes,
                splits,
            )
            timing["samples"] = time.monotonic() - t0
            say("samples: done")
        elif "samples" in opts.parts:
            notes.append("Sample quality skipped: no sample_fn given.")
    finally:
        if was_training and hasattr(model, "train"):
            model.train()

    available, reason = sq.inception_available()
    if not available:
        notes.append(reason + ".")
    notes.extend(opts.extra_notes)
    timing["total"] = time.monotonic() - t_start
    metrics["timing_s"] = {k: round(v, 3) for k, v in timing.items()}
    if finalize is not None:
        finalize(metrics)
    write_report(out, metrics, figures, notes, title=f"jemlab evaluation: {opts.dataset_name or 'model'}")
    return metrics


def _generate(
    sample_fn: SampleFn,
    n: int,
    labels: Tensor | None,
    batch: int,
    gen: torch.Generator,
    shape: tuple[int, ...],
) -> Tensor:
    chunks = []
    for i in range(0, n, batch):
        b = min(batch, n - i)
        lb = None if labels is None else labels[i : i + b]
        xs = torch.as_tensor(sample_fn(b, lb, gen)).detach().float().cpu()
        if tuple(xs.shape) != (b, *shape):
            raise JemlabError(
                f"sample_fn returned shape {tuple(xs.shape)}, expected {(b, *shape)}; it must "
                "return "
                "(n, C, H, W) images in [-1, 1]"
            )
        chunks.append(xs)
    return torch.cat(chunks)


def _evaluate_samples(
    model: Any,
    sample_fn: SampleFn,
    feature_net: nn.Module | None,
    x_test: Tensor,
    y_test: Tensor,
    num_classes: int,
    opts: SuiteOptions,
    gen: torch.Generator,
    device: torch.device,
    fig_dir: Path,
    out: Path,
    figures: list[tuple[str, Path]],
    notes: list[str],
    splits: Any,
) -> dict[str, Any]:
    shape = tuple(x_test.shape[1:])
    res: dict[str, Any] = {}
    x_u = _generate(sample_fn, opts.n_samples, None, opts.sample_batch, gen, shape)
    if not torch.isfinite(x_u).all():
        raise JemlabError("sample_fn returned non-finite images; the sampler or model has diverged")
    res["n"] = len(x_u)
    res["fraction_outside_range"] = float(((x_u < -1.0001) | (x_u > 1.0001)).double().mean())
    x_u = x_u.clamp(-1, 1)
    logits_u = _logits(model, x_u, opts.batch_size, device)
    with torch.no_grad():
        e_u = torch.cat(
            [
                model.energy(x_u[i : i + opts.batch_size].to(device)).cpu().reshape(-1)
                for i in range(0, len(x_u), opts.batch_size)
            ]
        )
        e_t = torch.cat(
            [
                model.energy(x_test[i : i + opts.batch_size].to(device)).cpu().reshape(-1)
                for i in range(0, len(x_test), opts.batch_size)
            ]
        )
    res["unconditional"] = {
        "class_histogram_entropy": sq.class_histogram_entropy(logits_u, num_classes),
        "class_histogram": sq.class_histogram(logits_u, num_classes).tolist(),
        "mean_max_softmax": float(torch.softmax(logits_u, 1).max(1).values.mean()),
        "mean_energy_samples": float(e_u.mean()),
        "mean_energy_test": float(e_t.mean()),
    }
    figures.append(
        (
            "Unconditional samples",
            sq.plot_image_grid(x_u[:64], fig_dir / "samples_unconditional.png", title="unconditional samples"),
        )
    )

    x_c: Tensor | None = None
    labels_c: Tensor | None = None
    if opts.conditional_samples:
        labels_c = torch.arange(opts.n_samples) % num_classes
        try:
            x_c = _generate(sample_fn, opts.n_samples, labels_c, opts.sample_batch, gen, shape).clamp(-1, 1)
        except (NotImplementedError, TypeError, ValueError, JemlabError) as exc:
            notes.append(f"Class-conditional samples skipped: sample_fn refused labels ({exc}).")
            x_c, labels_c = None, None
    if x_c is not None and labels_c is not None:
        logits_c = _logits(model, x_c, opts.batch_size, device)
        res["conditional"] = {"model_accuracy": sq.sample_class_accuracy(logits_c, labels_c, num_classes)}
        order = torch.argsort(labels_c[: min(len(labels_c), 10 * num_classes)], stable=True)
        figures.append(
            (
                "Class-conditional samples (one row per class)",
                sq.plot_image_grid(
                    x_c[order],
                    fig_dir / "samples_conditional.png",
                    nrow=max(1, len(order) // num_classes),
                    title="class-conditional samples",
                ),
            )
        )

    # Sample exchange format (SPEC): float32 images in [0, 1], int64 labels for class-conditional samples.
    np.savez_compressed(out / "samples_unconditional.npz", images=((x_u.numpy() + 1.0) / 2.0).astype(np.float32))
    if x_c is not None and labels_c is not None:
        np.savez_compressed(
            out / "samples_conditional.npz",
            images=((x_c.numpy() + 1.0) / 2.0).astype(np.float32),
            labels=labels_c.numpy().astype(np.int64),
        )

    if feature_net is not None:
        fnet = feature_net.to(device).eval() if hasattr(feature_net, "eval") else feature_net

        def feats(x: Tensor) -> np.ndarray:
            return sq.extract_features(_on(fnet.features, device), x, opts.batch_size)

        f_test = feats(x_test)
        f_u = feats(x_u)
        fq: dict[str, Any] = {}
        kid_kw = dict(n_subsets=opts.kid_subsets, subset_size=opts.kid_subset_size, seed=opts.seed)
        n_ref = min(len(f_test), len(f_u))
        fq["frechet_unconditional"] = sq.frechet_distance_from_features(f_test[:n_ref], f_u[:n_ref])
        fq["kid_unconditional"] = dict(
            zip(("mean", "std"), sq.kernel_inception_distance(f_test, f_u, **kid_kw), strict=True)
        )
        with torch.no_grad():
            fn_logits_test = torch.cat(
                [fnet(x_test[i : i + opts.batch_size].to(device)).cpu() for i in range(0, len(x_test), opts.batch_size)]
            )
            fn_logits_u = torch.cat(
                [fnet(x_u[i : i + opts.batch_size].to(device)).cpu() for i in range(0, len(x_u), opts.batch_size)]
            )
        fq["feature_net_test_accuracy"] = cls.accuracy(fn_logits_test, y_test)
        fq["class_histogram_entropy_feature_net"] = sq.class_histogram_entropy(fn_logits_u, num_classes)
        # Noise floor: the same statistics between two real sets of the same size.
        val = _split(splits, "val")
        if val is not None and len(val) >= 2:
            x_v, _ = _load(val, n_ref, gen, opts.batch_size)
            f_v = feats(x_v)
            m = min(len(f_v), n_ref)
            fq["frechet_real_vs_real"] = sq.frechet_distance_from_features(f_test[:m], f_v[:m])
            fq["kid_real_vs_real"] = dict(
                zip(
                    ("mean", "std"),
                    sq.kernel_inception_distance(f_test, f_v, **kid_kw),
                    strict=True,
                )
            )
        if x_c is not None and labels_c is not None:
            f_c = feats(x_c)
            fq["frechet_conditional"] = sq.frechet_distance_from_features(f_test[:n_ref], f_c[:n_ref])
            fq["kid_conditional"] = dict(
                zip(
                    ("mean", "std"),
                    sq.kernel_inception_distance(f_test, f_c, **kid_kw),
                    strict=True,
                )
            )
            with torch.no_grad():
                fn_logits_c = torch.cat(
                    [fnet(x_c[i : i + opts.batch_size].to(device)).cpu() for i in range(0, len(x_c), opts.batch_size)]
                )
            res["conditional"]["feature_net_accuracy"] = sq.sample_class_accuracy(fn_logits_c, labels_c, num_classes)
        meta = getattr(fnet, "meta", {}) or {}
        fq["feature_net_meta"] = dict(meta)
        res["feature_space"] = fq
        notes.append(
            f"Fréchet distance/KID: {n_ref} test images vs {n_ref} samples in the feature net's penultimate "
            f"space (feature net: dataset {meta.get('dataset', '?')}, accuracy {meta.get('accuracy', '?')}); "
            "KID = unbiased MMD^2 with k(x,y)=(x.y/d+1)^3, mean/std over subsets. Not Inception FID: compare "
            "only across models scored with the same feature net and sample count."
        )
    else:
        notes.append("Fréchet distance/KID skipped: no feature net given.")
    if math.isnan(res["fraction_outside_range"]):
        res["fraction_outside_range"] = None
    return res
