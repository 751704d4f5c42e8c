"""Stochastic gradient Langevin dynamics on an energy, as a pure function.

One step (Welling & Teh, 2011; the "cold" variant of JEM, Grathwohl et al., 2020, eq. 11):

    x ← clamp(x − α · clip(∇ₓE(x), ±c) + σ · ε,  −1, 1),      ε ~ N(0, I)

Textbook Langevin ties α = σ²/2; JEM and its successors decouple them (α = 1, σ = 0.01) and we expose both.
The function sees only an energy function: it never touches a model, a buffer or train/eval modes, and it asks
autograd for the gradient with respect to x alone, so no parameter gradient is computed or accumulated.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

EnergyFn = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class SGLDStats:
    """Diagnostics of one chain run (means over the batch, measured at the last step)."""

    grad_norm: float  # mean per-sample L2 norm of ∇ₓE before clipping
    energy: float  # mean energy at the last gradient evaluation


def sgld(
    energy_fn: EnergyFn,
    x_init: torch.Tensor,
    *,
    steps: int,
    step_size: float,
    noise: float,
    grad_clamp: float | None = None,
    noise_first: bool = False,
    bounds: tuple[float, float] | None = (-1.0, 1.0),
    generator: torch.Generator | None = None,
    autocast_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, SGLDStats]:
    """Run `steps` SGLD steps from `x_init` and return the final samples (detached) and diagnostics.

    Args:
        energy_fn: maps a batch (N, ...) to energies (N,); must be differentiable in its input.
        x_init: starting points (N, ...); not modified.
        steps: number of Langevin steps K (0 returns a copy of x_init).
        step_size: α, the multiplier of the energy gradient.
        noise: σ, the standard deviation of the Gaussian noise added each step.
        grad_clamp: if set, clip each gradient element to [−c, c] (proximal SGLD of JEM++ and the course code).
        noise_first: add the noise before the gradient step (the course code's order) instead of after it.
        bounds: clamp the chain to this box after every update (pixels live in [−1, 1]); None for no clamp.
        generator: random source for the noise, so a chain is reproducible independently of global RNG state.
        autocast_dtype: if set (e.g. torch.bfloat16), evaluate the energy and its gradient under autocast; the
            chain itself stays in the input's dtype.

    Returns:
        (samples, stats): samples have the shape and dtype of x_init and require no grad.
    """
    x = x_init.detach().clone()
    grad_norm = torch.zeros(())
    energy = torch.zeros(())
    device_type = x.device.type
    for step in range(steps):
        if noise_first and noise > 0:
            x.add_(
                torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype),
                alpha=noise,
            )
            if bounds is not None:
                x.clamp_(*bounds)
        x.requires_grad_(True)
        with torch.autocast(device_type, dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
            e = energy_fn(x)
        (grad,) = torch.autograd.grad(e.sum(), x)
        x = x.detach()
        if step == steps - 1:  # diagnostics once per chain, not in every step of the hot loop
            energy = e.detach().float().mean()
            grad_norm = grad.flatten(1).norm(dim=1).mean()
        if grad_clamp is not None:
            grad = grad.clamp(-grad_clamp, grad_clamp)
        x.sub_(grad, alpha=step_size)
        if not noise_first and noise > 0:
            x.add_(
                torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype),
                alpha=noise,
            )
        if bounds is not None:
            x.clamp_(*bounds)
    return x, SGLDStats(grad_norm=float(grad_norm), energy=float(energy))
