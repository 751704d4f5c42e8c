"""SVHN cropped digits: ``train_32x32.mat`` and ``test_32x32.mat`` via ``scipy.io.loadmat``."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from jemlab.data.dataset import OfficialSplits
from jemlab.data.download import RemoteFile
from jemlab.data.locate import resolve
from jemlab.data.mnist import DIGIT_CLASSES
from jemlab.errors import DataError

_URL = "http://ufldl.stanford.edu/housenumbers/"
TRAIN_FILE = "train_32x32.mat"
TEST_FILE = "test_32x32.mat"
SVHN_REMOTES = (
    RemoteFile(
        TRAIN_FILE,
        (_URL + TRAIN_FILE,),
        sha256="435e94d69a87fde4fd4d7f3dd208dfc32cb6ae8af2240d066de1df7508d083b8",
        md5="e26dedcc434d2e4c54c9b2d4a06d8373",
    ),
    RemoteFile(
        TEST_FILE,
        (_URL + TEST_FILE,),
        sha256="cdce80dfb2a2c4c6160906d0bd7c68ec5a99d7ca4831afa54f09182025b6a75b",
        md5="eb5a983be6a315427106f1b164d9cef3",
    ),
)

_FIX = "delete it and re-download, or pass --data-dir to a good copy"


def _find(directory: Path) -> dict[str, Path] | None:
    paths = {name: directory / name for name in (TRAIN_FILE, TEST_FILE)}
    return paths if all(p.is_file() for p in paths.values()) else None


def read_svhn_mat(path: str | os.PathLike) -> tuple[torch.Tensor, torch.Tensor]:
    """Read one SVHN ``.mat`` file.

    Args:
        path: ``train_32x32.mat`` or ``test_32x32.mat``.

    Returns:
        ``(images, labels)``: uint8 (N, 3, 32, 32) and int64 (N,) with digit d as label d (the file
            stores
        digit 0 as 10).
    """
    try:
        import scipy.io  # lazy: scipy is only needed for SVHN
    except ImportError as exc:
        raise DataError(
            f"{path}: reading SVHN .mat files needs scipy, which is not installed; pip install scipy"
        ) from exc
    try:
        mat = scipy.io.loadmat(str(path))
    except Exception as exc:  # ValueError, MatReadError, NotImplementedError (v7.3 files), OSError, ...
        reason = " ".join(str(exc).split()) or type(exc).__name__
        raise DataError(f"{path}: not a readable MATLAB file ({reason}); {_FIX}") from exc
    x, y = mat.get("X"), mat.get("y")
    if not isinstance(x, np.ndarray) or x.ndim != 4 or x.shape[:3] != (32, 32, 3):
        raise DataError(f"{path}: 'X' must be a (32, 32, 3, N) array, found {getattr(x, 'shape', None)}; {_FIX}")
    if not isinstance(y, np.ndarray) or y.size != x.shape[3]:
        raise DataError(f"{path}: {x.shape[3]} images but {getattr(y, 'size', 0)} labels in 'y'; {_FIX}")
    labels = y.reshape(-1).astype(np.int64)
    if labels.size and (labels.min() < 1 or labels.max() > 10):
        raise DataError(f"{path}: SVHN labels must be 1..10, found {labels.min()}..{labels.max()}; {_FIX}")
    labels[labels == 10] = 0
    # (H, W, C, N) -> (N, C, H, W); ascontiguousarray so later gathers are cheap.
    images = np.ascontiguousarray(x.transpose(3, 2, 0, 1), dtype=np.uint8)
    return torch.from_numpy(images), torch.from_numpy(labels)


def load_svhn(data_dir: str | os.PathLike | None, *, download: bool) -> OfficialSplits:
    """Locate (or download) and read SVHN.

    Args:
        data_dir: explicit folder, or None.
        download: allow downloading into the user cache.

    Returns:
        The official train and test sets with (N, 3, 32, 32) uint8 images.
    """
    files = resolve(
        "svhn",
        data_dir,
        find=_find,
        needs=f"{TRAIN_FILE}, {TEST_FILE}",
        remotes=SVHN_REMOTES,
        download=download,
        hint="pass --data-dir to a folder holding the two .mat files, or allow downloading",
    )
    train_x, train_y = read_svhn_mat(files[TRAIN_FILE])
    test_x, test_y = read_svhn_mat(files[TEST_FILE])
    return OfficialSplits(train_x, train_y, test_x, test_y, list(DIGIT_CLASSES), str(files[TRAIN_FILE].parent))
