"""The JEM objective (Grathwohl et al., 2020, eq. 8), with the course code's energy regulariser.

    L = w_yx · CE(f(x), y)                                  log p(y|x)
      + w_x  · (E(x_data).mean() − E(x_model).mean())       contrastive divergence for log p(x)
      + w_xy · (E(x_data, y).mean() − E(x_model|y, y).mean())  the same for log p(x|y), optional
      + λ    · (E(x_data)² + E(x_model)²).mean()            keeps energies near 0 (SPEC S2 uses λ = 0.1)

Minimising the contrastive-divergence term follows the maximum-likelihood gradient of log p(x):
∇θ log p(x) = −∇θ E(x) + E_{x'~p}[∇θ E(x')], with x' the SGLD samples (held fixed, no gradient through them).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from jemlab.energy import joint_energy
from jemlab.models import EnergyModel


@dataclass
class JEMWeights:
    """Weights of the four terms; ce = px = 1, pxy = 0 are the JEM paper's defaults."""

    ce: float = 1.0
    px: float = 1.0
    pxy: float = 0.0
    energy_l2: float = 0.0


def jem_loss(
    model: EnergyModel,
    x_data: torch.Tensor,
    y_data: torch.Tensor,
    x_model: torch.Tensor | None,
    weights: JEMWeights,
    x_model_cond: torch.Tensor | None = None,
    y_model_cond: torch.Tensor | None = None,
    x_data_px: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Compute the weighted JEM loss from one forward pass over data and negatives together.

    Args:
        model: the energy model.
        x_data: (B, C, H, W) training images (already noise-augmented).
        y_data: (B,) labels.
        x_model: (M, C, H, W) SGLD samples of p(x), or None when w_x = 0.
        weights: term weights.
        x_model_cond: (M', C, H, W) SGLD samples of p(x|y), needed when w_xy > 0.
        y_model_cond: (M',) the classes they were sampled for.
        x_data_px: (B', C, H, W) data images for the log p(x) terms (e.g. unaugmented, SADA-JEM); None: x_data.

    Returns:
        (loss, stats): the scalar loss and detached per-term diagnostics.
    """
    parts = [x_data]
    if x_data_px is not None:
        parts.append(x_data_px)
    if x_model is not None:
        parts.append(x_model)
    if x_model_cond is not None:
        parts.append(x_model_cond)
    logits, energy = model.logits_and_energy(torch.cat(parts) if len(parts) > 1 else x_data)
    b = len(x_data)
    logits_data, energy_data = logits[:b], energy[:b]
    offset, logits_px = b, logits_data
    if x_data_px is not None:  # the p(x) and p(x|y) terms see their own data images (same labels); CE the first b
        logits_px, energy_data = logits[b : b + len(x_data_px)], energy[b : b + len(x_data_px)]
        offset += len(x_data_px)

    ce = F.cross_entropy(logits_data, y_data)
    loss = weights.ce * ce
    stats: dict[str, torch.Tensor] = {
        "ce": ce.detach(),
        "train_accuracy": (logits_data.argmax(1) == y_data).float().mean().detach(),
        "energy_data": energy_data.detach().mean(),
    }
    energies_for_l2 = [energy_data]
    if x_model is not None:
        energy_model = energy[offset : offset + len(x_model)]
        offset += len(x_model)
        cd = energy_data.mean() - energy_model.mean()
        loss = loss + weights.px * cd
        energies_for_l2.append(energy_model)
        stats["energy_model"] = energy_model.detach().mean()
        stats["cd"] = cd.detach()
    if x_model_cond is not None:
        if y_model_cond is None:
            raise ValueError("x_model_cond needs y_model_cond")
        logits_cond = logits[offset:]
        cd_xy = joint_energy(logits_px, y_data).mean() - joint_energy(logits_cond, y_model_cond).mean()
        loss = loss + weights.pxy * cd_xy
        stats["cd_xy"] = cd_xy.detach()
    if weights.energy_l2 > 0:
        l2 = sum(e.pow(2).mean() for e in energies_for_l2)
        loss = loss + weights.energy_l2 * l2
        stats["energy_l2"] = l2.detach()
    stats["loss"] = loss.detach()
    return loss, stats
