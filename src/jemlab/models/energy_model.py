"""EnergyModel: a backbone plus a class head (and optionally a scalar energy head) read as an EBM."""

from __future__ import annotations

import torch
from torch import nn

from jemlab.energy import head_energy, joint_energy, marginal_energy
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
