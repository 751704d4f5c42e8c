"""Variety within a class: how many samples have a near-copy among the other samples of their class.

A generator that repeats a few images can still score a fair Fréchet distance per class when those images are
typical; counting near-copies catches it directly. Two images are near-copies when the root-mean-square difference
of their pixels, on the [0, 1] scale, is below `threshold` (0.05 by default: among 100 real Fashion-MNIST test
images per class no image has such a partner, while the repeated buffer images of a collapsing sampler do).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["NEAR_COPY_RMS", "Diversity", "near_copies", "nearest_in_class", "within_class_diversity"]

#: The near-copy threshold: root-mean-square pixel difference on the [0, 1] scale.
NEAR_COPY_RMS = 0.05


def _rms_distances(x: Tensor) -> Tensor:
    """(n, n) root-mean-square differences between the rows of x (n, d), on the scale of x."""
    x = x.double()
    sq = (x * x).sum(1)
    d2 = (sq[:, None] + sq[None, :] - 2.0 * x @ x.T).clamp_min(0.0) / x.shape[1]
    return d2.sqrt()


def nearest_in_class(images: Tensor, labels: Tensor | None = None) -> Tensor:
    """(n,) RMS pixel difference, on the [0, 1] scale, from each image to the nearest other image of its class (of
    the whole set without labels); NaN for an image alone in its class.

    Args:
        images: (n, ...) images in [−1, 1] (jemlab's model range).
        labels: (n,) class of each image, or None to compare every pair.
    """
    flat = images.detach().float().cpu().reshape(len(images), -1) / 2.0  # [−1, 1] → differences on the [0, 1] scale
    groups = torch.zeros(len(flat), dtype=torch.long) if labels is None else labels.detach().cpu().long()
    nearest = torch.full((len(flat),), float("nan"), dtype=torch.float64)
    for c in groups.unique().tolist():
        rows = (groups == c).nonzero().squeeze(1)
        if len(rows) < 2:
            continue
        d = _rms_distances(flat[rows])
        d.fill_diagonal_(float("inf"))
        nearest[rows] = d.min(1).values
    return nearest


def near_copies(images: Tensor, labels: Tensor | None = None, threshold: float = NEAR_COPY_RMS) -> Tensor:
    """(n,) bool: image i has another image of its class closer than `threshold` (RMS, [0, 1] scale)."""
    return nearest_in_class(images, labels) < threshold


@dataclass(frozen=True)
class Diversity:
    """Within-class variety of a set of samples.

    Attributes:
        near_copies: samples with a near-copy in their class (`near_copies`).
        near_copy_fraction: near_copies / samples.
        nn_rms: mean over samples of the RMS pixel difference ([0, 1] scale) to the nearest other sample of the
            class: a continuous figure that shrinks as samples repeat (real images of a class: ~0.1–0.2).
    """

    near_copies: int
    near_copy_fraction: float
    nn_rms: float


def within_class_diversity(images: Tensor, labels: Tensor, threshold: float = NEAR_COPY_RMS) -> Diversity:
    """Near-copies and the mean nearest-neighbour distance within each class (images in [−1, 1])."""
    nearest = nearest_in_class(images, labels)
    nearest = nearest[~nearest.isnan()]
    n = len(nearest)
    copies = int((nearest < threshold).sum())
    return Diversity(copies, copies / n if n else 0.0, float(nearest.mean()) if n else float("nan"))
