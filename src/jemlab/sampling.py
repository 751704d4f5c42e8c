"""Drawing samples from a trained energy model: the glue between a model, its config and the samplers.

Unconditional samples follow the marginal energy E(x); class-conditional samples follow the joint energy
E(x, y) = −f(x)[y], i.e. p(x|y) ∝ exp(f(x)[y]) (JEM, Grathwohl et al., 2020, Sec. 3).

Every path runs the same Langevin step (`jemlab.samplers.langevin`); they are registered by name in `PATHS` and
one is picked from the config by `path_name`: JEM++'s ``pyld`` when ``sampler.pyld_steps > 0``, else
``sampler.impl`` (``reference``: the plain `sgld` function; ``fast``: `jemlab.accel.fast_sgld`, whose explicit
gradient, chain groups, torch.compile and CUDA graphs are further chosen by the hardware probe and the config).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from jemlab.accel import AUTOCAST_DTYPES, choose_precision, fast_sgld, input_gradient
from jemlab.config import SamplerConfig
from jemlab.models import EnergyModel
from jemlab.samplers import SGLDStats, pyld, sgld, split_first_layer
from jemlab.samplers.langevin import EnergyFn, NoiseFn


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


@dataclass
class Chains:
    """One request for chains, as every sampler path receives it."""

    model: EnergyModel
    x_init: torch.Tensor
    cfg: SamplerConfig
    energy_fn: EnergyFn
    energy_for_rows: Callable[[slice], EnergyFn] | None  # per-group energies (joint energies hold labels)
    labels: torch.Tensor | None
    autocast_dtype: torch.dtype | None
    settings: dict  # steps, step_size, noise, grad_clamp, generator, randn_like, autocast_dtype


def _reference(c: Chains) -> tuple[torch.Tensor, SGLDStats]:
    return sgld(c.energy_fn, c.x_init, noise_first=c.cfg.noise_first, **c.settings)


def _fast(c: Chains) -> tuple[torch.Tensor, SGLDStats]:
    cfg = c.cfg
    traced = cfg.compile or cfg.cuda_graph
    gradient_fn = input_gradient(c.model, c.x_init, cfg.gradient, c.autocast_dtype, c.energy_fn, c.labels, traced)
    return fast_sgld(
        c.energy_fn,
        c.x_init,
        noise_first=cfg.noise_first,
        chain_groups=cfg.chain_groups or torch.get_num_threads(),
        energy_for_rows=c.energy_for_rows,
        compile=cfg.compile,
        cuda_graph=cfg.cuda_graph,
        gradient_fn=gradient_fn,
        **c.settings,
    )


def _pyld(c: Chains) -> tuple[torch.Tensor, SGLDStats]:
    """JEM++ PYLD (samplers/pyld.py); noise is added after each outer step."""
    energy_and_features, first_layer = split_first_layer(c.model, c.energy_fn, c.x_init)
    return pyld(
        energy_and_features,
        first_layer,
        c.x_init,
        inner_steps=c.cfg.pyld_steps,
        inner_step_size=c.cfg.pyld_step_size,
        inner_clamp=c.cfg.pyld_clamp,
        **c.settings,
    )


# sampler path name → the function that runs it
PATHS: dict[str, Callable[[Chains], tuple[torch.Tensor, SGLDStats]]] = {
    "reference": _reference,
    "fast": _fast,
    "pyld": _pyld,
}


def path_name(cfg: SamplerConfig) -> str:
    """The `PATHS` entry a sampler config runs."""
    return "pyld" if cfg.pyld_steps > 0 else cfg.impl


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
    randn_like: NoiseFn | None = None,
    channels_last: bool = False,
) -> tuple[torch.Tensor, SGLDStats]:
    """Refine `x_init` with SGLD on the model's energy using the config's sampler settings.

    Args:
        model: the energy model (its parameters are frozen for the duration).
        x_init: (N, C, H, W) starting points in [−1, 1].
        cfg: sampler settings (steps, α, σ, clipping, order, precision, implementation, PYLD).
        labels: if given, sample p(x|y) with the joint energy for these classes.
        steps, step_size, noise: override the config for this call (e.g. longer chains at generation time).
        generator: random source for the Langevin noise (one stream for the batch).
        randn_like: x ↦ N(0, I) noise shaped like x, instead of `generator` (e.g. one generator per sample).
        channels_last: hand the chains to the model in NHWC layout.
    """
    energy_fn: EnergyFn = model.energy
    energy_for_rows = None
    if labels is not None:
        labels = labels.to(x_init.device)

        def energy_fn(x: torch.Tensor) -> torch.Tensor:
            return model.joint_energy(x, labels)

        def energy_for_rows(rows: slice) -> EnergyFn:  # the joint energy of a group of chains (chain groups)
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
        "randn_like": randn_like,
        "autocast_dtype": autocast,
    }
    chains = Chains(model, x_init, cfg, energy_fn, energy_for_rows, labels, autocast, settings)
    with frozen(model):
        return PATHS[path_name(cfg)](chains)
