"""CIFAR-10 and CIFAR-100 from the official python-pickle archives.

The batches are read with ``RestrictedUnpickler`` (never plain ``pickle.load``), either from an
extracted folder (``cifar-10-batches-py/`` or the batch files directly in the folder) or straight
out of the ``.tar.gz`` archive. A download is unpacked into the user cache once, so later runs skip
decompression.
"""

from __future__ import annotations

import os
import tarfile
import tempfile
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from jemlab.data.dataset import OfficialSplits
from jemlab.data.download import RemoteFile
from jemlab.data.locate import resolve
from jemlab.data.safe_pickle import safe_loads
from jemlab.errors import DataError

CIFAR10_CLASSES = [
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
]

_FIX = "delete it and re-download, or pass --data-dir to a good copy"


@dataclass(frozen=True)
class CifarSpec:
    """Layout of one CIFAR archive."""

    name: str
    archive: str
    folder: str
    train_members: tuple[str, ...]
    test_member: str
    meta_member: str
    label_key: str
    names_key: str
    num_classes: int
    remote: RemoteFile

    @property
    def members(self) -> tuple[str, ...]:
        """The batch files that must be present (the meta file is optional)."""
        return (*self.train_members, self.test_member)


CIFAR_SPECS = {
    "cifar10": CifarSpec(
        name="cifar10",
        archive="cifar-10-python.tar.gz",
        folder="cifar-10-batches-py",
        train_members=tuple(f"data_batch_{i}" for i in range(1, 6)),
        test_member="test_batch",
        meta_member="batches.meta",
        label_key="labels",
        names_key="label_names",
        num_classes=10,
        remote=RemoteFile(
            "cifar-10-python.tar.gz",
            ("https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",),
            sha256="6d958be074577803d12ecdefd02955f39262c83c16fe9348329d7fe0b5c001ce",
            md5="c58f30108f718f92721af3b95e74349a",
        ),
    ),
    "cifar100": CifarSpec(
        name="cifar100",
        archive="cifar-100-python.tar.gz",
        folder="cifar-100-python",
        train_members=("train",),
        test_member="test",
        meta_member="meta",
        label_key="fine_labels",
        names_key="fine_label_names",
        num_classes=100,
        remote=RemoteFile(
            "cifar-100-python.tar.gz",
            ("https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",),
            sha256="85cd44d02ba6437773c5bbd22e183051d648de2e7d6b014e1ef29b855ba677a7",
            md5="eb9058c3a382ffc7106e4002c42a8d85",
        ),
    ),
}


@dataclass(frozen=True)
class _FolderSource:
    """Batch files lying in a folder."""

    folder: Path

    def read(self, names: Sequence[str]) -> dict[str, tuple[bytes, str]]:
        out = {}
        for name in names:
            path = self.folder / name
            if path.is_file():
                try:
                    out[name] = (path.read_bytes(), str(path))
                except OSError as exc:
                    raise DataError(f"{path}: cannot read: {exc.strerror or exc}; {_FIX}") from exc
        return out

    def __str__(self) -> str:
        return str(self.folder)


@dataclass(frozen=True)
class _ArchiveSource:
    """Batch files inside the official ``.tar.gz`` archive, under ``<folder>/``."""

    archive: Path
    folder: str

    def read(self, names: Sequence[str]) -> dict[str, tuple[bytes, str]]:
        wanted = {f"{self.folder}/{name}": name for name in names}
        out = {}
        try:
            # One sequential pass: random access into a gzip stream would decompress it again per
            # member.
            with tarfile.open(self.archive, "r:gz") as tar:
                for member in tar:
                    path = member.name.removeprefix("./")
                    if path in wanted and member.isfile():
                        handle = tar.extractfile(member)
                        assert handle is not None
                        out[wanted[path]] = (handle.read(), f"{self.archive}:{path}")
        except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:
            reason = " ".join(str(exc).split()) or type(exc).__name__
            raise DataError(f"{self.archive}: corrupt or truncated archive ({reason}); {_FIX}") from exc
        return out

    def __str__(self) -> str:
        return str(self.archive)


def _finder(spec: CifarSpec) -> Callable[[Path], _FolderSource | _ArchiveSource | None]:
    """A folder check for ``resolve``: extracted batches (in ``<folder>/`` or loose) beat the archive."""

    def find(directory: Path) -> _FolderSource | _ArchiveSource | None:
        for folder in (directory / spec.folder, directory):
            if all((folder / member).is_file() for member in spec.members):
                return _FolderSource(folder)
        if (directory / spec.archive).is_file():
            return _ArchiveSource(directory / spec.archive, spec.folder)
        return None

    return find


def _extract(spec: CifarSpec, directory: Path) -> None:
    """Unpack a downloaded archive's batches into ``directory/<folder>/``, then delete the archive.

    Only the known member names are written, under names chosen here, so a malicious archive cannot
    write outside the folder (no ``tar.extractall``).
    """
    archive = directory / spec.archive
    if not archive.is_file():
        return
    members = _ArchiveSource(archive, spec.folder).read([*spec.members, spec.meta_member])
    missing = [m for m in spec.members if m not in members]
    if missing:
        raise DataError(f"{archive}: archive lacks {', '.join(f'{spec.folder}/{m}' for m in missing)}; {_FIX}")
    target = directory / spec.folder
    target.mkdir(parents=True, exist_ok=True)
    for name, (data, _) in members.items():
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".part", dir=target)
        with os.fdopen(fd, "wb") as out:
            out.write(data)
        os.replace(tmp, target / name)
    archive.unlink()


def _get(batch: dict, key: str) -> Any:
    # Python 2 pickles read with encoding="bytes" have bytes keys; re-pickled copies have str keys.
    if key in batch:
        return batch[key]
    return batch.get(key.encode())


def _parse_batch(data: bytes, source: str, spec: CifarSpec) -> tuple[torch.Tensor, torch.Tensor]:
    batch = safe_loads(data, source)
    if not isinstance(batch, dict):
        raise DataError(f"{source}: expected a dict in a CIFAR batch, found {type(batch).__name__}; {_FIX}")
    pixels = _get(batch, "data")
    labels = _get(batch, spec.label_key)
    if not isinstance(pixels, np.ndarray) or pixels.ndim != 2 or pixels.shape[1] != 3 * 32 * 32:
        shape = getattr(pixels, "shape", None)
        raise DataError(
            f"{source}: 'data' must be an (N, 3072) uint8 array, found {type(pixels).__name__} {shape}; {_FIX}"
        )
    if labels is None:
        raise DataError(f"{source}: no '{spec.label_key}' entry; is this a {spec.name} file? {_FIX}")
    labels_array = np.asarray(labels, dtype=np.int64).reshape(-1)
    if labels_array.shape[0] != pixels.shape[0]:
        raise DataError(f"{source}: {pixels.shape[0]} images but {labels_array.shape[0]} labels; {_FIX}")
    if labels_array.size and (labels_array.min() < 0 or labels_array.max() >= spec.num_classes):
        raise DataError(
            f"{source}: labels must be 0..{spec.num_classes - 1}, found {labels_array.min()}.."
            f"{labels_array.max()}; {_FIX}"
        )
    images = torch.from_numpy(np.ascontiguousarray(pixels, dtype=np.uint8).reshape(-1, 3, 32, 32))
    return images, torch.from_numpy(labels_array)


def _class_names(members: dict[str, tuple[bytes, str]], spec: CifarSpec) -> list[str]:
    if spec.name == "cifar10":
        return list(CIFAR10_CLASSES)
    default = [f"class_{i}" for i in range(spec.num_classes)]
    if spec.meta_member not in members:
        return default
    data, source = members[spec.meta_member]
    meta = safe_loads(data, source)
    names = _get(meta, spec.names_key) if isinstance(meta, dict) else None
    if not isinstance(names, list) or len(names) != spec.num_classes:
        return default
    return [n.decode() if isinstance(n, bytes) else str(n) for n in names]


def load_cifar(name: str, data_dir: str | os.PathLike | None, *, download: bool) -> OfficialSplits:
    """Locate (or download) and read CIFAR-10 or CIFAR-100.

    Args:
        name: ``"cifar10"`` or ``"cifar100"``.
        data_dir: explicit folder, or None.
        download: allow downloading into the user cache.

    Returns:
        The official train and test sets with (N, 3, 32, 32) uint8 images.
    """
    spec = CIFAR_SPECS[name]
    source = resolve(
        name,
        data_dir,
        find=_finder(spec),
        needs=f"{spec.archive} or {spec.folder}/{{{','.join(spec.members)}}}",
        remotes=(spec.remote,),
        download=download,
        hint=f"pass --data-dir to a folder holding {spec.archive} or its extracted {spec.folder}/, "
        f"or allow downloading",
        after_download=lambda directory: _extract(spec, directory),
    )
    members = source.read([*spec.members, spec.meta_member])
    missing = [m for m in spec.members if m not in members]
    if missing:
        raise DataError(f"{source}: lacks {', '.join(missing)}; {_FIX}")
    train = [_parse_batch(*members[m], spec) for m in spec.train_members]
    test_x, test_y = _parse_batch(*members[spec.test_member], spec)
    return OfficialSplits(
        torch.cat([x for x, _ in train]),
        torch.cat([y for _, y in train]),
        test_x,
        test_y,
        _class_names(members, spec),
        str(source),
    )
