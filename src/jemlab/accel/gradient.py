"""The input gradient ∇ₓE for the SGLD chains: the hand-written explicit one where it can run, else autograd.

`input_gradient` makes the choice (``sampler.gradient``: auto, autograd or explicit) from the model's structure and
the device probe, and returns a gradient function guarded against run-time failure: if the explicit plan raises
despite the probe (a new torch, an unusual CPU), the failure is logged once, autograd computes that step and every
later one in the process, and the chain goes on.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from jemlab.accel.choices import Choice, failed, fall_back
from jemlab.accel.explicit import explicit_gradient, explicit_support
from jemlab.accel.probe import probe
from jemlab.errors import ConfigError
from jemlab.samplers.langevin import GradientFn, autograd_gradient

EXPLICIT = "the explicit input gradient"


def choose_gradient(
    requested: str, model: nn.Module, device: torch.device | str, dtype: torch.dtype | None, traced: bool = False
) -> Choice:
    """``explicit`` or ``autograd`` for this model, device and network dtype (None: fp32), with the reason.

    `traced`: the step is traced by torch.compile or captured as a CUDA graph, which need autograd.
    """
    device = torch.device(device)
    if requested == "autograd":
        return Choice("autograd", "requested")
    blocker = None
    if traced:
        blocker = "sampler.compile / sampler.cuda_graph trace the autograd step"
    elif dtype == torch.float16:
        blocker = "no explicit path in fp16"
    elif failed(EXPLICIT):
        blocker = f"it failed earlier in this process ({failed(EXPLICIT)})"
    else:
        blocker = explicit_support(model, device)
    if blocker is not None:
        if requested == "explicit":
            raise ConfigError(f"sampler.gradient=explicit cannot run here: {blocker}; use sampler.gradient=auto")
        return Choice("autograd", f"{requested}: {blocker}")
    found = probe(device)
    packed = found["packed_conv_bf16" if dtype == torch.bfloat16 else "packed_conv_fp32"]
    how = "oneDNN packed weights" if packed.ok else f"plain conv2d, packed weights unavailable: {packed.reason}"
    return Choice("explicit", f"{requested}: a plain layer sequence on a CPU; {how}")


def input_gradient(
    model: nn.Module,
    x_init: torch.Tensor,
    requested: str,
    autocast_dtype: torch.dtype | None,
    energy_fn: Callable[[torch.Tensor], torch.Tensor],
    labels: torch.Tensor | None = None,
    traced: bool = False,
) -> GradientFn | None:
    """The guarded explicit gradient for chains shaped like `x_init`, or None where autograd is the path.

    Args:
        model: the energy model whose chains these are.
        x_init: the chains' starting points (shape, device and memory format of the chain).
        requested: ``sampler.gradient`` (auto, autograd or explicit).
        autocast_dtype: the dtype the network is evaluated in (None: fp32).
        energy_fn: the energy the chains follow (marginal or joint); autograd on it is the fallback.
        labels: the classes of a joint energy E(x, y), or None for the marginal energy.
        traced: the step will be compiled or graph-captured (autograd only).
    """
    choice = choose_gradient(requested, model, x_init.device, autocast_dtype, traced)
    if choice.value != "explicit":
        return None
    nhwc = x_init.dim() == 4 and x_init.is_contiguous(memory_format=torch.channels_last) and not x_init.is_contiguous()
    try:
        plan = explicit_gradient(model, tuple(x_init.shape), autocast_dtype or torch.float32, nhwc)
    except Exception as exc:
        _give_up_or_fall_back(requested, exc)
        return None
    fallback = autograd_gradient(energy_fn, autocast_dtype)

    def gradient(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if failed(EXPLICIT):
            return fallback(x)
        try:
            return plan(x, labels)
        except Exception as exc:
            _give_up_or_fall_back(requested, exc)
            return fallback(x)

    return gradient


def _give_up_or_fall_back(requested: str, exc: Exception) -> None:
    """After the explicit path raised: a one-line error if the user insisted on it, else record the fallback."""
    if requested == "explicit":
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        message = f"sampler.gradient=explicit failed on this machine ({first}); use sampler.gradient=auto"
        raise ConfigError(message) from exc
    fall_back(EXPLICIT, "autograd", exc)
