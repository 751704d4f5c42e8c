"""Convolutional backbones for 28×28 / 32×32 images."""

from __future__ import annotations

import torch
from torch import nn

from jemlab.models.layers import activation


class CourseCNN(nn.Module):
    """The course network (SPEC S2): four strided convolutions with Swish, flattened to 256 features.

    28×28 input: Conv(1→16, k5, s2, p4) → 16×16, then three Conv(k3, s2, p1) → 8×8, 4×4, 2×2 with 32, 64, 64
    channels; 64·2·2 = 256 features.
    """

    def __init__(self, in_channels: int = 1, image_size: int = 28, hidden: int = 16, act: str = "swish") -> None:
        super().__init__()
        c1, c2, c3 = hidden, 2 * hidden, 4 * hidden
        self.net = nn.Sequential(
            nn.Conv2d(in_channels, c1, kernel_size=5, stride=2, padding=4),
            activation(act),
            nn.Conv2d(c1, c2, kernel_size=3, stride=2, padding=1),
            activation(act),
            nn.Conv2d(c2, c3, kernel_size=3, stride=2, padding=1),
            activation(act),
            nn.Conv2d(c3, c3, kernel_size=3, stride=2, padding=1),
            activation(act),
            nn.Flatten(),
        )
        with torch.no_grad():
            self.feature_dim = self.net(torch.zeros(1, in_channels, image_size, image_size)).shape[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)  # (N, feature_dim)

    def sequential_layers(self) -> list[nn.Module]:
        """The layers that `forward` applies one after another (for `jemlab.accel.explicit`)."""
        return list(self.net)


class SmallCNN(nn.Module):
    """A CPU-friendly CNN for the default preset: three stages of 3×3 convolutions, each stage halving the
    resolution, then a linear layer to `features` units.

    No normalisation (the energy of a sample must not depend on the rest of its batch) and a smooth activation
    (SGLD follows the input gradient, which a ReLU network makes piecewise constant).
    """

    def __init__(
        self,
        in_channels: int = 1,
        image_size: int = 28,
        width: int = 32,
        convs_per_stage: int = 1,
        features: int = 256,
        act: str = "swish",
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = in_channels
        for stage in range(3):
            out = width * 2**stage
            layers += [nn.Conv2d(channels, out, 3, stride=1 if stage == 0 else 2, padding=1)]
            layers += [activation(act)]
            for _ in range(convs_per_stage - 1):
                layers += [nn.Conv2d(out, out, 3, padding=1), activation(act)]
            channels = out
        layers += [nn.Conv2d(channels, channels, 3, stride=2, padding=1), activation(act)]
        self.conv = nn.Sequential(*layers)
        with torch.no_grad():
            flat = self.conv(torch.zeros(1, in_channels, image_size, image_size)).numel()
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(flat, features), activation(act))
        self.feature_dim = features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.conv(x))  # (N, features)

    def sequential_layers(self) -> list[nn.Module]:
        """The layers that `forward` applies one after another (for `jemlab.accel.explicit`)."""
        return [*self.conv, *self.head]
