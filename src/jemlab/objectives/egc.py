"""The EGC objective (Guo et al., ICCV 2023; SPEC S5): denoising through the energy gradient plus classification.

    x_t = √ᾱ_t x_0 + √(1 − ᾱ_t) ε,   t ~ U{0, …, T−1},  ε ~ N(0, I)
    ε̂   = √(1 − ᾱ_t) ∇ₓE(x_t, t[, ỹ])         ỹ = y, or "no label" for a fraction of the batch
    L   = w_t ‖ε̂ − ε‖² (mean over pixels; w_t = 1, or Min-SNR-γ: min(SNR_t, γ)/SNR_t)
        + γ       · mean_i √ᾱ_{t_i} · CE_ls(f(x_t, t), y)      classification of noisy images
        + γ_clean · mean_i            CE_ls(f(x_0, 0), y)      classification of clean images

CE_ls is cross-entropy with label smoothing. ∇ₓE is taken with ``create_graph=True``, so minimising the denoising
term back-propagates through the input gradient (double back-propagation). ``trunk_grad`` < 1 lets only that share
of the CE terms' gradient reach the network's trunk (the classifier's own layers get all of it); 1 is EGC as
published. Like the JEM objective, this module receives its random draws' generator and never samples negatives of
its own.

`epsilon_loss` is the control of the comparison (``egc.parameterisation=epsilon``): a plain ε-prediction diffusion
model (Ho et al., 2020) on the same UNet, whose output head emits ε̂(x_t, t[, ỹ]) directly, with the same draws of
t, ε and dropped labels and the same denoising term (Min-SNR weighting included), and nothing else: no energy, no
input gradient (so no double back-propagation) and no CE terms, since a plain diffusion model has no classifier.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from jemlab.diffusion.schedule import NoiseSchedule


@dataclass
class EGCWeights:
    """Loss weights and label handling (SPEC S5 values: γ ≈ 0.001–0.005, smoothing 0.2, 10% labels dropped)."""

    gamma: float = 0.005
    gamma_clean: float = 0.005
    label_smoothing: float = 0.2
    label_dropout: float = 0.1
    min_snr: float = 0.0  # γ of the Min-SNR weighting of the denoising term (Hang et al., 2023); 0: uniform
    trunk_grad: float = 1.0  # share of the CE terms' gradient that reaches the trunk (0: only the classifier learns)


def _denoising_error(
    eps_hat: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, schedule: NoiseSchedule, min_snr: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(term, mse): the denoising term, the batch mean of w_t · (pixel mean of (ε̂ − ε)²) with w_t = 1 when `min_snr`
    is 0, and the unweighted ε-MSE (detached; the number the logs and docs compare across runs)."""
    error = (eps_hat - noise).pow(2)
    mse = error.detach().mean()
    if min_snr > 0:
        error = error * schedule.min_snr_weight(t, min_snr, error)
    return error.mean(), mse


def _noised(
    model: torch.nn.Module,
    schedule: NoiseSchedule,
    x0: torch.Tensor,
    y: torch.Tensor,
    label_dropout: float,
    generator: torch.Generator | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """A training batch's diffusion draws, in this order from `generator`: timesteps t, noise ε, and (for a
    label-conditioned network) which labels are dropped to the "no label" class. Returns (t, ε, x_t, labels or
    None); both objectives call it, so they see the same noisy images for the same seed."""
    n, device = len(x0), x0.device
    t = schedule.sample_timesteps(n, generator, device)  # (B,)
    noise = torch.randn(x0.shape, generator=generator, device=device, dtype=x0.dtype)
    x_t = schedule.q_sample(x0, t, noise)
    if getattr(model, "label_embed", None) is None:
        return t, noise, x_t, None
    dropped = torch.rand(n, generator=generator, device=device) < label_dropout
    return t, noise, x_t, torch.where(dropped, torch.full_like(y, model.num_classes), y)


def egc_loss(
    model: torch.nn.Module,
    schedule: NoiseSchedule,
    x0: torch.Tensor,
    y: torch.Tensor,
    weights: EGCWeights,
    generator: torch.Generator | None = None,
    autocast_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Compute the EGC loss on a batch of clean images.

    Args:
        model: an EGC network (`logit_map`, `energy_from_map`, `noise_from_gradient`, `pool_logits`, `label_embed`,
            `num_classes`).
        schedule: the noise schedule.
        x0: (B, C, H, W) clean training images in [−1, 1].
        y: (B,) labels.
        weights: loss weights.
        generator: random source (on x0's device) of t, ε and the label dropout.
        autocast_dtype: run the forward passes under autocast in this dtype (e.g. torch.bfloat16).

    Returns:
        (loss, stats): the scalar loss and detached diagnostics.
    """
    n, device = len(x0), x0.device
    t, noise, x_t, y_eps = _noised(model, schedule, x0, y, weights.label_dropout, generator)
    conditional = y_eps is not None

    autocast = torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None)
    # Denoising term: ε̂ from the gradient of the energy, kept in the graph.
    x_in = x_t.detach().requires_grad_(True)
    with autocast:
        m_noisy = model.logit_map(x_in, t, y_eps)  # (B, C, H, W)
    energy = model.energy_from_map(m_noisy)  # (B,)
    (grad,) = torch.autograd.grad(energy.sum(), x_in, create_graph=True)
    eps_hat = model.noise_from_gradient(grad.float(), schedule.sigma(t, x0), x_t.float())
    denoising, mse = _denoising_error(eps_hat, noise, t, schedule, weights.min_snr)

    # Classification terms, read without a label (the label-free map). Without label conditioning, a classifier
    # that reads the map and the whole gradient, the noisy map above already is that map, so only the clean images
    # need a forward pass of their own.
    separate = conditional or weights.trunk_grad < 1 or getattr(model, "classifier_head", None) is not None
    with autocast:
        if separate:
            both = torch.cat([x_t, x0]), torch.cat([t, torch.zeros_like(t)])
            logits = model.logits_t(*both, trunk_grad=weights.trunk_grad)
            logits_noisy, logits_clean = logits[:n], logits[n:]
        else:
            logits_noisy = model.pool_logits(m_noisy)
            logits_clean = model.logits_t(x0, torch.zeros_like(t))
    ce_noisy_each = F.cross_entropy(logits_noisy.float(), y, label_smoothing=weights.label_smoothing, reduction="none")
    ce_noisy = (ce_noisy_each * schedule.signal(t, ce_noisy_each)).mean()
    ce_clean = F.cross_entropy(logits_clean.float(), y, label_smoothing=weights.label_smoothing)

    loss = denoising + weights.gamma * ce_noisy + weights.gamma_clean * ce_clean
    stats = {
        "loss": loss.detach(),
        "mse": mse,
        "ce": ce_clean.detach(),
        "ce_noisy": ce_noisy.detach(),
        "train_accuracy": (logits_clean.argmax(1) == y).float().mean().detach(),
        "energy_t": energy.detach().mean(),
    }
    return loss, stats


def epsilon_loss(
    model: torch.nn.Module,
    schedule: NoiseSchedule,
    x0: torch.Tensor,
    y: torch.Tensor,
    weights: EGCWeights,
    generator: torch.Generator | None = None,
    autocast_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The control's loss: ‖ε̂(x_t, t[, ỹ]) − ε‖² (mean over pixels) with ε̂ read off the network's ε head.

    t, ε and the dropped labels are drawn from `generator` in the same order as `egc_loss` draws them, so the two
    objectives see the same noisy images for the same seed. Only ``weights.label_dropout`` is read: the CE weights
    and the label smoothing belong to EGC's classifier, which the control does not have.

    Args:
        model: an EGC UNet built with ``output="epsilon"`` (`predict_eps`, `label_embed`, `num_classes`).
        schedule: the noise schedule.
        x0: (B, C, H, W) clean training images in [−1, 1].
        y: (B,) labels (for the label-conditioned network).
        weights: the label dropout.
        generator: random source (on x0's device) of t, ε and the label dropout.
        autocast_dtype: run the forward pass under autocast in this dtype (e.g. torch.bfloat16).

    Returns:
        (loss, stats): the scalar loss and detached diagnostics (``loss``, ``mse``).
    """
    t, noise, x_t, y_eps = _noised(model, schedule, x0, y, weights.label_dropout, generator)
    with torch.autocast(x0.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        eps_hat = model.predict_eps(x_t, t, y_eps)  # (B, C, H, W)
    loss, mse = _denoising_error(eps_hat.float(), noise, t, schedule, weights.min_snr)
    return loss, {"loss": loss.detach(), "mse": mse}
