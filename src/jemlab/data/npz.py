"""A user's images in one ``.npz`` file (``numpy.savez``), as an ``OfficialSplits``.

Arrays (docs/data.md); no others are accepted, and nothing is unpickled:

- ``images``: uint8, (N, H, W) greyscale or (N, H, W, C) with C = 1 or 3 (channels last, as images are usually
  stored). Required.
- ``labels``: integers (N,), classes 0..K-1; -1 marks an image without a label (scikit-learn's convention), which
  is used for the log p(x) term only. Without ``labels`` every image is one class, "all" (an energy model of the
  images alone: the classifier is trivial).
- ``class_names``: strings (K,), one per class (default "0".."K-1"); with it K is its length, else max(labels) + 1.
- ``test_images`` and ``test_labels``: a test set in the same form (its labels must be classes, not -1). Without
  them ``load_dataset`` holds a test set out of the labelled images.

Every problem is a one-line ``DataError`` naming the file, the array and the fix.
"""

from __future__ import annotations

import zipfile
import zlib
from pathlib import Path

import numpy as np
import torch

from jemlab.data.dataset import UNLABELLED, OfficialSplits
from jemlab.data.resize import resize_images
from jemlab.errors import DataError

NPZ_ARRAYS = ("images", "labels", "class_names", "test_images", "test_labels")
SINGLE_CLASS_NAME = "all"
# What reading an array out of a damaged or unexpected archive can raise (numpy, zipfile, zlib; zipfile raises
# NotImplementedError for an unknown compression method).
_READ_ERRORS = (OSError, ValueError, EOFError, KeyError, NotImplementedError, zipfile.BadZipFile, zlib.error)


def read_npz(path: Path, image_size: int | None = None) -> OfficialSplits:
    """Read an ``.npz`` of images and labels.

    Args:
        path: the file.
        image_size: resize every image to this many pixels square (bilinear, ``resize.py``); None keeps the size.

    Returns:
        ``OfficialSplits`` with uint8 (N, C, H, W) images, int64 labels (the labelled images only), class names,
        the test set (None without ``test_images``) and the unlabelled images (None without any -1 label).

    Raises:
        DataError: not an ``.npz``, unknown or missing arrays, wrong dtype or shape, lengths that differ, labels
            that are not classes.
    """
    arrays = _load_arrays(path)
    images = _images(path, arrays["images"], "images")
    n = images.shape[0]
    names = _class_names(path, arrays.get("class_names"))
    if "labels" in arrays:
        labels = _labels(path, arrays["labels"], "labels", n, allow_unlabelled=True)
        num_classes = _num_classes(path, labels, names)
    else:
        if names is not None and len(names) != 1:
            raise DataError(f"{path}: has class_names but no labels; add labels (N,) or drop class_names")
        labels = np.zeros(n, dtype=np.int64)
        num_classes = 1
        names = names or [SINGLE_CLASS_NAME]
    test_images, test_labels = _test_set(path, arrays, images, num_classes, same_size=image_size is None)

    labelled = labels != UNLABELLED
    unlabelled = None if labelled.all() else images[~labelled]
    convert = _to_tensor_fn(image_size)
    return OfficialSplits(
        train_images=convert(images[labelled]),
        train_labels=torch.from_numpy(labels[labelled]),
        test_images=None if test_images is None else convert(test_images),
        test_labels=None if test_labels is None else torch.from_numpy(test_labels),
        class_names=names or [str(k) for k in range(num_classes)],
        source=str(path),
        unlabelled_images=None if unlabelled is None else convert(unlabelled),
    )


def _load_arrays(path: Path) -> dict[str, np.ndarray]:
    """Every array of the archive, checked against ``NPZ_ARRAYS``."""
    fix = "save it with numpy.savez(path, images=..., labels=...) (docs/data.md)"
    try:
        archive = np.load(path, allow_pickle=False)
    except _READ_ERRORS as exc:
        raise DataError(f"{path}: cannot read as an .npz archive ({exc}); {fix}") from exc
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise DataError(f"{path}: holds a single array (.npy format), not an .npz archive of named arrays; {fix}")
    with archive:
        unknown = [key for key in archive.files if key not in NPZ_ARRAYS]
        if unknown:
            raise DataError(
                f"{path}: unknown array(s) {', '.join(unknown)}; an .npz dataset holds {', '.join(NPZ_ARRAYS)} "
                f"(images required): rename or drop the others"
            )
        if "images" not in archive.files:
            raise DataError(f"{path}: has no 'images' array (it has {', '.join(archive.files) or 'none'}); {fix}")
        arrays = {}
        for key in archive.files:
            try:
                arrays[key] = archive[key]
            except _READ_ERRORS as exc:
                # allow_pickle=False refuses object arrays with a ValueError: say how to store strings instead.
                raise DataError(
                    f"{path}: cannot read array '{key}' ({exc}); the file is damaged, or the array holds Python "
                    f"objects: store numbers and fixed-width strings (np.array(names, dtype=str))"
                ) from exc
    if "test_labels" in arrays and "test_images" not in arrays:
        raise DataError(f"{path}: has test_labels but no test_images; add test_images or drop test_labels")
    return arrays


def _images(path: Path, array: np.ndarray, key: str) -> np.ndarray:
    """uint8 (N, H, W, C) with C = 1 or 3, from (N, H, W) or (N, H, W, C)."""
    shape = tuple(array.shape)
    if array.dtype != np.uint8:
        if np.issubdtype(array.dtype, np.floating):
            fix = "scale to 0..255 and convert: (x * 255).round().astype(np.uint8) for pixels in [0, 1]"
        else:
            fix = "convert with x.astype(np.uint8) (pixels must be 0..255)"
        raise DataError(f"{path}: {key} are {array.dtype} {shape}, not uint8; {fix}")
    if array.ndim == 3:
        array = array[..., None]
    elif array.ndim != 4:
        raise DataError(
            f"{path}: {key} have shape {shape} ({array.ndim} dimensions); expected (N, H, W) for greyscale or "
            f"(N, H, W, C) with C = 1 or 3"
        )
    if array.shape[3] not in (1, 3):
        if array.shape[1] in (1, 3):
            fix = f"it looks channels-first: transpose with {key}.transpose(0, 2, 3, 1)"
        elif array.shape[3] == 4:
            fix = f"drop the alpha channel: {key}[..., :3]"
        else:
            fix = "use 1 (greyscale) or 3 (RGB) channels"
        raise DataError(f"{path}: {key} have shape {shape}: {array.shape[3]} channels in the last axis; {fix}")
    if 0 in array.shape:
        raise DataError(f"{path}: {key} have shape {shape}, which holds no pixels; store at least one image")
    return array


def _labels(path: Path, array: np.ndarray, key: str, n: int, *, allow_unlabelled: bool) -> np.ndarray:
    """int64 (N,) labels, each a class index >= 0 (or -1 where ``allow_unlabelled``)."""
    if not np.issubdtype(array.dtype, np.integer):
        raise DataError(
            f"{path}: {key} are {array.dtype}, not integers; store class indices 0..K-1 as integers "
            f"({key}.astype(np.int64))"
        )
    if array.ndim != 1:
        raise DataError(f"{path}: {key} have shape {tuple(array.shape)}; expected (N,): flatten with .reshape(-1)")
    images_key = "test_images" if key.startswith("test_") else "images"
    if len(array) != n:
        raise DataError(
            f"{path}: {images_key} has {n} images but {key} has {len(array)} labels; give one label per image"
        )
    labels = array.astype(np.int64)
    lowest = UNLABELLED if allow_unlabelled else 0
    if len(labels) and labels.min() < lowest:
        bad = int(np.count_nonzero(labels < lowest))
        allowed = "0..K-1, or -1 for an image without a label" if allow_unlabelled else "0..K-1 (no -1 in a test set)"
        raise DataError(f"{path}: {bad} {key} are negative (min {int(labels.min())}); labels must be {allowed}")
    return labels


def _class_names(path: Path, array: np.ndarray | None) -> list[str] | None:
    if array is None:
        return None
    if array.dtype.kind not in "US" or array.ndim != 1 or len(array) == 0:
        raise DataError(
            f"{path}: class_names are {array.dtype} {tuple(array.shape)}; expected a non-empty 1-D string array "
            f"(np.array(['cat', 'dog']))"
        )
    names = [str(v.decode() if isinstance(v, bytes) else v) for v in array.tolist()]
    if len(set(names)) != len(names):
        repeated = next(name for name in names if names.count(name) > 1)
        raise DataError(f"{path}: class_names repeats '{repeated}'; give every class its own name")
    return names


def _num_classes(path: Path, labels: np.ndarray, names: list[str] | None) -> int:
    """K from class_names or the largest label; every class must have a labelled image."""
    labelled = labels[labels != UNLABELLED]
    if len(labelled) == 0:
        raise DataError(f"{path}: every label is -1 (unlabelled); give at least one image per class a label 0..K-1")
    if names is not None:
        num_classes = len(names)
        if labelled.max() >= num_classes:
            bad = int(np.count_nonzero(labelled >= num_classes))
            raise DataError(
                f"{path}: {bad} labels are >= {num_classes} (max {int(labelled.max())}) but class_names has "
                f"{num_classes} names; labels must be 0..{num_classes - 1}"
            )
    else:
        num_classes = int(labelled.max()) + 1
    missing = np.setdiff1d(np.arange(num_classes), labelled)
    if len(missing):
        hint = " (labels that start at 1: subtract 1)" if missing[0] == 0 and labelled.min() == 1 else ""
        raise DataError(
            f"{path}: no image has label {int(missing[0])} but labels go up to {num_classes - 1}; labels must be "
            f"0..K-1 with every class used{hint}"
        )
    return num_classes


def _test_set(
    path: Path, arrays: dict[str, np.ndarray], images: np.ndarray, num_classes: int, *, same_size: bool
) -> tuple[np.ndarray | None, np.ndarray | None]:
    if "test_images" not in arrays:
        return None, None
    test_images = _images(path, arrays["test_images"], "test_images")
    if same_size and test_images.shape[1:3] != images.shape[1:3]:
        (height, width), (test_height, test_width) = images.shape[1:3], test_images.shape[1:3]
        raise DataError(
            f"{path}: test_images are {test_width}x{test_height} pixels but images are {width}x{height}; store "
            f"one size, or pass --set data.image_size=N to resize both to N x N pixels while loading"
        )
    if test_images.shape[3] != images.shape[3]:
        raise DataError(
            f"{path}: test_images have {test_images.shape[3]} channel(s) but images have {images.shape[3]}; "
            f"store both greyscale or both RGB"
        )
    if "test_labels" in arrays:
        test_labels = _labels(path, arrays["test_labels"], "test_labels", len(test_images), allow_unlabelled=False)
    elif "labels" in arrays:
        raise DataError(f"{path}: has test_images but no test_labels; add test_labels (one class per test image)")
    else:
        test_labels = np.zeros(len(test_images), dtype=np.int64)
    if len(test_labels) and test_labels.max() >= num_classes:
        raise DataError(
            f"{path}: test_labels go up to {int(test_labels.max())} but the training labels define {num_classes} "
            f"classes; test labels must be 0..{num_classes - 1}"
        )
    return test_images, test_labels


def _to_tensor_fn(image_size: int | None):
    """(N, H, W, C) uint8 array → (N, C, H, W) uint8 tensor, resized when ``image_size`` is set."""

    def convert(array: np.ndarray) -> torch.Tensor:
        images = torch.from_numpy(np.ascontiguousarray(array.transpose(0, 3, 1, 2)))  # (N, C, H, W)
        return images if image_size is None else resize_images(images, image_size)

    return convert
