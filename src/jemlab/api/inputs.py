"""The image forms the Python API accepts, and their conversion to the network's [−1, 1].

Accepted (a torch tensor or a numpy array, always with a leading batch axis N; one image is ``x[None]``):

- float (any float dtype) in [0, 1], shaped (N, C, H, W), or (N, H, W) for one-channel images;
- uint8 in 0–255, shaped (N, H, W) or channels-last (N, H, W, C), as PIL and imageio give them, or (N, C, H, W)
  as jemlab's own datasets hold them (the layout is read from the model's image shape).

Anything else (another dtype, float values outside [0, 1], a shape that does not match the model's images) is a
one-line `JemlabError` that says what to change. Images the API returns are float32 (N, C, H, W) in [0, 1] on the
CPU, the layout of the `.npz` exchange format.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from jemlab.errors import JemlabError
from jemlab.images import to_unit as _images_to_unit

# What the API's `images` arguments take (see the module docstring for the accepted shapes and ranges).
ImageBatch = torch.Tensor | np.ndarray

ACCEPTED = "float in [0, 1] as (N, C, H, W) or (N, H, W), or uint8 0-255 as (N, H, W), (N, H, W, C) or (N, C, H, W)"


def _shape_text(shape: tuple[int, ...]) -> str:
    return "(" + ", ".join(str(v) for v in shape) + ")"


def to_model_input(images: Any, image_shape: tuple[int, int, int]) -> torch.Tensor:
    """Check a batch of images in an accepted form and convert it to float32 (N, C, H, W) in [−1, 1] on the CPU.

    Args:
        images: a torch tensor or numpy array in one of the accepted forms (module docstring).
        image_shape: the model's (C, H, W).

    Returns:
        (N, C, H, W) float32 in [−1, 1].

    Raises:
        JemlabError: a wrong type, dtype, shape or range, in one line that names the fix.
    """
    c, h, w = image_shape
    if isinstance(images, np.ndarray):
        if images.dtype == object or images.dtype.kind not in "biuf":
            raise JemlabError(f"images have dtype {images.dtype}; pass {ACCEPTED}")
        x = torch.from_numpy(np.ascontiguousarray(images))
    elif isinstance(images, torch.Tensor):
        x = images.detach().cpu()
    else:
        raise JemlabError(f"images must be a torch.Tensor or numpy array, got {type(images).__name__}; pass {ACCEPTED}")
    shape = tuple(x.shape)
    if x.dim() == 0 or shape[0] == 0:
        raise JemlabError(f"images of shape {_shape_text(shape)} hold no image; pass a batch of N >= 1 images")
    if x.dtype == torch.uint8:
        x = _channels_first_uint8(x, image_shape)
        return x.float() / 255 * 2 - 1
    if not x.is_floating_point():
        hint = " (convert 0-255 integers with .astype(np.uint8))" if x.dtype != torch.bool else ""
        raise JemlabError(f"images have dtype {x.dtype}; pass {ACCEPTED}{hint}")
    if x.dim() == 3 and c == 1:
        x = x.unsqueeze(1)  # (N, H, W) → (N, 1, H, W)
    if x.dim() != 4 or tuple(x.shape[1:]) != (c, h, w):
        want = _shape_text((c, h, w))
        hint = f"; this model's float images are (N, {want[1:]}"
        if x.dim() == 4 and tuple(x.shape[1:]) == (h, w, c):
            hint += ": these look channels-last, pass x.permute(0, 3, 1, 2) (numpy: x.transpose(0, 3, 1, 2))"
        elif x.dim() == len(image_shape) and tuple(x.shape) == (c, h, w):
            hint += ": add the batch axis, x[None]"
        raise JemlabError(f"images of shape {_shape_text(shape)} do not fit{hint}")
    x = x.float()
    if not bool(torch.isfinite(x).all()):
        raise JemlabError("images hold NaN or infinite values; pass finite values in [0, 1]")
    low, high = float(x.min()), float(x.max())
    if low < 0 or high > 1:
        if low >= -1 and high <= 1:
            fix = "these look like [-1, 1] images: pass (x + 1) / 2"
        elif low >= 0:
            fix = "these look like 0-255 values: pass x / 255, or a uint8 array"
        else:
            fix = "rescale them to [0, 1]"
        raise JemlabError(f"float images must be in [0, 1], got values in [{low:.4g}, {high:.4g}]; {fix}")
    return x.contiguous() * 2 - 1


def _channels_first_uint8(x: torch.Tensor, image_shape: tuple[int, int, int]) -> torch.Tensor:
    """uint8 (N, H, W), (N, H, W, C) or (N, C, H, W) → (N, C, H, W), or a one-line error naming the shapes."""
    c, h, w = image_shape
    if x.dim() == 3 and c == 1 and tuple(x.shape[1:]) == (h, w):
        return x.unsqueeze(1)
    if x.dim() == 4 and tuple(x.shape[1:]) == (h, w, c):  # channels-last first: the usual layout of uint8 arrays
        return x.permute(0, 3, 1, 2)
    if x.dim() == 4 and tuple(x.shape[1:]) == (c, h, w):
        return x
    want = (f"(N, {h}, {w}), " if c == 1 else "") + f"(N, {h}, {w}, {c}) or (N, {c}, {h}, {w})"
    hint = ": add the batch axis, x[None]" if tuple(x.shape) in ((h, w), (h, w, c), (c, h, w)) else ""
    raise JemlabError(f"uint8 images of shape {_shape_text(tuple(x.shape))} do not fit; this model takes {want}{hint}")


def to_unit(x: torch.Tensor) -> torch.Tensor:
    """Network images in [−1, 1] → float32 (N, C, H, W) in [0, 1] on the CPU (clamped), as the API returns them."""
    return _images_to_unit(x).contiguous()
