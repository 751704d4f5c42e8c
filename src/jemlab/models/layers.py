"""Small shared pieces: activations and normalisation by name."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from jemlab.errors import ConfigError

ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "swish": nn.SiLU,  # x·sigmoid(x); smooth, so SGLD sees a smooth energy landscape
    "silu": nn.SiLU,
    "leaky_relu": lambda: nn.LeakyReLU(0.2),  # JEM's WRN uses LeakyReLU(0.2)
    "relu": nn.ReLU,
    "elu": nn.ELU,
    "gelu": nn.GELU,
}


def activation(name: str) -> nn.Module:
    """A fresh activation module by name; unknown names list the choices."""
    if name not in ACTIVATIONS:
        raise ConfigError(f"unknown activation '{name}'; choose one of: {', '.join(ACTIVATIONS)}")
    return ACTIVATIONS[name]()


def normalization(name: str | None, channels: int) -> nn.Module:
    """Normalisation by name. JEM trains without normalisation: BatchNorm's batch statistics differ between data
    and SGLD samples and break the energy (JEM++ re-enables it only with informative initialisation)."""
    if name in (None, "none"):
        return nn.Identity()
    if name == "batch":
        return nn.BatchNorm2d(channels)
    if name == "group":
        return nn.GroupNorm(min(32, channels // 4) or 1, channels)
    if name == "layer":
        return nn.GroupNorm(1, channels)
    raise ConfigError(f"unknown norm '{name}'; choose one of: none, batch, group, layer")
