"""Training-time augmentation on whole batches, on the training device, from the run's own random generator.

``crop`` pads each image by 4 pixels (reflection) and cuts a random 32×32 (H×W) window back out; ``crop_flip`` also
mirrors half of the images left-right. This is the CIFAR augmentation of the JEM and JEM++ code; digits (SVHN) take
``crop`` because a mirrored digit is another glyph. SADA-JEM leaves the p(x) branch unaugmented
(``data.augment_px=none``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

AUGMENTATIONS = ("none", "crop", "crop_flip")
PAD = 4


def augment(x: torch.Tensor, kind: str, generator: torch.Generator | None = None) -> torch.Tensor:
    """Augment a batch.

    Args:
        x: (B, C, H, W) images in [−1, 1].
        kind: one of `AUGMENTATIONS`.
        generator: random source on x's device (offsets and flips).

    Returns:
        A new (B, C, H, W) batch (x itself for "none").
    """
    if kind not in AUGMENTATIONS:
        raise ValueError(f"unknown augmentation '{kind}'; choose one of: {', '.join(AUGMENTATIONS)}")
    if kind == "none":
        return x
    b, _, h, w = x.shape
    padded = F.pad(x, (PAD, PAD, PAD, PAD), mode="reflect")  # (B, C, H+8, W+8)
    offsets = torch.randint(0, 2 * PAD + 1, (2, b), generator=generator, device=x.device)
    rows = offsets[0, :, None] + torch.arange(h, device=x.device)  # (B, H)
    cols = offsets[1, :, None] + torch.arange(w, device=x.device)  # (B, W)
    batch = torch.arange(b, device=x.device)[:, None, None]
    out = padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]]  # (B, H, W, C)
    out = out.permute(0, 3, 1, 2).contiguous(memory_format=_layout(x))
    if kind == "crop_flip":
        flip = torch.rand(b, generator=generator, device=x.device) < 0.5
        out = torch.where(flip[:, None, None, None], out.flip(3), out)
    return out


def _layout(x: torch.Tensor) -> torch.memory_format:
    return (
        torch.channels_last
        if x.is_contiguous(memory_format=torch.channels_last) and x.shape[1] > 1
        else (torch.contiguous_format)
    )
