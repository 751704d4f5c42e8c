"""The classifier's cross-entropy and accuracy on a split: used by the Trainer, ``jemlab eval`` and benchmarks."""

from __future__ import annotations

import torch

from jemlab.data import ArrayDataset
from jemlab.models import EnergyModel


@torch.no_grad()
def evaluate_split(
    model: EnergyModel, data: ArrayDataset, device: torch.device, prefix: str, batch_size: int = 500
) -> dict[str, float]:
    """Mean cross-entropy (`<prefix>_nll`) and accuracy (`<prefix>_accuracy`, a fraction) of the classifier.

    Empty for an empty split and for a model without a classifier (``has_classifier`` False: EGC's plain
    ε-prediction control), which has nothing to score here.
    """
    if len(data) == 0 or not getattr(model, "has_classifier", True):
        return {}
    was_training = model.training
    model.eval()
    total_loss, correct = 0.0, 0
    for start in range(0, len(data), batch_size):
        x, y = data.batch(torch.arange(start, min(start + batch_size, len(data))))
        logits = model.logits(x.to(device)).float()
        y = y.to(device)
        total_loss += float(torch.nn.functional.cross_entropy(logits, y, reduction="sum"))
        correct += int((logits.argmax(1) == y).sum())
    model.train(was_training)
    return {f"{prefix}_nll": total_loss / len(data), f"{prefix}_accuracy": correct / len(data)}
