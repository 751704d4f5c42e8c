"""PYLD: Langevin steps that re-run only the first layer (JEM++, Yang & Ji, ICCV 2021, Sec. 3.3).

Borrowed from YOPO adversarial training (Zhang et al., NeurIPS 2019). Write the energy as E(x) = g(f₁(x)) with f₁
the first layer and z = f₁(x). The chain rule gives ∇ₓE(x) = J_f₁(x)ᵀ p with the *co-state* p = ∂E/∂z. PYLD
computes p with one full forward/backward pass, then holds it fixed for `inner_steps` cheap steps on the
"Hamiltonian" H(x) = ⟨p, f₁(x)⟩, whose gradient J_f₁(x)ᵀ p needs only the first layer:

    for each of the K outer steps:
        p, ∇ₓE  ← full pass at x
        x ← clamp(x − α · clip(∇ₓE, ±c))                            (the proximal SGLD step)
        repeat inner_steps times:
            x ← clamp(x − β · clip(∇ₓ⟨p, f₁(x)⟩, ±ε))                 (first layer only)
        x ← clamp(x + σ ξ)                                          (JEM++ uses σ = 0)

At the point where p was computed, ∇ₓ⟨p, f₁(x)⟩ equals ∇ₓE(x) exactly; for a linear first layer the inner gradient
does not change with x at all. This mirrors the authors' code (sndnyang/JEMPP, ``sample_q``), written for our sign
convention (we descend E; they ascend −E).

The sampler sees two functions, not a model; `split_first_layer` builds them from an `nn.Module` whose first
parametrised layer receives the input (up to a reshape), which holds for every jemlab backbone.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable

import torch
from torch import nn

from jemlab.errors import ConfigError
from jemlab.samplers.langevin import LangevinSettings, NoiseFn, SGLDStats, chain_stats, gaussian_noise, langevin_step

# x -> (E(x) of shape (N,), z = f₁(x)): the full energy together with the first layer's output inside its graph.
EnergyAndFeatures = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
FirstLayer = Callable[[torch.Tensor], torch.Tensor]


def pyld(
    energy_and_features: EnergyAndFeatures,
    first_layer: FirstLayer,
    x_init: torch.Tensor,
    *,
    steps: int,
    step_size: float,
    noise: float,
    inner_steps: int,
    inner_step_size: float,
    grad_clamp: float | None = None,
    inner_clamp: float | None = 1.0,
    bounds: tuple[float, float] | None = (-1.0, 1.0),
    generator: torch.Generator | None = None,
    randn_like: NoiseFn | None = None,
    autocast_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, SGLDStats]:
    """Run K outer PYLD steps from `x_init` (see the module docstring) and return samples and diagnostics.

    Args:
        energy_and_features: x ↦ (E(x), f₁(x)), both from one forward pass (z must be part of E's graph).
        first_layer: x ↦ f₁(x), the first layer alone.
        x_init: starting points (N, ...); not modified.
        steps: outer steps K (full forward/backward passes).
        step_size: α of the full SGLD step.
        noise: σ of the Gaussian noise added after each outer step (0 in JEM++).
        inner_steps: first-layer steps per outer step (0 gives plain proximal SGLD).
        inner_step_size: β of the inner steps (JEM++ CIFAR-10: 0.2).
        grad_clamp: clip ∇ₓE to ±c in the full step (None: no clipping).
        inner_clamp: clip the inner gradient to ±ε (JEM++: 1).
        bounds: pixel box applied after every update.
        generator: random source of the noise.
        randn_like: x ↦ N(0, I) noise shaped like x, replacing `generator`.
        autocast_dtype: evaluate the network under autocast with this dtype (the chain stays in x_init's dtype).

    Returns:
        (samples, stats) like `sgld`: detached samples with x_init's shape and dtype.
    """
    x = x_init.detach().clone()
    draw = randn_like or gaussian_noise(generator)
    autocast = torch.autocast(
        x.device.type, dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None
    )
    # the full step is the Langevin step without its noise, which PYLD adds after the inner steps
    full_step = LangevinSettings(step_size, 0.0, grad_clamp, False, bounds)
    costate = torch.zeros(())

    def gradient(x_now: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """∇ₓE and, kept aside, the co-state p = ∂E/∂z, from one full forward/backward pass."""
        nonlocal costate
        x_var = x_now.detach().requires_grad_(True)
        with torch.enable_grad(), autocast:
            e, z = energy_and_features(x_var)
        grad, p = torch.autograd.grad(e.sum(), [x_var, z])
        costate = p.detach()
        return e.detach(), grad

    energy = grad = None
    for _ in range(steps):
        x, energy, grad = langevin_step(x, gradient, None, full_step, inplace=True)
        # Inner steps against the fixed co-state: only the first layer runs.
        for _ in range(inner_steps):
            x.requires_grad_(True)
            with autocast:
                hamiltonian = (first_layer(x) * costate).sum()
            (inner_grad,) = torch.autograd.grad(hamiltonian, x)
            x = x.detach()
            if inner_clamp is not None:
                inner_grad = inner_grad.clamp(-inner_clamp, inner_clamp)
            x.sub_(inner_grad.to(x.dtype), alpha=inner_step_size)
            if bounds is not None:
                x.clamp_(*bounds)
        if noise > 0:
            x.add_(draw(x), alpha=noise)
            if bounds is not None:
                x.clamp_(*bounds)
    if grad is None:
        return x, SGLDStats(grad_norm=0.0, energy=0.0)
    return x, chain_stats(energy, grad)


# --- splitting a network at its first layer -----------------------------------------------------------------------

_FIRST_LAYERS: weakref.WeakKeyDictionary[nn.Module, tuple[nn.Module, tuple[int, ...]]] = weakref.WeakKeyDictionary()


def _is_parametrised_leaf(module: nn.Module) -> bool:
    return next(module.children(), None) is None and next(module.parameters(recurse=False), None) is not None


def find_first_layer(model: nn.Module, energy_fn: Callable[[torch.Tensor], torch.Tensor], x_example: torch.Tensor):
    """The first parametrised layer that `energy_fn` runs, and the per-sample shape of that layer's input.

    Runs one forward pass on two example images in eval mode (no BatchNorm statistics are touched) and checks
    that the layer's input *is* the network's input up to a reshape, which PYLD needs.

    Returns:
        (layer, input_shape): the module and the per-sample shape it receives (e.g. (784,) after a Flatten).
    """
    if model in _FIRST_LAYERS:
        return _FIRST_LAYERS[model]
    calls: list[tuple[nn.Module, torch.Tensor]] = []
    hooks = [
        m.register_forward_hook(lambda mod, args, out: calls.append((mod, args[0])))
        for m in model.modules()
        if _is_parametrised_leaf(m)
    ]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            sample = x_example[:2].detach().float()
            energy_fn(sample)
    finally:
        model.train(was_training)
        for hook in hooks:
            hook.remove()
    if not calls:
        raise ConfigError("sampler.pyld_steps > 0 needs a network with a parametrised layer; set sampler.pyld_steps=0")
    layer, layer_input = calls[0]
    same = layer_input.numel() == sample.numel() and torch.equal(layer_input.reshape(sample.shape).float(), sample)
    if not same:
        raise ConfigError(
            f"PYLD needs the first layer ({type(layer).__name__}) to receive the input image itself; this network "
            f"transforms it first; set sampler.pyld_steps=0"
        )
    result = (layer, tuple(layer_input.shape[1:]))
    _FIRST_LAYERS[model] = result
    return result


def split_first_layer(
    model: nn.Module, energy_fn: Callable[[torch.Tensor], torch.Tensor], x_example: torch.Tensor
) -> tuple[EnergyAndFeatures, FirstLayer]:
    """Build PYLD's two functions for a network: (x ↦ (E(x), f₁(x)), x ↦ f₁(x)).

    Args:
        model: the network `energy_fn` runs (searched for its first parametrised layer).
        energy_fn: x ↦ E(x), e.g. ``model.energy`` or a joint energy for fixed labels.
        x_example: a batch of inputs of the right shape (two of them are used once, to find the layer).
    """
    layer, input_shape = find_first_layer(model, energy_fn, x_example)

    def energy_and_features(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        outputs: list[torch.Tensor] = []
        hook = layer.register_forward_hook(lambda mod, args, out: outputs.append(out))
        try:
            e = energy_fn(x)
        finally:
            hook.remove()
        return e, outputs[0]

    def first_layer(x: torch.Tensor) -> torch.Tensor:
        return layer(x.reshape(len(x), *input_shape))

    return energy_and_features, first_layer
