"""The MLP backbone of the LogSumExp variant (SPEC S3)."""

from __future__ import annotations

import torch
from torch import nn

from jemlab.models.layers import activation


class MLP(nn.Module):
    """Flatten the image and apply fully connected layers; the EnergyModel adds the 10-way head."""

    def __init__(
        self,
        in_channels: int = 1,
        image_size: int = 28,
        hidden: tuple[int, ...] = (512, 256),
        act: str = "swish",
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        size = in_channels * image_size * image_size
        for units in hidden:
            layers += [nn.Linear(size, units), activation(act)]
            size = units
        self.net = nn.Sequential(*layers)
        self.feature_dim = size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)  # (N, hidden[-1])

    def sequential_layers(self) -> list[nn.Module]:
        """The layers that `forward` applies one after another (for `jemlab.accel.explicit`)."""
        return list(self.net)
