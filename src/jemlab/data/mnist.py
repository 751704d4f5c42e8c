"""MNIST and Fashion-MNIST: four IDX files each, gzipped or raw.

Checksums of the downloads are the published digests of the official ``.gz`` files (SHA-256
cross-checked in several independent public sources, MD5 as published by torchvision). They are NOT
the digests of Debian's ``dataset-fashion-mnist`` copies: Debian recompressed the files without the
gzip name field, so its ``.gz`` bytes differ (24 bytes shorter) although the images are the same.
Local copies are therefore validated by structure (``idx.py``), and only downloads are checked
against digests.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from jemlab.data.dataset import OfficialSplits
from jemlab.data.download import RemoteFile
from jemlab.data.idx import read_idx_pair
from jemlab.data.locate import resolve
from jemlab.errors import DataError

TRAIN_IMAGES = "train-images-idx3-ubyte"
TRAIN_LABELS = "train-labels-idx1-ubyte"
TEST_IMAGES = "t10k-images-idx3-ubyte"
TEST_LABELS = "t10k-labels-idx1-ubyte"
IDX_FILES = (TRAIN_IMAGES, TRAIN_LABELS, TEST_IMAGES, TEST_LABELS)

FASHION_MNIST_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
DIGIT_CLASSES = [str(d) for d in range(10)]

_FASHION_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
_MNIST_URLS = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "http://yann.lecun.com/exdb/mnist/",
)


def _remote(base_urls: tuple[str, ...], stem: str, sha256: str, md5: str) -> RemoteFile:
    name = f"{stem}.gz"
    return RemoteFile(name, tuple(base + name for base in base_urls), sha256=sha256, md5=md5)


FASHION_MNIST_REMOTES = (
    _remote(
        (_FASHION_URL,),
        TRAIN_IMAGES,
        "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84",
        "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
    ),
    _remote(
        (_FASHION_URL,),
        TRAIN_LABELS,
        "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845",
        "25c81989df183df01b3e8a0aad5dffbe",
    ),
    _remote(
        (_FASHION_URL,),
        TEST_IMAGES,
        "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073",
        "bef4ecab320f06d8554ea6380940ec79",
    ),
    _remote(
        (_FASHION_URL,),
        TEST_LABELS,
        "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5",
        "bb300cfdad3c16e7a12a480ee83cd310",
    ),
)

MNIST_REMOTES = (
    _remote(
        _MNIST_URLS,
        TRAIN_IMAGES,
        "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
        "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    ),
    _remote(
        _MNIST_URLS,
        TRAIN_LABELS,
        "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
        "d53e105ee54ea40749a09fcbcd1e9432",
    ),
    _remote(
        _MNIST_URLS,
        TEST_IMAGES,
        "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
        "9fb629c4189551a2d022fa330f9573f3",
    ),
    _remote(
        _MNIST_URLS,
        TEST_LABELS,
        "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
        "ec29112dd5afa0611ce80d1b7f02629c",
    ),
)


@dataclass(frozen=True)
class IdxSpec:
    """What differs between the IDX datasets."""

    name: str
    class_names: list[str]
    remotes: tuple[RemoteFile, ...]
    hint: str


IDX_SPECS = {
    "fashion-mnist": IdxSpec(
        "fashion-mnist",
        FASHION_MNIST_CLASSES,
        FASHION_MNIST_REMOTES,
        "apt-get install dataset-fashion-mnist, or pass --data-dir to a folder holding the four "
        "files, or allow downloading",
    ),
    "mnist": IdxSpec(
        "mnist",
        DIGIT_CLASSES,
        MNIST_REMOTES,
        "pass --data-dir to a folder holding the four files, or allow downloading",
    ),
}


def find_idx_files(directory: Path) -> dict[str, Path] | None:
    """Find the four IDX files in one folder, preferring the gzipped name.

    Args:
        directory: folder to look in.

    Returns:
        ``{stem: path}`` for all four files, or None if any is missing.
    """
    found: dict[str, Path] = {}
    for stem in IDX_FILES:
        for candidate in (directory / f"{stem}.gz", directory / stem):
            if candidate.is_file():
                found[stem] = candidate
                break
        else:
            return None
    return found


def load_idx_dataset(name: str, data_dir: str | os.PathLike | None, *, download: bool) -> OfficialSplits:
    """Locate (or download) and read MNIST or Fashion-MNIST.

    Args:
        name: ``"mnist"`` or ``"fashion-mnist"``.
        data_dir: explicit folder, or None.
        download: allow downloading into the user cache.

    Returns:
        The official train and test sets with (N, 1, H, W) uint8 images.
    """
    spec = IDX_SPECS[name]
    files = resolve(
        name,
        data_dir,
        find=find_idx_files,
        needs=", ".join(f"{stem}[.gz]" for stem in IDX_FILES),
        remotes=spec.remotes,
        download=download,
        hint=spec.hint,
    )
    num_classes = len(spec.class_names)
    train_x, train_y = read_idx_pair(files[TRAIN_IMAGES], files[TRAIN_LABELS], num_classes)
    test_x, test_y = read_idx_pair(files[TEST_IMAGES], files[TEST_LABELS], num_classes)
    if train_x.shape[1:] != test_x.shape[1:]:
        raise DataError(
            f"{files[TEST_IMAGES]}: images are {tuple(test_x.shape[2:])} but {files[TRAIN_IMAGES]} "
            f"has {tuple(train_x.shape[2:])}; the files come from different datasets: delete them "
            f"and re-download"
        )
    return OfficialSplits(train_x, train_y, test_x, test_y, list(spec.class_names), str(files[TRAIN_IMAGES].parent))
