"""Datasets for jemlab: in-memory uint8 images, seeded validation splits, resumable batches.

Typical use::

    from jemlab.data import RandomBatcher, load_dataset

    splits = load_dataset("fashion-mnist", val_size=5000, seed=0)
    batcher = RandomBatcher(splits.train, batch_size=64, seed=0)
    for x, y in batcher:  # x: float32 in [-1, 1], (64, 1, 28, 28); y: int64 (64,)
        ...

Your own images: pass the path of a folder of class folders or of an ``.npz`` instead of a name
(``load_dataset("photos/", image_size=32)``; docs/data.md). Images without a label come back apart, in
``splits.unlabelled`` (label -1).

Writers for tiny fake datasets (for tests and smoke runs) live in ``jemlab.data.testing``.
"""

from jemlab.data.batching import RandomBatcher
from jemlab.data.dataset import ArrayDataset, DatasetSplits
from jemlab.data.registry import available_datasets, canonical_name, dataset_path, load_dataset

__all__ = [
    "ArrayDataset",
    "DatasetSplits",
    "RandomBatcher",
    "available_datasets",
    "canonical_name",
    "dataset_path",
    "load_dataset",
]
