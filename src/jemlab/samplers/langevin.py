"""The Langevin step, written once.

One step of stochastic gradient Langevin dynamics on an energy (Welling & Teh, 2011; the "cold" variant of JEM,
Grathwohl et al., 2020, eq. 11):

    x ← clamp(x − α · clip(∇ₓE(x), ±c) + σ · ε,  −1, 1),      ε ~ N(0, I)

Textbook Langevin ties α = σ²/2; JEM and its successors decouple them (α = 1, σ = 0.01) and we expose both. The
course code adds the noise first (``noise_first``): x ← clamp(x + σε), then the gradient step and the clamp.

Every sampler path calls `langevin_step`: the reference chain (`jemlab.samplers.sgld`), the fast ones
(`jemlab.accel`: explicit gradients, chain groups, torch.compile, CUDA graphs), PYLD's outer step and the SGLD
defence of the robustness evaluation. They differ in how they get ∇ₓE (a `GradientFn`) and where their noise comes
from (a `NoiseFn`), never in the update itself.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

EnergyFn = Callable[[torch.Tensor], torch.Tensor]
# x ↦ (E(x) per sample, ∇ₓE(x) shaped like x)
GradientFn = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
# x ↦ standard normal noise shaped like x (one draw per call)
NoiseFn = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class LangevinSettings:
    """Everything that defines one step besides the energy and the noise.

    Attributes:
        step_size: α, the multiplier of the energy gradient.
        noise: σ, the standard deviation of the Gaussian noise added each step (0: no noise is drawn).
        grad_clamp: if set, clip each gradient element to [−c, c] (proximal SGLD of JEM++ and the course code).
        noise_first: add the noise before the gradient step (the course code's order) instead of after it.
        bounds: clamp the chain to this box after every update (pixels live in [−1, 1]); None for no clamp.
    """

    step_size: float
    noise: float
    grad_clamp: float | None = None
    noise_first: bool = False
    bounds: tuple[float, float] | None = (-1.0, 1.0)


@dataclass
class SGLDStats:
    """Diagnostics of one chain run (means over the batch, measured at the last step)."""

    grad_norm: float  # mean per-sample L2 norm of ∇ₓE before clipping
    energy: float  # mean energy at the last gradient evaluation


def langevin_step(
    x: torch.Tensor,
    gradient: GradientFn,
    noise: torch.Tensor | None,
    s: LangevinSettings,
    *,
    inplace: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One Langevin step from x; returns (x after the step, E at the gradient's point, ∇ₓE there, unclipped).

    Args:
        x: the chains (N, ...).
        gradient: x ↦ (E(x), ∇ₓE(x)).
        noise: ε for this step, shaped like x (unused and may be None when ``s.noise == 0``).
        s: step size, noise scale, clipping, order and bounds.
        inplace: update x's own memory (hot eager loops: no allocation per step); otherwise x is left untouched
            and the result is a new tensor (autograd through the step, torch.compile).
    """
    if s.noise_first and s.noise > 0:
        x = _clamp(_add(x, noise, s.noise, inplace), s.bounds, inplace)
    energy, grad = gradient(x)
    update = grad.clamp(-s.grad_clamp, s.grad_clamp) if s.grad_clamp is not None else grad
    x = _add(x, update.to(x.dtype), -s.step_size, inplace)
    if not s.noise_first and s.noise > 0:
        x = _add(x, noise, s.noise, inplace)
    return _clamp(x, s.bounds, inplace), energy, grad


def autograd_gradient(
    energy_fn: EnergyFn, autocast_dtype: torch.dtype | None = None, create_graph: bool = False
) -> GradientFn:
    """x ↦ (E(x), ∇ₓE(x)) by autograd, with respect to x alone (no parameter gradient is accumulated).

    Args:
        energy_fn: maps a batch (N, ...) to energies (N,).
        autocast_dtype: evaluate the network under autocast in this dtype (the chain keeps its own dtype).
        create_graph: keep the graph through the gradient, so that a chain can be differentiated end to end
            (the adaptive attack on the SGLD defence); the energy is then not detached either.
    """

    def gradient(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if not (create_graph and x.requires_grad):  # keep the graph that leads to x only when differentiating it
            x = x.detach().requires_grad_(True)
        cast = autocast_dtype or torch.bfloat16
        with torch.enable_grad():
            with torch.autocast(x.device.type, dtype=cast, enabled=autocast_dtype is not None):
                energy = energy_fn(x)
            (grad,) = torch.autograd.grad(energy.sum(), x, create_graph=create_graph)
        return (energy if create_graph else energy.detach()), grad

    return gradient


def gaussian_noise(generator: torch.Generator | None = None) -> NoiseFn:
    """ε ~ N(0, I) shaped like x from one generator for the whole batch (the numbers ``torch.randn`` draws)."""

    def noise(x: torch.Tensor) -> torch.Tensor:
        return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)

    return noise


def chain_stats(energy: torch.Tensor, grad: torch.Tensor) -> SGLDStats:
    """Batch means of the last step's energies and per-sample gradient norms."""
    return SGLDStats(
        grad_norm=float(grad.float().flatten(1).norm(dim=1).mean()), energy=float(energy.detach().float().mean())
    )


def _add(x: torch.Tensor, y: torch.Tensor, alpha: float, inplace: bool) -> torch.Tensor:
    return x.add_(y, alpha=alpha) if inplace else x.add(y, alpha=alpha)


def _clamp(x: torch.Tensor, bounds: tuple[float, float] | None, inplace: bool) -> torch.Tensor:
    if bounds is None:
        return x
    return x.clamp_(*bounds) if inplace else x.clamp(*bounds)
