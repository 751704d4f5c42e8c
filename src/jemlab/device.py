"""The torch device a command runs on, from its ``--device``/``train.device`` name."""

from __future__ import annotations

import torch

from jemlab.errors import ConfigError


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when available; an explicit CUDA device without CUDA is a clear error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"train.device={name} but this torch build sees no CUDA GPU; use --device cpu")
    return torch.device(name)
