"""Adversarial robustness: PGD L∞ / L2 attacks, robust accuracy, and the JEM SGLD-refinement
defence.

Units. The literature states perturbation budgets in [0, 1] pixel units (e.g. L∞ eps = 8/255 on
CIFAR-10, 0.3 on MNIST). jemlab images live in [-1, 1], which is twice as wide, so every ``eps`` and
``step_size`` argument here is given in [0, 1] units and multiplied by 2 internally. L2 budgets
scale the same way (‖2δ‖₂ = 2‖δ‖₂). Adversarial inputs are always clipped to [-1, 1].

JEM defence (Grathwohl et al., 2020, Sec. 5.3): before classifying, refine the input with K SGLD
steps on the energy (K = 0/1/10 in the paper), from several chains started at x plus small Gaussian
noise, and average the logits over the chains. The attack differentiates through the refinement
(expectation over transformation, EOT: Athalye et al., 2018), which the official ``attack_model.py``
does by averaging the logits of ``n_dup_chains`` = 5 duplicated chains without detaching. This
module takes the refinement as a differentiable callable ``defend(x) -> x_refined``;
:func:`langevin_defence` builds one from :func:`langevin_refine`, the differentiable form of the
library's SGLD step.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from jemlab.errors import JemlabError
from jemlab.samplers import LangevinSettings, autograd_gradient, langevin_step, sgld

__all__ = [
    "PIXEL_SCALE",
    "defended_logits_fn",
    "evaluate_attack",
    "langevin_defence",
    "langevin_refine",
    "pgd_attack",
    "plot_robustness_curves",
    "robust_accuracy",
    "robustness_curve",
]

#: Width of our pixel range [-1, 1] relative to the literature's [0, 1]:
#: eps_ours = PIXEL_SCALE * eps_paper.
PIXEL_SCALE = 2.0
_LOW, _HIGH = -1.0, 1.0

LogitsFn = Callable[[Tensor], Tensor]

#: The losses PGD can ascend, with the names reports use for them.
LOSS_NAMES = {"ce": "cross-entropy", "margin": "logit margin"}


def _per_example_loss(logits: Tensor, y: Tensor, loss: str, targets: Tensor | None) -> Tensor:
    """Loss to *maximise*, one value per example."""
    if loss == "ce":
        if targets is None:
            return F.cross_entropy(logits, y, reduction="none")
        return -F.cross_entropy(logits, targets, reduction="none")
    if loss == "margin":
        f_y = logits.gather(1, y[:, None]).squeeze(1)
        if targets is not None:
            return logits.gather(1, targets[:, None]).squeeze(1) - f_y
        other = logits.clone()
        other.scatter_(1, y[:, None], float("-inf"))
        return other.max(dim=1).values - f_y
    raise JemlabError(f"unknown attack loss {loss!r}; choose from {', '.join(LOSS_NAMES)}")


def _flat_norm(t: Tensor) -> Tensor:
    return t.reshape(t.shape[0], -1).norm(p=2, dim=1).reshape(-1, *([1] * (t.ndim - 1)))


def _project(x_adv: Tensor, x0: Tensor, eps: float, norm: str) -> Tensor:
    delta = x_adv - x0
    if norm == "linf":
        delta = delta.clamp(-eps, eps)
    else:
        n = _flat_norm(delta)
        delta = delta * torch.clamp(eps / n.clamp_min(1e-12), max=1.0)
    return (x0 + delta).clamp(_LOW, _HIGH)


def _random_start(x0: Tensor, eps: float, norm: str, generator: torch.Generator | None) -> Tensor:
    if norm == "linf":
        delta = (torch.rand(x0.shape, generator=generator, dtype=x0.dtype) * 2 - 1) * eps
    else:
        d = torch.randn(x0.shape, generator=generator, dtype=x0.dtype)
        r = torch.rand((x0.shape[0],), generator=generator, dtype=x0.dtype)
        delta = d / _flat_norm(d).clamp_min(1e-12) * (r * eps).reshape(-1, *([1] * (x0.ndim - 1)))
    return (x0 + delta.to(x0.device)).clamp(_LOW, _HIGH)


def pgd_attack(
    logits_fn: LogitsFn,
    x: Tensor,
    y: Tensor,
    *,
    eps: float,
    norm: str = "linf",
    steps: int = 10,
    step_size: float | None = None,
    restarts: int = 1,
    random_start: bool = True,
    generator: torch.Generator | None = None,
    loss: str = "ce",
    targets: Tensor | None = None,
    eot_samples: int = 1,
) -> Tensor:
    """Projected gradient descent (Madry et al., 2018) on a differentiable classifier.

    Each step ascends the loss (L∞: x += α·sign(∇); L2: x += α·∇/‖∇‖₂), then projects the
    perturbation onto the eps-ball around x and the image onto [-1, 1]. Over all steps and restarts
    the iterate with the highest per-example loss is returned. Model parameters' ``.grad`` fields
    are not touched.

    Args:
        logits_fn: Differentiable map (B, C, H, W) -> (B, K) logits; may be stochastic (then use
            EOT).
        x: (B, C, H, W) clean images in [-1, 1].
        y: (B,) true labels.
        eps: Budget in **[0, 1] pixel units** (converted ×2 for our [-1, 1] range). 0 returns ``x``.
        norm: ``"linf"`` or ``"l2"``.
        steps: Number of gradient steps.
        step_size: Step α in [0, 1] units; default 2.5·eps/steps (Madry et al.).
        restarts: Number of independent runs (random starts); the best per example is kept.
        random_start: Start uniformly in the L∞ ball / at a random point of the L2 ball (first
            restart too).
        generator: Random generator for the random starts.
        loss: ``"ce"`` (cross-entropy) or ``"margin"`` (max_{j≠y} f_j - f_y, Carlini-Wagner style).
        targets: Optional (B,) target classes for a targeted attack (maximise -CE(t) or f_t - f_y).
        eot_samples: Number of forward/backward passes whose gradients are averaged per step
            (expectation over transformation for stochastic defences).

    Returns:
        (B, C, H, W) adversarial images, detached, in [-1, 1] and within the eps-ball of ``x``.
    """
    _check_attack(norm, eps, steps, restarts, eot_samples)
    x0 = x.detach()
    y = y.detach().long().to(x0.device)
    if targets is not None:
        targets = targets.detach().long().to(x0.device)
    if eps == 0:
        return x0.clone()
    eps_m = PIXEL_SCALE * float(eps)
    alpha = PIXEL_SCALE * (float(step_size) if step_size is not None else 2.5 * float(eps) / steps)

    best_x = x0.clone()
    best_loss = torch.full((x0.shape[0],), float("-inf"), device=x0.device)
    for _ in range(restarts):
        xa = _random_start(x0, eps_m, norm, generator) if random_start else x0.clone()
        for _ in range(steps):
            per, g = _loss_and_grad(logits_fn, xa, y, loss, targets, eot_samples)
            _keep_best(best_x, best_loss, xa, per)
            xa = xa + alpha * _ascent_direction(g, norm)
            xa = _project(xa, x0, eps_m, norm)
        _keep_best(best_x, best_loss, xa, _mean_loss(logits_fn, xa, y, loss, targets, eot_samples))
    return best_x.detach()


def _check_attack(norm: str, eps: float, steps: int, restarts: int, eot_samples: int) -> None:
    """Reject an unknown norm, a negative budget and non-positive counts."""
    if norm not in ("linf", "l2"):
        raise JemlabError(f"unknown PGD norm {norm!r}; choose 'linf' or 'l2'")
    if eps < 0:
        raise JemlabError(f"eps must be >= 0 (in [0, 1] pixel units), got {eps}")
    if steps < 1 or restarts < 1 or eot_samples < 1:
        raise JemlabError("steps, restarts and eot_samples must all be >= 1")


def _loss_and_grad(
    logits_fn: LogitsFn, xa: Tensor, y: Tensor, loss: str, targets: Tensor | None, eot_samples: int
) -> tuple[Tensor, Tensor]:
    """Per-example attack loss and its gradient with respect to the input, each averaged over ``eot_samples``
    passes (expectation over transformation); model parameters' ``.grad`` fields are not touched."""
    total_grad = torch.zeros_like(xa)
    total_loss = torch.zeros(xa.shape[0], device=xa.device)
    for _ in range(eot_samples):
        with torch.enable_grad():
            xg = xa.detach().requires_grad_(True)
            per = _per_example_loss(logits_fn(xg).float(), y, loss, targets)
            (g,) = torch.autograd.grad(per.sum(), [xg])
        total_grad += g.detach()
        total_loss += per.detach()
    return total_loss / eot_samples, total_grad / eot_samples


def _mean_loss(
    logits_fn: LogitsFn, xa: Tensor, y: Tensor, loss: str, targets: Tensor | None, eot_samples: int
) -> Tensor:
    """Per-example attack loss averaged over ``eot_samples`` passes, without gradients."""
    with torch.no_grad():
        per = torch.zeros(xa.shape[0], device=xa.device)
        for _ in range(eot_samples):
            per += _per_example_loss(logits_fn(xa).float(), y, loss, targets)
    return per / eot_samples


def _ascent_direction(g: Tensor, norm: str) -> Tensor:
    """Steepest-ascent step of unit size: sign(∇) for L∞, ∇/‖∇‖₂ for L2."""
    return g.sign() if norm == "linf" else g / _flat_norm(g).clamp_min(1e-12)


def _keep_best(best_x: Tensor, best_loss: Tensor, xa: Tensor, per: Tensor) -> None:
    """In place: where ``xa`` has a higher loss than the best so far, it becomes the best."""
    better = per > best_loss
    best_loss[better] = per[better]
    best_x[better] = xa[better]


def _predict(logits_fn: LogitsFn, x: Tensor, batch_size: int) -> Tensor:
    with torch.no_grad():
        return torch.cat([logits_fn(x[i : i + batch_size]).argmax(1).cpu() for i in range(0, len(x), batch_size)])


def evaluate_attack(
    logits_fn: LogitsFn,
    x: Tensor,
    y: Tensor,
    *,
    eps: float,
    norm: str = "linf",
    batch_size: int = 128,
    predict_fn: LogitsFn | None = None,
    **attack_kwargs: Any,
) -> dict[str, float]:
    """Attack every example and report clean and robust accuracy.

    An example counts as robust if it is classified correctly after the attack (clean mistakes count
    as non-robust, since the adversarial search starts at the clean point).

    Args:
        logits_fn: Differentiable classifier used by the attack.
        x: (N, C, H, W) clean images in [-1, 1].
        y: (N,) labels.
        eps: Budget in [0, 1] pixel units.
        norm: ``"linf"`` or ``"l2"``.
        batch_size: Attack batch size.
        predict_fn: Classifier used for the final predictions (default ``logits_fn``); for a
            stochastic defence this can average more chains than the attack's gradient does.
        **attack_kwargs: Passed to :func:`pgd_attack` (steps, step_size, restarts, generator, loss,
            ...).

    Returns:
        ``{"eps", "norm", "n", "clean_accuracy", "robust_accuracy"}``.
    """
    predict_fn = predict_fn or logits_fn
    y = y.long()
    clean_pred, adv_pred = [], []
    for i in range(0, len(x), batch_size):
        xb, yb = x[i : i + batch_size], y[i : i + batch_size]
        xa = pgd_attack(logits_fn, xb, yb, eps=eps, norm=norm, **attack_kwargs)
        clean_pred.append(_predict(predict_fn, xb, batch_size))
        adv_pred.append(_predict(predict_fn, xa, batch_size))
    yc = y.cpu()
    clean = torch.cat(clean_pred) == yc
    adv = torch.cat(adv_pred) == yc
    return {
        "eps": float(eps),
        "norm": norm,
        "n": len(x),
        "clean_accuracy": float(clean.double().mean()),
        "robust_accuracy": float((adv & clean).double().mean()),
    }


def robust_accuracy(
    logits_fn: LogitsFn, x: Tensor, y: Tensor, *, eps: float, norm: str = "linf", **kwargs: Any
) -> float:
    """Accuracy under a PGD attack of budget ``eps`` ([0, 1] pixel units).

    Args:
        logits_fn: Differentiable classifier.
        x: (N, C, H, W) images in [-1, 1].
        y: (N,) labels.
        eps: Budget in [0, 1] pixel units.
        norm: ``"linf"`` or ``"l2"``.
        **kwargs: Passed to :func:`evaluate_attack`.

    Returns:
        Robust accuracy in [0, 1].
    """
    return evaluate_attack(logits_fn, x, y, eps=eps, norm=norm, **kwargs)["robust_accuracy"]


def robustness_curve(
    logits_fn: LogitsFn,
    x: Tensor,
    y: Tensor,
    eps_list: Sequence[float],
    *,
    norm: str = "linf",
    **kwargs: Any,
) -> dict[str, Any]:
    """Robust accuracy at each budget in ``eps_list`` ([0, 1] pixel units).

    Args:
        logits_fn: Differentiable classifier.
        x: Images.
        y: Labels.
        eps_list: Budgets in [0, 1] pixel units.
        norm: ``"linf"`` or ``"l2"``.
        **kwargs: Passed to :func:`evaluate_attack`.

    Returns:
        ``{"norm", "eps": [...], "robust_accuracy": [...], "clean_accuracy"}``.
    """
    accs: list[float] = []
    clean = float("nan")
    for e in eps_list:
        r = evaluate_attack(logits_fn, x, y, eps=float(e), norm=norm, **kwargs)
        accs.append(r["robust_accuracy"])
        clean = r["clean_accuracy"]
    return {
        "norm": norm,
        "eps": [float(e) for e in eps_list],
        "robust_accuracy": accs,
        "clean_accuracy": clean,
    }


# ---------------------------------------------------------------- JEM defence


def langevin_refine(
    energy_fn: Callable[[Tensor], Tensor],
    x: Tensor,
    *,
    steps: int,
    step_size: float = 1.0,
    noise_std: float = 0.01,
    init_noise_std: float = 0.0,
    generator: torch.Generator | None = None,
    differentiable: bool = True,
    grad_clamp: float | None = None,
) -> Tensor:
    """K steps of SGLD on the energy starting at x: x ← clamp(x − α∇ₓE(x) + σε, -1, 1).

    With ``differentiable=True`` the graph of every step is kept (``create_graph=True``), so
    gradients of the output flow back to the input through the refinement (what an EOT attack
    needs); that is the one thing the library's sampler (:func:`jemlab.samplers.sgld`) does not do,
    and ``differentiable=False`` runs that sampler after the start noise (its noise comes from a
    `generator` on x's device). Model parameters' ``.grad`` are not touched. Defaults follow JEM's attack code (step 1,
    σ = 0.01, start noise 0.03 is ``init_noise_std``).

    Args:
        energy_fn: (B, C, H, W) -> (B,) energies, e.g. ``model.energy``.
        x: Start images.
        steps: K (0 returns x, plus start noise).
        step_size: α.
        noise_std: σ of the per-step Gaussian noise.
        init_noise_std: σ of the Gaussian noise added once before the first step.
        generator: Random generator for the noise.
        differentiable: Keep the graph through all steps.
        grad_clamp: If set, clip ∇ₓE element-wise to ±c before the step (proximal SGLD, as in
            the sampler config of models trained that way).

    Returns:
        Refined images in [-1, 1].
    """

    def noise_like(t: Tensor) -> Tensor:  # drawn on the CPU generator, moved to x's device
        return torch.randn(t.shape, generator=generator, dtype=t.dtype).to(t.device)

    xk = x if differentiable else x.detach()
    if init_noise_std > 0:
        xk = (xk + init_noise_std * noise_like(xk)).clamp(_LOW, _HIGH)
    if not differentiable:
        out, _ = sgld(
            energy_fn, xk, steps=steps, step_size=step_size, noise=noise_std, grad_clamp=grad_clamp, generator=generator
        )
        return out
    # the library's Langevin step, kept differentiable end to end (autograd through every gradient)
    settings = LangevinSettings(step_size, noise_std, grad_clamp, bounds=(_LOW, _HIGH))
    gradient = autograd_gradient(energy_fn, create_graph=True)
    with torch.enable_grad():
        for _ in range(steps):
            xk, _, _ = langevin_step(xk, gradient, noise_like(xk) if noise_std > 0 else None, settings)
    return xk


def langevin_defence(
    energy_fn: Callable[[Tensor], Tensor],
    *,
    steps: int = 10,
    step_size: float = 1.0,
    noise_std: float = 0.01,
    init_noise_std: float = 0.03,
    generator: torch.Generator | None = None,
    grad_clamp: float | None = None,
) -> Callable[[Tensor], Tensor]:
    """A differentiable ``defend(x)`` callable built on :func:`langevin_refine` (JEM defaults).

    Args:
        energy_fn: Energy function.
        steps: K SGLD steps.
        step_size: α.
        noise_std: Per-step noise σ.
        init_noise_std: Start noise σ (JEM's ``--sigma`` = 0.03).
        generator: Random generator.
        grad_clamp: Optional element-wise gradient clip (see :func:`langevin_refine`).

    Returns:
        ``defend(x) -> x_refined``.
    """

    def defend(x: Tensor) -> Tensor:
        return langevin_refine(
            energy_fn,
            x,
            steps=steps,
            step_size=step_size,
            noise_std=noise_std,
            init_noise_std=init_noise_std,
            generator=generator,
            differentiable=True,
            grad_clamp=grad_clamp,
        )

    return defend


def defended_logits_fn(logits_fn: LogitsFn, defend: Callable[[Tensor], Tensor], n_chains: int = 5) -> LogitsFn:
    """Classifier that refines the input with ``defend`` and averages logits over ``n_chains``
    chains.

    Mirrors JEM's ``refined_logits`` (5 duplicated chains, logits averaged). Gradients flow through
    ``defend``, so :func:`pgd_attack` on the result is the EOT attack; add ``eot_samples > 1`` to
    average more.

    Args:
        logits_fn: Plain classifier.
        defend: Differentiable stochastic refinement.
        n_chains: Number of refinement chains per input.

    Returns:
        A (stochastic) differentiable ``logits_fn``.
    """
    if n_chains < 1:
        raise JemlabError(f"n_chains must be >= 1, got {n_chains}")

    def fn(x: Tensor) -> Tensor:
        b = x.shape[0]
        dup = x.repeat(n_chains, *([1] * (x.ndim - 1)))
        logits = logits_fn(defend(dup))
        return logits.reshape(n_chains, b, -1).mean(dim=0)

    return fn


def plot_robustness_curves(
    curves: dict[str, dict[str, Any]], path: str | Path, title: str = "Robust accuracy vs eps"
) -> Path:
    """Save robust-accuracy-vs-eps curves as PNG.

    Args:
        curves: label -> output of :func:`robustness_curve` (keys ``eps`` and ``robust_accuracy``).
        path: Output PNG path.
        title: Title.

    Returns:
        The written path.
    """
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.5, 4.0), dpi=100)
    ax = fig.add_subplot(1, 1, 1)
    for label, c in curves.items():
        ax.plot(c["eps"], c["robust_accuracy"], marker="o", label=label)
    ax.set_xlabel("eps ([0, 1] pixel units)")
    ax.set_ylabel("robust accuracy")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.set_title(title)
    ax.legend(fontsize=8)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path)
    return path
