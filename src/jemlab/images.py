"""Image files: PNG grids (numpy + Pillow, no torchvision) and the `.npz` sample format of SPEC.

Sample files exchanged with other tools hold ``images``: float32 (N, C, H, W) in [0, 1] and, for
class-conditional samples, ``labels``: int64 (N,).
"""

from __future__ import annotations

import math
import zipfile
import zlib
from pathlib import Path

import numpy as np
import torch

from jemlab.errors import JemlabError


def to_unit(x: torch.Tensor) -> torch.Tensor:
    """Map images from [−1, 1] to [0, 1] (clamped)."""
    return ((x.detach().float().cpu() + 1) / 2).clamp(0, 1)


def make_grid(x: torch.Tensor, nrow: int | None = None, padding: int = 2, scale: int = 1) -> np.ndarray:
    """Tile images into one uint8 array.

    Args:
        x: (N, C, H, W) images in [−1, 1].
        nrow: images per row (default: ceil(sqrt(N))).
        padding: pixels between images.
        scale: integer upscaling factor (nearest neighbour) so that small images are visible.

    Returns:
        (H', W') array for one channel, (H', W', 3) for three.
    """
    if x.dim() != 4:
        raise JemlabError(f"expected images of shape (N, C, H, W), got {tuple(x.shape)}")
    n, c, h, w = x.shape
    nrow = nrow or max(1, math.ceil(math.sqrt(n)))
    rows = math.ceil(n / nrow)
    images = (to_unit(x).numpy() * 255).round().astype(np.uint8)
    grid = np.full((c, rows * (h + padding) + padding, nrow * (w + padding) + padding), 255, np.uint8)
    for i in range(n):
        r, col = divmod(i, nrow)
        top, left = padding + r * (h + padding), padding + col * (w + padding)
        grid[:, top : top + h, left : left + w] = images[i]
    if scale > 1:
        grid = grid.repeat(scale, axis=1).repeat(scale, axis=2)
    return grid[0] if c == 1 else grid.transpose(1, 2, 0)


def save_grid(x: torch.Tensor, path: str | Path, nrow: int | None = None, scale: int | None = None) -> Path:
    """Save images in [−1, 1] as a PNG grid (small images are upscaled to stay legible)."""
    from PIL import Image

    if scale is None:
        scale = max(1, 64 // x.shape[-1])
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(make_grid(x, nrow=nrow, scale=scale)).save(path)
    return path


def save_npz(path: str | Path, x: torch.Tensor, labels: torch.Tensor | None = None) -> Path:
    """Save samples in the exchange format: images float32 (N, C, H, W) in [0, 1], labels int64 (N,)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {"images": to_unit(x).numpy().astype(np.float32)}
    if labels is not None:
        arrays["labels"] = labels.detach().cpu().numpy().astype(np.int64)
    np.savez_compressed(path, **arrays)
    return path


def load_npz(path: str | Path) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Read an exchange-format `.npz` (never unpickles objects); return images in [−1, 1] and labels or None."""
    path = Path(path)
    try:
        data = np.load(path, allow_pickle=False)
        if not isinstance(data, np.lib.npyio.NpzFile):
            raise JemlabError(
                f"{path}: a single .npy array, not an .npz archive; save with numpy.savez(path, images=...)"
            )
        with data:
            if "images" not in data:
                raise JemlabError(f"{path}: no 'images' array; expected the jemlab .npz sample format")
            images = data["images"]
            labels = data.get("labels")
    except (OSError, ValueError, EOFError, KeyError, NotImplementedError, zipfile.BadZipFile, zlib.error) as err:
        # A cut-off or corrupt zip surfaces as any of these, depending on where the damage is.
        raise JemlabError(f"{path}: not a readable .npz file ({type(err).__name__}: {err})") from None
    if images.ndim != 4 or images.dtype != np.float32 or images.size == 0:
        raise JemlabError(f"{path}: 'images' must be non-empty float32 (N, C, H, W), got {images.dtype} {images.shape}")
    if not np.isfinite(images).all() or images.min() < 0 or images.max() > 1:
        raise JemlabError(f"{path}: 'images' must be finite values in [0, 1]")
    if labels is not None and (labels.shape != (images.shape[0],) or labels.dtype.kind not in "iu"):
        raise JemlabError(f"{path}: 'labels' must be int (N,) matching images, got {labels.dtype} {labels.shape}")
    x = torch.from_numpy(images) * 2 - 1
    return x, None if labels is None else torch.from_numpy(labels.astype(np.int64))
