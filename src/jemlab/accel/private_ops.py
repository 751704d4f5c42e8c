"""Every private or version-specific torch operator jemlab uses, in one place.

The fast paths of `jemlab.accel` use a few operators that are not part of torch's public API: oneDNN's packed
convolution (``torch.ops.mkldnn._reorder_convolution_weight`` / ``_convolution_pointwise``), the ATen activation
backwards that write into a given tensor (``aten.silu_backward.grad_input`` and friends), the in-place version
counter of a tensor (``tensor._version``), and torch's CPU instruction-set queries (``torch.cpu._is_*``). They can
be missing from a torch build, change between releases, or raise on a CPU that lacks an instruction set (oneDNN's
bf16 weight reorder needs AVX-512 or AVX-NE-CONVERT).

So each one appears only here, next to a self-test that `jemlab.accel.probe` runs on a tiny input before any fast
path relies on it, and each has a plain public-API fallback that gives the same numbers. Nothing outside this file
may call them (`tests/test_accel.py` checks the source tree).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

import torch
import torch.nn.functional as F

# --- CPU instruction sets as torch sees them ---------------------------------------------------------------------

# name in jemlab's reports → the query in torch.cpu (present in torch ≥ 2.3; absent ones read as False)
_CPU_QUERIES = {
    "avx2": "_is_avx2_supported",
    "avx512": "_is_avx512_supported",
    "avx512_bf16": "_is_avx512_bf16_supported",
    "avx512_vnni": "_is_vnni_supported",
    "amx_tile": "_is_amx_tile_supported",
    "amx_fp16": "_is_amx_fp16_supported",
    "arm_sve": "_is_arm_sve_supported",
}


def torch_cpu_isa() -> dict[str, bool]:
    """The instruction sets torch's own CPU detection reports (cpuinfo), each False where torch cannot say."""
    found = {}
    for name, query in _CPU_QUERIES.items():
        fn = getattr(torch.cpu, query, None)
        try:
            found[name] = bool(fn()) if callable(fn) else False
        except Exception:  # a query that exists but fails on this platform
            found[name] = False
    return found


def os_cpu_flags() -> set[str]:
    """The CPU feature flags the operating system lists (/proc/cpuinfo ``flags`` or ``Features``), empty elsewhere."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        key = line.split(":", 1)[0].strip()
        if key in ("flags", "Features"):
            return set(line.split(":", 1)[1].split())
    return set()


# --- oneDNN packed convolutions ------------------------------------------------------------------------------------


def pack_conv_weight(
    weight: torch.Tensor, padding: int, stride: int, input_shape: Iterable[int]
) -> torch.Tensor:
    """Reorder a convolution weight into oneDNN's blocked layout for inputs of `input_shape` (once per chain)."""
    return torch.ops.mkldnn._reorder_convolution_weight(
        weight, [padding, padding], [stride, stride], [1, 1], 1, list(input_shape)
    )


def packed_conv2d(
    x: torch.Tensor, packed_weight: torch.Tensor, bias: torch.Tensor | None, padding: int, stride: int
) -> torch.Tensor:
    """conv2d(x, weight, bias, stride, padding) with a weight from `pack_conv_weight`."""
    return torch.ops.mkldnn._convolution_pointwise(
        x, packed_weight, bias, [padding, padding], [stride, stride], [1, 1], 1, "none", [], ""
    )


def packed_conv_available() -> bool:
    """Whether this torch build has oneDNN and the two packed-convolution operators at all."""
    return (
        torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_convolution_pointwise")
        and hasattr(torch.ops.mkldnn, "_reorder_convolution_weight")
    )


def check_packed_conv(dtype: torch.dtype, channels_last: bool) -> str | None:
    """None if packed convolutions in `dtype` match F.conv2d on a tiny input, else why not (raised or wrong)."""
    if not packed_conv_available():
        return "this torch build has no oneDNN packed convolution"
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 9, 9, generator=g).to(dtype)
    w = torch.randn(4, 3, 3, 3, generator=g).to(dtype)
    b = torch.randn(4, generator=g).to(dtype)
    if channels_last:
        x, w = x.contiguous(memory_format=torch.channels_last), w.contiguous(memory_format=torch.channels_last)
    try:
        got = packed_conv2d(x, pack_conv_weight(w, 1, 2, x.shape), b, 1, 2)
    except Exception as exc:  # e.g. "bf16 path needs the cpu support avx_ne_convert or avx512bw, ..."
        return f"{type(exc).__name__}: {_first_line(exc)}"
    want = F.conv2d(x.float(), w.float(), b.float(), 2, 1)
    return _mismatch(got.float(), want, dtype)


# --- activation backwards written into a given tensor --------------------------------------------------------------

ActivationBackward = Callable[[torch.Tensor, torch.Tensor, float, torch.Tensor], torch.Tensor]


def _silu_out(g: torch.Tensor, pre: torch.Tensor, slope: float, out: torch.Tensor) -> torch.Tensor:
    return torch.ops.aten.silu_backward.grad_input(g, pre, grad_input=out)


def _leaky_relu_out(g: torch.Tensor, pre: torch.Tensor, slope: float, out: torch.Tensor) -> torch.Tensor:
    return torch.ops.aten.leaky_relu_backward.grad_input(g, pre, slope, False, grad_input=out)


def _relu_out(g: torch.Tensor, pre: torch.Tensor, slope: float, out: torch.Tensor) -> torch.Tensor:
    return torch.ops.aten.threshold_backward.grad_input(g, pre, 0.0, grad_input=out)


def _silu_public(g: torch.Tensor, pre: torch.Tensor, slope: float, out: torch.Tensor) -> torch.Tensor:
    s = torch.sigmoid(pre)  # d/dz z·σ(z) = σ(z)·(1 + z·(1 − σ(z)))
    return torch.mul(g, s * (1 + pre * (1 - s)), out=out)


def _leaky_relu_public(g: torch.Tensor, pre: torch.Tensor, slope: float, out: torch.Tensor) -> torch.Tensor:
    return torch.where(pre > 0, g, g * slope, out=out)


def _relu_public(g: torch.Tensor, pre: torch.Tensor, slope: float, out: torch.Tensor) -> torch.Tensor:
    return torch.where(pre > 0, g, torch.zeros((), dtype=g.dtype, device=g.device), out=out)


# activation name → (single fused ATen kernel, the same derivative from public operators)
ACTIVATION_BACKWARD: dict[str, tuple[ActivationBackward, ActivationBackward]] = {
    "silu": (_silu_out, _silu_public),
    "leaky_relu": (_leaky_relu_out, _leaky_relu_public),
    "relu": (_relu_out, _relu_public),
}


def check_activation_backward(dtype: torch.dtype) -> str | None:
    """None if every fused activation backward matches its public form on a tiny input, else why not."""
    g = torch.Generator().manual_seed(0)
    pre = torch.randn(2, 3, 5, 5, generator=g).to(dtype)
    grad = torch.randn(2, 3, 5, 5, generator=g).to(dtype)
    for name, (fused, public) in ACTIVATION_BACKWARD.items():
        try:
            got = fused(grad, pre, 0.2, torch.empty_like(pre))
        except Exception as exc:
            return f"{name}: {type(exc).__name__}: {_first_line(exc)}"
        reason = _mismatch(got.float(), public(grad.float(), pre.float(), 0.2, torch.empty_like(pre.float())), dtype)
        if reason is not None:
            return f"{name}: {reason}"
    return None


# --- the in-place version counter ----------------------------------------------------------------------------------


def parameter_versions(module: torch.nn.Module) -> tuple | None:
    """(identity, storage, in-place version) of every parameter, or None where tensors have no version counter.

    A cached computation on the weights (a packed plan) is valid while this tuple is unchanged: an optimiser step
    updates parameters in place, which moves their version counters."""
    try:
        return tuple((id(p), p.data_ptr(), p._version) for p in module.parameters())
    except (AttributeError, RuntimeError):
        return None


def check_version_counter() -> str | None:
    """None if an in-place update moves a tensor's version counter, else why it cannot be relied on."""
    t = torch.zeros(2)
    try:
        before = t._version
        t.add_(1)
        after = t._version
    except (AttributeError, RuntimeError) as exc:
        return f"{type(exc).__name__}: {_first_line(exc)}"
    return None if after > before else "an in-place update did not move tensor._version"


# --- helpers -------------------------------------------------------------------------------------------------------


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else "(no message)"


def _mismatch(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> str | None:
    """None if got ≈ want within the rounding of `dtype`, else a short description of the wrong answer."""
    if got.shape != want.shape:
        return f"wrong shape {tuple(got.shape)} (expected {tuple(want.shape)})"
    tol = {torch.float32: 1e-4, torch.float64: 1e-10}.get(dtype, 5e-2)  # bf16/fp16: inputs already rounded
    scale = want.abs().max().clamp_min(1.0)
    error = float((got - want).abs().max() / scale)
    if not error <= tol:  # also catches NaN
        return f"wrong answer (relative error {error:.2g} > {tol:g})"
    return None
