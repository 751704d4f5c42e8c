"""Array conversion shared by the sample-quality and evaluation code: numpy or torch in, the other out."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

ArrayLike = Tensor | np.ndarray


def to_numpy(a: Any, dtype: Any = None) -> np.ndarray:
    """Convert a torch tensor, numpy array or sequence to a numpy array on the CPU.

    Args:
        a: Tensor (any device, may require grad), numpy array, or nested sequence of numbers.
        dtype: Optional numpy dtype for the result.

    Returns:
        A numpy array (a copy when a dtype change or device transfer is needed).
    """
    if isinstance(a, Tensor):
        a = a.detach().cpu().numpy()
    arr = np.asarray(a)
    if dtype is not None:
        arr = arr.astype(dtype, copy=False)
    return arr


def to_tensor(a: Any, dtype: torch.dtype | None = None) -> Tensor:
    """Convert a numpy array, tensor or sequence to a detached CPU tensor.

    Args:
        a: Tensor, numpy array or nested sequence.
        dtype: Optional torch dtype for the result.

    Returns:
        A detached CPU tensor.
    """
    t = a.detach().cpu() if isinstance(a, Tensor) else torch.as_tensor(np.asarray(a))
    if dtype is not None:
        t = t.to(dtype)
    return t
