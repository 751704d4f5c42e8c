"""Fast SGLD: the chain of `sgld`, computed with the per-step overheads removed.

Same arguments, same random numbers, same result up to floating-point rounding (`tests/test_fast_sampling.py`
checks it). What changes is how each step is executed:

- **Input gradient only.** The energy gradient is taken with respect to x alone; with frozen parameters autograd
  records no weight nodes at all.
- **No per-step allocations in the chain.** The noise lives in one buffer refilled in place (``normal_`` with the
  caller's generator draws exactly the numbers ``torch.randn`` draws), the gradient is clipped and applied in place,
  and x keeps its memory format (channels-last chains stay channels-last).
- **Chain groups on CPU cores** (``chain_groups=G``): the batch is split into G groups of chains that step
  concurrently, one CPU thread each. A small network's convolutions are too small to split well across threads
  inside one operator (on the 2-core development machine two intra-op threads gave only ~1.1× over one), while
  independent chains scale almost perfectly. Every step still draws the whole batch's noise from the caller's
  generator first, so the numbers are those of `sgld`. This needs energies that treat samples independently, which
  excludes BatchNorm in training mode.
- **torch.compile** (``compile=True``): the whole step — forward, input-gradient backward (``torch.func``), clipping,
  update and clamping — becomes one graph compiled by Inductor, so the element-wise tail fuses into a few loops.
  If compilation fails (no C++ compiler, an unsupported op), the eager step is used and `compile_status()` says why.
- **Explicit gradients** (``gradient_fn``, chosen by `jemlab.sampling.run_chains` with ``sampler.gradient``): for
  plain layer sequences on a CPU, ∇ₓE is computed by a hand-written backward pass with pre-packed oneDNN weights
  and strided transposed convolutions rewritten as stride-1 ones (`jemlab.accel.explicit`); no autograd.
- **CUDA graphs** (``cuda_graph=True`` on a GPU): one step is captured once per (energy, shape) and replayed, which
  removes the kernel-launch overhead that dominates small networks on a GPU (`jemlab.samplers.cuda_graph`).

Mixed precision (``autocast_dtype``) evaluates the network in bf16/fp16 while the chain itself stays fp32, exactly
as `sgld` does.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from jemlab.samplers.sgld import EnergyFn, SGLDStats

log = logging.getLogger(__name__)

# x ↦ (E(x), ∇ₓE(x)) computed without autograd (accel/explicit.py)
GradientFn = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class StepSettings:
    """Everything that defines one SGLD step besides the energy (see `jemlab.samplers.sgld`)."""

    step_size: float
    noise: float
    grad_clamp: float | None
    noise_first: bool
    bounds: tuple[float, float] | None
    autocast_dtype: torch.dtype | None


# --- one eager step -----------------------------------------------------------------------------------------------


def _eager_step(
    energy_fn: EnergyFn,
    x: torch.Tensor,
    noise: torch.Tensor,
    s: StepSettings,
    gradient_fn: GradientFn | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One step on the chain x (updated in place); returns (x, E(x) before the update, ∇ₓE)."""
    if s.noise_first and s.noise > 0:
        x.add_(noise, alpha=s.noise)
        if s.bounds is not None:
            x.clamp_(*s.bounds)
    if gradient_fn is not None:  # the explicit gradient (accel/explicit.py): no autograd at all
        e, grad = gradient_fn(x)
    else:
        x.requires_grad_(True)
        with torch.autocast(
            x.device.type, dtype=s.autocast_dtype or torch.bfloat16, enabled=s.autocast_dtype is not None
        ):
            e = energy_fn(x)
        (grad,) = torch.autograd.grad(e.sum(), x)
        x.requires_grad_(False)
    update = grad.clamp(-s.grad_clamp, s.grad_clamp) if s.grad_clamp is not None else grad
    x.sub_(update.to(x.dtype), alpha=s.step_size)
    if not s.noise_first and s.noise > 0:
        x.add_(noise, alpha=s.noise)
    if s.bounds is not None:
        x.clamp_(*s.bounds)
    return x, e.detach(), grad


def _stats(energies: list[torch.Tensor], grads: list[torch.Tensor]) -> SGLDStats:
    """Batch means over all groups of the last step's energies and per-sample gradient norms."""
    energy = torch.cat([e.float().reshape(-1) for e in energies]).mean()
    grad_norm = torch.cat([g.float().flatten(1).norm(dim=1) for g in grads]).mean()
    return SGLDStats(grad_norm=float(grad_norm), energy=float(energy))


def _run_eager(
    energy_fn: EnergyFn,
    x_init: torch.Tensor,
    steps: int,
    s: StepSettings,
    generator: torch.Generator | None,
    gradient_fn: GradientFn | None = None,
) -> tuple[torch.Tensor, SGLDStats]:
    x = x_init.detach().clone()
    noise = torch.empty(x.shape, dtype=x.dtype, device=x.device)  # contiguous, like torch.randn(x.shape)
    e = grad = None
    for _ in range(steps):
        if s.noise > 0:
            noise.normal_(generator=generator)  # the numbers torch.randn(x.shape, generator=...) would draw
        x, e, grad = _eager_step(energy_fn, x, noise, s, gradient_fn)
    return x, _stats([e], [grad])


# --- chain groups on CPU threads ----------------------------------------------------------------------------------

_POOLS: dict[int, ThreadPoolExecutor] = {}
_MAX_PREDRAWN_NOISE_BYTES = 256 * 2**20  # beyond this, groups synchronise every step instead of pre-drawing noise


def _pool(workers: int) -> ThreadPoolExecutor:
    """A persistent pool whose threads each run single-threaded torch ops (set once, per thread, at start)."""
    if workers not in _POOLS:
        _POOLS[workers] = ThreadPoolExecutor(
            workers, thread_name_prefix="jemlab-sgld", initializer=torch.set_num_threads, initargs=(1,)
        )
    return _POOLS[workers]


@contextmanager
def _single_threaded() -> Any:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _group_chain(
    energy_fn: EnergyFn, x: torch.Tensor, noise: torch.Tensor | None, steps: int, s: StepSettings
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The whole chain of one group (in place on x), with its rows of the pre-drawn noise (K, n, ...) or None."""
    result = (x, torch.zeros(()), torch.zeros(1, 1))
    for k in range(steps):
        result = _eager_step(energy_fn, x, x if noise is None else noise[k], s)  # noise unused when s.noise == 0
    return result


def _run_groups(
    energy_for_rows: Callable[[slice], EnergyFn],
    x_init: torch.Tensor,
    steps: int,
    s: StepSettings,
    generator: torch.Generator | None,
    groups: int,
) -> tuple[torch.Tensor, SGLDStats]:
    n = len(x_init)
    bounds = torch.linspace(0, n, groups + 1).round().long().tolist()
    rows = [slice(a, b) for a, b in itertools.pairwise(bounds) if b > a]
    x = x_init.detach().clone()
    parts = [x[r].clone() for r in rows]  # each group owns its chains; x[r] keeps x's memory format
    energies = [energy_for_rows(r) for r in rows]
    pool = _pool(len(rows) - 1)
    results: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    with _single_threaded():
        if s.noise == 0 or steps * x.numel() * x.element_size() <= _MAX_PREDRAWN_NOISE_BYTES:
            # Draw every step's noise up front, step by step in `sgld`'s order, so that the groups run their whole
            # chains without waiting for each other.
            noise = None
            if s.noise > 0:
                noise = torch.empty((steps, *x.shape), dtype=x.dtype)
                for k in range(steps):
                    noise[k].normal_(generator=generator)
            futures = [
                pool.submit(_group_chain, energies[i], parts[i], None if noise is None else noise[:, rows[i]], steps, s)
                for i in range(1, len(rows))
            ]
            first = _group_chain(energies[0], parts[0], None if noise is None else noise[:, rows[0]], steps, s)
            results = [first, *(f.result() for f in futures)]
        else:  # long chains (generation): one step at a time, the whole batch's noise drawn before each step
            noise = torch.empty(x.shape, dtype=x.dtype)
            for _ in range(steps):
                noise.normal_(generator=generator)
                futures = [
                    pool.submit(_eager_step, energies[i], parts[i], noise[rows[i]], s) for i in range(1, len(rows))
                ]
                first = _eager_step(energies[0], parts[0], noise[rows[0]], s)  # the calling thread does group 0
                results = [first, *(f.result() for f in futures)]
    for r, part in zip(rows, parts, strict=True):
        x[r] = part
    return x, _stats([e for _, e, _ in results], [g for _, _, g in results])


# --- torch.compile ------------------------------------------------------------------------------------------------

# Why compilation was or was not used, in this process (reported by the benchmark).
_COMPILE_STATUS: dict[str, Any] = {"requested": False, "used": False, "reason": "not requested"}
_COMPILED: dict[Any, Callable[..., Any]] = {}
COMPILE_BACKEND = "inductor"  # torch.compile backend; tests use "aot_eager" (same tracing, no C++ build)


def compile_status() -> dict[str, Any]:
    """Whether torch.compile has been requested and used in this process, and the reason if it fell back."""
    return dict(_COMPILE_STATUS)


def reset_compile_state() -> None:
    """Forget compiled steps and a recorded compile failure (tests; or after changing torch settings)."""
    _COMPILED.clear()
    _COMPILE_STATUS.clear()
    _COMPILE_STATUS.update(requested=False, used=False, reason="not requested")


def _energy_key(energy_fn: EnergyFn) -> Any:
    """A stable identity for an energy function: bound methods are re-created on every attribute access."""
    owner = getattr(energy_fn, "__self__", None)
    if owner is not None:
        return (id(owner), getattr(energy_fn, "__func__", energy_fn))
    return energy_fn


def _make_compiled_step(energy_fn: EnergyFn, s: StepSettings, device_type: str) -> Callable[..., Any]:
    """One functional SGLD step x ↦ (x', E(x), ∇E(x)) traced with torch.func, for torch.compile."""

    def total_energy(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.autocast(
            device_type, dtype=s.autocast_dtype or torch.bfloat16, enabled=s.autocast_dtype is not None
        ):
            e = energy_fn(x)
        return e.sum(), e

    grad_and_energy = torch.func.grad_and_value(total_energy, has_aux=True)

    def step(x: torch.Tensor, noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if s.noise_first and s.noise > 0:
            x = x + s.noise * noise
            if s.bounds is not None:
                x = x.clamp(*s.bounds)
        grad, (_, e) = grad_and_energy(x)
        update = grad.clamp(-s.grad_clamp, s.grad_clamp) if s.grad_clamp is not None else grad
        x_new = x - s.step_size * update.to(x.dtype)
        if not s.noise_first and s.noise > 0:
            x_new = x_new + s.noise * noise
        if s.bounds is not None:
            x_new = x_new.clamp(*s.bounds)
        return x_new, e, grad

    return torch.compile(step, dynamic=False, backend=COMPILE_BACKEND)


def _run_compiled(
    energy_fn: EnergyFn, x_init: torch.Tensor, steps: int, s: StepSettings, generator: torch.Generator | None
) -> tuple[torch.Tensor, SGLDStats] | None:
    """The compiled chain, or None (after logging why) when compilation is unavailable."""
    _COMPILE_STATUS["requested"] = True
    if _COMPILE_STATUS.get("failed"):
        return None
    saved_rng = generator.get_state() if generator is not None else None
    try:
        key = (_energy_key(energy_fn), s, x_init.device.type)
        if key not in _COMPILED:
            _COMPILED[key] = _make_compiled_step(energy_fn, s, x_init.device.type)
        step_fn = _COMPILED[key]
        x = x_init.detach().clone()
        noise = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        e = grad = None
        for _ in range(steps):
            if s.noise > 0:
                noise.normal_(generator=generator)
            x, e, grad = step_fn(x, noise)
    except Exception as err:  # compilation errors come in many types (BackendCompilerFailed, OSError, ...)
        reason = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        _COMPILE_STATUS.update(used=False, failed=True, reason=reason)
        log.warning(f"sampler.compile: torch.compile failed ({reason}); using the eager SGLD step")
        if saved_rng is not None:  # the eager chain must draw the noise the compiled one started to draw
            generator.set_state(saved_rng)
        return None
    _COMPILE_STATUS.update(used=True, reason="compiled")
    return x.detach(), _stats([e], [grad])


# --- the entry point ----------------------------------------------------------------------------------------------


def fast_sgld(
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
    chain_groups: int = 1,
    energy_for_rows: Callable[[slice], EnergyFn] | None = None,
    compile: bool = False,
    cuda_graph: bool = False,
    gradient_fn: GradientFn | None = None,
) -> tuple[torch.Tensor, SGLDStats]:
    """`sgld` with the same arguments and result, executed faster (see the module docstring).

    Args:
        energy_fn, x_init, steps, step_size, noise, grad_clamp, noise_first, bounds, generator, autocast_dtype:
            exactly as in `jemlab.samplers.sgld`.
        chain_groups: on a CPU, step this many groups of chains concurrently, one thread each (1: no groups).
            The energy must treat samples independently (no BatchNorm in training mode).
        energy_for_rows: the energy for a slice of the batch, for energies that hold per-sample data (e.g. the
            labels of a joint energy); default: `energy_fn` for every group.
        compile: compile the whole step with torch.compile (falls back to eager, once, with a logged reason).
            Used only with a single group.
        cuda_graph: on a CUDA device, capture the step in a CUDA graph and replay it.
        gradient_fn: x ↦ (E(x), ∇ₓE(x)) without autograd (`jemlab.accel.explicit`); when given, it replaces
            autograd, chain groups and compilation (it already evaluates the network at `autocast_dtype`).

    Returns:
        (samples, stats) as `sgld` returns them.
    """
    if steps == 0:
        return x_init.detach().clone(), SGLDStats(grad_norm=0.0, energy=0.0)
    s = StepSettings(step_size, noise, grad_clamp, noise_first, bounds, autocast_dtype)
    if cuda_graph and x_init.is_cuda:
        from jemlab.samplers.cuda_graph import graphed_sgld

        return graphed_sgld(energy_fn, x_init, steps, s, generator)
    if gradient_fn is not None:
        return _run_eager(energy_fn, x_init, steps, s, generator, gradient_fn)
    groups = min(chain_groups, len(x_init))
    if groups > 1 and not x_init.is_cuda:
        return _run_groups(energy_for_rows or (lambda rows: energy_fn), x_init, steps, s, generator, groups)
    if compile:
        result = _run_compiled(energy_fn, x_init, steps, s, generator)
        if result is not None:
            return result
    return _run_eager(energy_fn, x_init, steps, s, generator)
