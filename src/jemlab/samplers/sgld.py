"""Stochastic gradient Langevin dynamics on an energy, as a pure function: the reference chain.

`sgld` runs `jemlab.samplers.langevin.langevin_step` K times with autograd's input gradient. It sees only an
energy function: it never touches a model, a buffer or train/eval modes, and it asks autograd for the gradient with
respect to x alone, so no parameter gradient is computed or accumulated. The faster paths of `jemlab.accel` run
the same step and draw the same noise (tests hold them to this chain).
"""

from __future__ import annotations

import torch

from jemlab.samplers.langevin import (
    EnergyFn,
    LangevinSettings,
    NoiseFn,
    SGLDStats,
    autograd_gradient,
    chain_stats,
    gaussian_noise,
    langevin_step,
)

__all__ = ["EnergyFn", "SGLDStats", "sgld"]


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
    randn_like: NoiseFn | None = None,
    autocast_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, SGLDStats]:
    """Run `steps` SGLD steps from `x_init` and return the final samples (detached) and diagnostics.

    Args:
        energy_fn: maps a batch (N, ...) to energies (N,); must be differentiable in its input.
        x_init: starting points (N, ...); not modified.
        steps: number of Langevin steps K (0 returns a copy of x_init).
        step_size, noise, grad_clamp, noise_first, bounds: α, σ, the element-wise gradient clip, the course
            code's order and the pixel box (`jemlab.samplers.langevin.LangevinSettings`).
        generator: random source for the noise, so a chain is reproducible independently of global RNG state.
        randn_like: x ↦ N(0, I) noise shaped like x, replacing `generator` (e.g. one generator per sample, so
            that a sample does not depend on the batch it is drawn in).
        autocast_dtype: if set (e.g. torch.bfloat16), evaluate the energy and its gradient under autocast; the
            chain itself stays in the input's dtype.

    Returns:
        (samples, stats): samples have the shape and dtype of x_init and require no grad.
    """
    s = LangevinSettings(step_size, noise, grad_clamp, noise_first, bounds)
    draw = randn_like or gaussian_noise(generator)
    gradient = autograd_gradient(energy_fn, autocast_dtype)
    x = x_init.detach().clone()
    energy = grad = None
    for _ in range(steps):
        x, energy, grad = langevin_step(x, gradient, draw(x) if noise > 0 else None, s, inplace=True)
    if grad is None:
        return x, SGLDStats(grad_norm=0.0, energy=0.0)
    return x, chain_stats(energy, grad)
