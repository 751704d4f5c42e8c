"""Out-of-distribution detection: metrics, score functions and OOD set builders.

Convention: every score is "higher = more in-distribution". The in-distribution set is the positive
class.

JEM (Grathwohl et al., 2020, Table 3) compares three scores on CIFAR-10 test vs SVHN / CIFAR-100 /
CelebA: log p(x) = -E(x) (AUROC .67/.67/.75), max p(y|x) (.89/.87/.79) and the gradient norm -||∇ₓ
log p(x)||₂, and also uses interpolations of two test images as an OOD set. AUROC is computed here
as the Mann-Whitney U statistic (probability that a random in-distribution score beats a random OOD
score, ties counting 1/2).

Two more scores are fitted on in-distribution data before use (`FITTED_SCORES`, built by
:func:`fit_scores`): the Mahalanobis distance of the network's penultimate features to the nearest
class mean under a shared covariance (Lee et al., NeurIPS 2018), and the sum of that score and the JEM
gradient-norm score, each standardised on held-out in-distribution images (no OOD data is used to fit
or weight anything).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from torch import Tensor

from jemlab.errors import JemlabError
from jemlab.evaluation._common import ArrayLike, check_scores

__all__ = [
    "FITTED_SCORES",
    "SCORE_FUNCTIONS",
    "EnergyModel",
    "MahalanobisScore",
    "aupr",
    "auroc",
    "average_precision",
    "build_ood_sets",
    "compute_scores",
    "fit_scores",
    "flip_horizontal",
    "flip_vertical",
    "fpr_at_tpr",
    "gaussian_noise",
    "has_features",
    "interpolations",
    "invert",
    "ood_metrics",
    "plot_score_histogram",
    "rankdata_average",
    "score_energy",
    "score_grad_norm",
    "score_log_px",
    "score_max_softmax",
    "uniform_noise",
]


class EnergyModel(Protocol):
    """What the score functions need: ``logits(x) -> (N, C)`` and ``energy(x) -> (N,)``."""

    def logits(self, x: Tensor) -> Tensor: ...

    def energy(self, x: Tensor) -> Tensor: ...


# ---------------------------------------------------------------- metrics


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


# ---------------------------------------------------------------- scores


def score_log_px(model: EnergyModel, x: Tensor) -> Tensor:
    """log p(x) up to the log-partition constant, read from the classifier: logsumexp_y f(x)[y].

    Under the JEM convention E(x) = -logsumexp_y f(x)[y] this is exactly -E(x). For a model whose
    energy comes from a separate scalar head (the course variant, SPEC S2) this is the LogSumExp of
    the *class* logits, which is not the density that model was trained on; use :func:`score_energy`
    for that.

    Args:
        model: Object with ``logits(x)``.
        x: (N, C, H, W) images in [-1, 1].

    Returns:
        (N,) scores, higher = more in-distribution.
    """
    with torch.no_grad():
        return torch.logsumexp(model.logits(x).float(), dim=1)


def score_max_softmax(model: EnergyModel, x: Tensor) -> Tensor:
    """Maximum softmax probability max_y p(y|x) (Hendrycks & Gimpel, 2017), JEM's second OOD score.

    Args:
        model: Object with ``logits(x)``.
        x: (N, C, H, W) images.

    Returns:
        (N,) scores in [1/C, 1].
    """
    with torch.no_grad():
        return torch.softmax(model.logits(x).float(), dim=1).max(dim=1).values


def score_energy(model: EnergyModel, x: Tensor) -> Tensor:
    """Negative model energy -E(x), using the model's own ``energy`` method.

    For LogSumExp energies (JEM, JEM++, the MLP variant, EGC at t = 0) this equals log p(x) up to
    the constant log Z and coincides with :func:`score_log_px`. For a model with a separate energy
    head (SPEC S2) it is the head's unnormalised log-density and differs from :func:`score_log_px`.

    Args:
        model: Object with ``energy(x)``.
        x: (N, C, H, W) images.

    Returns:
        (N,) scores, higher = lower energy = more in-distribution.
    """
    with torch.no_grad():
        return -model.energy(x).float().reshape(-1)


def score_grad_norm(model: EnergyModel, x: Tensor) -> Tensor:
    """Negative input-gradient norm -||∇ₓ log p(x)||₂ = -||∇ₓ E(x)||₂ (JEM's third OOD score).

    Data sit near modes of p(x), where the score ∇ₓ log p(x) is small. Gradients are taken with
    ``torch.autograd.grad`` with respect to x only: model parameters' ``.grad`` fields are never
    touched. Samples are assumed independent (put BatchNorm models in ``eval()`` mode first).

    Args:
        model: Object with ``energy(x)``.
        x: (N, C, H, W) images.

    Returns:
        (N,) scores, higher (smaller gradient) = more in-distribution.
    """
    with torch.enable_grad():
        xg = x.detach().clone().requires_grad_(True)
        e = model.energy(xg).reshape(-1)
        (g,) = torch.autograd.grad(e.sum(), [xg], create_graph=False)
    return -g.reshape(g.shape[0], -1).norm(p=2, dim=1).detach().float()


SCORE_FUNCTIONS: dict[str, Callable[[EnergyModel, Tensor], Tensor]] = {
    "log_px": score_log_px,
    "max_softmax": score_max_softmax,
    "energy": score_energy,
    "grad_norm": score_grad_norm,
}


def has_features(model: object) -> bool:
    """Whether the model exposes penultimate features (``features(x)`` or ``backbone(x)``) for `FITTED_SCORES`."""
    return hasattr(model, "features") or hasattr(model, "backbone")


def _features(model: EnergyModel, x: Tensor) -> Tensor:
    """Penultimate features: ``model.features(x)`` when the model has it, else ``model.backbone(x)``."""
    if hasattr(model, "features"):
        return model.features(x)
    if hasattr(model, "backbone"):
        return model.backbone(x)
    raise JemlabError("the Mahalanobis OOD score needs model.features(x) or model.backbone(x); this model has neither")


class MahalanobisScore:
    """Negative squared Mahalanobis distance of the penultimate features to the nearest class mean.

    Class means and one covariance shared by all classes are estimated from labelled in-distribution
    images (Lee et al., NeurIPS 2018, without their input pre-processing and layer ensemble). A small
    ridge (1e-3 × the mean variance) keeps the covariance invertible.

    Args:
        model: The model (``features`` or ``backbone``).
        x: (N, C, H, W) in-distribution images (the training split).
        y: (N,) their labels.
        num_classes: C.
        batch_size: Batch size for the feature pass.
    """

    def __init__(self, model: EnergyModel, x: Tensor, y: Tensor, num_classes: int, batch_size: int = 256) -> None:
        f = self._batched(model, x, batch_size).double()
        y = y.to(f.device).long()
        missing = [c for c in range(num_classes) if not bool((y == c).any())]
        if missing:
            raise JemlabError(f"Mahalanobis score: no fitting images of classes {missing}; fit on more images")
        self.means = torch.stack([f[y == c].mean(0) for c in range(num_classes)])
        centred = f - self.means[y]
        cov = centred.T @ centred / len(f)
        cov += 1e-3 * cov.diagonal().mean() * torch.eye(len(cov), dtype=cov.dtype, device=cov.device)
        self.precision = torch.linalg.inv(cov)

    @staticmethod
    def _batched(model: EnergyModel, x: Tensor, batch_size: int) -> Tensor:
        with torch.no_grad():
            return torch.cat([_features(model, x[i : i + batch_size]).float() for i in range(0, len(x), batch_size)])

    def __call__(self, model: EnergyModel, x: Tensor) -> Tensor:
        with torch.no_grad():
            f = _features(model, x).double().to(self.means.device)
            d = f[:, None, :] - self.means[None]
            q = torch.einsum("ncd,de,nce->nc", d, self.precision, d)
        return -q.min(dim=1).values.float().cpu()


class StandardisedSum:
    """Sum of scores, each standardised (zero mean, unit spread) on held-out in-distribution images."""

    def __init__(self, parts: Sequence[Callable[[EnergyModel, Tensor], Tensor]], model: EnergyModel, x_ref: Tensor):
        self.parts = list(parts)
        self.stats = []
        for part in self.parts:
            ref = compute_scores(part, model, x_ref)
            self.stats.append((float(ref.mean()), max(float(ref.std()), 1e-12)))

    def __call__(self, model: EnergyModel, x: Tensor) -> Tensor:
        total = torch.zeros(len(x))
        for part, (mean, std) in zip(self.parts, self.stats, strict=True):
            total += (part(model, x).detach().cpu().float() - mean) / std
        return total


FITTED_SCORES = ("mahalanobis", "grad_norm+mahalanobis")


def fit_scores(
    names: Sequence[str],
    model: EnergyModel,
    x_fit: Tensor,
    y_fit: Tensor,
    x_ref: Tensor,
    num_classes: int,
    batch_size: int = 256,
) -> dict[str, Callable[[EnergyModel, Tensor], Tensor]]:
    """Build the requested `FITTED_SCORES` from in-distribution data.

    Args:
        names: Score names (those not in `FITTED_SCORES` are ignored).
        model: The model.
        x_fit, y_fit: Labelled in-distribution images to fit class means and covariance on (training split).
        x_ref: Other in-distribution images (validation split) to standardise the summed scores on.
        num_classes: C.
        batch_size: Batch size.

    Returns:
        ``{name: score_fn(model, x)}``, usable with :func:`compute_scores`.
    """
    wanted = [n for n in names if n in FITTED_SCORES]
    if not wanted:
        return {}
    maha = MahalanobisScore(model, x_fit, y_fit, num_classes, batch_size)
    out: dict[str, Callable[[EnergyModel, Tensor], Tensor]] = {}
    if "mahalanobis" in wanted:
        out["mahalanobis"] = maha
    if "grad_norm+mahalanobis" in wanted:
        out["grad_norm+mahalanobis"] = StandardisedSum([score_grad_norm, maha], model, x_ref)
    return out


def compute_scores(
    score_fn: Callable[[EnergyModel, Tensor], Tensor] | str,
    model: EnergyModel,
    x: Tensor,
    batch_size: int = 256,
) -> Tensor:
    """Apply a score function batch by batch.

    Args:
        score_fn: A function from :data:`SCORE_FUNCTIONS` (or its name).
        model: The model.
        x: (N, C, H, W) images.
        batch_size: Batch size.

    Returns:
        (N,) float32 CPU scores.
    """
    if isinstance(score_fn, str):
        if score_fn not in SCORE_FUNCTIONS:
            raise JemlabError(f"unknown OOD score {score_fn!r}; choose one of {sorted(SCORE_FUNCTIONS)}")
        score_fn = SCORE_FUNCTIONS[score_fn]
    out = [score_fn(model, x[i : i + batch_size]).detach().cpu().float() for i in range(0, len(x), batch_size)]
    return torch.cat(out) if out else torch.empty(0)


# ---------------------------------------------------------------- OOD sets


def uniform_noise(n: int, shape: Sequence[int], generator: torch.Generator | None = None) -> Tensor:
    """Images of i.i.d. U[-1, 1] pixels (the JEM replay-buffer initialisation).

    Args:
        n: Number of images.
        shape: Per-image shape (C, H, W).
        generator: Random generator for reproducibility.

    Returns:
        (n, C, H, W) float32 tensor.
    """
    return torch.rand((n, *shape), generator=generator) * 2.0 - 1.0


def gaussian_noise(
    n: int,
    shape: Sequence[int],
    *,
    mean: float | Tensor = 0.0,
    std: float | Tensor = 0.5,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Images of Gaussian pixels N(mean, std²), clipped to [-1, 1].

    Args:
        n: Number of images.
        shape: Per-image shape (C, H, W).
        mean: Scalar or per-pixel (C, H, W) mean (e.g. the data mean).
        std: Scalar or per-pixel standard deviation.
        generator: Random generator.

    Returns:
        (n, C, H, W) float32 tensor in [-1, 1].
    """
    z = torch.randn((n, *shape), generator=generator)
    return (z * torch.as_tensor(std) + torch.as_tensor(mean)).clamp(-1.0, 1.0).float()


def interpolations(x: Tensor, n: int | None = None, generator: torch.Generator | None = None) -> Tensor:
    """Midpoints 0.5·(x_i + x_j) of random pairs i ≠ j of (test) images, as in JEM's OOD table.

    Args:
        x: (N, C, H, W) images, N >= 2.
        n: Number of interpolations (default N).
        generator: Random generator choosing the pairs.

    Returns:
        (n, C, H, W) tensor.
    """
    m = x.shape[0]
    if m < 2:
        raise JemlabError("interpolations need at least 2 images; pass a larger test set")
    n = m if n is None else n
    i = torch.randint(0, m, (n,), generator=generator)
    # j = i + offset with offset in [1, m-1] guarantees j != i.
    j = (i + torch.randint(1, m, (n,), generator=generator)) % m
    return 0.5 * (x[i] + x[j])


def flip_vertical(x: Tensor) -> Tensor:
    """Upside-down images (flip along height)."""
    return torch.flip(x, dims=[-2])


def flip_horizontal(x: Tensor) -> Tensor:
    """Mirrored images (flip along width). Near in-distribution for natural images, OOD for
    digits."""
    return torch.flip(x, dims=[-1])


def invert(x: Tensor) -> Tensor:
    """Colour-inverted images -x (in [-1, 1] this is 1 - x in [0, 1] units)."""
    return -x


def build_ood_sets(
    x_test: Tensor,
    n: int | None = None,
    generator: torch.Generator | None = None,
    kinds: Sequence[str] = ("uniform", "gaussian", "interp", "vflip", "hflip", "invert"),
) -> dict[str, Tensor]:
    """Synthetic OOD sets derived from the test images (and pure noise).

    Args:
        x_test: (N, C, H, W) in-distribution test images in [-1, 1].
        n: Size of each set (default N; transformed sets use the first n test images).
        generator: Random generator.
        kinds: Subset of ``uniform``, ``gaussian`` (mean/std matched to the test pixels, clipped),
            ``interp``, ``vflip``, ``hflip``, ``invert``.

    Returns:
        dict name -> (n, C, H, W) tensor.
    """
    n = x_test.shape[0] if n is None else min(n, x_test.shape[0])
    shape = tuple(x_test.shape[1:])
    base = x_test[:n]
    out: dict[str, Tensor] = {}
    for kind in kinds:
        if kind == "uniform":
            out[kind] = uniform_noise(n, shape, generator)
        elif kind == "gaussian":
            out[kind] = gaussian_noise(
                n, shape, mean=float(x_test.mean()), std=float(x_test.std()), generator=generator
            )
        elif kind == "interp":
            out[kind] = interpolations(x_test, n, generator)
        elif kind == "vflip":
            out[kind] = flip_vertical(base)
        elif kind == "hflip":
            out[kind] = flip_horizontal(base)
        elif kind == "invert":
            out[kind] = invert(base)
        else:
            raise JemlabError(
                f"unknown OOD set kind {kind!r}; choose from uniform, gaussian, interp, vflip, hflip, invert"
            )
    return out


# ---------------------------------------------------------------- plots


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
