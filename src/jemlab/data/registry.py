"""The dataset registry: names, loaders, and the validation split applied to every dataset."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

from jemlab.data.cifar import load_cifar
from jemlab.data.dataset import ArrayDataset, DatasetSplits, OfficialSplits, split_train_val
from jemlab.data.mnist import load_idx_dataset
from jemlab.data.mnist5k import load_mnist5k
from jemlab.data.svhn import load_svhn
from jemlab.errors import DataError

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

    def key(s: str) -> str:
        return s.lower().replace("-", "").replace("_", "")

    by_key = {key(n): n for n in _LOADERS}
    canonical = by_key.get(key(str(name)))
    if canonical is None:
        raise DataError(f"unknown dataset {name!r}; choose one of: {', '.join(available_datasets())}")
    return canonical


def load_dataset(
    name: str,
    data_dir: str | os.PathLike | None = None,
    *,
    val_size: int | None = 5000,
    seed: int = 0,
    download: bool = True,
    limit: int | None = None,
) -> DatasetSplits:
    """Load a dataset's train/validation/test splits into memory.

    Files are looked for in ``data_dir`` (directly or in ``data_dir/<name>/``), then the user cache
    (``$JEMLAB_DATA/<name>`` or ``~/.cache/jemlab/<name>``), then ``/usr/share/datasets/<name>``,
    and are downloaded into the user cache as a last resort (checksum-verified).

    Args:
        name: dataset name, see ``available_datasets()``; case, ``-`` and ``_`` are ignored.
        data_dir: folder holding the dataset files, searched first.
        val_size: images held out from the official training set for validation (0 for none; None for
            min(5000, a tenth of the training set)).
        seed: seed of the validation split and of the ``limit`` subset.
        download: allow downloading missing files.
        limit: cap on the number of training images (a seeded random subset), for quick runs; None
            for all.

    Returns:
        ``DatasetSplits`` with uint8 images in memory.

    Raises:
        DataError: unknown name, missing or corrupt files, failed checksum, or ``val_size`` too
            large.
    """
    canonical = canonical_name(name)
    official = _LOADERS[canonical](data_dir, download)
    train, val = split_train_val(
        official.train_images,
        official.train_labels,
        val_size=val_size,
        seed=seed,
        limit=limit,
        what=canonical,
    )
    test = ArrayDataset(official.test_images, official.test_labels)
    log.info(
        "%s from %s: %d train, %d val, %d test images of %s",
        canonical,
        official.source,
        len(train),
        len(val),
        len(test),
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
    )
