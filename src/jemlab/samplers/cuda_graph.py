"""SGLD on a GPU with the step captured as a CUDA graph.

A small energy network launches dozens of tiny kernels per step, and on a GPU their launch overhead, not their
arithmetic, sets the pace. We capture one step (forward, input-gradient backward, clip, update, clamp) once per
(energy function, batch shape) and replay it K times. The graph reads the network's parameters at their fixed
addresses, so it stays valid while an optimiser updates them in place; the noise is drawn outside the graph into
a static buffer with the caller's generator, so the numbers are those `sgld` draws.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any

import torch

from jemlab.samplers.fast import StepSettings
from jemlab.samplers.sgld import EnergyFn, SGLDStats

_WARMUP_STEPS = 3  # autograd needs a few eager runs on a side stream before capture (torch.cuda.graph docs)


@dataclass
class _Captured:
    graph: torch.cuda.CUDAGraph
    x: torch.Tensor  # the chain, updated in place by every replay
    noise: torch.Tensor  # refilled before every replay
    energy: torch.Tensor  # () mean energy of the last replay
    grad_norm: torch.Tensor  # () mean per-sample gradient norm of the last replay


# owner (a module for bound methods, else the function itself) → {settings key: captured step}
_CACHE: weakref.WeakKeyDictionary[Any, dict[Any, _Captured]] = weakref.WeakKeyDictionary()


def _capture(energy_fn: EnergyFn, x_init: torch.Tensor, s: StepSettings) -> _Captured:
    step_size, noise_scale, grad_clamp, bounds, noise_first, autocast_dtype = (
        s.step_size, s.noise, s.grad_clamp, s.bounds, s.noise_first, s.autocast_dtype
    )  # fmt: skip
    x = x_init.detach().clone()
    noise = torch.zeros(x.shape, dtype=x.dtype, device=x.device)  # contiguous, like torch.randn(x.shape)
    energy = torch.zeros((), device=x.device)
    grad_norm = torch.zeros((), device=x.device)

    def body() -> None:
        if noise_first and noise_scale > 0:
            x.add_(noise, alpha=noise_scale)
            if bounds is not None:
                x.clamp_(*bounds)
        x_var = x.detach().requires_grad_(True)
        # Autocast's weight-cast cache must be off inside a graph (torch.cuda.graph documentation).
        with torch.autocast(
            "cuda", dtype=autocast_dtype or torch.float16, enabled=autocast_dtype is not None, cache_enabled=False
        ):
            e = energy_fn(x_var)
        (grad,) = torch.autograd.grad(e.sum(), x_var)
        energy.copy_(e.detach().float().mean())
        grad_norm.copy_(grad.float().flatten(1).norm(dim=1).mean())
        if grad_clamp is not None:
            grad = grad.clamp(-grad_clamp, grad_clamp)
        x.sub_(grad.to(x.dtype), alpha=step_size)
        if not noise_first and noise_scale > 0:
            x.add_(noise, alpha=noise_scale)
        if bounds is not None:
            x.clamp_(*bounds)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(_WARMUP_STEPS):
            body()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        body()
    return _Captured(graph=graph, x=x, noise=noise, energy=energy, grad_norm=grad_norm)


def graphed_sgld(
    energy_fn: EnergyFn,
    x_init: torch.Tensor,
    steps: int,
    s: StepSettings,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, SGLDStats]:
    """`sgld` on a CUDA tensor with every step replayed from a captured CUDA graph.

    Args:
        energy_fn: the energy; its parameters must stay at the same addresses between calls (in-place updates).
        x_init: (N, ...) CUDA starting points; not modified.
        steps: number of steps K.
        s: the step settings.
        generator: CUDA generator of the noise (drawn outside the graph, in `sgld`'s order).
    """
    owner = getattr(energy_fn, "__self__", energy_fn)
    func = getattr(energy_fn, "__func__", energy_fn)
    key = (func, tuple(x_init.shape), x_init.stride(), x_init.dtype, x_init.device, s)
    per_owner = _CACHE.setdefault(owner, {})
    if key not in per_owner:
        per_owner[key] = _capture(energy_fn, x_init, s)
    captured = per_owner[key]
    captured.x.copy_(x_init)
    for _ in range(steps):
        if s.noise > 0:
            captured.noise.normal_(generator=generator)
        captured.graph.replay()
    stats = SGLDStats(grad_norm=float(captured.grad_norm), energy=float(captured.energy))
    return captured.x.clone(), stats
