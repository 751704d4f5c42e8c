"""Fast SGLD: the chain of `sgld`, computed with the per-step overheads removed.

Same arguments, same random numbers, same result up to floating-point rounding (`tests/test_fast_sampling.py`
checks it). What changes is how each step is executed:

- **Input gradient only.** The energy gradient is taken with respect to x alone; with frozen parameters autograd
  records no weight nodes at all.
- **No per-step allocations in the chain.** The noise lives in one buffer refilled in place (``normal_`` with the
  caller's generator draws exactly the numbers ``torch.randn`` draws; a caller's own ``randn_like`` is called
  instead), the step updates the chain in place, and x keeps its memory format (channels-last stays channels-last).
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
  removes the kernel-launch overhead that dominates small networks on a GPU (`jemlab.accel.cuda_graph`).

Every path runs the one Langevin update, `jemlab.samplers.langevin.langevin_step`; only the gradient and the
noise are supplied differently. Mixed precision (``autocast_dtype``) evaluates the network in bf16/fp16 while the
chain itself stays fp32, exactly as `sgld` does.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

import torch

from jemlab.samplers.langevin import (
    EnergyFn,
    GradientFn,
    LangevinSettings,
    NoiseFn,
    SGLDStats,
    autograd_gradient,
    chain_stats,
    langevin_step,
)

log = logging.getLogger(__name__)


def _noise_source(
    x: torch.Tensor, generator: torch.Generator | None, randn_like: NoiseFn | None
) -> Callable[[], torch.Tensor]:
    """A function that returns this step's noise for the whole batch x (a refilled buffer unless `randn_like`)."""
    if randn_like is not None:
        return lambda: randn_like(x)
    buffer = torch.empty(x.shape, dtype=x.dtype, device=x.device)  # contiguous, like torch.randn(x.shape)
    return lambda: buffer.normal_(generator=generator)  # the numbers torch.randn(x.shape, generator=...) draws


# --- eager steps ---------------------------------------------------------------------------------------------------


def _run_eager(
    gradient: GradientFn,
    x_init: torch.Tensor,
    steps: int,
    s: LangevinSettings,
    draw: Callable[[torch.Tensor], Callable[[], torch.Tensor]],
) -> tuple[torch.Tensor, SGLDStats]:
    x = x_init.detach().clone()
    noise = draw(x)
    for _ in range(steps):
        x, energy, grad = langevin_step(x, gradient, noise() if s.noise > 0 else None, s, inplace=True)
    return x, chain_stats(energy, grad)


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
    gradient: GradientFn, x: torch.Tensor, noise: torch.Tensor | None, steps: int, s: LangevinSettings
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The whole chain of one group (in place on x), with its rows of the pre-drawn noise (K, n, ...) or None."""
    result = (x, torch.zeros(1), torch.zeros(1, 1))
    for k in range(steps):
        result = langevin_step(x, gradient, None if noise is None else noise[k], s, inplace=True)
    return result


def _run_groups(
    gradient_for_rows: Callable[[slice], GradientFn],
    x_init: torch.Tensor,
    steps: int,
    s: LangevinSettings,
    draw: Callable[[torch.Tensor], Callable[[], torch.Tensor]],
    groups: int,
) -> tuple[torch.Tensor, SGLDStats]:
    n = len(x_init)
    bounds = torch.linspace(0, n, groups + 1).round().long().tolist()
    rows = [slice(a, b) for a, b in itertools.pairwise(bounds) if b > a]
    x = x_init.detach().clone()
    parts = [x[r].clone() for r in rows]  # each group owns its chains; x[r] keeps x's memory format
    gradients = [gradient_for_rows(r) for r in rows]
    pool = _pool(len(rows) - 1)
    noise_for = draw(x)
    results: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    with _single_threaded():
        if s.noise == 0 or steps * x.numel() * x.element_size() <= _MAX_PREDRAWN_NOISE_BYTES:
            # Draw every step's noise up front, step by step in `sgld`'s order, so that the groups run their whole
            # chains without waiting for each other.
            noise = None
            if s.noise > 0:
                noise = torch.empty((steps, *x.shape), dtype=x.dtype, device=x.device)
                for k in range(steps):
                    noise[k].copy_(noise_for())
            rows_noise = [None if noise is None else noise[:, r] for r in rows]
            futures = [
                pool.submit(_group_chain, gradients[i], parts[i], rows_noise[i], steps, s) for i in range(1, len(rows))
            ]
            first = _group_chain(gradients[0], parts[0], rows_noise[0], steps, s)
            results = [first, *(f.result() for f in futures)]
        else:  # long chains (generation): one step at a time, the whole batch's noise drawn before each step
            for _ in range(steps):
                noise = noise_for()
                futures = [
                    pool.submit(langevin_step, parts[i], gradients[i], noise[rows[i]], s, inplace=True)
                    for i in range(1, len(rows))
                ]
                first = langevin_step(parts[0], gradients[0], noise[rows[0]], s, inplace=True)  # group 0 here
                results = [first, *(f.result() for f in futures)]
    for r, part in zip(rows, parts, strict=True):
        x[r] = part
    energies = torch.cat([e.float().reshape(-1) for _, e, _ in results])
    grads = torch.cat([g.float().flatten(1) for _, _, g in results])
    return x, chain_stats(energies, grads)


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


def _make_compiled_step(
    energy_fn: EnergyFn, s: LangevinSettings, autocast_dtype: torch.dtype | None, device_type: str
) -> Callable[..., Any]:
    """One functional Langevin step x ↦ (x', E(x), ∇E(x)) with torch.func's input gradient, for torch.compile."""

    def total_energy(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.autocast(device_type, dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
            e = energy_fn(x)
        return e.sum(), e

    grad_and_energy = torch.func.grad_and_value(total_energy, has_aux=True)

    def gradient(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        grad, (_, e) = grad_and_energy(x)
        return e, grad

    def step(x: torch.Tensor, noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return langevin_step(x, gradient, noise, s)

    return torch.compile(step, dynamic=False, backend=COMPILE_BACKEND)


def _run_compiled(
    energy_fn: EnergyFn,
    x_init: torch.Tensor,
    steps: int,
    s: LangevinSettings,
    autocast_dtype: torch.dtype | None,
    draw: Callable[[torch.Tensor], Callable[[], torch.Tensor]],
    generator: torch.Generator | None,
) -> tuple[torch.Tensor, SGLDStats] | None:
    """The compiled chain, or None (after logging why) when compilation is unavailable."""
    _COMPILE_STATUS["requested"] = True
    if _COMPILE_STATUS.get("failed"):
        return None
    saved_rng = generator.get_state() if generator is not None else None
    try:
        key = (_energy_key(energy_fn), s, autocast_dtype, x_init.device.type)
        if key not in _COMPILED:
            _COMPILED[key] = _make_compiled_step(energy_fn, s, autocast_dtype, x_init.device.type)
        step_fn = _COMPILED[key]
        x = x_init.detach().clone()
        noise_for = draw(x)
        zeros = torch.zeros_like(x)
        for _ in range(steps):
            x, e, grad = step_fn(x, noise_for() if s.noise > 0 else zeros)
    except Exception as err:  # compilation errors come in many types (BackendCompilerFailed, OSError, ...)
        reason = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        _COMPILE_STATUS.update(used=False, failed=True, reason=reason)
        log.warning(f"sampler.compile: torch.compile failed ({reason}); using the eager SGLD step")
        if saved_rng is not None:  # the eager chain must draw the noise the compiled one started to draw
            generator.set_state(saved_rng)
        return None
    _COMPILE_STATUS.update(used=True, reason="compiled")
    return x.detach(), chain_stats(e, grad)


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
    randn_like: NoiseFn | None = None,
    autocast_dtype: torch.dtype | None = None,
    chain_groups: int = 1,
    energy_for_rows: Callable[[slice], EnergyFn] | None = None,
    compile: bool = False,
    cuda_graph: bool = False,
    gradient_fn: GradientFn | None = None,
) -> tuple[torch.Tensor, SGLDStats]:
    """`sgld` with the same arguments and result, executed faster (see the module docstring).

    Args:
        energy_fn, x_init, steps, step_size, noise, grad_clamp, noise_first, bounds, generator, randn_like,
            autocast_dtype: exactly as in `jemlab.samplers.sgld`.
        chain_groups: on a CPU, step this many groups of chains concurrently, one thread each (1: no groups).
            The energy must treat samples independently (no BatchNorm in training mode).
        energy_for_rows: the energy for a slice of the batch, for energies that hold per-sample data (e.g. the
            labels of a joint energy); default: `energy_fn` for every group.
        compile: compile the whole step with torch.compile (falls back to eager, once, with a logged reason).
            Used only with a single group.
        cuda_graph: on a CUDA device, capture the step in a CUDA graph and replay it.
        gradient_fn: x ↦ (E(x), ∇ₓE(x)) without autograd (`jemlab.accel.gradient`); when given, it replaces
            autograd, chain groups and compilation (it already evaluates the network at `autocast_dtype`).

    Returns:
        (samples, stats) as `sgld` returns them.
    """
    if steps == 0:
        return x_init.detach().clone(), SGLDStats(grad_norm=0.0, energy=0.0)
    s = LangevinSettings(step_size, noise, grad_clamp, noise_first, bounds)

    def draw(x: torch.Tensor) -> Callable[[], torch.Tensor]:
        return _noise_source(x, generator, randn_like)

    if cuda_graph and x_init.is_cuda:
        from jemlab.accel.cuda_graph import graphed_sgld  # CUDA only: not imported on a CPU machine

        return graphed_sgld(energy_fn, x_init, steps, s, autocast_dtype, draw)
    if gradient_fn is not None:
        return _run_eager(gradient_fn, x_init, steps, s, draw)
    groups = min(chain_groups, len(x_init))
    if groups > 1 and not x_init.is_cuda:
        energy_rows = energy_for_rows or (lambda rows: energy_fn)
        return _run_groups(
            lambda rows: autograd_gradient(energy_rows(rows), autocast_dtype), x_init, steps, s, draw, groups
        )
    if compile:
        result = _run_compiled(energy_fn, x_init, steps, s, autocast_dtype, draw, generator)
        if result is not None:
            return result
    return _run_eager(autograd_gradient(energy_fn, autocast_dtype), x_init, steps, s, draw)
