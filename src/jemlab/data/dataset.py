"""In-memory image datasets and the train/validation/test bundle that loaders return.

Every supported dataset is small enough (at most a few hundred MB of uint8 pixels) to keep in memory
as one tensor, which makes batching a single vectorised gather instead of a per-item Python loop.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from jemlab.errors import ConfigError, DataError

IndexLike = torch.Tensor | Sequence[int] | slice

# The label of an image without a class (a user's ``_unlabelled`` folder, or -1 in an ``.npz``'s labels, as in
# scikit-learn). Such images live only in ``DatasetSplits.unlabelled``: never in train, val or test.
UNLABELLED = -1


@dataclass
class ArrayDataset:
    """Images and labels held in memory.

    Attributes:
        images: uint8 tensor of shape (N, C, H, W) with raw pixel values 0..255.
        labels: int64 tensor of shape (N,).
    """

    images: torch.Tensor
    labels: torch.Tensor

    def __post_init__(self) -> None:
        # These are programming errors (loaders validate user files before building a dataset),
        # hence ValueError.
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise ValueError(
                f"ArrayDataset.images must be uint8 (N, C, H, W), got {self.images.dtype} {tuple(self.images.shape)}"
            )
        if self.labels.dtype != torch.int64 or self.labels.dim() != 1:
            raise ValueError(
                f"ArrayDataset.labels must be int64 (N,), got {self.labels.dtype} {tuple(self.labels.shape)}"
            )
        if self.images.shape[0] != self.labels.shape[0]:
            raise ValueError(f"ArrayDataset has {self.images.shape[0]} images but {self.labels.shape[0]} labels")

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """The (C, H, W) shape of one image."""
        c, h, w = self.images.shape[1:]
        return (int(c), int(h), int(w))

    def batch(self, index: IndexLike) -> tuple[torch.Tensor, torch.Tensor]:
        """Gather a batch and scale it for the network.

        Args:
            index: int64 index tensor (or list of ints / slice) selecting the examples.

        Returns:
            ``(x, y)``: float32 images (B, C, H, W) in [-1, 1] computed as ``x / 127.5 - 1``, and
            the int64 labels (B,). Both live on the device of ``images``.
        """
        index = self._as_index(index)
        x = self.images[index].to(torch.float32).div_(127.5).sub_(1.0)
        return x, self.labels[index]

    def subset(self, index: IndexLike) -> ArrayDataset:
        """A new dataset holding the selected examples (copied; a view for a slice).

        Args:
            index: int64 index tensor, list of ints or slice.

        Returns:
            The selected examples as an ``ArrayDataset``.
        """
        index = self._as_index(index)
        return ArrayDataset(self.images[index], self.labels[index])

    def _as_index(self, index: IndexLike) -> torch.Tensor | slice:
        if isinstance(index, slice):
            return index
        return torch.as_tensor(index, dtype=torch.int64, device=self.images.device)


@dataclass
class DatasetSplits:
    """The three splits of one dataset plus what a model needs to know about it.

    Attributes:
        name: canonical registry name, e.g. ``"fashion-mnist"``.
        train: training images (the official training set minus ``val``, possibly capped by
            ``limit``).
        val: images held out from the official training set (deterministic given the seed); may be
            empty.
        test: the official test set.
        num_classes: number of classes.
        image_shape: (C, H, W) of one image.
        class_names: one human-readable name per class.
        source: where the files were read from (for logs and run metadata).
        unlabelled: images without a class, for the log p(x) term only (label ``UNLABELLED`` = -1 on every
            one, same image shape as ``train``); None when the source has none (it is never empty). Only
            user datasets have them (docs/data.md); they are not capped by ``limit`` and never enter val or
            test.
    """

    name: str
    train: ArrayDataset
    val: ArrayDataset
    test: ArrayDataset
    num_classes: int
    image_shape: tuple[int, int, int]
    class_names: list[str]
    source: str = field(default="")
    unlabelled: ArrayDataset | None = None


@dataclass
class OfficialSplits:
    """What a dataset loader returns: the official train and test sets before any validation split.

    Attributes:
        train_images: uint8 (N, C, H, W).
        train_labels: int64 (N,).
        test_images: uint8 (M, C, H, W); None when the source has no test set (a user's folder or ``.npz``),
            and ``load_dataset`` holds one out of the training set (``hold_out_test``).
        test_labels: int64 (M,); None exactly when ``test_images`` is.
        class_names: one name per class.
        source: where the files were read from.
        unlabelled_images: uint8 (U, C, H, W) images without a class, or None.
    """

    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor | None
    test_labels: torch.Tensor | None
    class_names: list[str]
    source: str
    unlabelled_images: torch.Tensor | None = None


def split_train_val(
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    val_size: int | None,
    seed: int,
    limit: int | None,
    what: str,
) -> tuple[ArrayDataset, ArrayDataset]:
    """Hold out a random validation set from an official training set, then optionally cap the rest.

    One ``torch.randperm`` drawn from a generator seeded with ``seed`` decides both: its first
    ``val_size`` entries are the validation set and the next ``limit`` entries the training set. The
    validation set therefore does not depend on ``limit``, and a capped training set is a random
    (not first-rows) subset, which matters for files sorted by class. Both index sets are sorted to
    keep the file order.

    Args:
        images: uint8 (N, C, H, W) official training images.
        labels: int64 (N,) official training labels.
        val_size: number of images to hold out; 0 gives an empty validation set; None picks
            min(5000, N // 10), so small datasets such as mnist-5k keep most images for training.
        seed: seed of the split.
        limit: cap on the number of training images after the split; None for no cap.
        what: dataset name for error messages.

    Returns:
        ``(train, val)`` datasets.
    """
    n = int(labels.shape[0])
    if val_size is None:
        val_size = min(5000, n // 10)
    if val_size < 0:
        raise ConfigError(f"val_size must be >= 0, got {val_size}; pass --val-size 0 or more")
    if limit is not None and limit <= 0:
        raise ConfigError(f"limit must be a positive number of images, got {limit}; omit it for no cap")
    if val_size >= n:
        raise DataError(
            f"{what}: val_size={val_size} leaves no training images (the official training set has "
            f"{n}); pass a smaller --val-size, e.g. {max(n // 10, 0)}"
        )
    generator = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n, generator=generator)
    val_index = perm[:val_size].sort().values
    rest = perm[val_size:] if limit is None else perm[val_size : val_size + limit]
    train_index = rest.sort().values
    train = ArrayDataset(images[train_index], labels[train_index])
    val = ArrayDataset(images[val_index], labels[val_index])
    return train, val


# The held-out test split does not depend on the run's seed: every run on a dataset is tested on the same images.
TEST_SPLIT_SEED = 0


def hold_out_test(images: torch.Tensor, labels: torch.Tensor, *, what: str) -> tuple[ArrayDataset, ArrayDataset]:
    """Split a test set off a dataset that comes without one (a user's folder or ``.npz``).

    The test set is min(5000, N // 10) images chosen by one ``torch.randperm`` with the fixed seed
    ``TEST_SPLIT_SEED``, so it is the same for every run whatever ``train.seed``; the validation split is then drawn
    from the rest by ``split_train_val``. Both index sets are sorted to keep the file order.

    Args:
        images: uint8 (N, C, H, W) labelled images.
        labels: int64 (N,) labels.
        what: the dataset, for the error message.

    Returns:
        ``(rest, test)`` datasets.

    Raises:
        DataError: fewer than 10 images, too few to hold out a test set.
    """
    n = int(labels.shape[0])
    test_size = min(5000, n // 10)
    if test_size == 0:
        raise DataError(
            f"{what}: only {n} labelled images, too few to hold out a test set (a tenth of them); add images "
            f"(10 at the very least) or provide a test set (test/ folder or test_images in the .npz)"
        )
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(TEST_SPLIT_SEED))
    test_index = perm[:test_size].sort().values
    rest_index = perm[test_size:].sort().values
    return ArrayDataset(images[rest_index], labels[rest_index]), ArrayDataset(images[test_index], labels[test_index])
