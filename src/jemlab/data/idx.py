"""Reader for the IDX format of MNIST and Fashion-MNIST, plain or gzipped.

An IDX file is a 4-byte magic number (two zero bytes, a type code, the number of dimensions), one
big-endian uint32 per dimension, then the payload in C order. Only unsigned bytes (type 0x08) occur
in these datasets. Every structural problem is reported as a one-line ``DataError`` naming the file,
because a half-downloaded or mixed-up file is the usual cause and deleting it is the usual fix.
"""

from __future__ import annotations

import gzip
import math
import os
import zlib
from pathlib import Path

import numpy as np
import torch

from jemlab.errors import DataError

IMAGES_MAGIC = 0x00000803  # unsigned bytes, 3 dimensions (N, rows, cols)
LABELS_MAGIC = 0x00000801  # unsigned bytes, 1 dimension (N,)
_UBYTE = 0x08

_FIX = "delete it and re-download (jemlab will fetch it again) or pass --data-dir to a good copy"


def read_bytes(path: str | os.PathLike) -> bytes:
    """Read a file, transparently decompressing it when its name ends in ``.gz``.

    Args:
        path: the file.

    Returns:
        The (decompressed) contents.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataError(f"{path}: cannot read: {exc.strerror or exc}; check the path and its permissions") from exc
    if path.suffix != ".gz":
        return raw
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as exc:
        # gzip.BadGzipFile is an OSError; a cut-off stream raises EOFError.
        raise DataError(f"{path}: corrupt gzip file ({exc}); {_FIX}") from exc


def parse_idx(data: bytes, path: str | os.PathLike, expected_magic: int) -> np.ndarray:
    """Parse IDX bytes into a uint8 array, validating the header against the payload.

    Args:
        data: the decompressed file contents.
        path: the file name, for error messages.
        expected_magic: ``IMAGES_MAGIC`` or ``LABELS_MAGIC``.

    Returns:
        A read-only uint8 array whose shape is the header's dimensions.
    """
    kind = "images" if expected_magic == IMAGES_MAGIC else "labels"
    if len(data) < 4:
        raise DataError(f"{path}: not an IDX {kind} file: only {len(data)} bytes, too short for a header; {_FIX}")
    magic = int.from_bytes(data[:4], "big")
    if magic != expected_magic:
        hint = ""
        if magic in (IMAGES_MAGIC, LABELS_MAGIC):
            other = "images" if magic == IMAGES_MAGIC else "labels"
            hint = f" (this is an {other} file: are the file names swapped?)"
        raise DataError(
            f"{path}: not an IDX {kind} file: magic number 0x{magic:08x}, expected 0x{expected_magic:08x}{hint}; {_FIX}"
        )
    ndim = expected_magic & 0xFF
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"{path}: truncated IDX file: {len(data)} bytes, shorter than its {header}-byte header; {_FIX}")
    dims = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    if kind == "images" and 0 in dims[1:]:
        raise DataError(f"{path}: IDX header says images of {dims[1]}x{dims[2]} pixels, which is empty; {_FIX}")
    expected = math.prod(dims)  # Python ints: a corrupt header cannot overflow
    actual = len(data) - header
    if actual != expected:
        if kind == "images":
            what = f"{dims[0]} images of {dims[1]}x{dims[2]} ({expected} bytes)"
        else:
            what = f"{dims[0]} labels ({expected} bytes)"
        problem = "truncated IDX file" if actual < expected else "IDX file has trailing bytes"
        follow = f"only {actual} bytes follow" if actual < expected else f"{actual} bytes follow"
        raise DataError(f"{path}: {problem}: header says {what} but {follow}; {_FIX}")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)


def read_idx_images(path: str | os.PathLike) -> torch.Tensor:
    """Read an IDX images file (``*-images-idx3-ubyte[.gz]``).

    Args:
        path: the file; gzipped if its name ends in ``.gz``.

    Returns:
        uint8 tensor of shape (N, 1, H, W).
    """
    array = parse_idx(read_bytes(path), path, IMAGES_MAGIC)
    # copy(): frombuffer views immutable bytes, and torch wants a writable buffer.
    return torch.from_numpy(array.copy()).unsqueeze(1)


def read_idx_labels(path: str | os.PathLike, num_classes: int) -> torch.Tensor:
    """Read an IDX labels file (``*-labels-idx1-ubyte[.gz]``) and check every label is a class.

    Args:
        path: the file; gzipped if its name ends in ``.gz``.
        num_classes: labels must be in ``0 .. num_classes - 1``.

    Returns:
        int64 tensor of shape (N,).
    """
    array = parse_idx(read_bytes(path), path, LABELS_MAGIC)
    if array.size and int(array.max()) >= num_classes:
        bad = int(np.count_nonzero(array >= num_classes))
        raise DataError(
            f"{path}: {bad} labels are >= {num_classes} (max {int(array.max())}) but this dataset "
            f"has {num_classes} classes; {_FIX}"
        )
    return torch.from_numpy(array.astype(np.int64))


def read_idx_pair(
    images_path: str | os.PathLike, labels_path: str | os.PathLike, num_classes: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Read matching images and labels files and check that they have the same number of items.

    Args:
        images_path: the IDX images file.
        labels_path: the IDX labels file.
        num_classes: number of classes, to validate the labels.

    Returns:
        ``(images, labels)``: uint8 (N, 1, H, W) and int64 (N,).
    """
    images = read_idx_images(images_path)
    labels = read_idx_labels(labels_path, num_classes)
    if images.shape[0] != labels.shape[0]:
        raise DataError(
            f"{images_path}: has {images.shape[0]} images but {labels_path} has {labels.shape[0]} "
            f"labels; the two files are from different downloads: delete both and re-download, or "
            f"pass --data-dir to a matching pair"
        )
    return images, labels


def write_idx(path: str | os.PathLike, array: np.ndarray) -> Path:
    """Write a uint8 array as an IDX file (gzipped if the name ends in ``.gz``).

    Args:
        path: destination file.
        array: uint8 array with 1 dimension (labels) or 3 dimensions (images).

    Returns:
        The path written.
    """
    path = Path(path)
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = bytes([0, 0, _UBYTE, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    data = header + array.tobytes()
    if path.suffix == ".gz":
        # mtime=0 keeps the output byte-identical across runs (stable checksums in tests).
        data = gzip.compress(data, mtime=0)
    path.write_bytes(data)
    return path
