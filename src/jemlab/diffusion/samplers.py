"""DDIM and DDPM ancestral sampling from a noise estimate (Song et al., 2021; Ho et al., 2020).

The samplers see only ``eps_fn(x_t, t) -> ε̂`` and a `NoiseSchedule`; they know nothing about energies or models.
Both walk a decreasing subsequence τ of the T timesteps. One step from τ_i = t to τ_{i−1} = s (ᾱ_s = 1 after the
last step) is DDIM's update (Song et al., 2021, eq. 12):

    x̂_0 = (x_t − √(1 − ᾱ_t) ε̂) / √ᾱ_t
    σ   = η · √((1 − ᾱ_s)/(1 − ᾱ_t)) · √(1 − ᾱ_t/ᾱ_s)
    x_s = √ᾱ_s x̂_0 + √(1 − ᾱ_s − σ²) ε̂ + σ z

η = 0 is deterministic DDIM; η = 1 makes σ² the variance of the DDPM posterior q(x_s | x_t, x̂_0) and the step
DDPM's ancestral step on the respaced chain (with τ = all T steps, exactly Ho et al.'s Algorithm 2), which is how
``ddpm`` is implemented.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from jemlab.diffusion.schedule import NoiseSchedule
from jemlab.errors import ConfigError

EpsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def timestep_subsequence(timesteps: int, steps: int) -> torch.Tensor:
    """`steps` timesteps evenly spaced over [0, T − 1], decreasing, always starting at T − 1 and ending at 0."""
    if not 1 <= steps <= timesteps:
        raise ConfigError(f"sampler steps must be in [1, {timesteps}], got {steps}")
    return torch.linspace(timesteps - 1, 0, steps).round().long().unique().flip(0)


def diffusion_step(
    x_t: torch.Tensor,
    eps: torch.Tensor,
    alpha_bar_t: float,
    alpha_bar_s: float,
    eta: float,
    noise: torch.Tensor | None,
    clip_x0: bool = True,
) -> torch.Tensor:
    """One DDIM(η) step from noise level ᾱ_t to ᾱ_s (see the module docstring).

    Args:
        x_t: (N, C, H, W) current images.
        eps: ε̂(x_t, t), shaped like x_t.
        alpha_bar_t, alpha_bar_s: ᾱ at the current and the next (less noisy) timestep; ᾱ_s = 1 ends the chain.
        eta: 0 = deterministic DDIM, 1 = DDPM posterior variance.
        noise: z ~ N(0, I) shaped like x_t (unused when eta = 0).
        clip_x0: clip x̂_0 to [−1, 1] and re-derive ε̂ from it (keeps early, poor estimates in the image range).
    """
    sqrt_ab_t, sigma_t = alpha_bar_t**0.5, (1 - alpha_bar_t) ** 0.5
    x0 = (x_t - sigma_t * eps) / sqrt_ab_t
    if clip_x0:
        x0 = x0.clamp(-1, 1)
        eps = (x_t - sqrt_ab_t * x0) / sigma_t
    std = eta * ((1 - alpha_bar_s) / (1 - alpha_bar_t)) ** 0.5 * (1 - alpha_bar_t / alpha_bar_s) ** 0.5
    direction = max(1 - alpha_bar_s - std**2, 0.0) ** 0.5
    x_s = alpha_bar_s**0.5 * x0 + direction * eps
    if std > 0 and noise is not None:
        x_s = x_s + std * noise
    return x_s


def sample(
    eps_fn: EpsFn,
    schedule: NoiseSchedule,
    x_T: torch.Tensor,
    *,
    steps: int,
    eta: float = 0.0,
    clip_x0: bool = True,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Run the reverse process from x_T ~ N(0, I) along `steps` evenly spaced timesteps.

    Args:
        eps_fn: ε̂(x_t, t) with t a (N,) int64 tensor on x's device.
        schedule: the noise schedule the model was trained with.
        x_T: (N, C, H, W) starting noise.
        steps: number of model evaluations.
        eta: 0 = DDIM, 1 = DDPM ancestral.
        clip_x0: clip the predicted clean image to [−1, 1] at each step.
        generator: random source of the per-step noise (on x_T's device).

    Returns:
        x_0 estimates, (N, C, H, W) (not clamped: callers that want images clamp to [−1, 1]).
    """
    taus = timestep_subsequence(schedule.timesteps, steps)
    alpha_bar = schedule.alpha_bar.tolist()
    x = x_T
    for i, t in enumerate(taus.tolist()):
        t_batch = torch.full((len(x),), t, dtype=torch.long, device=x.device)
        eps = eps_fn(x, t_batch)
        alpha_bar_s = alpha_bar[taus[i + 1]] if i + 1 < len(taus) else 1.0
        noise = None
        if eta > 0 and i + 1 < len(taus):
            noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        x = diffusion_step(x, eps, alpha_bar[t], alpha_bar_s, eta, noise, clip_x0)
    return x


# name → η, so that both samplers share one loop (DDPM ancestral = DDIM with η = 1).
SAMPLERS: dict[str, float | None] = {"ddim": None, "ddpm": 1.0}


def sampler_eta(name: str, eta: float) -> float:
    """η for a named sampler: ``ddim`` uses the configured η, ``ddpm`` always 1."""
    if name not in SAMPLERS:
        raise ConfigError(f"unknown diffusion sampler '{name}'; choose one of: {', '.join(SAMPLERS)}")
    fixed = SAMPLERS[name]
    return eta if fixed is None else fixed
