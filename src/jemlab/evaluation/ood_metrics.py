"""Out-of-distribution detection metrics: AUROC, AUPR, FPR at 95% TPR, and the score histogram.

Convention: every score is "higher = more in-distribution". The in-distribution set is the positive
class. AUROC is computed as the Mann-Whitney U statistic (probability that a random in-distribution
score beats a random OOD score, ties counting 1/2). The scores themselves are in
:mod:`jemlab.evaluation.ood_scores`, the synthetic OOD sets in :mod:`jemlab.evaluation.ood_sets`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from jemlab.errors import JemlabError
from jemlab.evaluation._common import ArrayLike, check_scores

__all__ = [
    "aupr",
    "auroc",
    "average_precision",
    "fpr_at_tpr",
    "ood_metrics",
    "plot_score_histogram",
    "rankdata_average",
]


def rankdata_average(a: np.ndarray) -> np.ndarray:
    """Ranks 1..N of a 1-D array with ties given their average rank (like ``scipy.stats.rankdata``).

    Args:
        a: 1-D array.

    Returns:
        float64 ranks.
    """
    a = np.asarray(a).reshape(-1)
    order = np.argsort(a, kind="mergesort")
    sorted_a = a[order]
    # Start index of each run of equal values.
    new_run = np.concatenate(([True], sorted_a[1:] != sorted_a[:-1]))
    run_id = np.cumsum(new_run) - 1
    starts = np.flatnonzero(new_run)
    ends = np.concatenate((starts[1:], [a.size]))
    avg_rank = 0.5 * (starts + 1 + ends)  # mean of ranks start+1 .. end
    ranks = np.empty(a.size, dtype=np.float64)
    ranks[order] = avg_rank[run_id]
    return ranks


def auroc(scores_in: ArrayLike, scores_out: ArrayLike) -> float:
    """Area under the ROC curve with in-distribution as positives (Mann-Whitney U / (n_in·n_out)).

    Equals P(s_in > s_out) + 0.5·P(s_in = s_out) for independent draws: 1 when every in-distribution
    score is above every OOD score, 0 when reversed, 0.5 for identical score sets.

    Args:
        scores_in: (n_in,) scores of in-distribution inputs (higher = more in-distribution).
        scores_out: (n_out,) scores of OOD inputs.

    Returns:
        AUROC in [0, 1].
    """
    s_in = check_scores(scores_in, "scores_in")
    s_out = check_scores(scores_out, "scores_out")
    ranks = rankdata_average(np.concatenate([s_in, s_out]))
    n_in, n_out = s_in.size, s_out.size
    u = ranks[:n_in].sum() - n_in * (n_in + 1) / 2.0
    return float(u / (n_in * n_out))


def average_precision(scores: ArrayLike, is_positive: ArrayLike) -> float:
    """Average precision AP = sum_n (R_n - R_{n-1}) P_n over distinct score thresholds (step-wise
    AUPR).

    Tied scores are one threshold (the same convention as scikit-learn's
    ``average_precision_score``).

    Args:
        scores: (N,) scores, higher = more likely positive.
        is_positive: (N,) booleans.

    Returns:
        AP in [0, 1].
    """
    s = check_scores(scores, "scores")
    pos = np.asarray(is_positive, dtype=bool).reshape(-1)
    if pos.size != s.size:
        raise JemlabError(f"{s.size} scores but {pos.size} labels; pass matching lengths")
    n_pos = int(pos.sum())
    if n_pos == 0:
        raise JemlabError("average precision needs at least one positive example")
    order = np.argsort(-s, kind="mergesort")
    s_sorted, pos_sorted = s[order], pos[order]
    tps = np.cumsum(pos_sorted)
    fps = np.cumsum(~pos_sorted)
    last_of_run = np.concatenate((s_sorted[1:] != s_sorted[:-1], [True]))
    tps, fps = tps[last_of_run], fps[last_of_run]
    precision = tps / (tps + fps)
    recall = tps / n_pos
    recall_prev = np.concatenate(([0.0], recall[:-1]))
    return float(np.sum((recall - recall_prev) * precision))


def aupr(scores_in: ArrayLike, scores_out: ArrayLike, positive: str = "in") -> float:
    """Area under the precision-recall curve (average precision).

    Args:
        scores_in: In-distribution scores (higher = more in-distribution).
        scores_out: OOD scores.
        positive: ``"in"`` (AUPR-In: in-distribution is the positive class) or ``"out"`` (AUPR-Out:
            OOD is positive and scores are negated).

    Returns:
        AUPR in [0, 1]; its chance level is the positive fraction, unlike AUROC's 0.5.
    """
    s_in = check_scores(scores_in, "scores_in")
    s_out = check_scores(scores_out, "scores_out")
    scores = np.concatenate([s_in, s_out])
    labels = np.concatenate([np.ones(s_in.size, bool), np.zeros(s_out.size, bool)])
    if positive == "in":
        return average_precision(scores, labels)
    if positive == "out":
        return average_precision(-scores, ~labels)
    raise JemlabError(f"positive must be 'in' or 'out', got {positive!r}")


def fpr_at_tpr(scores_in: ArrayLike, scores_out: ArrayLike, tpr: float = 0.95) -> float:
    """False-positive rate at the threshold that keeps at least ``tpr`` of in-distribution inputs.

    The threshold t is the k-th largest in-distribution score with k = ceil(tpr·n_in), so at least a
    ``tpr`` fraction of in-distribution scores are >= t (the largest such threshold, i.e. the
    smallest FPR); the FPR is the fraction of OOD scores >= t (OOD inputs wrongly accepted).

    Args:
        scores_in: In-distribution scores (higher = more in-distribution).
        scores_out: OOD scores.
        tpr: Target true-positive rate in (0, 1].

    Returns:
        FPR in [0, 1] (lower is better).
    """
    if not 0.0 < tpr <= 1.0:
        raise JemlabError(f"tpr must be in (0, 1], got {tpr}")
    s_in = check_scores(scores_in, "scores_in")
    s_out = check_scores(scores_out, "scores_out")
    k = int(np.ceil(tpr * s_in.size - 1e-9))
    k = min(max(k, 1), s_in.size)
    threshold = np.sort(s_in)[::-1][k - 1]
    return float(np.mean(s_out >= threshold))


def ood_metrics(scores_in: ArrayLike, scores_out: ArrayLike) -> dict[str, float]:
    """AUROC, AUPR-In, AUPR-Out and FPR at 95% TPR in one dict.

    Args:
        scores_in: In-distribution scores.
        scores_out: OOD scores.

    Returns:
        ``{"auroc", "aupr_in", "aupr_out", "fpr95", "n_in", "n_out", "mean_in", "mean_out"}``.
    """
    s_in = check_scores(scores_in, "scores_in")
    s_out = check_scores(scores_out, "scores_out")
    return {
        "auroc": auroc(s_in, s_out),
        "aupr_in": aupr(s_in, s_out, "in"),
        "aupr_out": aupr(s_in, s_out, "out"),
        "fpr95": fpr_at_tpr(s_in, s_out, 0.95),
        "n_in": int(s_in.size),
        "n_out": int(s_out.size),
        "mean_in": float(s_in.mean()),
        "mean_out": float(s_out.mean()),
    }


def plot_score_histogram(
    scores_in: ArrayLike,
    scores_out: dict[str, ArrayLike],
    path: str | Path,
    *,
    title: str = "OOD scores",
    score_name: str = "score",
    in_name: str = "in-distribution",
    bins: int = 50,
) -> Path:
    """Save overlaid density histograms of in-distribution and OOD scores as PNG (JEM Fig. 4 style).

    Args:
        scores_in: In-distribution scores.
        scores_out: dict OOD set name -> scores.
        path: Output PNG path.
        title: Title.
        score_name: x-axis label.
        in_name: Legend label of the in-distribution set.
        bins: Number of histogram bins (shared across sets).

    Returns:
        The written path.
    """
    from matplotlib.figure import Figure

    s_in = check_scores(scores_in, "scores_in")
    outs = {k: check_scores(v, f"scores_out[{k}]") for k, v in scores_out.items()}
    allv = np.concatenate([s_in, *outs.values()])
    lo, hi = np.percentile(allv, [0.5, 99.5])
    if not hi > lo:
        lo, hi = float(allv.min()) - 0.5, float(allv.max()) + 0.5
    edges = np.linspace(lo, hi, bins + 1)
    fig = Figure(figsize=(6.0, 4.0), dpi=100)
    ax = fig.add_subplot(1, 1, 1)
    ax.hist(np.clip(s_in, lo, hi), bins=edges, density=True, alpha=0.5, label=in_name, color="k")
    for name, s in outs.items():
        ax.hist(
            np.clip(s, lo, hi),
            bins=edges,
            density=True,
            alpha=0.4,
            label=f"{name} (AUROC {auroc(s_in, s):.3f})",
            histtype="stepfilled",
        )
    ax.set_xlabel(score_name)
    ax.set_ylabel("density")
    ax.set_title(title)
    ax.legend(fontsize=7)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path)
    return path
