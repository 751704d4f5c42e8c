"""Sample quality: Fréchet distance, KID, mode coverage and class-conditional accuracy of samples.

Published numbers (SPEC): JEM CIFAR-10 FID 38.4 / IS 8.76; JEM++ FID 38.0; SADA-JEM FID 9.41 (on the
replay buffer after a confidence filter, not 50k fresh samples); EGC FID 3.30. Those use
Inception-v3 features (Heusel et al., 2017). jemlab has no Inception weights offline, so by default
the Fréchet distance is computed on the penultimate features of a small domain classifier
(:mod:`jemlab.quality.feature_net`); such numbers are only comparable with each other (same
feature net, same sample count), never with published FIDs.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from jemlab.errors import JemlabError
from jemlab.quality.arrays import ArrayLike, to_numpy

__all__ = [
    "class_histogram",
    "class_histogram_entropy",
    "extract_features",
    "feature_statistics",
    "frechet_distance",
    "frechet_distance_from_features",
    "image_grid",
    "inception_available",
    "kernel_inception_distance",
    "plot_image_grid",
    "polynomial_mmd2_unbiased",
    "sample_class_accuracy",
]


def feature_statistics(features: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Mean and unbiased covariance of a feature set.

    Args:
        features: (N, D) features, N >= 2.

    Returns:
        ``(mu (D,), sigma (D, D))`` in float64.
    """
    f = to_numpy(features, np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise JemlabError(f"features must have shape (N >= 2, D), got {f.shape}; pass more samples")
    return f.mean(axis=0), np.cov(f, rowvar=False).reshape(f.shape[1], f.shape[1])


def _sqrt_psd(a: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh(0.5 * (a + a.T))
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance(mu1: ArrayLike, sigma1: ArrayLike, mu2: ArrayLike, sigma2: ArrayLike) -> float:
    """Fréchet (2-Wasserstein²) distance between N(mu1, S1) and N(mu2, S2).

    d² = ‖mu1 − mu2‖² + tr(S1) + tr(S2) − 2·tr((S1 S2)^{1/2}). The trace term is computed without a
    general matrix square root: tr((S1 S2)^{1/2}) equals tr((S1^{1/2} S2 S1^{1/2})^{1/2}), the sum
    of square roots of the (real, non-negative) eigenvalues of the symmetric PSD matrix S1^{1/2} S2
    S1^{1/2}. This is the same number ``scipy.linalg.sqrtm`` gives in FID code, with no imaginary
    parts to discard; tiny negative eigenvalues from round-off are clipped to 0.

    Args:
        mu1: (D,) mean of set 1.
        sigma1: (D, D) covariance of set 1.
        mu2: (D,) mean of set 2.
        sigma2: (D, D) covariance of set 2.

    Returns:
        The squared Fréchet distance (what papers call FID when the features are Inception pool3),
        >= 0.
    """
    m1, m2 = to_numpy(mu1, np.float64).reshape(-1), to_numpy(mu2, np.float64).reshape(-1)
    s1, s2 = (
        np.atleast_2d(to_numpy(sigma1, np.float64)),
        np.atleast_2d(to_numpy(sigma2, np.float64)),
    )
    d = m1.size
    if m2.size != d or s1.shape != (d, d) or s2.shape != (d, d):
        raise JemlabError(
            f"Fréchet distance needs means of equal length and matching (D, D) covariances; got "
            f"{m1.shape}, {s1.shape}, {m2.shape}, {s2.shape}"
        )
    r1 = _sqrt_psd(s1)
    m = r1 @ s2 @ r1
    eig = np.linalg.eigvalsh(0.5 * (m + m.T))
    tr_covmean = float(np.sum(np.sqrt(np.clip(eig, 0.0, None))))
    diff = m1 - m2
    val = float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_covmean)
    return max(val, 0.0)


def frechet_distance_from_features(features1: ArrayLike, features2: ArrayLike) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets.

    Args:
        features1: (N1, D) features.
        features2: (N2, D) features.

    Returns:
        Squared Fréchet distance. Biased upwards for small N; compare only at equal N.
    """
    mu1, s1 = feature_statistics(features1)
    mu2, s2 = feature_statistics(features2)
    return frechet_distance(mu1, s1, mu2, s2)


def polynomial_mmd2_unbiased(x: np.ndarray, y: np.ndarray, degree: int = 3, coef0: float = 1.0) -> float:
    """Unbiased MMD² with the polynomial kernel k(a, b) = (a·b / d + coef0)^degree.

    Args:
        x: (m, d) features.
        y: (n, d) features.
        degree: Kernel degree (3 for KID).
        coef0: Kernel offset (1 for KID).

    Returns:
        The unbiased MMD² estimate (can be slightly negative when the sets match).
    """
    m, n = x.shape[0], y.shape[0]
    if m < 2 or n < 2:
        raise JemlabError("unbiased MMD needs at least 2 samples per set")
    d = x.shape[1]
    kxx = (x @ x.T / d + coef0) ** degree
    kyy = (y @ y.T / d + coef0) ** degree
    kxy = (x @ y.T / d + coef0) ** degree
    sxx = (kxx.sum() - np.trace(kxx)) / (m * (m - 1))
    syy = (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
    return float(sxx + syy - 2.0 * kxy.mean())


def kernel_inception_distance(
    features1: ArrayLike,
    features2: ArrayLike,
    *,
    n_subsets: int = 10,
    subset_size: int = 1000,
    seed: int = 0,
) -> tuple[float, float]:
    """Kernel (Inception) distance, KID (Bińkowski et al., 2018): unbiased polynomial-kernel MMD² in
    subsets.

    Uses k(x, y) = (x·y/d + 1)³ and averages over ``n_subsets`` random subsets (without replacement
    within a subset) of size min(subset_size, N1, N2). Unlike FID it is unbiased, so it is usable
    with few samples.

    Args:
        features1: (N1, D) features.
        features2: (N2, D) features.
        n_subsets: Number of subsets.
        subset_size: Subset size.
        seed: Seed for choosing subsets.

    Returns:
        ``(mean, std)`` of the per-subset MMD² values.
    """
    f1, f2 = to_numpy(features1, np.float64), to_numpy(features2, np.float64)
    if f1.ndim != 2 or f2.ndim != 2 or f1.shape[1] != f2.shape[1]:
        raise JemlabError(f"KID needs two (N, D) feature sets of equal D, got {f1.shape} and {f2.shape}")
    m = min(subset_size, f1.shape[0], f2.shape[0])
    rng = np.random.default_rng(seed)
    vals = []
    for _ in range(max(n_subsets, 1)):
        a = f1[rng.choice(f1.shape[0], m, replace=False)]
        b = f2[rng.choice(f2.shape[0], m, replace=False)]
        vals.append(polynomial_mmd2_unbiased(a, b))
    v = np.asarray(vals)
    return float(v.mean()), float(v.std())


def class_histogram(labels_or_logits: ArrayLike, num_classes: int) -> np.ndarray:
    """Counts of predicted classes.

    Args:
        labels_or_logits: (N,) predicted labels or (N, C) logits/probabilities (argmax taken).
        num_classes: C.

    Returns:
        (C,) int64 counts.
    """
    a = to_numpy(labels_or_logits)
    pred = a.argmax(axis=1) if a.ndim == 2 else a.astype(np.int64)
    return np.bincount(pred.reshape(-1), minlength=num_classes)[:num_classes].astype(np.int64)


def class_histogram_entropy(labels_or_logits: ArrayLike, num_classes: int) -> float:
    """Normalised entropy H(hist)/log C of the predicted-class histogram of samples (mode coverage).

    1 = samples spread evenly over all classes; 0 = all samples in one class (mode collapse).

    Args:
        labels_or_logits: Predicted labels or logits of generated samples under a classifier.
        num_classes: C >= 2.

    Returns:
        Normalised entropy in [0, 1].
    """
    if num_classes < 2:
        raise JemlabError(f"class-histogram entropy needs num_classes >= 2, got {num_classes}")
    counts = class_histogram(labels_or_logits, num_classes).astype(np.float64)
    p = counts / max(counts.sum(), 1.0)
    nz = p[p > 0]
    return float(-(nz * np.log(nz)).sum() / math.log(num_classes)) + 0.0  # + 0.0 turns -0.0 into 0.0


def sample_class_accuracy(
    logits: ArrayLike, intended_labels: ArrayLike, num_classes: int | None = None
) -> dict[str, Any]:
    """How often a classifier assigns class-conditional samples to the class they were generated
    for.

    Args:
        logits: (N, C) classifier logits on the samples (the model itself or an independent feature
            net).
        intended_labels: (N,) labels the samples were conditioned on.
        num_classes: C (default: logits width).

    Returns:
        ``{"accuracy", "per_class_accuracy": {class: acc or None}}``.
    """
    lg = to_numpy(logits, np.float64)
    lb = to_numpy(intended_labels).astype(np.int64).reshape(-1)
    if lg.ndim != 2 or lg.shape[0] != lb.size:
        raise JemlabError(f"need (N, C) logits and (N,) labels, got {lg.shape} and {lb.shape}")
    c = num_classes or lg.shape[1]
    correct = lg.argmax(axis=1) == lb
    per = {}
    for k in range(c):
        mask = lb == k
        per[str(k)] = float(correct[mask].mean()) if mask.any() else None
    return {"accuracy": float(correct.mean()), "per_class_accuracy": per}


def extract_features(feature_fn: Callable[[Tensor], Tensor], x: Tensor, batch_size: int = 256) -> np.ndarray:
    """Apply a feature extractor batch by batch under ``torch.no_grad()``.

    Args:
        feature_fn: (B, C, H, W) -> (B, D), e.g. ``FeatureNet.features``.
        x: Images in [-1, 1].
        batch_size: Batch size.

    Returns:
        (N, D) float64 numpy features.
    """
    with torch.no_grad():
        out = [feature_fn(x[i : i + batch_size]).detach().cpu().double() for i in range(0, len(x), batch_size)]
    return torch.cat(out).reshape(len(x), -1).numpy()


def inception_available(weights_path: str | Path | None = None) -> tuple[bool, str]:
    """Whether the standard Inception-v3 FID/IS can be computed. In jemlab it cannot (yet).

    jemlab ships no torchvision, no Inception-v3 implementation and no network access, so there is
    no pool3 feature extractor. A local weights file alone does not change that.

    Args:
        weights_path: Optional path to local pt_inception weights.

    Returns:
        ``(False, reason)``; the reason is suitable for reports.
    """
    base = (
        "Inception-v3 FID/IS unavailable: jemlab has no torchvision and no Inception "
        "implementation; "
        "Fréchet distance and KID are reported on a domain feature net instead and are not "
        "comparable to "
        "published FIDs"
    )
    if weights_path is None:
        return False, base + " (no weights file given)"
    p = Path(weights_path)
    if not p.is_file():
        return False, base + f" (weights file {p} does not exist)"
    return False, base + f" (weights file {p} found, but no network to load it into)"


def image_grid(x: Tensor | np.ndarray, nrow: int | None = None, pad: int = 2) -> np.ndarray:
    """Tile images (N, C, H, W) in [-1, 1] into one (rows·(H+pad), cols·(W+pad), 3) array in [0, 1].

    Args:
        x: Images in [-1, 1] (values outside are clipped).
        nrow: Images per row (default ceil(sqrt(N))).
        pad: Padding in pixels between tiles (white).

    Returns:
        float32 RGB grid.
    """
    a = to_numpy(x, np.float32)
    if a.ndim != 4 or a.shape[0] == 0:
        raise JemlabError(f"image grid needs (N, C, H, W) images with N >= 1, got {a.shape}")
    a = np.clip((a + 1.0) / 2.0, 0.0, 1.0)
    if a.shape[1] == 1:
        a = np.repeat(a, 3, axis=1)
    elif a.shape[1] != 3:
        a = np.repeat(a[:, :1], 3, axis=1)
    n, _, h, w = a.shape
    cols = nrow or math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    grid = np.ones((rows * (h + pad) + pad, cols * (w + pad) + pad, 3), dtype=np.float32)
    for i in range(n):
        r, c = divmod(i, cols)
        y0, x0 = pad + r * (h + pad), pad + c * (w + pad)
        grid[y0 : y0 + h, x0 : x0 + w] = a[i].transpose(1, 2, 0)
    return grid


def plot_image_grid(x: Tensor | np.ndarray, path: str | Path, *, nrow: int | None = None, title: str = "") -> Path:
    """Save a grid of images (N, C, H, W) in [-1, 1] as PNG.

    Args:
        x: Images.
        path: Output PNG path.
        nrow: Images per row.
        title: Optional title.

    Returns:
        The written path.
    """
    from matplotlib.figure import Figure

    grid = image_grid(x, nrow)
    h, w = grid.shape[:2]
    width = 6.0
    height = max(width * h / w, 1.0) + (0.4 if title else 0.0)
    fig = Figure(figsize=(width, height), dpi=100)
    ax = fig.add_subplot(1, 1, 1)
    ax.imshow(grid, interpolation="nearest")
    ax.axis("off")
    if title:
        ax.set_title(title, fontsize=9)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path)
    return path
