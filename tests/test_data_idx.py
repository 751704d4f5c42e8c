"""IDX reader: round trips, every corruption gives a one-line DataError naming the file, real data."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
import torch

from jemlab.data import load_dataset
from jemlab.data.idx import (
    IMAGES_MAGIC,
    LABELS_MAGIC,
    parse_idx,
    read_idx_images,
    read_idx_labels,
    read_idx_pair,
    write_idx,
)
from jemlab.data.testing import isolate_data_locations, write_idx_dataset
from jemlab.errors import DataError

REAL_FASHION = Path("/usr/share/datasets/fashion-mnist")


@pytest.fixture(autouse=True)
def _isolated(monkeypatch, tmp_path):
    isolate_data_locations(monkeypatch, tmp_path / "locations")


def _assert_data_error(excinfo: pytest.ExceptionInfo, path: Path, *words: str) -> None:
    message = str(excinfo.value)
    assert path.name in message
    assert "\n" not in message
    for word in words:
        assert word in message, message


@pytest.mark.parametrize("suffix", [".gz", ""])
def test_round_trip_images_and_labels(tmp_path, suffix):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(7, 5, 4), dtype=np.uint8)
    labels = rng.integers(0, 10, size=7, dtype=np.uint8)
    image_path = write_idx(tmp_path / f"imgs{suffix}", images)
    label_path = write_idx(tmp_path / f"lbls{suffix}", labels)
    if suffix:
        assert image_path.read_bytes()[:2] == b"\x1f\x8b"  # really gzipped

    x, y = read_idx_pair(image_path, label_path, num_classes=10)
    assert x.dtype == torch.uint8 and x.shape == (7, 1, 5, 4)
    assert y.dtype == torch.int64
    np.testing.assert_array_equal(x[:, 0].numpy(), images)
    np.testing.assert_array_equal(y.numpy(), labels)


@pytest.mark.parametrize("gz", [True, False])
def test_fake_dataset_loads_with_expected_sizes(tmp_path, gz):
    root = write_idx_dataset(tmp_path / "fm", n_train=60, n_test=20, shape=(12, 10), gz=gz)
    splits = load_dataset("fashion-mnist", root, val_size=10, download=False)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (50, 10, 20)
    assert splits.image_shape == (1, 12, 10)
    assert splits.num_classes == 10 and splits.class_names[0] == "T-shirt/top"
    # Balanced labels: every class appears twice in the 20 test images.
    assert torch.bincount(splits.test.labels, minlength=10).tolist() == [2] * 10


def test_fake_dataset_is_class_structured(tmp_path):
    # A nearest-class-mean classifier must separate the classes, so CLI smoke tests can learn them.
    root = write_idx_dataset(tmp_path / "fm", n_train=200, n_test=100)
    splits = load_dataset("fashion-mnist", root, val_size=0, download=False)
    x, y = splits.train.batch(torch.arange(len(splits.train)))
    means = torch.stack([x[y == c].mean(0) for c in range(10)]).flatten(1)
    xt, yt = splits.test.batch(torch.arange(len(splits.test)))
    predicted = torch.cdist(xt.flatten(1), means).argmin(1)
    assert (predicted == yt).float().mean() > 0.95


def _idx_bytes(array: np.ndarray, magic: int | None = None) -> bytes:
    magic = magic if magic is not None else (0x0800 | array.ndim)
    header = magic.to_bytes(4, "big") + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + array.tobytes()


IMAGES = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)


@pytest.mark.parametrize(
    ("data", "words"),
    [
        (_idx_bytes(IMAGES)[:-5], ["truncated", "2 images of 3x3 (18 bytes)", "only 13 bytes"]),
        (_idx_bytes(IMAGES) + b"xyz", ["trailing bytes", "21 bytes follow"]),
        (_idx_bytes(np.zeros(4, np.uint8)), ["magic number 0x00000801", "swapped"]),
        (_idx_bytes(IMAGES, magic=0x0D03), ["magic number 0x00000d03"]),
        (b"\x00\x00", ["too short"]),
        (_idx_bytes(IMAGES)[:10], ["truncated", "header"]),
        (_idx_bytes(np.zeros((2, 0, 3), np.uint8)), ["images of 0x3 pixels"]),
        (_idx_bytes(IMAGES)[:4] + b"\xff" * 12, ["truncated", "4294967295 images"]),
    ],
    ids=["truncated", "trailing", "labels-as-images", "float-type", "tiny", "cut-header", "empty-images", "huge"],
)
def test_structural_corruption_is_reported(tmp_path, data, words):
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(data)
    with pytest.raises(DataError) as excinfo:
        read_idx_images(path)
    _assert_data_error(excinfo, path, *words)


def test_corrupt_and_cut_gzip_are_reported(tmp_path):
    good = gzip.compress(_idx_bytes(IMAGES))
    for name, data in [("garbage.gz", b"this is not gzip"), ("cut.gz", good[: len(good) // 2])]:
        path = tmp_path / name
        path.write_bytes(data)
        with pytest.raises(DataError) as excinfo:
            read_idx_images(path)
        _assert_data_error(excinfo, path, "corrupt gzip")


def test_count_mismatch_names_both_files(tmp_path):
    images = write_idx(tmp_path / "imgs", IMAGES)
    labels = write_idx(tmp_path / "lbls", np.zeros(3, np.uint8))
    with pytest.raises(DataError) as excinfo:
        read_idx_pair(images, labels, num_classes=10)
    _assert_data_error(excinfo, images, "2 images", "3 labels", "lbls")


def test_label_out_of_range(tmp_path):
    path = write_idx(tmp_path / "lbls.gz", np.array([0, 3, 10, 12], np.uint8))
    with pytest.raises(DataError) as excinfo:
        read_idx_labels(path, num_classes=10)
    _assert_data_error(excinfo, path, "2 labels are >= 10", "max 12")


def test_missing_file_is_a_data_error(tmp_path):
    path = tmp_path / "nope.gz"
    with pytest.raises(DataError) as excinfo:
        read_idx_labels(path, num_classes=10)
    _assert_data_error(excinfo, path, "cannot read")


def test_corrupt_file_in_dataset_folder_is_reported_by_load_dataset(tmp_path):
    root = write_idx_dataset(tmp_path / "fm", n_train=20, n_test=10)
    bad = root / "t10k-labels-idx1-ubyte.gz"
    bad.write_bytes(bad.read_bytes()[:-6])
    with pytest.raises(DataError) as excinfo:
        load_dataset("fashion-mnist", root, val_size=0, download=False)
    _assert_data_error(excinfo, bad)


def test_parse_idx_returns_header_shape():
    array = parse_idx(_idx_bytes(np.arange(5, dtype=np.uint8)), "x", LABELS_MAGIC)
    assert array.shape == (5,) and array.tolist() == [0, 1, 2, 3, 4]
    assert parse_idx(_idx_bytes(IMAGES), "x", IMAGES_MAGIC).shape == (2, 3, 3)


@pytest.mark.skipif(not REAL_FASHION.is_dir(), reason="apt package dataset-fashion-mnist not installed")
def test_real_fashion_mnist():
    train_x, train_y = read_idx_pair(
        REAL_FASHION / "train-images-idx3-ubyte.gz",
        REAL_FASHION / "train-labels-idx1-ubyte.gz",
        num_classes=10,
    )
    assert train_x.shape == (60000, 1, 28, 28)
    assert torch.bincount(train_y, minlength=10).tolist() == [6000] * 10

    splits = load_dataset("fashion-mnist", REAL_FASHION, val_size=5000, seed=0, download=False)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (55000, 5000, 10000)
    assert splits.image_shape == (1, 28, 28)
    assert splits.test.images.shape == (10000, 1, 28, 28)
    assert torch.bincount(splits.test.labels, minlength=10).tolist() == [1000] * 10
