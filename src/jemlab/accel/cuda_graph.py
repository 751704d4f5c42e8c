"""SGLD on a GPU with the step captured as a CUDA graph.

A small energy network launches dozens of tiny kernels per step, and on a GPU their launch overhead, not their
arithmetic, sets the pace. We capture one step (forward, input-gradient backward, clip, update, clamp) once per
(energy function, batch shape) and replay it K times. The graph reads the network's parameters at their fixed
addresses, so it stays valid while an optimiser updates them in place; the noise is drawn outside the graph into
a static buffer from the caller's noise source, so the numbers are those `sgld` draws. The captured step is
`jemlab.samplers.langevin.langevin_step` itself, run in place on the graph's static chain.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from jemlab.samplers.langevin import EnergyFn, LangevinSettings, SGLDStats, langevin_step

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


def _capture(
    energy_fn: EnergyFn, x_init: torch.Tensor, s: LangevinSettings, autocast_dtype: torch.dtype | None
) -> _Captured:
    x = x_init.detach().clone()
    noise = torch.zeros(x.shape, dtype=x.dtype, device=x.device)  # contiguous, like torch.randn(x.shape)
    energy = torch.zeros((), device=x.device)
    grad_norm = torch.zeros((), device=x.device)

    def gradient(x_now: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x_var = x_now.detach().requires_grad_(True)
        # Autocast's weight-cast cache must be off inside a graph (torch.cuda.graph documentation).
        with torch.autocast(
            "cuda", dtype=autocast_dtype or torch.float16, enabled=autocast_dtype is not None, cache_enabled=False
        ):
            e = energy_fn(x_var)
        (grad,) = torch.autograd.grad(e.sum(), x_var)
        return e.detach(), grad

    def body() -> None:
        _, e, grad = langevin_step(x, gradient, noise, s, inplace=True)
        energy.copy_(e.float().mean())
        grad_norm.copy_(grad.float().flatten(1).norm(dim=1).mean())

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
    s: LangevinSettings,
    autocast_dtype: torch.dtype | None,
    draw: Callable[[torch.Tensor], Callable[[], torch.Tensor]],
) -> tuple[torch.Tensor, SGLDStats]:
    """`sgld` on a CUDA tensor with every step replayed from a captured CUDA graph.

    Args:
        energy_fn: the energy; its parameters must stay at the same addresses between calls (in-place updates).
        x_init: (N, ...) CUDA starting points; not modified.
        steps: number of steps K.
        s: the step settings.
        autocast_dtype: network dtype under autocast (None: fp32).
        draw: x ↦ a function returning each step's noise for the batch (drawn outside the graph, in `sgld`'s order).
    """
    owner = getattr(energy_fn, "__self__", energy_fn)
    func = getattr(energy_fn, "__func__", energy_fn)
    key = (func, tuple(x_init.shape), x_init.stride(), x_init.dtype, x_init.device, s, autocast_dtype)
    per_owner = _CACHE.setdefault(owner, {})
    if key not in per_owner:
        per_owner[key] = _capture(energy_fn, x_init, s, autocast_dtype)
    captured = per_owner[key]
    captured.x.copy_(x_init)
    noise_for = draw(captured.x)
    for _ in range(steps):
        if s.noise > 0:
            captured.noise.copy_(noise_for())
        captured.graph.replay()
    stats = SGLDStats(grad_norm=float(captured.grad_norm), energy=float(captured.energy))
    return captured.x.clone(), stats
