"""Synthetic out-of-distribution sets: noise images and transformed test images.

JEM (Grathwohl et al., 2020) also uses interpolations of two test images as an OOD set; flips and
colour inversion keep the pixel statistics of the data while breaking its structure.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from jemlab.errors import JemlabError

__all__ = [
    "build_ood_sets",
    "flip_horizontal",
    "flip_vertical",
    "gaussian_noise",
    "interpolations",
    "invert",
    "uniform_noise",
]


def uniform_noise(n: int, shape: Sequence[int], generator: torch.Generator | None = None) -> Tensor:
    """Images of i.i.d. U[-1, 1] pixels (the JEM replay-buffer initialisation).

    Args:
        n: Number of images.
        shape: Per-image shape (C, H, W).
        generator: Random generator for reproducibility.

    Returns:
        (n, C, H, W) float32 tensor.
    """
    return torch.rand((n, *shape), generator=generator) * 2.0 - 1.0


def gaussian_noise(
    n: int,
    shape: Sequence[int],
    *,
    mean: float | Tensor = 0.0,
    std: float | Tensor = 0.5,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Images of Gaussian pixels N(mean, std²), clipped to [-1, 1].

    Args:
        n: Number of images.
        shape: Per-image shape (C, H, W).
        mean: Scalar or per-pixel (C, H, W) mean (e.g. the data mean).
        std: Scalar or per-pixel standard deviation.
        generator: Random generator.

    Returns:
        (n, C, H, W) float32 tensor in [-1, 1].
    """
    z = torch.randn((n, *shape), generator=generator)
    return (z * torch.as_tensor(std) + torch.as_tensor(mean)).clamp(-1.0, 1.0).float()


def interpolations(x: Tensor, n: int | None = None, generator: torch.Generator | None = None) -> Tensor:
    """Midpoints 0.5·(x_i + x_j) of random pairs i ≠ j of (test) images, as in JEM's OOD table.

    Args:
        x: (N, C, H, W) images, N >= 2.
        n: Number of interpolations (default N).
        generator: Random generator choosing the pairs.

    Returns:
        (n, C, H, W) tensor.
    """
    m = x.shape[0]
    if m < 2:
        raise JemlabError("interpolations need at least 2 images; pass a larger test set")
    n = m if n is None else n
    i = torch.randint(0, m, (n,), generator=generator)
    # j = i + offset with offset in [1, m-1] guarantees j != i.
    j = (i + torch.randint(1, m, (n,), generator=generator)) % m
    return 0.5 * (x[i] + x[j])


def flip_vertical(x: Tensor) -> Tensor:
    """Upside-down images (flip along height)."""
    return torch.flip(x, dims=[-2])


def flip_horizontal(x: Tensor) -> Tensor:
    """Mirrored images (flip along width). Near in-distribution for natural images, OOD for
    digits."""
    return torch.flip(x, dims=[-1])


def invert(x: Tensor) -> Tensor:
    """Colour-inverted images -x (in [-1, 1] this is 1 - x in [0, 1] units)."""
    return -x


def build_ood_sets(
    x_test: Tensor,
    n: int | None = None,
    generator: torch.Generator | None = None,
    kinds: Sequence[str] = ("uniform", "gaussian", "interp", "vflip", "hflip", "invert"),
) -> dict[str, Tensor]:
    """Synthetic OOD sets derived from the test images (and pure noise).

    Args:
        x_test: (N, C, H, W) in-distribution test images in [-1, 1].
        n: Size of each set (default N; transformed sets use the first n test images).
        generator: Random generator.
        kinds: Subset of ``uniform``, ``gaussian`` (mean/std matched to the test pixels, clipped),
            ``interp``, ``vflip``, ``hflip``, ``invert``.

    Returns:
        dict name -> (n, C, H, W) tensor.
    """
    n = x_test.shape[0] if n is None else min(n, x_test.shape[0])
    shape = tuple(x_test.shape[1:])
    base = x_test[:n]
    builders: dict[str, Callable[[], Tensor]] = {
        "uniform": lambda: uniform_noise(n, shape, generator),
        "gaussian": lambda: gaussian_noise(
            n, shape, mean=float(x_test.mean()), std=float(x_test.std()), generator=generator
        ),
        "interp": lambda: interpolations(x_test, n, generator),
        "vflip": lambda: flip_vertical(base),
        "hflip": lambda: flip_horizontal(base),
        "invert": lambda: invert(base),
    }
    out: dict[str, Tensor] = {}
    for kind in kinds:  # in the order asked for: the noise sets draw from the generator in turn
        if kind not in builders:
            raise JemlabError(f"unknown OOD set kind {kind!r}; choose from {', '.join(builders)}")
        out[kind] = builders[kind]()
    return out
