"""Wide residual network (Zagoruyko & Komodakis, 2016) as used by JEM: WRN-28-10 without normalisation and with
LeakyReLU(0.2) (Grathwohl et al., 2020, Sec. 5 / App. H)."""

from __future__ import annotations

import torch
from torch import nn

from jemlab.errors import ConfigError
from jemlab.models.layers import activation, normalization


class _Block(nn.Module):
    """Pre-activation residual block: norm → act → conv → norm → act → (dropout) → conv, plus shortcut."""

    def __init__(self, c_in: int, c_out: int, stride: int, norm: str | None, act: str, dropout: float) -> None:
        super().__init__()
        self.norm1 = normalization(norm, c_in)
        self.act1 = activation(act)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1)
        self.norm2 = normalization(norm, c_out)
        self.act2 = activation(act)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.shortcut = nn.Identity() if stride == 1 and c_in == c_out else nn.Conv2d(c_in, c_out, 1, stride=stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(self.act1(self.norm1(x)))
        h = self.conv2(self.dropout(self.act2(self.norm2(h))))
        return h + self.shortcut(x)


class WideResNet(nn.Module):
    """WRN-depth-widen: 3 groups of (depth − 4) / 6 blocks with 16·k, 32·k, 64·k channels, global average pool.

    Args:
        depth: 6n + 4 (28 in JEM).
        widen: width multiplier k (10 in JEM).
        norm: None (JEM), "batch" (JEM++ with informative init), "group" or "layer".
        act: activation name (JEM: leaky_relu).
        dropout: dropout rate inside blocks.
    """

    def __init__(
        self,
        in_channels: int = 3,
        image_size: int = 32,
        depth: int = 28,
        widen: int = 10,
        norm: str | None = None,
        act: str = "leaky_relu",
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if depth < 10 or (depth - 4) % 6 != 0:
            raise ConfigError(f"wide_resnet depth must be 6n+4 with n >= 1 (e.g. 10, 16, 28), got {depth}")
        blocks = (depth - 4) // 6
        widths = [16, 16 * widen, 32 * widen, 64 * widen]
        layers: list[nn.Module] = [nn.Conv2d(in_channels, widths[0], 3, padding=1)]
        c_in = widths[0]
        for group, c_out in enumerate(widths[1:]):
            for i in range(blocks):
                stride = 2 if (group > 0 and i == 0) else 1
                layers.append(_Block(c_in, c_out, stride, norm, act, dropout))
                c_in = c_out
        layers += [normalization(norm, c_in), activation(act)]
        self.body = nn.Sequential(*layers)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.feature_dim = c_in

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.body(x))  # (N, 64·widen)
