"""Writers for tiny fake datasets in the real on-disk formats, for tests and smoke runs.

The images are class-structured so that a small classifier can actually learn them: each class is a
    bright
Gaussian blob at its own position on a circle around the image centre (and, for colour images, with
its own tint), jittered by a pixel and laid over low-level noise. Everything is seeded and
deterministic.

Example::

    from jemlab.data.testing import write_idx_dataset
    root = write_idx_dataset(tmp_path / "fashion-mnist", n_train=200, n_test=50)
    splits = load_dataset("fashion-mnist", data_dir=root, val_size=20, download=False)
"""

from __future__ import annotations

import gzip
import io
import os
import pickle
import struct
import tarfile
from pathlib import Path

import numpy as np

from jemlab.data.idx import write_idx


def balanced_labels(n: int, num_classes: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` labels with every class equally often (up to one), in random order.

    Args:
        n: number of labels.
        num_classes: number of classes.
        rng: random generator.

    Returns:
        uint8 array of shape (n,) (int64 when there are more than 256 classes).
    """
    labels = np.arange(n) % num_classes
    rng.shuffle(labels)
    return labels.astype(np.uint8 if num_classes <= 256 else np.int64)


def make_images(
    labels: np.ndarray,
    *,
    shape: tuple[int, int] = (28, 28),
    channels: int = 1,
    num_classes: int = 10,
    rng: np.random.Generator,
) -> np.ndarray:
    """Class-structured uint8 images: one jittered blob per class position, plus noise.

    Args:
        labels: class of each image, shape (N,).
        shape: (H, W).
        channels: 1 (grey) or 3 (colour; each class also gets its own tint).
        num_classes: number of classes (sets the blob positions).
        rng: random generator.

    Returns:
        uint8 array of shape (N, channels, H, W).
    """
    h, w = shape
    n = len(labels)
    size = min(h, w)
    angle = 2 * np.pi * np.asarray(labels, dtype=np.float64) / num_classes
    jitter = rng.uniform(-1.0, 1.0, size=(2, n))
    cy = (h - 1) / 2 + 0.3 * size * np.sin(angle) + jitter[0]
    cx = (w - 1) / 2 + 0.3 * size * np.cos(angle) + jitter[1]
    yy = np.arange(h, dtype=np.float64)[None, :, None]
    xx = np.arange(w, dtype=np.float64)[None, None, :]
    sigma = 0.12 * size
    blob = np.exp(-((yy - cy[:, None, None]) ** 2 + (xx - cx[:, None, None]) ** 2) / (2 * sigma**2))
    if channels == 1:
        tint = np.ones((n, 1))
    else:
        phase = np.arange(channels)[None, :] / channels
        tint = 0.55 + 0.45 * np.cos(2 * np.pi * (angle[:, None] / (2 * np.pi) + phase))
    images = 220.0 * tint[:, :, None, None] * blob[:, None, :, :]
    images += rng.uniform(0.0, 30.0, size=images.shape)
    return np.clip(images, 0, 255).astype(np.uint8)


def write_idx_dataset(
    directory: str | os.PathLike,
    n_train: int = 600,
    n_test: int = 100,
    *,
    shape: tuple[int, int] = (28, 28),
    gz: bool = True,
    seed: int = 0,
    num_classes: int = 10,
) -> Path:
    """Write a fake MNIST / Fashion-MNIST: the four IDX files, in ``directory``.

    Args:
        directory: destination folder (created). Pass it as ``data_dir`` to ``load_dataset``.
        n_train: training images.
        n_test: test images.
        shape: (H, W) of each image.
        gz: gzip the files (``*.gz`` names) or write them raw.
        seed: seed of labels, jitter and noise.
        num_classes: number of classes (labels are 0..num_classes-1).

    Returns:
        ``directory`` as a Path.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    suffix = ".gz" if gz else ""
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = balanced_labels(n, num_classes, rng)
        images = make_images(labels, shape=shape, channels=1, num_classes=num_classes, rng=rng)
        write_idx(directory / f"{prefix}-images-idx3-ubyte{suffix}", images[:, 0])
        write_idx(directory / f"{prefix}-labels-idx1-ubyte{suffix}", labels.astype(np.uint8))
    return directory


class _Py2StylePickler(pickle._Pickler):  # the pure-Python pickler, whose dispatch table is open
    """Protocol 2 with every str and bytes written as a Python 2 ``str`` (``BINSTRING``), like cPickle.

    Python 3 itself pickles bytes at protocol 2 through ``_codecs.encode``, a global that the official
    (Python 2) CIFAR files never reference and the restricted unpickler refuses.
    """

    dispatch = pickle._Pickler.dispatch.copy()

    def _save_py2_str(self, obj: str | bytes) -> None:
        data = obj.encode("latin-1") if isinstance(obj, str) else obj
        if len(data) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(data)]) + data)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(data)) + data)

    dispatch[bytes] = _save_py2_str
    dispatch[str] = _save_py2_str


def py2_style_pickle(obj: object) -> bytes:
    """Pickle ``obj`` the way Python 2's cPickle wrote the official CIFAR batches (protocol 2).

    Args:
        obj: dicts, lists, ints, str/bytes and numpy arrays.

    Returns:
        The pickle bytes.
    """
    buffer = io.BytesIO()
    _Py2StylePickler(buffer, protocol=2).dump(obj)
    return buffer.getvalue()


def _cifar_batches(n_train: int, n_test: int, num_classes: int, seed: int) -> dict[str, dict[bytes, object]]:
    rng = np.random.default_rng(seed)
    cifar10 = num_classes == 10
    label_key = b"labels" if cifar10 else b"fine_labels"
    batches: dict[str, dict[bytes, object]] = {}
    train_names = [f"data_batch_{i}" for i in range(1, 6)] if cifar10 else ["train"]
    sizes = [len(part) for part in np.array_split(np.arange(n_train), len(train_names))]
    for name, n in [
        *zip(train_names, sizes, strict=True),
        ("test_batch" if cifar10 else "test", n_test),
    ]:
        labels = balanced_labels(n, num_classes, rng).astype(np.int64)
        images = make_images(labels, shape=(32, 32), channels=3, num_classes=num_classes, rng=rng)
        # Same layout as the official batches: bytes keys, (N, 3072) uint8 rows, labels as a list.
        batches[name] = {b"data": images.reshape(n, -1), label_key: labels.tolist()}
    if cifar10:
        names = [f"class{i}".encode() for i in range(num_classes)]
        batches["batches.meta"] = {b"label_names": names}
    else:
        batches["meta"] = {b"fine_label_names": [f"fine{i}".encode() for i in range(num_classes)]}
    return batches


def write_cifar_dataset(
    directory: str | os.PathLike,
    n_train: int = 500,
    n_test: int = 100,
    *,
    num_classes: int = 10,
    archive: bool = False,
    seed: int = 0,
) -> Path:
    """Write a fake CIFAR-10 (``num_classes=10``) or CIFAR-100 (``num_classes=100``) in the official
    layout.

    Batches are pickled like the official Python 2 files (``py2_style_pickle``).

    Args:
        directory: destination folder (created).
        n_train: training images (split over the five CIFAR-10 batches).
        n_test: test images.
        num_classes: 10 or 100.
        archive: write the ``.tar.gz`` archive instead of the extracted folder.
        seed: seed of labels, jitter and noise.

    Returns:
        ``directory`` as a Path.
    """
    if num_classes not in (10, 100):
        raise ValueError(f"num_classes must be 10 or 100, got {num_classes}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    folder = "cifar-10-batches-py" if num_classes == 10 else "cifar-100-python"
    blobs = {
        name: py2_style_pickle(batch) for name, batch in _cifar_batches(n_train, n_test, num_classes, seed).items()
    }
    if archive:
        name = "cifar-10-python.tar.gz" if num_classes == 10 else "cifar-100-python.tar.gz"
        with tarfile.open(directory / name, "w:gz") as tar:
            for member, data in blobs.items():
                info = tarfile.TarInfo(f"{folder}/{member}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    else:
        (directory / folder).mkdir(exist_ok=True)
        for member, data in blobs.items():
            (directory / folder / member).write_bytes(data)
    return directory


def write_svhn_dataset(directory: str | os.PathLike, n_train: int = 300, n_test: int = 100, *, seed: int = 0) -> Path:
    """Write a fake SVHN: ``train_32x32.mat`` and ``test_32x32.mat`` (needs scipy).

    Labels follow the SVHN convention: digit 0 is stored as 10.

    Args:
        directory: destination folder (created).
        n_train: training images.
        n_test: test images.
        seed: seed of labels, jitter and noise.

    Returns:
        ``directory`` as a Path.
    """
    import scipy.io

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for name, n in (("train_32x32.mat", n_train), ("test_32x32.mat", n_test)):
        labels = balanced_labels(n, 10, rng)
        images = make_images(labels, shape=(32, 32), channels=3, num_classes=10, rng=rng)
        stored = np.where(labels == 0, 10, labels).astype(np.uint8).reshape(n, 1)
        scipy.io.savemat(directory / name, {"X": images.transpose(2, 3, 1, 0), "y": stored})
    return directory


def write_mnist5k_csv(directory: str | os.PathLike, n_per_class: int = 50, *, gz: bool = True, seed: int = 0) -> Path:
    """Write a fake ``mnist_5k.csv[.gz]``: 784 pixel columns then the label, rows sorted by class.

    Args:
        directory: destination folder (created).
        n_per_class: rows per digit.
        gz: gzip the file.
        seed: seed of jitter and noise.

    Returns:
        Path of the file written.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(10), n_per_class)
    images = make_images(labels, shape=(28, 28), channels=1, num_classes=10, rng=rng)
    table = np.concatenate([images.reshape(len(labels), -1), labels[:, None]], axis=1)
    out = io.StringIO()
    np.savetxt(out, table, fmt="%d", delimiter=",")
    data = out.getvalue().encode("ascii")
    path = directory / ("mnist_5k.csv.gz" if gz else "mnist_5k.csv")
    path.write_bytes(gzip.compress(data, mtime=0) if gz else data)
    return path


def isolate_data_locations(monkeypatch, root: str | os.PathLike) -> tuple[Path, Path]:
    """Point the user cache and the system dataset folder into ``root`` and forbid network access.

    Use in tests so nothing reads ``~/.cache/jemlab`` or ``/usr/share/datasets`` or touches the
    network: any download attempt fails as if the network were down.

    Args:
        monkeypatch: pytest's ``monkeypatch`` fixture.
        root: a temporary folder.

    Returns:
        ``(cache_root, system_dir)``: the folders now used as ``$JEMLAB_DATA`` and the system folder
        (neither is created).
    """
    from jemlab.data import download, locate

    root = Path(root)
    cache, system = root / "cache", root / "system"
    monkeypatch.setenv(locate.CACHE_ENV, str(cache))
    monkeypatch.setattr(locate, "SYSTEM_DATA_DIR", system)

    def no_network(url: str, dest: Path) -> None:
        raise OSError(f"network access is disabled in tests (tried {url})")

    monkeypatch.setattr(download, "fetch", no_network)
    return cache, system


def write_image_folder(
    directory: str | os.PathLike,
    n_per_class: int = 20,
    *,
    class_names: tuple[str, ...] = ("circle", "square", "triangle"),
    shape: tuple[int, int] = (28, 28),
    channels: int = 1,
    n_unlabelled: int = 0,
    n_test_per_class: int = 0,
    suffix: str = ".png",
    seed: int = 0,
) -> Path:
    """Write a fake user dataset as class folders of image files (docs/data.md).

    Without ``n_test_per_class`` the classes are ``directory/<class>/``; with it, ``directory/train/<class>/`` and
    ``directory/test/<class>/``. ``n_unlabelled`` images go to the ``_unlabelled`` folder next to the class folders.

    Args:
        directory: destination folder (created). Pass it as the dataset (``load_dataset(directory)``).
        n_per_class: training images per class.
        class_names: folder names, one per class (written in this order; classes are their sorted order).
        shape: (H, W) of each image.
        channels: 1 (greyscale files) or 3 (RGB files).
        n_unlabelled: images in ``_unlabelled``.
        n_test_per_class: test images per class (0: no ``test/`` folder).
        suffix: ``.png`` or ``.jpg`` (lossy: pixels will not round-trip exactly).
        seed: seed of jitter and noise.

    Returns:
        ``directory`` as a Path.
    """
    from PIL import Image

    directory = Path(directory)
    rng = np.random.default_rng(seed)
    num_classes = len(class_names)
    train_root = directory / "train" if n_test_per_class else directory
    parts = [(train_root, n_per_class)]
    if n_test_per_class:
        parts.append((directory / "test", n_test_per_class))
    for root, n in parts:
        for label, name in enumerate(class_names):
            folder = root / name
            folder.mkdir(parents=True, exist_ok=True)
            labels = np.full(n, label)
            images = make_images(labels, shape=shape, channels=channels, num_classes=num_classes, rng=rng)
            for i, image in enumerate(images):
                _save_image(Image, image, folder / f"{i:05d}{suffix}")
    if n_unlabelled:
        folder = train_root / "_unlabelled"
        folder.mkdir(parents=True, exist_ok=True)
        labels = np.arange(n_unlabelled) % num_classes
        images = make_images(labels, shape=shape, channels=channels, num_classes=num_classes, rng=rng)
        for i, image in enumerate(images):
            _save_image(Image, image, folder / f"{i:05d}{suffix}")
    return directory


def _save_image(image_module, image: np.ndarray, path: Path) -> None:
    """Save one (C, H, W) uint8 image as greyscale (C = 1) or RGB (C = 3)."""
    array = image[0] if image.shape[0] == 1 else image.transpose(1, 2, 0)
    image_module.fromarray(np.ascontiguousarray(array)).save(path)


def write_npz_dataset(
    path: str | os.PathLike,
    n: int = 60,
    *,
    num_classes: int = 3,
    shape: tuple[int, int] = (28, 28),
    channels: int = 1,
    n_unlabelled: int = 0,
    n_test: int = 0,
    class_names: tuple[str, ...] | None = None,
    seed: int = 0,
) -> Path:
    """Write a fake user dataset as an ``.npz`` (docs/data.md): ``images`` (N, H, W) or (N, H, W, 3), ``labels``.

    Args:
        path: destination file (parent folders created).
        n: labelled images.
        num_classes: number of classes.
        shape: (H, W).
        channels: 1 (stored as (N, H, W)) or 3 (stored as (N, H, W, 3)).
        n_unlabelled: extra images with label -1, appended after the labelled ones.
        n_test: images in ``test_images``/``test_labels`` (0: none).
        class_names: stored as ``class_names`` when given.
        seed: seed of labels, jitter and noise.

    Returns:
        ``path`` as a Path.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)

    def images_for(labels: np.ndarray) -> np.ndarray:
        images = make_images(labels, shape=shape, channels=channels, num_classes=num_classes, rng=rng)
        return images[:, 0] if channels == 1 else images.transpose(0, 2, 3, 1)  # (N, H, W[, C])

    labels = balanced_labels(n, num_classes, rng).astype(np.int64)
    arrays = {"images": images_for(labels), "labels": labels}
    if n_unlabelled:
        hidden = np.arange(n_unlabelled) % num_classes
        arrays["images"] = np.concatenate([arrays["images"], images_for(hidden)])
        arrays["labels"] = np.concatenate([labels, np.full(n_unlabelled, -1, dtype=np.int64)])
    if n_test:
        test_labels = balanced_labels(n_test, num_classes, rng).astype(np.int64)
        arrays["test_images"] = images_for(test_labels)
        arrays["test_labels"] = test_labels
    if class_names is not None:
        arrays["class_names"] = np.array(class_names, dtype=str)
    np.savez(path, **arrays)
    return path
