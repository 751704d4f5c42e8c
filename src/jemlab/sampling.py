"""Drawing samples from a trained energy model: the glue between a model, its config and the pure SGLD sampler.

Unconditional samples follow the marginal energy E(x); class-conditional samples follow the joint energy
E(x, y) = −f(x)[y], i.e. p(x|y) ∝ exp(f(x)[y]) (JEM, Grathwohl et al., 2020, Sec. 3).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from jemlab.accel import AUTOCAST_DTYPES, choose_precision, input_gradient
from jemlab.config import SamplerConfig
from jemlab.models import EnergyModel
from jemlab.samplers import SGLDStats, sgld
from jemlab.samplers.fast import fast_sgld
from jemlab.samplers.pyld import pyld, split_first_layer


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
        cfg: sampler settings (steps, α, σ, clipping, order, precision, implementation, PYLD).
        labels: if given, sample p(x|y) with the joint energy for these classes.
        steps, step_size, noise: override the config for this call (e.g. longer chains at generation time).
        generator: random source for the Langevin noise.
        channels_last: hand the chains to the model in NHWC layout.
    """
    energy_for_rows = None
    if labels is None:
        energy_fn = model.energy
    else:
        labels = labels.to(x_init.device)

        def energy_fn(x: torch.Tensor) -> torch.Tensor:
            return model.joint_energy(x, labels)

        def energy_for_rows(rows: slice):  # the joint energy of a group of chains (fast sampler's chain groups)
            return lambda x: model.joint_energy(x, labels[rows])

    if channels_last and x_init.dim() == 4:
        x_init = x_init.contiguous(memory_format=torch.channels_last)
    # sampler.precision=auto: bf16 where this device runs it natively, else fp32 (jemlab.accel.choices)
    autocast = AUTOCAST_DTYPES[choose_precision(cfg.precision, x_init.device, "sampler.precision").value]
    settings = {
        "steps": cfg.steps if steps is None else steps,
        "step_size": cfg.step_size if step_size is None else step_size,
        "noise": cfg.noise if noise is None else noise,
        "grad_clamp": cfg.grad_clamp,
        "generator": generator,
        "autocast_dtype": autocast,
    }
    with frozen(model):
        if cfg.pyld_steps > 0:  # JEM++ PYLD (samplers/pyld.py); noise is added after each outer step
            energy_and_features, first_layer = split_first_layer(model, energy_fn, x_init)
            return pyld(
                energy_and_features,
                first_layer,
                x_init,
                inner_steps=cfg.pyld_steps,
                inner_step_size=cfg.pyld_step_size,
                inner_clamp=cfg.pyld_clamp,
                **settings,
            )
        if cfg.impl == "fast":
            traced = cfg.compile or cfg.cuda_graph
            gradient_fn = input_gradient(model, x_init, cfg.gradient, autocast, energy_fn, labels, traced)
            return fast_sgld(
                energy_fn,
                x_init,
                noise_first=cfg.noise_first,
                chain_groups=cfg.chain_groups or torch.get_num_threads(),
                energy_for_rows=energy_for_rows,
                compile=cfg.compile,
                cuda_graph=cfg.cuda_graph,
                gradient_fn=gradient_fn,
                **settings,
            )
        return sgld(energy_fn, x_init, noise_first=cfg.noise_first, **settings)

