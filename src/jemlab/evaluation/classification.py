"""Classification metrics from logits: accuracy, NLL, per-class accuracy, confusion matrix.

All functions accept torch tensors or numpy arrays. ``logits`` has shape (N, C) and ``labels`` shape
(N,) with integer class ids. In JEM (Grathwohl et al., 2020) the classifier is p(y|x) =
softmax(f(x)), the same network whose LogSumExp is the (negative) energy, so these are the
"discriminative" half of the evaluation.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from jemlab.errors import JemlabError
from jemlab.evaluation._common import ArrayLike, check_logits_labels, to_numpy

__all__ = [
    "accuracy",
    "classification_metrics",
    "collect_logits",
    "confusion_matrix",
    "iterate_dataset",
    "nll",
    "per_class_accuracy",
    "plot_confusion_matrix",
]


def accuracy(logits: ArrayLike, labels: ArrayLike) -> float:
    """Top-1 accuracy.

    Args:
        logits: (N, C) logits (or probabilities: only the argmax is used).
        labels: (N,) integer labels.

    Returns:
        Fraction of rows whose argmax equals the label, in [0, 1].
    """
    lg, lb = check_logits_labels(logits, labels)
    return float((lg.argmax(dim=1) == lb).double().mean())


def nll(logits: ArrayLike, labels: ArrayLike) -> float:
    """Mean negative log-likelihood -log softmax(logits)[y] in nats (= cross-entropy loss).

    Args:
        logits: (N, C) unnormalised logits.
        labels: (N,) integer labels.

    Returns:
        Mean NLL over the N examples (float64 computation).
    """
    lg, lb = check_logits_labels(logits, labels)
    return float(F.cross_entropy(lg, lb, reduction="mean"))


def confusion_matrix(logits_or_preds: ArrayLike, labels: ArrayLike, num_classes: int | None = None) -> np.ndarray:
    """Confusion matrix with rows = true class and columns = predicted class.

    Args:
        logits_or_preds: (N, C) logits, or (N,) integer predictions.
        labels: (N,) integer labels.
        num_classes: Number of classes C; inferred from the logits width (or max label/pred + 1).

    Returns:
        (C, C) int64 array; entry [i, j] counts examples of class i predicted as j.
    """
    arr = to_numpy(logits_or_preds)
    lb = to_numpy(labels).astype(np.int64).reshape(-1)
    if arr.ndim == 2:
        if num_classes is None:
            num_classes = arr.shape[1]
        preds = arr.argmax(axis=1).astype(np.int64)
    elif arr.ndim == 1:
        preds = arr.astype(np.int64)
    else:
        raise JemlabError(f"expected (N, C) logits or (N,) predictions, got shape {arr.shape}")
    if preds.shape[0] != lb.shape[0]:
        raise JemlabError(f"{preds.shape[0]} predictions but {lb.shape[0]} labels; pass matching lengths")
    if num_classes is None:
        num_classes = int(max(preds.max(initial=0), lb.max(initial=0))) + 1
    if lb.size and (lb.min() < 0 or lb.max() >= num_classes):
        raise JemlabError(f"labels must lie in [0, {num_classes}); got range [{lb.min()}, {lb.max()}]")
    cm = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(cm, (lb, preds), 1)
    return cm


def per_class_accuracy(logits: ArrayLike, labels: ArrayLike, num_classes: int | None = None) -> np.ndarray:
    """Accuracy restricted to each true class (recall per class).

    Args:
        logits: (N, C) logits or (N,) predictions.
        labels: (N,) integer labels.
        num_classes: Number of classes; inferred when omitted.

    Returns:
        (C,) float64 array; NaN for classes with no examples.
    """
    cm = confusion_matrix(logits, labels, num_classes)
    support = cm.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        acc = np.where(support > 0, np.diag(cm) / np.maximum(support, 1), np.nan)
    return acc.astype(np.float64)


def classification_metrics(logits: ArrayLike, labels: ArrayLike) -> dict[str, Any]:
    """All classification metrics in one JSON-friendly dict.

    Args:
        logits: (N, C) logits.
        labels: (N,) integer labels.

    Returns:
        ``{"n", "accuracy", "error", "nll", "per_class_accuracy": {class: acc}, "confusion_matrix":
        [[...]]}``.
    """
    lg, lb = check_logits_labels(logits, labels)
    acc = accuracy(lg, lb)
    pca = per_class_accuracy(lg, lb, lg.shape[1])
    return {
        "n": int(lg.shape[0]),
        "accuracy": acc,
        "error": 1.0 - acc,
        "nll": nll(lg, lb),
        "per_class_accuracy": {str(i): (None if np.isnan(v) else float(v)) for i, v in enumerate(pca)},
        "confusion_matrix": confusion_matrix(lg, lb, lg.shape[1]).tolist(),
    }


def collect_logits(
    logits_fn: Callable[[Tensor], Tensor],
    images_iter: Iterable[Tensor | tuple[Tensor, Tensor] | list[Tensor]],
    device: torch.device | str | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Run ``logits_fn`` batch by batch under ``torch.no_grad()`` and concatenate the results.

    Args:
        logits_fn: Maps a batch of images (B, C, H, W) in [-1, 1] to logits (B, K), e.g.
            ``model.logits``.
        images_iter: Iterable of image batches, or of ``(images, labels)`` pairs.
        device: Device the batches are moved to before calling ``logits_fn`` (default: leave as is).

    Returns:
        ``(logits, labels)``: float32 CPU logits (N, K) and int64 CPU labels (N,), or ``None`` for
            the labels
        when the iterable yields bare image batches.
    """
    all_logits: list[Tensor] = []
    all_labels: list[Tensor] = []
    has_labels: bool | None = None
    with torch.no_grad():
        for item in images_iter:
            if isinstance(item, (tuple, list)):
                x, y = item[0], item[1]
                this_has = True
            else:
                x, y = item, None
                this_has = False
            if has_labels is None:
                has_labels = this_has
            elif has_labels != this_has:
                raise JemlabError("images_iter mixes bare batches and (images, labels) pairs; yield one kind")
            if device is not None:
                x = x.to(device)
            out = logits_fn(x)
            all_logits.append(out.detach().float().cpu())
            if y is not None:
                all_labels.append(torch.as_tensor(y).long().cpu())
    if not all_logits:
        raise JemlabError("images_iter yielded no batches; pass a non-empty dataset")
    logits = torch.cat(all_logits)
    labels = torch.cat(all_labels) if has_labels else None
    return logits, labels


def iterate_dataset(
    dataset: Any,
    indices: Tensor,
    batch_size: int = 256,
) -> Iterable[tuple[Tensor, Tensor]]:
    """Yield ``dataset.batch(idx)`` for consecutive chunks of ``indices``.

    Args:
        dataset: Object with ``batch(index_tensor) -> (x, y)`` (jemlab ``ArrayDataset``).
        indices: 1-D int64 tensor of example indices.
        batch_size: Chunk size.

    Returns:
        A generator of ``(x, y)`` batches.
    """
    for start in range(0, int(indices.numel()), batch_size):
        yield dataset.batch(indices[start : start + batch_size])


def plot_confusion_matrix(
    cm: np.ndarray, path: str | Path, title: str = "Confusion matrix", normalise: bool = True
) -> Path:
    """Save a confusion-matrix heat map as a PNG.

    Args:
        cm: (C, C) counts, rows = true class.
        path: Output PNG path (parent directories are created).
        title: Figure title.
        normalise: Show row-normalised rates (per-class recall) instead of counts.

    Returns:
        The written path.
    """
    from matplotlib.figure import Figure

    cm = np.asarray(cm, dtype=np.float64)
    shown = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1) if normalise else cm
    c = cm.shape[0]
    fig = Figure(figsize=(1.0 + 0.45 * c, 0.8 + 0.45 * c), dpi=100)
    ax = fig.add_subplot(1, 1, 1)
    im = ax.imshow(shown, cmap="Blues", vmin=0.0, vmax=1.0 if normalise else None)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    if c <= 20:
        for i in range(c):
            for j in range(c):
                txt = f"{shown[i, j]:.2f}" if normalise else str(int(cm[i, j]))
                ax.text(
                    j,
                    i,
                    txt,
                    ha="center",
                    va="center",
                    fontsize=6,
                    color="white" if shown[i, j] > 0.6 * shown.max() else "black",
                )
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(title)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path)
    return path
