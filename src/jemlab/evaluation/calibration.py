"""Calibration: ECE, MCE, Brier score, reliability diagrams and temperature scaling.

JEM (Grathwohl et al., 2020, Sec. 5.2) reports expected calibration error on CIFAR-100: 4.87% for
JEM vs 22.3% for the softmax baseline; JEM++ (Yang & Ji, 2021) uses 20 equal-width confidence bins,
which is our default.

ECE (Naeini et al., 2015; Guo et al., 2017): partition the confidences max_y p(y|x) into equal-width
bins over [0, 1] (bin b is (b/B, (b+1)/B]; confidence exactly 0 goes to the first bin) and take ECE
= sum_b |B_b|/N * |acc(B_b) - conf(B_b)|. MCE is the largest per-bin gap over non-empty bins.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from jemlab.errors import JemlabError
from jemlab.evaluation._common import ArrayLike, check_logits_labels, to_numpy

__all__ = [
    "ReliabilityData",
    "apply_temperature",
    "brier_score",
    "calibration_metrics",
    "confidence_and_correctness",
    "expected_calibration_error",
    "fit_temperature",
    "max_calibration_error",
    "plot_reliability_diagram",
    "reliability_data",
]

DEFAULT_N_BINS = 20


@dataclass(frozen=True)
class ReliabilityData:
    """Per-bin statistics behind a reliability diagram.

    Attributes:
        bin_edges: (B+1,) equal-width edges from 0 to 1.
        bin_confidence: (B,) mean confidence per bin (NaN for empty bins).
        bin_accuracy: (B,) mean correctness per bin (NaN for empty bins).
        bin_count: (B,) number of examples per bin.
    """

    bin_edges: np.ndarray
    bin_confidence: np.ndarray
    bin_accuracy: np.ndarray
    bin_count: np.ndarray

    @property
    def n(self) -> int:
        """Total number of examples."""
        return int(self.bin_count.sum())

    def to_dict(self) -> dict[str, list[float | None]]:
        """JSON-friendly form (NaN becomes None)."""

        def clean(a: np.ndarray) -> list[float | None]:
            return [None if not np.isfinite(v) else float(v) for v in a]

        return {
            "bin_edges": clean(self.bin_edges),
            "bin_confidence": clean(self.bin_confidence),
            "bin_accuracy": clean(self.bin_accuracy),
            "bin_count": [int(c) for c in self.bin_count],
        }


def confidence_and_correctness(logits: ArrayLike, labels: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Confidence max_y softmax(logits) and 0/1 correctness of the argmax prediction.

    Args:
        logits: (N, C) logits.
        labels: (N,) integer labels.

    Returns:
        ``(confidences, correct)``: float64 arrays of shape (N,).
    """
    lg, lb = check_logits_labels(logits, labels)
    probs = torch.softmax(lg, dim=1)
    conf, pred = probs.max(dim=1)
    return conf.numpy(), (pred == lb).double().numpy()


def _check_conf(confidences: ArrayLike, correct: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    c = to_numpy(confidences, np.float64).reshape(-1)
    k = to_numpy(correct, np.float64).reshape(-1)
    if c.shape != k.shape:
        raise JemlabError(f"{c.size} confidences but {k.size} correctness flags; pass matching lengths")
    if c.size == 0:
        raise JemlabError("no examples to evaluate calibration on; pass at least one")
    if not np.all(np.isfinite(c)) or np.any(c < -1e-6) or np.any(c > 1 + 1e-6):
        raise JemlabError("confidences must be finite and in [0, 1]; pass max softmax probabilities")
    return np.clip(c, 0.0, 1.0), k


def reliability_data(confidences: ArrayLike, correct: ArrayLike, n_bins: int = DEFAULT_N_BINS) -> ReliabilityData:
    """Bin confidences into ``n_bins`` equal-width bins and average confidence and accuracy per bin.

    Args:
        confidences: (N,) confidences in [0, 1] (max softmax probability).
        correct: (N,) 0/1 correctness (bool, int or float).
        n_bins: Number of equal-width bins over [0, 1] (JEM++ uses 20).

    Returns:
        A :class:`ReliabilityData`.
    """
    if n_bins < 1:
        raise JemlabError(f"n_bins must be >= 1, got {n_bins}")
    c, k = _check_conf(confidences, correct)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    # Bin b is (edges[b], edges[b+1]]; a confidence of exactly 0 joins bin 0.
    idx = np.clip(np.searchsorted(edges, c, side="left") - 1, 0, n_bins - 1)
    count = np.bincount(idx, minlength=n_bins).astype(np.int64)
    sum_c = np.bincount(idx, weights=c, minlength=n_bins)
    sum_k = np.bincount(idx, weights=k, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_c = np.where(count > 0, sum_c / np.maximum(count, 1), np.nan)
        mean_k = np.where(count > 0, sum_k / np.maximum(count, 1), np.nan)
    return ReliabilityData(edges, mean_c, mean_k, count)


def expected_calibration_error(confidences: ArrayLike, correct: ArrayLike, n_bins: int = DEFAULT_N_BINS) -> float:
    """Expected calibration error, sum_b |B_b|/N * |acc(B_b) - conf(B_b)|.

    Args:
        confidences: (N,) confidences in [0, 1].
        correct: (N,) 0/1 correctness.
        n_bins: Number of equal-width bins (default 20, as in JEM++).

    Returns:
        ECE in [0, 1] (multiply by 100 for the percentages quoted in papers).
    """
    rd = reliability_data(confidences, correct, n_bins)
    mask = rd.bin_count > 0
    gaps = np.abs(rd.bin_accuracy[mask] - rd.bin_confidence[mask])
    return float(np.sum(rd.bin_count[mask] / rd.n * gaps))


def max_calibration_error(confidences: ArrayLike, correct: ArrayLike, n_bins: int = DEFAULT_N_BINS) -> float:
    """Maximum calibration error: the largest |acc - conf| over non-empty bins.

    Args:
        confidences: (N,) confidences in [0, 1].
        correct: (N,) 0/1 correctness.
        n_bins: Number of equal-width bins.

    Returns:
        MCE in [0, 1].
    """
    rd = reliability_data(confidences, correct, n_bins)
    mask = rd.bin_count > 0
    return float(np.max(np.abs(rd.bin_accuracy[mask] - rd.bin_confidence[mask])))


def brier_score(probs_or_logits: ArrayLike, labels: ArrayLike, *, from_logits: bool = True) -> float:
    """Multi-class Brier score (Brier, 1950): mean over examples of sum_k (p_k - 1[y = k])².

    Ranges from 0 (perfect) to 2. Some papers divide by C; we do not.

    Args:
        probs_or_logits: (N, C) logits (``from_logits=True``) or probabilities.
        labels: (N,) integer labels.
        from_logits: Apply a softmax first.

    Returns:
        The Brier score.
    """
    lg, lb = check_logits_labels(probs_or_logits, labels)
    p = torch.softmax(lg, dim=1) if from_logits else lg
    onehot = torch.nn.functional.one_hot(lb, p.shape[1]).double()
    return float(((p - onehot) ** 2).sum(dim=1).mean())


def apply_temperature(logits: ArrayLike, temperature: float) -> Tensor:
    """Divide logits by a temperature T > 0 (T > 1 softens, T < 1 sharpens).

    Args:
        logits: (N, C) logits.
        temperature: T.

    Returns:
        float64 tensor logits / T.
    """
    if not temperature > 0:
        raise JemlabError(f"temperature must be > 0, got {temperature}")
    return torch.as_tensor(to_numpy(logits, np.float64)) / float(temperature)


def _nll_at_log_t(lg: Tensor, lb: Tensor, log_t: float) -> float:
    z = lg * math.exp(-log_t)
    return float((torch.logsumexp(z, dim=1) - z.gather(1, lb[:, None]).squeeze(1)).mean())


def fit_temperature(
    logits: ArrayLike,
    labels: ArrayLike,
    *,
    log_t_range: tuple[float, float] = (-5.0, 5.0),
    grid_points: int = 101,
    tol: float = 1e-7,
) -> float:
    """Fit a temperature by minimising the validation NLL of softmax(logits / T) (Guo et al., 2017).

    The NLL is convex in 1/T (a LogSumExp of a linear function of 1/T minus a linear term), hence
    unimodal in log T. We evaluate a coarse grid over ``log_t_range`` and refine with golden-section
    search in the bracketing cell, all in float64. Deterministic and needs no learning rate.

    Args:
        logits: (N, C) validation logits (never fit on the test set you report).
        labels: (N,) validation labels.
        log_t_range: Search interval for log T; the result is clipped to it (T in [e^-5, e^5] by
            default).
        grid_points: Coarse grid size.
        tol: Golden-section tolerance on log T.

    Returns:
        The fitted temperature T (divide test logits by it before computing calibrated
        probabilities). When every validation example is classified correctly the NLL keeps
        decreasing as T → 0 and the result sits at the lower end of ``log_t_range``.
    """
    lg, lb = check_logits_labels(logits, labels)
    lo, hi = log_t_range
    if not lo < hi:
        raise JemlabError(f"log_t_range must be (low, high) with low < high, got {log_t_range}")
    grid = np.linspace(lo, hi, max(grid_points, 3))
    vals = np.array([_nll_at_log_t(lg, lb, g) for g in grid])
    i = int(np.argmin(vals))
    a, b = grid[max(i - 1, 0)], grid[min(i + 1, len(grid) - 1)]
    gr = (math.sqrt(5.0) - 1.0) / 2.0
    c, d = b - gr * (b - a), a + gr * (b - a)
    fc, fd = _nll_at_log_t(lg, lb, c), _nll_at_log_t(lg, lb, d)
    while b - a > tol:
        if fc < fd:
            b, d, fd = d, c, fc
            c = b - gr * (b - a)
            fc = _nll_at_log_t(lg, lb, c)
        else:
            a, c, fc = c, d, fd
            d = a + gr * (b - a)
            fd = _nll_at_log_t(lg, lb, d)
    return float(math.exp(0.5 * (a + b)))


def calibration_metrics(logits: ArrayLike, labels: ArrayLike, n_bins: int = DEFAULT_N_BINS) -> dict[str, Any]:
    """ECE, MCE, Brier and NLL of softmax(logits), plus the reliability-diagram bins.

    Args:
        logits: (N, C) logits (already temperature-scaled if you want calibrated numbers).
        labels: (N,) labels.
        n_bins: Number of equal-width confidence bins.

    Returns:
        ``{"ece", "mce", "brier", "nll", "mean_confidence", "accuracy", "n_bins", "reliability":
        {...}}``.
    """
    lg, lb = check_logits_labels(logits, labels)
    conf, corr = confidence_and_correctness(lg, lb)
    rd = reliability_data(conf, corr, n_bins)
    nll = float(torch.nn.functional.cross_entropy(lg, lb))
    return {
        "ece": expected_calibration_error(conf, corr, n_bins),
        "mce": max_calibration_error(conf, corr, n_bins),
        "brier": brier_score(lg, lb),
        "nll": nll,
        "mean_confidence": float(conf.mean()),
        "accuracy": float(corr.mean()),
        "n_bins": int(n_bins),
        "reliability": rd.to_dict(),
    }


def plot_reliability_diagram(
    data: ReliabilityData | dict[str, ReliabilityData],
    path: str | Path,
    title: str = "Reliability diagram",
) -> Path:
    """Save a reliability diagram (accuracy vs confidence per bin, plus a confidence histogram) as
    PNG.

    Args:
        data: One :class:`ReliabilityData`, or a dict label -> data to overlay (e.g. before/after
            temperature scaling).
        path: Output PNG path.
        title: Figure title.

    Returns:
        The written path.
    """
    from matplotlib.figure import Figure

    series = data if isinstance(data, dict) else {"model": data}
    fig = Figure(figsize=(5.0, 6.0), dpi=100)
    ax = fig.add_axes((0.14, 0.36, 0.8, 0.56))
    axh = fig.add_axes((0.14, 0.08, 0.8, 0.2))
    ax.plot([0, 1], [0, 1], "k--", lw=1, label="perfect calibration")
    n_series = len(series)
    for s, (label, rd) in enumerate(series.items()):
        edges = rd.bin_edges
        width = (edges[1] - edges[0]) / n_series
        left = edges[:-1] + s * width
        acc = np.nan_to_num(rd.bin_accuracy, nan=0.0)
        ece = expected_calibration_error_from_data(rd)
        ax.bar(
            left,
            acc,
            width=width,
            align="edge",
            alpha=0.6,
            edgecolor="k",
            lw=0.5,
            label=f"{label} (ECE {100 * ece:.2f}%)",
        )
        axh.bar(left, rd.bin_count / max(rd.n, 1), width=width, align="edge", alpha=0.6)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy")
    ax.set_title(title)
    ax.legend(loc="upper left", fontsize=8)
    axh.set_xlim(0, 1)
    axh.set_xlabel("confidence (max softmax probability)")
    axh.set_ylabel("fraction")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


def expected_calibration_error_from_data(rd: ReliabilityData) -> float:
    """ECE computed from already-binned :class:`ReliabilityData`.

    Args:
        rd: Binned statistics.

    Returns:
        ECE in [0, 1].
    """
    mask = rd.bin_count > 0
    gaps = np.abs(rd.bin_accuracy[mask] - rd.bin_confidence[mask])
    return float(np.sum(rd.bin_count[mask] / max(rd.n, 1) * gaps))
