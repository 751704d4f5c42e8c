"""Out-of-distribution scores: functions ``score(model, x) -> (N,)``, higher = more in-distribution.

JEM (Grathwohl et al., 2020, Table 3) compares three scores on CIFAR-10 test vs SVHN / CIFAR-100 /
CelebA: log p(x) = -E(x) (AUROC .67/.67/.75), max p(y|x) (.89/.87/.79) and the gradient norm -||∇ₓ
log p(x)||₂. They are in `SCORE_FUNCTIONS`, with the model's own energy -E(x).

Two more scores are fitted on in-distribution data before use (`FITTED_SCORES`, built by
:func:`fit_scores`): the Mahalanobis distance of the network's penultimate features to the nearest
class mean under a shared covariance (Lee et al., NeurIPS 2018), and the sum of that score and the JEM
gradient-norm score, each standardised on held-out in-distribution images (no OOD data is used to fit
or weight anything).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

import torch
from torch import Tensor

from jemlab.errors import JemlabError

__all__ = [
    "FITTED_SCORES",
    "SCORE_FUNCTIONS",
    "EnergyModel",
    "MahalanobisScore",
    "compute_scores",
    "fit_scores",
    "has_features",
    "score_energy",
    "score_grad_norm",
    "score_log_px",
    "score_max_softmax",
]


class EnergyModel(Protocol):
    """What the score functions need: ``logits(x) -> (N, C)`` and ``energy(x) -> (N,)``."""

    def logits(self, x: Tensor) -> Tensor: ...

    def energy(self, x: Tensor) -> Tensor: ...


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
