"""Backbones and the energy model around them.

Swappable parts come from an explicit name → constructor dict; an unknown name is an error that lists the choices.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from torch import nn

from jemlab.errors import ConfigError
from jemlab.models.cnn import CourseCNN, SmallCNN
from jemlab.models.egc_unet import EGCUNet
from jemlab.models.energy_model import EnergyModel
from jemlab.models.mlp import MLP
from jemlab.models.wide_resnet import WideResNet

# name → backbone constructor. Each backbone maps (N, C, H, W) images to (N, feature_dim) features and has a
# `feature_dim` attribute; the EnergyModel adds the class head (and, optionally, a scalar energy head).
BACKBONES: dict[str, Callable[..., nn.Module]] = {
    "cnn": SmallCNN,
    "course_cnn": CourseCNN,
    "mlp": MLP,
    "wide_resnet": WideResNet,
}

# name → constructor of a complete model with the EnergyModel interface (logits, energy, logits_and_energy,
# joint_energy) plus its own extras; called with (in_channels, image_size, num_classes, **options).
# egc_unet: EGC's noise-conditional energy UNet (SPEC S5), trained with objective.name=egc.
MODELS: dict[str, Callable[..., nn.Module]] = {
    "egc_unet": EGCUNet,
}


def backbone_options(name: str) -> list[str]:
    """The keyword arguments a backbone accepts besides the image shape (used to validate config keys)."""
    if name not in BACKBONES and name not in MODELS:
        raise ConfigError(f"unknown model '{name}'; choose one of: {', '.join(sorted({**BACKBONES, **MODELS}))}")
    params = inspect.signature(MODELS.get(name) or BACKBONES[name]).parameters
    return [p for p in params if p not in ("in_channels", "image_size", "num_classes")]


def build_model(
    name: str,
    image_shape: tuple[int, int, int],
    num_classes: int,
    energy_head: str = "logsumexp",
    options: dict[str, Any] | None = None,
) -> EnergyModel:
    """Build an EnergyModel from a registry name (or, for a name in ``MODELS``, that complete model).

    Args:
        name: backbone name, one of ``BACKBONES``.
        image_shape: (C, H, W) of the inputs.
        num_classes: number of classes C.
        energy_head: ``"logsumexp"`` (JEM: E = −logsumexp f(x)) or ``"separate"`` (course: E = −h(x)).
        options: extra keyword arguments for the backbone (validated against its signature).

    Returns:
        The model, in training mode, on the CPU.
    """
    options = dict(options or {})
    allowed = backbone_options(name)
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ConfigError(f"model '{name}' has no option(s) {', '.join(unknown)}; it accepts: {', '.join(allowed)}")
    channels, height, width = image_shape
    if height != width:
        raise ConfigError(
            f"images must be square, got {height}x{width} (height x width); resize them while loading with "
            f"data.image_size=N (--set data.image_size={max(height, width)})"
        )
    if name in MODELS:  # a complete model (EGC): no separate head to add
        return MODELS[name](in_channels=channels, image_size=height, num_classes=num_classes, **options)
    backbone = BACKBONES[name](in_channels=channels, image_size=height, **options)
    return EnergyModel(backbone, num_classes=num_classes, energy_head=energy_head)


__all__ = ["BACKBONES", "MODELS", "EGCUNet", "EnergyModel", "backbone_options", "build_model"]
