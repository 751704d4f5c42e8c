"""A user's own dataset, named by its path instead of a registry name (docs/data.md).

A folder is read as class folders (``image_folder.py``), a ``.npz`` file as named arrays (``npz.py``). The dataset's
name is the file or folder name plus a digest of its content (e.g. ``flowers-3fa2c1d0``): safe in file names, the
same wherever the folder is moved, and different when the images change, so caches keyed on the dataset name (the
FID feature net of ``jemlab fid-ref``) are never taken for other images.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

from jemlab.data.dataset import OfficialSplits
from jemlab.data.image_folder import read_image_folder
from jemlab.data.npz import read_npz
from jemlab.errors import DataError


def load_user_dataset(path: Path, image_size: int | None = None) -> OfficialSplits:
    """Read a folder of class folders or an ``.npz`` file.

    Args:
        path: an existing folder or ``.npz`` file.
        image_size: resize every image to this many pixels square; None keeps the size.

    Returns:
        The dataset's ``OfficialSplits`` (``test_images`` None when the source has no test set).

    Raises:
        DataError: a file that is not an ``.npz``, or any problem the readers find.
    """
    if path.is_dir():
        return read_image_folder(path, image_size)
    if path.suffix.lower() == ".npz":
        return read_npz(path, image_size)
    raise DataError(
        f"{path}: is a {path.suffix or 'suffix-less'} file; a dataset path is a folder of class sub-folders or an "
        f".npz file (docs/data.md)"
    )


def user_dataset_name(path: Path, official: OfficialSplits) -> str:
    """``<file or folder name>-<8 hex digits of a digest of the images, labels and class names>``."""
    digest = hashlib.blake2b(digest_size=4)
    for tensor in (
        official.train_images,
        official.train_labels,
        official.test_images,
        official.test_labels,
        official.unlabelled_images,
    ):
        if tensor is None:
            digest.update(b"none")
        else:
            digest.update(str(tuple(tensor.shape)).encode())
            digest.update(tensor.contiguous().numpy())
    digest.update("\0".join(official.class_names).encode())
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", path.stem).strip("._") or "dataset"
    return f"{stem}-{digest.hexdigest()}"
