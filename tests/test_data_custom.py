"""Your own images: class folders and .npz files through load_dataset and `jemlab train --dataset PATH`.

Round trips (pixels, labels, class names, shapes, range), the splits (seeded validation, a held-out test set that
does not depend on the seed), resizing, unlabelled images, every bad input as a one-line error naming the file, the
models that presets build for other image shapes, and a tiny end-to-end run.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from jemlab.data import dataset_path, load_dataset
from jemlab.data.dataset import UNLABELLED
from jemlab.data.resize import resize_images
from jemlab.data.testing import isolate_data_locations, write_image_folder, write_npz_dataset
from jemlab.errors import ConfigError, DataError


def _save(path: Path, pixels: np.ndarray) -> None:
    """Save (H, W) as greyscale or (H, W, 3) as RGB."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


def _pixels(rng: np.random.Generator, n: int, shape: tuple[int, ...]) -> np.ndarray:
    return rng.integers(0, 256, size=(n, *shape), dtype=np.uint8)


def _one_line(excinfo: pytest.ExceptionInfo, *fragments: str) -> str:
    message = str(excinfo.value)
    assert "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    return message


# --- class folders ---------------------------------------------------------------------------------------------


def test_folder_round_trip_greyscale(tmp_path):
    rng = np.random.default_rng(0)
    root = tmp_path / "shapes"
    written: dict[str, np.ndarray] = {}
    for name in ("b_second", "a_first", "c_third"):  # written out of order: classes are the sorted names
        written[name] = _pixels(rng, 40, (12, 12))
        written[name][0, 0, :2] = (0, 255)  # the extremes map to -1 and 1
        for i, image in enumerate(written[name]):
            _save(root / name / f"{i:03d}.png", image)
    (root / "a_first" / "notes.txt").write_text("not an image")  # other files are skipped
    (root / ".cache").mkdir()  # hidden folders are not classes

    splits = load_dataset(root, val_size=10, seed=0)
    assert splits.class_names == ["a_first", "b_second", "c_third"] and splits.num_classes == 3
    assert splits.image_shape == (1, 12, 12) and splits.unlabelled is None
    assert splits.name.startswith("shapes-") and splits.source == str(root.resolve())
    assert len(splits.test) == 12 and len(splits.val) == 10 and len(splits.train) == 98

    # Every image comes back exactly, with its folder's label.
    everything = torch.cat([splits.train.images, splits.val.images, splits.test.images])
    labels = torch.cat([splits.train.labels, splits.val.labels, splits.test.labels])
    for label, name in enumerate(splits.class_names):
        got = everything[labels == label][:, 0]
        want = torch.from_numpy(written[name])
        assert sorted(map(bytes, got.numpy())) == sorted(map(bytes, want.numpy()))
    x, y = splits.train.batch(torch.arange(len(splits.train)))
    assert x.dtype == torch.float32 and y.dtype == torch.int64
    assert x.min() >= -1.0 and x.max() <= 1.0
    assert x.min() == -1.0 and x.max() == 1.0


def test_folder_rgb_and_greyscale_mix_becomes_rgb(tmp_path):
    rng = np.random.default_rng(1)
    colour = _pixels(rng, 12, (8, 8, 3))
    grey = _pixels(rng, 12, (8, 8))
    for i in range(12):
        _save(tmp_path / "d" / "colour" / f"{i}.png", colour[i])
        _save(tmp_path / "d" / "grey" / f"{i}.png", grey[i])
    splits = load_dataset(tmp_path / "d", val_size=0)
    assert splits.image_shape == (3, 8, 8)
    images = torch.cat([splits.train.images, splits.test.images])
    labels = torch.cat([splits.train.labels, splits.test.labels])
    greys = images[labels == 1]
    assert torch.equal(greys[:, 0], greys[:, 1]) and torch.equal(greys[:, 0], greys[:, 2])  # grey → R = G = B
    got = sorted(map(bytes, images[labels == 0].permute(0, 2, 3, 1).numpy()))
    assert got == sorted(map(bytes, colour))


def test_folder_rgba_and_jpeg_are_read(tmp_path):
    rng = np.random.default_rng(2)
    (tmp_path / "d" / "a").mkdir(parents=True)
    (tmp_path / "d" / "b").mkdir(parents=True)
    rgba = _pixels(rng, 10, (8, 8, 4))
    for i in range(10):
        Image.fromarray(rgba[i], mode="RGBA").save(tmp_path / "d" / "a" / f"{i}.png")  # alpha is dropped
        flat = np.full((8, 8, 3), 40 * (i % 5), dtype=np.uint8)
        Image.fromarray(flat).save(tmp_path / "d" / "b" / f"{i}.JPG", quality=95)  # suffixes in any case
    splits = load_dataset(tmp_path / "d", val_size=0)
    assert splits.image_shape == (3, 8, 8)
    images = torch.cat([splits.train.images, splits.test.images])
    labels = torch.cat([splits.train.labels, splits.test.labels])
    got = sorted(map(bytes, images[labels == 0].permute(0, 2, 3, 1).numpy()))
    assert got == sorted(map(bytes, np.ascontiguousarray(rgba[..., :3])))
    jpeg_means = images[labels == 1].float().mean((1, 2, 3)).tolist()  # JPEG is lossy: close, not equal
    assert all(min(abs(v - 40 * k) for k in range(5)) <= 2 for v in jpeg_means)


def test_folder_with_train_and_test_folders(tmp_path):
    root = write_image_folder(tmp_path / "d", 15, n_test_per_class=4, shape=(10, 10), channels=3)
    splits = load_dataset(root, val_size=5)
    assert splits.class_names == ["circle", "square", "triangle"]
    assert len(splits.test) == 12 and len(splits.train) + len(splits.val) == 45 and len(splits.val) == 5
    assert splits.image_shape == (3, 10, 10)
    assert torch.equal(splits.test.labels.bincount(), torch.tensor([4, 4, 4]))
    # A test set may lack a class; the labels follow the training classes.
    for path in (root / "test" / "circle").iterdir():
        path.unlink()
    (root / "test" / "circle").rmdir()
    splits = load_dataset(root, val_size=5)
    assert set(splits.test.labels.tolist()) == {1, 2}


@pytest.mark.parametrize("folder_name", ["_unlabelled", "_unlabeled"])
def test_unlabelled_folder(tmp_path, folder_name):
    root = write_image_folder(tmp_path / "d", 20, n_unlabelled=9, shape=(8, 8))
    if folder_name != "_unlabelled":
        (root / "_unlabelled").rename(root / folder_name)
    splits = load_dataset(root, val_size=6)
    assert splits.class_names == ["circle", "square", "triangle"]  # not a class
    assert splits.unlabelled is not None and len(splits.unlabelled) == 9
    assert splits.unlabelled.image_shape == splits.image_shape == (1, 8, 8)
    assert (splits.unlabelled.labels == UNLABELLED).all() and UNLABELLED == -1
    assert len(splits.train) + len(splits.val) + len(splits.test) == 60
    for part in (splits.train, splits.val, splits.test):
        assert (part.labels >= 0).all()
    # In the train/test layout the unlabelled folder sits next to the training classes.
    root = write_image_folder(tmp_path / "e", 10, n_unlabelled=5, n_test_per_class=2, shape=(8, 8))
    assert (root / "train" / "_unlabelled").is_dir()
    assert len(load_dataset(root, val_size=0).unlabelled) == 5


def test_splits_are_seeded_and_the_test_set_does_not_depend_on_the_seed(tmp_path):
    root = write_image_folder(tmp_path / "d", 40, shape=(8, 8))
    a = load_dataset(root, val_size=12, seed=0)
    b = load_dataset(root, val_size=12, seed=0)
    c = load_dataset(root, val_size=12, seed=1)
    assert torch.equal(a.val.images, b.val.images) and torch.equal(a.train.images, b.train.images)
    assert not torch.equal(a.val.images, c.val.images)
    assert torch.equal(a.test.images, c.test.images) and torch.equal(a.test.labels, c.test.labels)
    assert a.name == c.name  # the name is a digest of the content, not of the split
    limited = load_dataset(root, val_size=12, seed=0, limit=30)
    assert len(limited.train) == 30 and torch.equal(limited.val.images, a.val.images)
    assert torch.equal(load_dataset(root, val_size=0).test.images, a.test.images)


def test_relative_path_and_data_dir(tmp_path, monkeypatch):
    write_image_folder(tmp_path / "sets" / "mine", 10, shape=(8, 8))
    assert dataset_path("fashion-mnist") is None  # a registry name
    assert dataset_path("mine", tmp_path / "sets") == (tmp_path / "sets" / "mine").resolve()
    monkeypatch.chdir(tmp_path / "sets")
    assert dataset_path("./mine") == (tmp_path / "sets" / "mine").resolve()
    assert load_dataset("mine", val_size=0).class_names == ["circle", "square", "triangle"]


# --- .npz ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("channels", [1, 3])
def test_npz_round_trip(tmp_path, channels):
    path = write_npz_dataset(tmp_path / "d.npz", 90, channels=channels, shape=(9, 9), class_names=("x", "y", "z"))
    with np.load(path) as stored:
        images, labels = stored["images"], stored["labels"]
    splits = load_dataset(path, val_size=9, seed=3)
    assert splits.class_names == ["x", "y", "z"] and splits.image_shape == (channels, 9, 9)
    assert len(splits.test) == 9 and len(splits.val) == 9 and len(splits.train) == 72
    everything = torch.cat([splits.train.images, splits.val.images, splits.test.images])
    everything_labels = torch.cat([splits.train.labels, splits.val.labels, splits.test.labels])
    hwc = everything.permute(0, 2, 3, 1).numpy()
    want = images if channels == 3 else images[..., None]
    got_pairs = sorted(zip(everything_labels.tolist(), map(bytes, hwc), strict=True))
    assert got_pairs == sorted(zip(labels.tolist(), map(bytes, want), strict=True))


def test_npz_unlabelled_test_set_and_no_labels(tmp_path):
    path = write_npz_dataset(tmp_path / "d.npz", 30, n_unlabelled=11, n_test=6)
    splits = load_dataset(path, val_size=3)
    assert splits.class_names == ["0", "1", "2"]
    assert len(splits.unlabelled) == 11 and (splits.unlabelled.labels == -1).all()
    assert len(splits.test) == 6 and len(splits.train) + len(splits.val) == 30

    # Without labels every image is one class: an energy model of the images alone.
    np.savez(tmp_path / "plain.npz", images=np.zeros((20, 6, 6), dtype=np.uint8))
    plain = load_dataset(tmp_path / "plain.npz", val_size=0)
    assert plain.class_names == ["all"] and plain.num_classes == 1 and len(plain.test) == 2


def test_folder_and_npz_of_the_same_images_give_the_same_splits(tmp_path):
    rng = np.random.default_rng(4)
    images = _pixels(rng, 30, (7, 7))
    labels = np.repeat(np.arange(3), 10)  # class by class, as a folder lists them
    for i, (image, label) in enumerate(zip(images, labels, strict=True)):
        _save(tmp_path / "f" / f"class{label}" / f"{i:03d}.png", image)
    np.savez(tmp_path / "f.npz", images=images, labels=labels, class_names=np.array(["class0", "class1", "class2"]))
    a = load_dataset(tmp_path / "f", val_size=4, seed=5)
    b = load_dataset(tmp_path / "f.npz", val_size=4, seed=5)
    assert a.class_names == b.class_names and a.name.split("-")[1] == b.name.split("-")[1]  # same content digest
    for part in ("train", "val", "test"):
        assert torch.equal(getattr(a, part).images, getattr(b, part).images)
        assert torch.equal(getattr(a, part).labels, getattr(b, part).labels)


# --- resizing --------------------------------------------------------------------------------------------------


def test_resize_mixed_sizes_and_non_square(tmp_path):
    rng = np.random.default_rng(5)
    for i in range(10):
        _save(tmp_path / "d" / "a" / f"{i}.png", np.full((20, 30), 200, dtype=np.uint8))  # non-square, constant
        _save(tmp_path / "d" / "b" / f"{i}.png", _pixels(rng, 1, (16, 16))[0])
    splits = load_dataset(tmp_path / "d", val_size=0, image_size=12)
    assert splits.image_shape == (1, 12, 12)
    images = torch.cat([splits.train.images, splits.test.images])
    labels = torch.cat([splits.train.labels, splits.test.labels])
    assert (images[labels == 0] == 200).all()  # a constant image stays constant


def test_resize_matches_torch_bilinear_with_antialiasing():
    images = torch.randint(0, 256, (3, 2, 10, 14), dtype=torch.uint8)
    want = torch.nn.functional.interpolate(images.float(), size=(6, 6), mode="bilinear", antialias=True)
    assert torch.equal(resize_images(images, 6), want.round().clamp(0, 255).to(torch.uint8))
    assert resize_images(images[:, :, :6, :6], 6) is not None
    same = images[:, :, :6, :6].contiguous()
    assert resize_images(same, 6) is same


def test_resize_npz_and_a_built_in_dataset(tmp_path, monkeypatch):
    path = write_npz_dataset(tmp_path / "d.npz", 30, channels=3, shape=(28, 28))
    assert load_dataset(path, val_size=0, image_size=32).image_shape == (3, 32, 32)
    isolate_data_locations(monkeypatch, tmp_path / "places")
    from jemlab.data.testing import write_idx_dataset

    write_idx_dataset(tmp_path / "fm", n_train=50, n_test=10)
    splits = load_dataset("fashion-mnist", tmp_path / "fm", val_size=5, download=False, image_size=32)
    assert splits.image_shape == (1, 32, 32) and splits.test.images.shape == (10, 1, 32, 32)
    with pytest.raises(ConfigError):
        load_dataset(path, image_size=0)


# --- errors: one line, naming the file and the fix -------------------------------------------------------------


def _folder(tmp_path: Path, n: int = 4, shape: tuple[int, int] = (6, 6)) -> Path:
    return write_image_folder(tmp_path / "d", n, shape=shape)


def test_error_mixed_sizes_without_resize(tmp_path):
    root = _folder(tmp_path)
    odd = root / "square" / "00002.png"
    _save(odd, np.zeros((6, 7), dtype=np.uint8))
    with pytest.raises(DataError) as excinfo:
        load_dataset(root)
    _one_line(excinfo, str(odd), "7 wide and 6 high", "data.image_size")


def test_error_empty_class_folder(tmp_path):
    root = _folder(tmp_path)
    (root / "empty").mkdir()
    (root / "empty" / "a.gif").write_bytes(b"GIF89a")
    with pytest.raises(DataError) as excinfo:
        load_dataset(root)
    _one_line(excinfo, str(root / "empty"), "empty class folder", "a.gif")


@pytest.mark.parametrize("content", [b"", b"not a png at all", "truncated"])
def test_error_corrupt_image(tmp_path, content):
    root = _folder(tmp_path)
    bad = root / "circle" / "00001.png"
    if content == "truncated":
        content = bad.read_bytes()[:40]
    bad.write_bytes(content)
    with pytest.raises(DataError) as excinfo:
        load_dataset(root)
    _one_line(excinfo, str(bad), "cannot read this image", "replace or delete it")


def test_error_sixteen_bit_image(tmp_path):
    root = _folder(tmp_path)
    bad = root / "circle" / "00001.png"
    Image.fromarray(np.zeros((6, 6), dtype=np.uint16)).save(bad)
    with pytest.raises(DataError) as excinfo:
        load_dataset(root)
    _one_line(excinfo, str(bad), "8-bit")


def test_error_no_class_folders(tmp_path):
    root = tmp_path / "flat"
    for i in range(3):
        _save(root / f"{i}.png", np.zeros((4, 4), dtype=np.uint8))
    with pytest.raises(DataError) as excinfo:
        load_dataset(root)
    _one_line(excinfo, str(root.resolve()), "no class sub-folders", "3 images directly")
    (tmp_path / "only_unlabelled" / "_unlabelled").mkdir(parents=True)
    with pytest.raises(DataError) as excinfo:
        load_dataset(tmp_path / "only_unlabelled")
    _one_line(excinfo, "no class sub-folders")


def test_error_test_class_not_in_train_and_stray_folders(tmp_path):
    root = write_image_folder(tmp_path / "d", 4, n_test_per_class=2, shape=(6, 6))
    (root / "test" / "circle").rename(root / "test" / "oval")
    with pytest.raises(DataError) as excinfo:
        load_dataset(root)
    _one_line(excinfo, str(root / "test" / "oval"), "not a training class")
    (root / "test" / "oval").rename(root / "test" / "circle")
    (root / "val").mkdir()
    with pytest.raises(DataError) as excinfo:
        load_dataset(root)
    _one_line(excinfo, str(root.resolve()), "val/")


def test_error_path_does_not_exist_or_is_not_a_dataset(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(DataError) as excinfo:
        load_dataset(missing)
    _one_line(excinfo, str(missing), "no such file or folder", "fashion-mnist")
    with pytest.raises(DataError) as excinfo:
        load_dataset("no-such-name")
    _one_line(excinfo, "'no-such-name'", "fashion-mnist", ".npz")
    text = tmp_path / "data.csv"
    text.write_text("1,2,3\n")
    with pytest.raises(DataError) as excinfo:
        load_dataset(text)
    _one_line(excinfo, str(text), ".npz")


def _npz(tmp_path: Path, **arrays: np.ndarray) -> Path:
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    return path


_IMAGES = np.zeros((20, 5, 5), dtype=np.uint8)
_LABELS = np.arange(20) % 2


@pytest.mark.parametrize(
    ("arrays", "fragments"),
    [
        ({"images": _IMAGES, "labels": _LABELS, "class_names": np.array(["a"])}, ["labels are >= 1", "class_names"]),
        ({"images": _IMAGES, "labels": _LABELS - 2}, ["negative", "-1 for an image without a label"]),
        ({"images": _IMAGES, "labels": _LABELS.astype(np.float32)}, ["float32, not integers"]),
        ({"images": _IMAGES, "labels": _LABELS[:-3]}, ["20 images", "17 labels"]),
        ({"images": _IMAGES, "labels": _LABELS[:, None]}, ["(20, 1)", "reshape(-1)"]),
        ({"images": _IMAGES.astype(np.float32) / 255, "labels": _LABELS}, ["float32", "not uint8", "* 255"]),
        ({"images": _IMAGES.astype(np.int64), "labels": _LABELS}, ["int64", "astype(np.uint8)"]),
        ({"images": _IMAGES.reshape(20, 25), "labels": _LABELS}, ["(20, 25)", "(N, H, W)"]),
        ({"images": np.zeros((20, 3, 5, 5), np.uint8), "labels": _LABELS}, ["channels-first", "transpose"]),
        ({"images": np.zeros((20, 5, 5, 4), np.uint8), "labels": _LABELS}, ["alpha"]),
        ({"images": _IMAGES, "labels": _LABELS + 1}, ["no image has label 0", "subtract 1"]),
        ({"images": _IMAGES, "labels": np.full(20, -1)}, ["every label is -1"]),
        ({"images": _IMAGES, "x_train": _IMAGES}, ["unknown array(s) x_train"]),
        ({"pixels": _IMAGES}, ["unknown array(s) pixels"]),
        ({"images": _IMAGES, "labels": _LABELS, "test_images": _IMAGES}, ["no test_labels"]),
        ({"images": _IMAGES, "labels": _LABELS, "test_labels": _LABELS}, ["no test_images"]),
        (
            {"images": _IMAGES, "labels": _LABELS, "test_images": _IMAGES[:4], "test_labels": np.array([0, 1, 5, 1])},
            ["test_labels go up to 5"],
        ),
        (
            {"images": _IMAGES, "labels": _LABELS, "test_images": _IMAGES[:2, :4], "test_labels": np.array([0, 1])},
            ["test_images are 5x4", "data.image_size"],
        ),
        ({"images": _IMAGES, "labels": _LABELS, "class_names": np.array([1, 2])}, ["string array"]),
        ({"images": _IMAGES, "labels": _LABELS, "class_names": np.array(["a", "a"])}, ["repeats 'a'"]),
    ],
)
def test_error_bad_npz(tmp_path, arrays, fragments):
    path = _npz(tmp_path, **arrays)
    with pytest.raises(DataError) as excinfo:
        load_dataset(path)
    _one_line(excinfo, str(path), *fragments)


def test_error_npz_that_is_not_an_archive(tmp_path):
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"\x00\x01 definitely not a zip file")
    with pytest.raises(DataError) as excinfo:
        load_dataset(garbage)
    _one_line(excinfo, str(garbage), "cannot read as an .npz")
    single = tmp_path / "single.npz"
    with single.open("wb") as f:
        np.save(f, _IMAGES)
    with pytest.raises(DataError) as excinfo:
        load_dataset(single)
    _one_line(excinfo, str(single), "single array")
    pickled = tmp_path / "pickled.npz"
    np.savez(pickled, images=_IMAGES, labels=_LABELS, class_names=np.array(["a", None], dtype=object))
    with pytest.raises(DataError) as excinfo:
        load_dataset(pickled)
    _one_line(excinfo, str(pickled), "class_names", "Python objects")
    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(write_npz_dataset(tmp_path / "ok.npz", 20).read_bytes()[:300])
    with pytest.raises(DataError) as excinfo:
        load_dataset(truncated)
    _one_line(excinfo, str(truncated))


def test_error_too_few_images_for_a_test_split(tmp_path):
    root = _folder(tmp_path, n=2)  # 6 images
    with pytest.raises(DataError) as excinfo:
        load_dataset(root)
    _one_line(excinfo, str(root.resolve()), "too few to hold out a test set")


# --- models for other image shapes ----------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32), (1, 12, 12), (3, 48, 48)])
@pytest.mark.parametrize("preset", ["default", "mlp", "course"])
def test_presets_build_models_for_any_square_size(preset, shape):
    from jemlab.config import build_config
    from jemlab.models import build_model

    m = build_config(preset).model
    model = build_model(m.name, shape, 5, m.energy_head, m.options)
    assert model.logits(torch.zeros(2, *shape)).shape == (2, 5)


def test_models_that_do_not_fit_say_which_options_to_change():
    from jemlab.config import build_config
    from jemlab.models import build_model

    m = build_config("egc").model  # patch 2, two levels: sizes divisible by 4
    with pytest.raises(ConfigError) as excinfo:
        build_model(m.name, (1, 30, 30), 3, m.energy_head, m.options)
    _one_line(excinfo, "divisible by", "data.image_size=32", "model.patch")
    m = build_config("default").model
    with pytest.raises(ConfigError) as excinfo:
        build_model(m.name, (3, 20, 30), 3, m.energy_head, m.options)
    _one_line(excinfo, "must be square", "data.image_size")

    from jemlab.samplers.init import fit_class_gaussians

    with pytest.raises(ConfigError) as excinfo:
        fit_class_gaussians(torch.zeros(4, 3, 64, 64, dtype=torch.uint8), torch.tensor([0, 0, 1, 1]), 10, "full", 8)
    _one_line(excinfo, "GiB", "sampler.init_covariance=lowrank")


# --- end to end: `jemlab train --dataset PATH` ----------------------------------------------------------------


def test_train_eval_from_a_folder_via_the_cli(tmp_path, capsys, monkeypatch):
    from jemlab.cli import main
    from jemlab.run import load_run

    root = write_image_folder(tmp_path / "my photos", 40, n_unlabelled=16, shape=(20, 20), channels=3)
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "run"
    argv = [
        "train", "--dataset", "my photos", "--run-dir", str(run), "--epochs", "1", "--batch-size", "16",
        "--val-size", "12", "--no-progress", "--set", "data.image_size=16", "--set", "train.tensorboard=false",
        "--set", "sampler.steps=2", "--set", "sampler.buffer_size=64", "--set", "train.log_every=2",
    ]  # fmt: skip
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert 0.0 <= summary["test_accuracy"] <= 1.0

    config = json.loads((run / "config.json").read_text())
    assert config["data"]["dataset"] == str(root.resolve())  # saved absolute: eval works from anywhere
    assert config["data"]["image_size"] == 16
    trained = load_run(run)
    assert trained.class_names == ["circle", "square", "triangle"]
    assert tuple(trained.image_shape) == (3, 16, 16)
    assert trained.meta["dataset"]["name"].startswith("my_photos-")

    monkeypatch.chdir(tmp_path / "my photos")  # elsewhere: eval reads the same (resized) test split
    out = tmp_path / "eval.json"
    assert main(["eval", "--checkpoint", str(run), "--json", str(out)]) == 0
    assert json.loads(out.read_text())["test_accuracy"] == summary["test_accuracy"]

    # serve: the class names, and the OOD reference scored on the run's own (resized) test images.
    from jemlab.serve.server import create_app

    app = create_app(run, reference_size=8)
    assert app.actions.class_names == ["circle", "square", "triangle"]
    assert app.reference is not None, app.reference_note


def test_cli_names_a_missing_dataset_path(tmp_path, capsys):
    from jemlab.cli import main

    assert main(["train", "--dataset", str(tmp_path / "nope"), "--dry-run"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and str(tmp_path / "nope") in err and "no such file or folder" in err
