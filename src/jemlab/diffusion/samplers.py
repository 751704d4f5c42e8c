"""DDIM and DDPM ancestral sampling from a noise estimate (Song et al., 2021; Ho et al., 2020).

The samplers see only ``eps_fn(x_t, t) -> ε̂``, a `NoiseSchedule` and a noise source ``randn_like(x)``; they
know nothing about energies, models or runs (the run-level glue is `jemlab.generate.egc`).
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

EpsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x_t, t) ↦ ε̂
NoiseFn = Callable[[torch.Tensor], torch.Tensor]  # x ↦ z ~ N(0, I) shaped like x


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
    x: torch.Tensor,
    *,
    steps: int,
    eta: float = 0.0,
    clip_x0: bool = True,
    randn_like: NoiseFn | None = None,
    start: int = 0,
    stop: int | None = None,
) -> torch.Tensor:
    """Run the reverse process along `steps` evenly spaced timesteps: from x_T ~ N(0, I) to x_0, or a segment of it.

    The sampler is handed its random source (as in NVlabs/edm): a caller that gives every sample its own generator
    gets images that do not depend on the batch they are drawn in.

    Args:
        eps_fn: ε̂(x_t, t) with t a (N,) int64 tensor on x's device.
        schedule: the noise schedule the model was trained with.
        x: (N, C, H, W) images at position `start` (x_T when `start` is 0).
        steps: number of model evaluations from x_T to x_0.
        eta: 0 = DDIM, 1 = DDPM ancestral.
        clip_x0: clip the predicted clean image to [−1, 1] at each step.
        randn_like: x ↦ z ~ N(0, I) shaped like x, the per-step noise (η > 0); default ``torch.randn_like``.
        start, stop: run positions start … stop − 1 of the `steps` (default: all of them); positions past the end
            leave x unchanged, so a caller can advance a chain piece by piece (animations, ``jemlab serve``).

    Returns:
        x after position stop − 1, (N, C, H, W): the x_0 estimates when the segment reaches the end (not clamped:
        callers that want images clamp to [−1, 1]).
    """
    taus = timestep_subsequence(schedule.timesteps, steps).tolist()
    alpha_bar = schedule.alpha_bar.tolist()
    randn_like = randn_like or torch.randn_like
    stop = len(taus) if stop is None else min(stop, len(taus))
    for i in range(max(start, 0), stop):
        t_batch = torch.full((len(x),), taus[i], dtype=torch.long, device=x.device)
        eps = eps_fn(x, t_batch)
        last = i + 1 == len(taus)
        alpha_bar_s = 1.0 if last else alpha_bar[taus[i + 1]]
        noise = randn_like(x) if eta > 0 and not last else None
        x = diffusion_step(x, eps, alpha_bar[taus[i]], alpha_bar_s, eta, noise, clip_x0)
    return x


# name → η, so that both samplers share one loop (DDPM ancestral = DDIM with η = 1).
SAMPLERS: dict[str, float | None] = {"ddim": None, "ddpm": 1.0}


def sampler_eta(name: str, eta: float) -> float:
    """η for a named sampler: ``ddim`` uses the configured η, ``ddpm`` always 1."""
    if name not in SAMPLERS:
        raise ConfigError(f"unknown diffusion sampler '{name}'; choose one of: {', '.join(SAMPLERS)}")
    fixed = SAMPLERS[name]
    return eta if fixed is None else fixed
