"""EnergyModel: a backbone plus a class head (and optionally a scalar energy head) read as an EBM."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from jemlab.energy import (
    energy_and_logit_gradient,
    head_energy,
    head_energy_and_gradient,
    joint_energy,
    marginal_energy,
)
from jemlab.errors import ConfigError


class EnergyModel(nn.Module):
    """One network that is a classifier p(y|x) and an energy-based model p(x) ∝ exp(−E(x)).

    The model knows nothing about sampling or training. ``forward`` returns logits, so the model can be used as a
    plain classifier by any code that expects one.

    Args:
        backbone: maps images (N, C, H, W) to features (N, backbone.feature_dim).
        num_classes: number of classes.
        energy_head: "logsumexp" (JEM, E = −logsumexp f(x)) or "separate" (SPEC S2, E = −h(x) for a scalar head).
    """

    def __init__(self, backbone: nn.Module, num_classes: int, energy_head: str = "logsumexp") -> None:
        super().__init__()
        if energy_head not in ("logsumexp", "separate"):
            raise ConfigError(f"unknown energy_head '{energy_head}'; choose logsumexp or separate")
        self.backbone = backbone
        self.num_classes = num_classes
        self.energy_head = energy_head
        self.classifier = nn.Linear(backbone.feature_dim, num_classes)
        self.density_head = nn.Linear(backbone.feature_dim, 1) if energy_head == "separate" else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits(x)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits f(x), shape (N, C)."""
        return self.classifier(self.backbone(x))

    def logits_and_energy(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits (N, C) and marginal energy E(x) (N,) from one forward pass."""
        features = self.backbone(x)
        logits = self.classifier(features)
        if self.density_head is None:
            return logits, marginal_energy(logits)
        return logits, head_energy(self.density_head(features))

    def energy(self, x: torch.Tensor) -> torch.Tensor:
        """Marginal energy E(x), shape (N,)."""
        if self.density_head is None:
            return marginal_energy(self.logits(x))
        return head_energy(self.density_head(self.backbone(x)))

    def joint_energy(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Joint energy E(x, y) = −f(x)[y], shape (N,)."""
        return joint_energy(self.logits(x), y)

    # --- for code that differentiates by hand (jemlab.accel.explicit) -----------------------------------------------

    def sequential_layers(self) -> list[nn.Module] | None:
        """The backbone as a plain list of layers, or None if it is not one (see the backbones' own method)."""
        layers = getattr(self.backbone, "sequential_layers", None)
        return None if layers is None else list(layers())

    def feature_energy_and_gradient(
        self, features: torch.Tensor, labels: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """E and ∂E/∂features from the backbone's features, through this model's heads (no autograd).

        The energy is the one `energy` (labels None) or `joint_energy` (labels given) computes; the heads are
        linear, so ∂E/∂features = ∂E/∂(head output) · W.

        Args:
            features: (N, feature_dim) backbone outputs, fp32.
            labels: (N,) classes for the joint energy E(x, y), or None.

        Returns:
            ((N,) energies, (N, feature_dim) gradients).
        """
        if labels is None and self.density_head is not None:
            head = self.density_head
            energy, grad_out = head_energy_and_gradient(F.linear(features, head.weight.float(), _float(head.bias)))
        else:
            head = self.classifier
            logits = F.linear(features, head.weight.float(), _float(head.bias))
            energy, grad_out = energy_and_logit_gradient(logits, labels)
        return energy, grad_out @ head.weight.float()


def _float(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.float()
