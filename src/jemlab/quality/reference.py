"""The reference domain feature net of a dataset: trained once, cached, shared by evaluation and training.

`jemlab eval --parts samples`, `jemlab fid-ref` and the training-time sample-quality tracking all measure Fréchet
distance and KID in the feature space of the same cached net (``<cache>/feature_nets/<dataset>/``), so their numbers
are comparable with each other. The cache is keyed by the dataset's name *and* a fingerprint of its test split, so a
net trained on other files under the same name (the quickstart's generated stand-in for Fashion-MNIST, a user's own
copy) never stands in for the real one: ``<cache>/feature_nets/<dataset>/<fingerprint>/``.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from jemlab.data import DatasetSplits
from jemlab.data.locate import cache_root
from jemlab.errors import JemlabError
from jemlab.quality.feature_net import FeatureNet, load_feature_net, save_feature_net, train_feature_net

__all__ = [
    "FEATURE_NET_FILE",
    "dataset_fingerprint",
    "feature_net_path",
    "reference_feature_net",
    "train_reference_feature_net",
]

FEATURE_NET_FILE = "feature_net.safetensors"
_COLOUR_DATASETS = ("cifar10", "cifar100", "svhn")


def dataset_fingerprint(splits: DatasetSplits) -> str:
    """A short hash of the test split (pixels, labels, shape): the images FD/KID are measured against.

    The test split does not depend on the validation size, the seed or ``--limit``, so every run and evaluation of
    the same files shares one feature net, and different files under one name do not.

    Args:
        splits: The dataset.

    Returns:
        12 hexadecimal digits.
    """
    digest = hashlib.sha256()
    digest.update(f"{splits.name}|{splits.num_classes}|{tuple(splits.image_shape)}".encode())
    digest.update(splits.test.images.detach().cpu().contiguous().numpy().tobytes())
    digest.update(splits.test.labels.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:12]


def feature_net_path(splits: DatasetSplits, cache_dir: str | Path | None = None) -> Path:
    """Where the cached feature net of a dataset lives.

    Args:
        splits: The dataset (its name and the fingerprint of its test split make the key).
        cache_dir: jemlab cache root (None: ``$JEMLAB_DATA`` or ``~/.cache/jemlab``).

    Returns:
        ``<cache>/feature_nets/<dataset>/<fingerprint>/feature_net.safetensors`` (its JSON sidecar sits next to it).
    """
    root = Path(cache_dir).expanduser() if cache_dir is not None else cache_root()
    return root / "feature_nets" / splits.name / dataset_fingerprint(splits) / FEATURE_NET_FILE


def train_reference_feature_net(
    splits: DatasetSplits,
    *,
    epochs: int = 2,
    max_minutes: float | None = None,
    batch_size: int = 128,
    seed: int = 0,
    log: Callable[[str], None] | None = None,
) -> FeatureNet:
    """Train the domain classifier whose penultimate features replace Inception's for FD/KID.

    It trains on the training split and reports its accuracy on the test split (the split the FD/KID reference
    statistics come from); horizontal flips only for colour datasets (flipped digits are not digits).

    Args:
        splits: The dataset.
        epochs: Passes over the training split.
        max_minutes: Optional wall-clock cap.
        batch_size: Mini-batch size.
        seed: Seed of initialisation and shuffling.
        log: Progress callback.

    Returns:
        The trained net; ``net.meta`` holds its test accuracy and provenance.
    """
    return train_feature_net(
        splits.train.images,
        splits.train.labels,
        splits.num_classes,
        epochs=epochs,
        max_minutes=max_minutes,
        batch_size=batch_size,
        seed=seed,
        hflip=splits.name in _COLOUR_DATASETS,
        val_images=splits.test.images,
        val_labels=splits.test.labels,
        dataset_name=splits.name,
        log=log,
    )


def _check_compatible(net: FeatureNet, path: Path, splits: DatasetSplits) -> None:
    shape = tuple(net.meta.get("image_shape", ()))
    if net.num_classes != splits.num_classes or (shape and shape != tuple(splits.image_shape)):
        raise JemlabError(
            f"cached feature net {path} is for {net.num_classes} classes of {shape} images, but {splits.name} has "
            f"{splits.num_classes} classes of {tuple(splits.image_shape)}; retrain it with "
            f"`jemlab fid-ref --dataset {splits.name} --force`"
        )


def reference_feature_net(
    splits: DatasetSplits,
    *,
    cache_dir: str | Path | None = None,
    train_if_missing: bool = True,
    force: bool = False,
    epochs: int = 2,
    max_minutes: float | None = None,
    seed: int = 0,
    log: Callable[[str], None] | None = None,
) -> tuple[FeatureNet | None, dict[str, Any]]:
    """The cached feature net of ``splits`` (see :func:`feature_net_path`), training and caching it when missing.

    Args:
        splits: The dataset.
        cache_dir: jemlab cache root (see :func:`feature_net_path`).
        train_if_missing: Train (and cache) the net when none is cached; False returns ``(None, info)``.
        force: Retrain even when a cached net exists.
        epochs: Training passes when training.
        max_minutes: Wall-clock cap when training.
        seed: Training seed.
        log: Progress callback.

    Returns:
        ``(net or None, info)``; info = {path, trained_now, train_seconds, accuracy, note}.
    """
    path = feature_net_path(splits, cache_dir)
    info: dict[str, Any] = {"path": str(path), "trained_now": False}
    if path.is_file() and not force:
        net = load_feature_net(path)
        _check_compatible(net, path, splits)
        info.update(accuracy=net.meta.get("accuracy"), note=f"feature net loaded from the cache {path}")
        return net, info
    if not train_if_missing:
        info["note"] = (
            f"Fréchet distance/KID skipped: no cached feature net for {splits.name} at {path} "
            f"(run `jemlab fid-ref --dataset {splits.name}`)."
        )
        return None, info
    t0 = time.monotonic()
    net = train_reference_feature_net(splits, epochs=epochs, max_minutes=max_minutes, seed=seed, log=log)
    seconds = time.monotonic() - t0
    epochs_done, n_train = float(net.meta.get("epochs", 0.0)), net.meta.get("n_train")
    save_feature_net(net, path, meta={"source": getattr(splits, "source", ""), "accuracy_split": "test"})
    info.update(
        trained_now=True,
        train_seconds=round(seconds, 1),
        accuracy=net.meta.get("accuracy"),
        note=(
            f"feature net trained now in {seconds:.0f} s ({epochs_done:.2f} epochs on {n_train} "
            f"images, test accuracy {net.meta.get('accuracy')}) and cached at {path}"
        ),
    )
    return net, info
