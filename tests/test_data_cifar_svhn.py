"""CIFAR (restricted unpickling, folder and archive layouts, download + unpack) and SVHN (.mat)."""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import sys
import tarfile

import numpy as np
import pytest
import torch

from jemlab.data import download as download_module
from jemlab.data import load_dataset
from jemlab.data.cifar import CIFAR10_CLASSES, CIFAR_SPECS
from jemlab.data.download import RemoteFile
from jemlab.data.safe_pickle import safe_loads
from jemlab.data.testing import (
    isolate_data_locations,
    py2_style_pickle,
    write_cifar_dataset,
    write_svhn_dataset,
)
from jemlab.errors import DataError


@pytest.fixture
def places(monkeypatch, tmp_path):
    return isolate_data_locations(monkeypatch, tmp_path / "locations")


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


# --- restricted unpickler -------------------------------------------------------------------------


@pytest.mark.parametrize("dumps", [py2_style_pickle, pickle.dumps], ids=["py2", "py3"])
def test_unpickler_refuses_os_system(dumps):
    data = dumps({b"data": _Evil()})
    with pytest.raises(DataError) as excinfo:
        safe_loads(data, "data_batch_1")
    message = str(excinfo.value)
    assert "data_batch_1" in message and "refusing" in message and ".system" in message


@pytest.mark.parametrize(
    "payload",
    [pickle.dumps(eval), pickle.dumps(io.BytesIO), pickle.dumps(np.float64(1.0))],
    ids=["builtins.eval", "io.BytesIO", "numpy-scalar"],
)
def test_unpickler_refuses_any_other_global(payload):
    with pytest.raises(DataError, match="refusing"):
        safe_loads(payload, "f")


@pytest.mark.parametrize(
    "dumps",
    [py2_style_pickle, lambda o: pickle.dumps(o, protocol=3), lambda o: pickle.dumps(o, protocol=4)],
    ids=["py2-cpickle", "protocol3", "protocol4"],
)
def test_unpickler_reads_numpy_arrays_and_plain_data(dumps):
    obj = {b"data": np.arange(12, dtype=np.uint8).reshape(3, 4), b"labels": [1, 2, 3]}
    out = safe_loads(dumps(obj), "f")
    np.testing.assert_array_equal(out[b"data"], obj[b"data"])
    assert out[b"data"].dtype == np.uint8 and out[b"labels"] == [1, 2, 3]


def test_unpickler_reports_garbage():
    with pytest.raises(DataError, match="not a readable pickle"):
        safe_loads(b"\x80\x04garbage", "test_batch")


def test_tampered_batch_in_dataset_is_refused(places, tmp_path):
    root = write_cifar_dataset(tmp_path / "c10", n_train=50, n_test=10)
    bad = root / "cifar-10-batches-py" / "data_batch_3"
    bad.write_bytes(py2_style_pickle({b"data": _Evil()}))
    with pytest.raises(DataError) as excinfo:
        load_dataset("cifar10", root, val_size=5, download=False)
    assert str(bad) in str(excinfo.value)


# --- CIFAR layouts --------------------------------------------------------------------------------


@pytest.mark.parametrize("archive", [False, True], ids=["folder", "archive"])
def test_cifar10_round_trip(places, tmp_path, archive):
    root = write_cifar_dataset(tmp_path / "c10", n_train=50, n_test=20, archive=archive)
    splits = load_dataset("cifar10", root, val_size=10, download=False)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (40, 10, 20)
    assert splits.image_shape == (3, 32, 32) and splits.class_names == CIFAR10_CLASSES
    assert torch.bincount(splits.test.labels, minlength=10).tolist() == [2] * 10

    # Pixels match the pickled rows: row-major 3072 = (3, 32, 32).
    raw = write_cifar_dataset(tmp_path / "raw", 50, 20) / "cifar-10-batches-py" / "test_batch"
    batch = pickle.loads(raw.read_bytes(), encoding="bytes")
    assert torch.equal(splits.test.images, torch.from_numpy(batch[b"data"].reshape(-1, 3, 32, 32)))


def test_cifar_batches_directly_in_data_dir(places, tmp_path):
    root = write_cifar_dataset(tmp_path / "c10", n_train=25, n_test=10)
    splits = load_dataset("cifar10", root / "cifar-10-batches-py", val_size=5, download=False)
    assert len(splits.train) == 20


def test_cifar100_class_names_from_meta_or_default(places, tmp_path):
    root = write_cifar_dataset(tmp_path / "c100", n_train=200, n_test=100, num_classes=100)
    splits = load_dataset("cifar100", root, val_size=0, download=False)
    assert splits.num_classes == 100 and splits.class_names[:2] == ["fine0", "fine1"]
    (root / "cifar-100-python" / "meta").unlink()
    splits = load_dataset("cifar100", root, val_size=0, download=False)
    assert splits.class_names[99] == "class_99"


def test_corrupt_cifar_archive_is_reported(places, tmp_path):
    root = write_cifar_dataset(tmp_path / "c10", n_train=20, n_test=10, archive=True)
    archive = root / "cifar-10-python.tar.gz"
    archive.write_bytes(archive.read_bytes()[:200])
    with pytest.raises(DataError) as excinfo:
        load_dataset("cifar10", root, val_size=0, download=False)
    assert str(archive) in str(excinfo.value)


def test_cifar_label_out_of_range(places, tmp_path):
    root = write_cifar_dataset(tmp_path / "c10", n_train=20, n_test=10)
    path = root / "cifar-10-batches-py" / "test_batch"
    batch = pickle.loads(path.read_bytes(), encoding="bytes")
    batch[b"labels"][0] = 10
    path.write_bytes(py2_style_pickle(batch))
    with pytest.raises(DataError, match=r"labels must be 0\.\.9"):
        load_dataset("cifar10", root, val_size=0, download=False)


def test_cifar_download_is_verified_and_unpacked(places, monkeypatch, tmp_path):
    cache_root, _ = places
    source = write_cifar_dataset(tmp_path / "upstream", n_train=30, n_test=10, archive=True)
    data = (source / "cifar-10-python.tar.gz").read_bytes()
    url = "https://example.invalid/cifar-10-python.tar.gz"
    spec = CIFAR_SPECS["cifar10"]
    remote = RemoteFile(spec.remote.filename, (url,), sha256=hashlib.sha256(data).hexdigest())
    monkeypatch.setitem(CIFAR_SPECS, "cifar10", spec.__class__(**{**vars(spec), "remote": remote}))
    monkeypatch.setattr(download_module, "fetch", lambda u, dest: dest.write_bytes(data))

    splits = load_dataset("cifar10", val_size=5)
    assert _sizes(splits) == (25, 5, 10)
    folder = cache_root / "cifar10" / "cifar-10-batches-py"
    assert sorted(os.listdir(folder)) == sorted([*spec.members, "batches.meta"])
    assert not (cache_root / "cifar10" / "cifar-10-python.tar.gz").exists()


def test_archive_members_outside_the_folder_are_ignored(places, tmp_path):
    root = tmp_path / "c10"
    write_cifar_dataset(root, n_train=20, n_test=10, archive=True)
    archive = root / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "r:gz") as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar]
    with tarfile.open(archive, "w:gz") as tar:
        for member, data in members:
            member.name = "../" + member.name  # path traversal attempt: must not be picked up
            tar.addfile(member, io.BytesIO(data))
    with pytest.raises(DataError, match="lacks"):
        load_dataset("cifar10", root, val_size=0, download=False)


def _sizes(splits):
    return len(splits.train), len(splits.val), len(splits.test)


# --- SVHN -----------------------------------------------------------------------------------------


def test_svhn_round_trip_maps_label_10_to_0(places, tmp_path):
    scipy_io = pytest.importorskip("scipy.io")
    root = write_svhn_dataset(tmp_path / "svhn", n_train=40, n_test=20)
    splits = load_dataset("svhn", root, val_size=10, download=False)
    assert _sizes(splits) == (30, 10, 20) and splits.image_shape == (3, 32, 32)

    raw = scipy_io.loadmat(root / "test_32x32.mat")
    stored = raw["y"].reshape(-1)
    assert 10 in stored and 0 not in stored
    assert torch.equal(splits.test.labels, torch.from_numpy(np.where(stored == 10, 0, stored)).long())
    assert torch.equal(splits.test.images[3], torch.from_numpy(raw["X"][:, :, :, 3].transpose(2, 0, 1)))


def test_corrupt_svhn_file_is_reported(places, tmp_path):
    pytest.importorskip("scipy.io")
    root = write_svhn_dataset(tmp_path / "svhn", n_train=10, n_test=10)
    bad = root / "test_32x32.mat"
    bad.write_bytes(b"not a mat file at all" * 10)
    with pytest.raises(DataError) as excinfo:
        load_dataset("svhn", root, val_size=0, download=False)
    assert str(bad) in str(excinfo.value)


def test_svhn_without_scipy_says_pip_install(places, tmp_path, monkeypatch):
    pytest.importorskip("scipy.io")
    root = write_svhn_dataset(tmp_path / "svhn", n_train=10, n_test=10)
    monkeypatch.setitem(sys.modules, "scipy.io", None)  # makes "import scipy.io" raise ImportError
    with pytest.raises(DataError, match="pip install scipy"):
        load_dataset("svhn", root, val_size=0, download=False)
