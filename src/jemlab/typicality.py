"""Typicality: where an image's scores fall among the model's scores on real test images.

The out-of-distribution verdict of ``jemlab serve`` and of the Python API's ``Model.ood_score``, written once. Two
scores per image, both JEM's (Grathwohl et al., 2020): log p(x) = −E(x), and the input-gradient norm ‖∇ₓE(x)‖
(data sit near modes of p(x), where the gradient is small). Each is turned into a percentile against a reference
set of test images scored by the same model, and an image is called out of distribution when either percentile is
below q/2, so that at most a fraction q of real test images would be (q = 0.05 by default).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from jemlab.errors import JemlabError
from jemlab.sampling import frozen

# The two scores, in the order `ood_reasons` names them.
SCORE_NAMES = ("log p(x)", "gradient norm")


@dataclass
class Prediction:
    """One batch of predictions: p(y|x) (N, C), energies E(x) (N,) and input-gradient norms ‖∇ₓE(x)‖ (N,)."""

    probs: torch.Tensor
    energy: torch.Tensor
    grad_norm: torch.Tensor


def predict_with_gradient(model: Any, x: torch.Tensor, device: torch.device) -> Prediction:
    """p(y|x), E(x) and ‖∇ₓE(x)‖ from one forward and one backward pass (gradient with respect to the input only).

    Args:
        model: a network with ``logits_and_energy(x)`` (JEM models; EGC models read at t = 0).
        x: (N, C, H, W) images in [−1, 1].
        device: the model's device.

    Returns:
        A Prediction on the CPU, float32.
    """
    x = x.to(device).requires_grad_(True)
    with frozen(model), torch.enable_grad():
        logits, energy = model.logits_and_energy(x)
        (grad,) = torch.autograd.grad(energy.sum(), x)
    return Prediction(
        probs=logits.detach().float().softmax(1).cpu(),
        energy=energy.detach().float().cpu(),
        grad_norm=grad.flatten(1).norm(dim=1).float().cpu(),
    )


@dataclass
class Reference:
    """The model's scores on held-out test images, sorted, for percentile-based OOD verdicts.

    Attributes:
        log_px: −E(x) of the reference images, ascending.
        grad_norm: ‖∇ₓE(x)‖ of the reference images, ascending.
        accuracy: the model's accuracy on them (NaN without labels).
        source: where they came from (shown on the demo page).
    """

    log_px: np.ndarray
    grad_norm: np.ndarray
    accuracy: float
    source: str

    @property
    def size(self) -> int:
        return int(self.log_px.size)


def compute_reference(
    predict: Callable[[torch.Tensor], Prediction],
    images: torch.Tensor,
    labels: torch.Tensor | None,
    source: str,
    batch_size: int = 250,
) -> Reference:
    """Score reference images (N, C, H, W) in [−1, 1] with `predict`, in batches.

    Args:
        predict: images → Prediction (e.g. `predict_with_gradient` bound to a model).
        images: the reference images, N ≥ 1.
        labels: their classes (for the accuracy shown next to the reference), or None.
        source: a description, e.g. "1000 random fashion-mnist test images".
        batch_size: images scored at once.
    """
    if len(images) == 0:
        raise JemlabError("a reference set needs at least one image")
    preds = [predict(chunk) for chunk in images.split(batch_size)]
    probs = torch.cat([p.probs for p in preds])
    has_labels = labels is not None and len(labels) > 0
    accuracy = float((probs.argmax(1) == labels.cpu()).float().mean()) if has_labels else float("nan")
    return Reference(
        log_px=np.sort(-torch.cat([p.energy for p in preds]).numpy()),
        grad_norm=np.sort(torch.cat([p.grad_norm for p in preds]).numpy()),
        accuracy=accuracy,
        source=source,
    )


def reference_from_test_set(
    config: Any,
    predict: Callable[[torch.Tensor], Prediction],
    size: int,
    data_dir: str | None = None,
    seed: int = 0,
) -> tuple[Reference | None, str]:
    """Score up to `size` random test images of the run's dataset; (None, reason) when the data cannot be read.

    Args:
        config: the run's config (its ``data`` section names the dataset and where it lives).
        predict: images → Prediction.
        size: how many test images (0: no reference).
        data_dir: where the dataset lives, if not where the config says.
        seed: which random test images.
    """
    from jemlab.data import load_dataset

    if size == 0:
        return None, "no reference set (--reference-size 0)"
    d = config.data
    try:
        splits = load_dataset(d.dataset, data_dir or d.data_dir, val_size=0, download=False, image_size=d.image_size)
    except JemlabError as err:
        return None, f"no OOD verdict: the test split of {d.dataset} could not be read ({err})"
    test = splits.test
    index = torch.randperm(len(test), generator=torch.Generator().manual_seed(seed))[:size]
    images, labels = test.batch(index)
    source = f"{len(index)} random {splits.name} test images"
    return compute_reference(predict, images.float(), labels, source), ""


def percentiles(reference: Reference, energy: np.ndarray, grad_norm: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The typicality of each image against the reference: higher = more like the test images.

    Args:
        reference: the model's scores on test images.
        energy: (N,) E(x) of the images.
        grad_norm: (N,) ‖∇ₓE(x)‖ of the images.

    Returns:
        (log p(x) percentile, gradient percentile), each (N,) float64 in [0, 1]: the fraction of reference images
        the model finds no more probable, and the fraction with a gradient at least as steep (a non-finite gradient
        counts as the steepest). Both are NaN where the energy is not finite.
    """
    energy = np.asarray(energy, dtype=np.float64)
    grad_norm = np.asarray(grad_norm, dtype=np.float64)
    size = reference.size
    finite = np.isfinite(energy)
    log_px_pct = np.searchsorted(reference.log_px, -np.where(finite, energy, 0.0), side="right") / size
    # JEM's third score: data sit near modes, where ∇ₓE is small. On Fashion-MNIST it separates far better than
    # log p(x) alone (docs/evaluation.md); a blank canvas, for one, is "probable" but steep.
    steeper = np.where(
        np.isfinite(grad_norm),
        np.searchsorted(reference.grad_norm, np.where(np.isfinite(grad_norm), grad_norm, 0.0), side="left"),
        size,
    )
    grad_pct = 1 - steeper / size
    return np.where(finite, log_px_pct, np.nan), np.where(finite, grad_pct, np.nan)


def ood_reasons(log_px_percentile: float, grad_percentile: float, quantile: float = 0.05) -> list[str]:
    """The scores (`SCORE_NAMES`) whose percentile is below quantile/2: each may flag q/2 of real test images, so at
    most q of them are called out of distribution. An empty list means in distribution."""
    half = quantile / 2
    return [name for name, value in zip(SCORE_NAMES, (log_px_percentile, grad_percentile), strict=True) if value < half]
