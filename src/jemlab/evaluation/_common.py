"""Small shared helpers for the evaluation modules: array conversion and input checks."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from jemlab.errors import JemlabError
from jemlab.quality.arrays import ArrayLike, to_numpy, to_tensor

__all__ = ["ArrayLike", "check_logits_labels", "to_numpy", "to_tensor"]

def check_logits_labels(logits: ArrayLike, labels: ArrayLike) -> tuple[Tensor, Tensor]:
    """Validate and convert a (N, C) logits matrix and (N,) integer labels.

    Args:
        logits: Array of shape (N, C).
        labels: Integer array of shape (N,) with values in [0, C).

    Returns:
        ``(logits float64 tensor, labels int64 tensor)``.

    Raises:
        JemlabError: on shape mismatch, empty input or labels out of range.
    """
    lg = to_tensor(logits, torch.float64)
    lb = to_tensor(labels)
    if lg.ndim != 2:
        raise JemlabError(f"logits must have shape (N, C), got {tuple(lg.shape)}; pass one row per example")
    if lb.ndim != 1 or lb.shape[0] != lg.shape[0]:
        raise JemlabError(f"labels must have shape ({lg.shape[0]},) to match logits, got {tuple(lb.shape)}")
    if lg.shape[0] == 0:
        raise JemlabError("no examples to evaluate: logits are empty; pass at least one example")
    if lb.dtype.is_floating_point and not torch.equal(lb, lb.round()):
        raise JemlabError("labels must be integers; got non-integer floats")
    lb = lb.long()
    if lb.min() < 0 or lb.max() >= lg.shape[1]:
        raise JemlabError(
            f"labels must lie in [0, {lg.shape[1]}) for {lg.shape[1]} logit columns, "
            f"got range [{int(lb.min())}, {int(lb.max())}]"
        )
    return lg, lb


def check_scores(scores: ArrayLike, name: str) -> np.ndarray:
    """Convert a 1-D score vector to float64 numpy and check it is non-empty and finite.

    Args:
        scores: 1-D array of scores.
        name: Name used in error messages.

    Returns:
        A float64 numpy vector.
    """
    s = to_numpy(scores, np.float64).reshape(-1)
    if s.size == 0:
        raise JemlabError(f"{name} is empty; pass at least one score")
    if not np.all(np.isfinite(s)):
        raise JemlabError(
            f"{name} contains {int((~np.isfinite(s)).sum())} non-finite values; "
            "check the model for divergence (NaN/inf energies)"
        )
    return s
