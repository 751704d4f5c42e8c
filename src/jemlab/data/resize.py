"""Resizing uint8 images to one square size (``data.image_size``), the same way for every source.

Bilinear interpolation with antialiasing (``torch.nn.functional.interpolate(..., antialias=True)``): when shrinking,
each output pixel averages the input pixels it covers, as Pillow's ``Image.resize(BILINEAR)`` does, instead of
sampling four of them (which aliases). The aspect ratio is not kept: a non-square image is stretched to a square.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Images converted to float per call: bounds the temporary float32 copy (4,096 × 3 × 64 × 64 × 4 B = 200 MB).
_CHUNK = 4096


def resize_images(images: torch.Tensor, size: int) -> torch.Tensor:
    """Resize a batch of images to ``size`` × ``size`` pixels.

    Args:
        images: uint8 (N, C, H, W) with pixel values 0..255.
        size: side of the square output, in pixels.

    Returns:
        uint8 (N, C, size, size); ``images`` itself when it already has that size.
    """
    if images.dim() != 4 or images.dtype != torch.uint8:
        raise ValueError(f"resize_images takes uint8 (N, C, H, W), got {images.dtype} {tuple(images.shape)}")
    if tuple(images.shape[2:]) == (size, size):
        return images
    n, c = images.shape[:2]
    out = torch.empty((n, c, size, size), dtype=torch.uint8)
    for start in range(0, n, _CHUNK):
        chunk = images[start : start + _CHUNK].to(torch.float32)  # (B, C, H, W)
        resized = F.interpolate(chunk, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        out[start : start + _CHUNK] = resized.round_().clamp_(0, 255).to(torch.uint8)  # (B, C, size, size)
    return out
