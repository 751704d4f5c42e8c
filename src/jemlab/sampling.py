"""Drawing samples from a trained energy model: the glue between a model, its config and the pure SGLD sampler.

Unconditional samples follow the marginal energy E(x); class-conditional samples follow the joint energy
E(x, y) = −f(x)[y], i.e. p(x|y) ∝ exp(f(x)[y]) (JEM, Grathwohl et al., 2020, Sec. 3).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from jemlab.config import SamplerConfig
from jemlab.models import EnergyModel
from jemlab.samplers import SGLDStats, sgld


@contextmanager
def frozen(model: nn.Module) -> Iterator[None]:
    """Turn off parameter gradients while sampling: autograd then builds no graph for the weights at all."""
    flags = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in zip(model.parameters(), flags, strict=True):
            p.requires_grad_(flag)


def run_chains(
    model: EnergyModel,
    x_init: torch.Tensor,
    cfg: SamplerConfig,
    *,
    labels: torch.Tensor | None = None,
    steps: int | None = None,
    step_size: float | None = None,
    noise: float | None = None,
    generator: torch.Generator | None = None,
    channels_last: bool = False,
) -> tuple[torch.Tensor, SGLDStats]:
    """Refine `x_init` with SGLD on the model's energy using the config's sampler settings.

    Args:
        model: the energy model (its parameters are frozen for the duration).
        x_init: (N, C, H, W) starting points in [−1, 1].
        cfg: sampler settings (steps, α, σ, clipping, order, precision).
        labels: if given, sample p(x|y) with the joint energy for these classes.
        steps, step_size, noise: override the config for this call (e.g. longer chains at generation time).
        generator: random source for the Langevin noise.
        channels_last: hand the chains to the model in NHWC layout.
    """
    if labels is None:
        energy_fn = model.energy
    else:
        labels = labels.to(x_init.device)

        def energy_fn(x: torch.Tensor) -> torch.Tensor:
            return model.joint_energy(x, labels)

    if channels_last and x_init.dim() == 4:
        x_init = x_init.contiguous(memory_format=torch.channels_last)
    autocast = torch.bfloat16 if cfg.precision == "bf16" else None
    with frozen(model):
        return sgld(
            energy_fn,
            x_init,
            steps=cfg.steps if steps is None else steps,
            step_size=cfg.step_size if step_size is None else step_size,
            noise=cfg.noise if noise is None else noise,
            grad_clamp=cfg.grad_clamp,
            noise_first=cfg.noise_first,
            generator=generator,
            autocast_dtype=autocast,
        )
