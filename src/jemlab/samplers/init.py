"""Where chains start. An initialiser maps (n, labels or None, generator) to n images in [−1, 1]."""

from __future__ import annotations

from collections.abc import Callable

import torch

from jemlab.errors import ConfigError

Initializer = Callable[[int, "torch.Tensor | None", "torch.Generator | None"], torch.Tensor]


def uniform_init(shape: tuple[int, ...], device: torch.device | str = "cpu") -> Initializer:
    """U[−1, 1] noise of the given per-sample shape (JEM's initialisation of the buffer and of re-started chains)."""

    def init(n: int, labels: torch.Tensor | None = None, generator: torch.Generator | None = None):
        return torch.rand((n, *shape), generator=generator, device=device) * 2 - 1

    return init


INITIALIZERS: dict[str, Callable[..., Initializer]] = {"uniform": uniform_init}


def build_initializer(name: str, shape: tuple[int, ...], **kwargs) -> Initializer:
    """An initialiser by name; an unknown name lists the choices."""
    if name not in INITIALIZERS:
        raise ConfigError(f"unknown sampler.init '{name}'; choose one of: {', '.join(INITIALIZERS)}")
    return INITIALIZERS[name](shape, **kwargs)
