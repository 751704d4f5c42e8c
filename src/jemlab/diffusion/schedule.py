"""Noise schedules and the forward process of a DDPM (Ho et al., 2020), in the discrete-time form EGC uses.

Timesteps are indices t = 0 … T−1; index t holds β_{t+1} of the paper, so ᾱ[0] = 1 − β_1 is the least noisy level
and "t = 0" is where EGC classifies. The forward process adds noise in one jump (Ho et al., eq. 4):

    x_t = √ᾱ_t · x_0 + √(1 − ᾱ_t) · ε,   ε ~ N(0, I).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from jemlab.errors import ConfigError


def linear_betas(timesteps: int) -> torch.Tensor:
    """β linear from 1e-4 to 0.02 for 1,000 steps (Ho et al., 2020), rescaled so other T keep the same ᾱ_T."""
    scale = 1000.0 / timesteps
    return torch.linspace(scale * 1e-4, scale * 0.02, timesteps, dtype=torch.float64)


def cosine_betas(timesteps: int, offset: float = 0.008, max_beta: float = 0.999) -> torch.Tensor:
    """ᾱ(s) = cos²((s + offset)/(1 + offset) · π/2) with s = t/T (Nichol & Dhariwal, 2021, eq. 17), β capped."""

    def alpha_bar(s: float) -> float:
        return math.cos((s + offset) / (1 + offset) * math.pi / 2) ** 2

    betas = [min(1 - alpha_bar((i + 1) / timesteps) / alpha_bar(i / timesteps), max_beta) for i in range(timesteps)]
    return torch.tensor(betas, dtype=torch.float64)


SCHEDULES: dict[str, Callable[[int], torch.Tensor]] = {"linear": linear_betas, "cosine": cosine_betas}


class NoiseSchedule:
    """ᾱ_t and the quantities derived from it, as float64 CPU tables indexed by integer timesteps.

    Args:
        name: ``"linear"`` or ``"cosine"``.
        timesteps: T, the number of diffusion steps (EGC: 1,000).
    """

    def __init__(self, name: str = "linear", timesteps: int = 1000) -> None:
        if name not in SCHEDULES:
            raise ConfigError(f"unknown noise schedule '{name}'; choose one of: {', '.join(SCHEDULES)}")
        if timesteps < 2:
            raise ConfigError(f"a noise schedule needs at least 2 timesteps, got {timesteps}")
        self.name = name
        self.timesteps = timesteps
        self.betas = SCHEDULES[name](timesteps)  # (T,)
        self.alpha_bar = torch.cumprod(1 - self.betas, dim=0)  # (T,) ᾱ_t, decreasing

    def _gather(self, table: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """table[t] as (N, 1, …, 1) in like's dtype and device, ready to broadcast over images."""
        values = table[t.long().cpu()].to(device=like.device, dtype=like.dtype)
        return values.reshape(-1, *([1] * (like.dim() - 1)))

    def signal(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """√ᾱ_t, shaped to broadcast over `like`."""
        return self._gather(self.alpha_bar.sqrt(), t, like)

    def sigma(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """√(1 − ᾱ_t), the noise level, shaped to broadcast over `like`."""
        return self._gather((1 - self.alpha_bar).sqrt(), t, like)

    def min_snr_weight(self, t: torch.Tensor, gamma: float, like: torch.Tensor) -> torch.Tensor:
        """min(SNR_t, γ) / SNR_t with SNR_t = ᾱ_t / (1 − ᾱ_t), shaped to broadcast over `like`: the Min-SNR-γ weight
        of an ε-prediction loss (Hang et al., ICCV 2023). It is 1 where the image is noisier than SNR γ and falls as
        γ/SNR_t towards t = 0, where ε is nearly unlearnable (σ_t ≈ 0.01 on 8-bit data) and its error barely moves
        the predicted clean image (an error δ in ε̂ moves x̂₀ by σ_t δ / √ᾱ_t)."""
        snr = self.alpha_bar / (1 - self.alpha_bar)
        return self._gather(snr.clamp(max=gamma) / snr, t, like)

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Draw x_t ~ q(x_t | x_0) with the given noise: √ᾱ_t x_0 + √(1 − ᾱ_t) ε."""
        return self.signal(t, x0) * x0 + self.sigma(t, x0) * noise

    def sample_timesteps(self, n: int, generator: torch.Generator | None = None, device: str | torch.device = "cpu"):
        """n timesteps uniform on {0, …, T−1} (the training distribution of Ho et al., Alg. 1)."""
        return torch.randint(0, self.timesteps, (n,), generator=generator, device=device)
