"""The dataset registry: names, loaders, and the splits applied to every dataset.

``load_dataset`` takes a registry name (``fashion-mnist``, ``cifar10``, ...) or the path of a user's dataset: a folder
of class folders or an ``.npz`` file (``custom.py``, docs/data.md). A registry name wins over a folder of the same
name in the current directory (write ``./mnist`` for the folder).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable
from pathlib import Path

import torch

from jemlab.data.cifar import load_cifar
from jemlab.data.custom import load_user_dataset, user_dataset_name
from jemlab.data.dataset import (
    UNLABELLED,
    ArrayDataset,
    DatasetSplits,
    OfficialSplits,
    hold_out_test,
    split_train_val,
)
from jemlab.data.mnist import load_idx_dataset
from jemlab.data.mnist5k import load_mnist5k
from jemlab.data.resize import resize_images
from jemlab.data.svhn import load_svhn
from jemlab.errors import ConfigError, DataError

log = logging.getLogger(__name__)

Loader = Callable[[str | os.PathLike | None, bool], OfficialSplits]

_LOADERS: dict[str, Loader] = {
    "fashion-mnist": lambda data_dir, download: load_idx_dataset("fashion-mnist", data_dir, download=download),
    "mnist": lambda data_dir, download: load_idx_dataset("mnist", data_dir, download=download),
    "mnist-5k": lambda data_dir, download: load_mnist5k(data_dir),
    "cifar10": lambda data_dir, download: load_cifar("cifar10", data_dir, download=download),
    "cifar100": lambda data_dir, download: load_cifar("cifar100", data_dir, download=download),
    "svhn": lambda data_dir, download: load_svhn(data_dir, download=download),
}


def available_datasets() -> list[str]:
    """Names accepted by ``load_dataset``.

    Returns:
        Sorted canonical dataset names.
    """
    return sorted(_LOADERS)


def canonical_name(name: str) -> str:
    """Map a user-typed dataset name to its registry name, ignoring case, ``-`` and ``_``.

    Args:
        name: e.g. ``"Fashion_MNIST"`` or ``"cifar-10"``.

    Returns:
        The canonical name, e.g. ``"fashion-mnist"``.

    Raises:
        DataError: the name matches no dataset; the message lists the choices.
    """

    canonical = _registry_name(name)
    if canonical is None:
        raise DataError(
            f"unknown dataset {name!r}; choose one of: {', '.join(available_datasets())}, or pass the path of a "
            f"folder of class sub-folders or of an .npz file (docs/data.md)"
        )
    return canonical


def _registry_name(name: str) -> str | None:
    def key(s: str) -> str:
        return s.lower().replace("-", "").replace("_", "")

    return {key(n): n for n in _LOADERS}.get(key(str(name)))


def dataset_path(name: str | os.PathLike, data_dir: str | os.PathLike | None = None) -> Path | None:
    """The user dataset (folder or ``.npz``) that ``name`` refers to, or None for a registry name.

    A relative path is looked for in ``data_dir`` first (when given), then in the current directory.

    Args:
        name: a registry name or a path.
        data_dir: the folder searched first for a relative path.

    Returns:
        The absolute path of the existing folder or file; None when ``name`` is a registry name, or no such path
        exists and ``name`` does not look like a path (``canonical_name`` then reports the unknown name).

    Raises:
        DataError: ``name`` looks like a path (has a ``/``, starts with ``.`` or ``~``, or ends in ``.npz``) but
            nothing exists there.
    """
    text = os.fspath(name)
    if _registry_name(text) is not None:
        return None
    given = Path(text).expanduser()
    candidates = [given] if given.is_absolute() or data_dir is None else [Path(data_dir).expanduser() / given, given]
    for candidate in candidates:
        if candidate.exists():
            return candidate.resolve()
    if "/" in text or os.sep in text or text.startswith((".", "~")) or text.lower().endswith(".npz"):
        looked = ", ".join(str(c) for c in candidates)
        raise DataError(
            f"{text}: no such file or folder (looked for {looked}); pass the path of a folder of class sub-folders "
            f"or of an .npz file (docs/data.md), or a dataset name: {', '.join(available_datasets())}"
        )
    return None


def load_dataset(
    name: str | os.PathLike,
    data_dir: str | os.PathLike | None = None,
    *,
    val_size: int | None = 5000,
    seed: int = 0,
    download: bool = True,
    limit: int | None = None,
    image_size: int | None = None,
) -> DatasetSplits:
    """Load a dataset's train/validation/test splits into memory.

    A registry name's files are looked for in ``data_dir`` (directly or in ``data_dir/<name>/``), then the user
    cache (``$JEMLAB_DATA/<name>`` or ``~/.cache/jemlab/<name>``), then ``/usr/share/datasets/<name>``, and are
    downloaded into the user cache as a last resort (checksum-verified). Any other name is the path of a user's
    dataset (``dataset_path``): a folder of class folders or an ``.npz`` (docs/data.md); when it has no test set,
    one is held out with a fixed seed (``hold_out_test``).

    Args:
        name: dataset name, see ``available_datasets()`` (case, ``-`` and ``_`` are ignored), or a path.
        data_dir: folder holding the dataset files, searched first (for a relative path too).
        val_size: images held out from the official training set for validation (0 for none; None for
            min(5000, a tenth of the training set)).
        seed: seed of the validation split and of the ``limit`` subset.
        download: allow downloading missing files.
        limit: cap on the number of training images (a seeded random subset), for quick runs; None
            for all.
        image_size: resize every image (all splits) to this many pixels square, bilinear with antialiasing
            (``resize.py``); None keeps the dataset's size.

    Returns:
        ``DatasetSplits`` with uint8 images in memory; ``unlabelled`` holds a user dataset's images without a
        label (label -1), None otherwise.

    Raises:
        DataError: unknown name, missing or corrupt files, failed checksum, or ``val_size`` too
            large.
    """
    if image_size is not None and image_size < 1:
        raise ConfigError(f"image_size must be a positive number of pixels, got {image_size}")
    path = dataset_path(name, data_dir)
    if path is None:
        canonical = canonical_name(str(name))
        official = _resized(_LOADERS[canonical](data_dir, download), image_size)
    else:
        official = load_user_dataset(path, image_size)
        canonical = user_dataset_name(path, official)
    if official.test_images is None or official.test_labels is None:
        rest, test = hold_out_test(official.train_images, official.train_labels, what=str(path or canonical))
    else:
        rest = ArrayDataset(official.train_images, official.train_labels)
        test = ArrayDataset(official.test_images, official.test_labels)
    train, val = split_train_val(
        rest.images,
        rest.labels,
        val_size=val_size,
        seed=seed,
        limit=limit,
        what=canonical,
    )
    unlabelled = None
    if official.unlabelled_images is not None and len(official.unlabelled_images):
        u = official.unlabelled_images
        unlabelled = ArrayDataset(u, torch.full((u.shape[0],), UNLABELLED, dtype=torch.int64))
    log.info(
        "%s from %s: %d train, %d val, %d test%s images of %s",
        canonical,
        official.source,
        len(train),
        len(val),
        len(test),
        "" if unlabelled is None else f", {len(unlabelled)} unlabelled",
        train.image_shape,
    )
    return DatasetSplits(
        name=canonical,
        train=train,
        val=val,
        test=test,
        num_classes=len(official.class_names),
        image_shape=train.image_shape,
        class_names=list(official.class_names),
        source=official.source,
        unlabelled=unlabelled,
    )


def _resized(official: OfficialSplits, image_size: int | None) -> OfficialSplits:
    """A built-in dataset with every image resized to ``image_size`` square (unchanged for None)."""
    if image_size is None:
        return official
    assert official.test_images is not None  # built-in datasets have an official test set
    return dataclasses.replace(
        official,
        train_images=resize_images(official.train_images, image_size),
        test_images=resize_images(official.test_images, image_size),
    )
