"""Property tests over every parser of user files: IDX datasets, .npz samples, user datasets (.npz, image
folders), config JSON, checkpoints.

The property: whatever the bytes, a parser either returns a well-formed result or raises a `JemlabError` (whose
message is one line naming the file); never another exception, never a crash. Inputs are random bytes, valid
files cut short or with bytes changed, and well-formed containers with random contents.

The budget is bounded and deterministic (`derandomize`): ``JEMLAB_FUZZ_EXAMPLES`` examples per property (default
120; the whole file runs in seconds). Set it higher for a longer fuzzing session; the number of inputs tried is
printed at the end and, with ``JEMLAB_FUZZ_REPORT=FILE``, written to FILE as JSON.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from jemlab.config import _SECTIONS, Config, config_from_dict, load_config_file
from jemlab.data import load_dataset
from jemlab.data.idx import IMAGES_MAGIC, LABELS_MAGIC, parse_idx, read_idx_images, read_idx_labels, write_idx
from jemlab.data.testing import write_image_folder
from jemlab.errors import JemlabError
from jemlab.images import load_npz
from jemlab.training.checkpoint import load_checkpoint, save_checkpoint

EXAMPLES = int(os.environ.get("JEMLAB_FUZZ_EXAMPLES", "120"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,  # the same inputs on every CI run: a failure is reproducible, the budget fixed
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
TRIED: Counter[str] = Counter()
SCRATCH = Path(tempfile.mkdtemp(prefix="jemlab-fuzz-"))  # hypothesis calls the test many times per fixture


@pytest.fixture(scope="module", autouse=True)
def report(request):
    yield
    total = sum(TRIED.values())
    lines = [f"fuzz: {total} inputs tried, all parsed or refused with a JemlabError"]
    lines += [f"  {name}: {count}" for name, count in sorted(TRIED.items())]
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if reporter is not None and capture is not None:
        with capture.global_and_fixture_disabled():  # shown even though pytest captures output
            reporter.write_line("")
            for line in lines:
                reporter.write_line(line)
    if os.environ.get("JEMLAB_FUZZ_REPORT"):
        Path(os.environ["JEMLAB_FUZZ_REPORT"]).write_text(json.dumps({"total": total, **TRIED}, indent=2) + "\n")


def expect_clean(name: str, parse, *args):
    """Run a parser; only success or a one-line JemlabError may come out."""
    TRIED[name] += 1
    try:
        return parse(*args)
    except JemlabError as err:
        assert "\n" not in str(err), f"{name}: multi-line error: {err!r}"
        return None


def mutate(data: bytes, cut: int, flips: list[tuple[int, int]], extra: bytes) -> bytes:
    """A valid file cut at `cut`, with some bytes replaced, and `extra` appended."""
    out = bytearray(data[: max(0, min(cut, len(data)))] if cut >= 0 else data)
    for position, value in flips:
        if out:
            out[position % len(out)] = value
    return bytes(out) + extra


mutations = st.tuples(
    st.integers(-1, 4096),  # -1: keep the whole file
    st.lists(st.tuples(st.integers(0, 1 << 20), st.integers(0, 255)), max_size=4),
    st.binary(max_size=16),
)


# --- IDX ---------------------------------------------------------------------------------------------------------


def idx_bytes(array: np.ndarray) -> bytes:
    path = SCRATCH / "valid.idx"
    write_idx(path, array)
    return path.read_bytes()


VALID_IMAGES = idx_bytes(np.arange(3 * 4 * 5, dtype=np.uint8).reshape(3, 4, 5))
VALID_LABELS = idx_bytes(np.array([0, 3, 9, 1], dtype=np.uint8))


@FUZZ
@given(data=st.binary(max_size=200), images=st.booleans())
def test_idx_random_bytes(data, images):
    magic = IMAGES_MAGIC if images else LABELS_MAGIC
    array = expect_clean("idx/random", parse_idx, data, "fuzz.idx", magic)
    if array is not None:
        assert array.dtype == np.uint8 and array.ndim == (3 if images else 1)


@FUZZ
@given(dims=st.lists(st.integers(0, 2**32 - 1), min_size=1, max_size=3), payload=st.integers(0, 300))
def test_idx_headers_with_any_dimensions(dims, payload):
    header = bytes([0, 0, 8, len(dims)]) + b"".join(d.to_bytes(4, "big") for d in dims)
    magic = IMAGES_MAGIC if len(dims) == 3 else LABELS_MAGIC
    array = expect_clean("idx/header", parse_idx, header + bytes(payload), "fuzz.idx", magic)
    if array is not None:
        assert list(array.shape) == dims


@FUZZ
@given(mutation=mutations, images=st.booleans(), gz=st.booleans())
def test_idx_files_cut_and_changed(mutation, images, gz):
    data = mutate(VALID_IMAGES if images else VALID_LABELS, *mutation)
    path = SCRATCH / ("fuzz-idx.gz" if gz else "fuzz-idx")
    path.write_bytes(gzip.compress(data, mtime=0) if gz else data)
    if images:
        out = expect_clean("idx/mutated", read_idx_images, path)
        assert out is None or (out.dtype == torch.uint8 and out.dim() == 4)
    else:
        out = expect_clean("idx/mutated", read_idx_labels, path, 10)
        assert out is None or (out.dtype == torch.int64 and (out.numel() == 0 or int(out.max()) < 10))


@FUZZ
@given(data=st.binary(max_size=300))
def test_idx_gzip_garbage(data):
    path = SCRATCH / "garbage-idx.gz"
    path.write_bytes(b"\x1f\x8b" + data)  # looks like gzip for two bytes
    expect_clean("idx/gzip", read_idx_images, path)


# --- .npz samples ------------------------------------------------------------------------------------------------


def npz_bytes(**arrays) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


VALID_NPZ = npz_bytes(images=np.full((2, 1, 3, 3), 0.5, np.float32), labels=np.array([1, 2]))


@FUZZ
@given(data=st.binary(max_size=400))
def test_npz_random_bytes(data):
    path = SCRATCH / "random.npz"
    path.write_bytes(data)
    expect_clean("npz/random", load_npz, path)


@FUZZ
@given(mutation=mutations)
@example(mutation=(-1, [(4712, 64)], b""))  # found by a 500-example session: zipfile raised NotImplementedError
def test_npz_cut_and_changed(mutation):
    path = SCRATCH / "mutated.npz"
    path.write_bytes(mutate(VALID_NPZ, *mutation))
    out = expect_clean("npz/mutated", load_npz, path)
    if out is not None:
        images, _ = out
        assert images.dim() == 4 and bool(torch.isfinite(images).all()) and images.abs().max() <= 1


dtypes = st.sampled_from([np.float32, np.float64, np.int64, np.uint8, np.bool_, np.complex64])
shapes = st.lists(st.integers(0, 3), min_size=0, max_size=5)
values = st.sampled_from([0.0, 0.5, 1.0, -0.1, 1.5, np.nan, np.inf])


@FUZZ
@given(images_dtype=dtypes, images_shape=shapes, fill=values, labels=st.none() | st.tuples(dtypes, shapes))
def test_npz_with_any_arrays(images_dtype, images_shape, fill, labels):
    with np.errstate(invalid="ignore"):  # NaN cast to an integer type: any value will do
        arrays = {"images": np.full(images_shape, fill).astype(images_dtype)}
    if labels is not None:
        arrays["labels"] = np.ones(labels[1]).astype(labels[0])
    path = SCRATCH / "arrays.npz"
    path.write_bytes(npz_bytes(**arrays))
    out = expect_clean("npz/arrays", load_npz, path)
    if out is not None:
        images, loaded_labels = out
        assert images.dim() == 4 and bool(torch.isfinite(images).all())
        assert loaded_labels is None or loaded_labels.shape == (images.shape[0],)


# --- user datasets: an .npz of images and labels, a folder of class folders --------------------------------------

VALID_DATASET_NPZ = npz_bytes(
    images=np.arange(12 * 4 * 4, dtype=np.uint8).reshape(12, 4, 4),
    labels=np.arange(12) % 2,
    class_names=np.array(["a", "b"]),
)


def dataset_ok(splits) -> bool:
    """A loaded user dataset is well formed: uint8 (N, C, H, W) images, labels 0..K-1 (-1 only when unlabelled)."""
    for part in (splits.train, splits.val, splits.test):
        assert part.images.dtype == torch.uint8 and part.images.dim() == 4
        assert part.labels.numel() == 0 or 0 <= int(part.labels.min()) <= int(part.labels.max()) < splits.num_classes
    assert splits.unlabelled is None or bool((splits.unlabelled.labels == -1).all())
    return True


@FUZZ
@given(data=st.binary(max_size=400))
def test_dataset_npz_random_bytes(data):
    path = SCRATCH / "dataset-random.npz"
    path.write_bytes(data)
    expect_clean("dataset-npz/random", load_dataset, path)


@FUZZ
@given(mutation=mutations)
@example(mutation=(-1, [(4712, 64)], b""))
def test_dataset_npz_cut_and_changed(mutation):
    path = SCRATCH / "dataset-mutated.npz"
    path.write_bytes(mutate(VALID_DATASET_NPZ, *mutation))
    out = expect_clean("dataset-npz/mutated", load_dataset, path, None)
    assert out is None or dataset_ok(out)


label_dtypes = st.sampled_from([np.int64, np.int8, np.uint8, np.float32, np.bool_])


@FUZZ
@given(
    images_dtype=dtypes,
    images_shape=shapes,
    labels=st.none() | st.tuples(label_dtypes, st.lists(st.integers(0, 12), max_size=2), st.integers(-3, 3)),
)
def test_dataset_npz_with_any_arrays(images_dtype, images_shape, labels):
    arrays = {"images": np.ones(images_shape).astype(images_dtype)}
    if labels is not None:
        dtype, shape, value = labels
        with np.errstate(invalid="ignore"):
            arrays["labels"] = (np.arange(int(np.prod(shape))).reshape(shape) % 3 + value).astype(dtype)
    path = SCRATCH / "dataset-arrays.npz"
    path.write_bytes(npz_bytes(**arrays))
    out = expect_clean("dataset-npz/arrays", load_dataset, path, None)
    assert out is None or dataset_ok(out)


def _png_bytes() -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.arange(36, dtype=np.uint8).reshape(6, 6)).save(buffer, format="PNG")
    return buffer.getvalue()


VALID_PNG = _png_bytes()


@FUZZ
@given(mutation=mutations, suffix=st.sampled_from([".png", ".jpg"]))
def test_image_folder_with_a_damaged_image(mutation, suffix):
    root = SCRATCH / "folder"
    if not root.exists():
        write_image_folder(root, 6, class_names=("a", "b"), shape=(6, 6))
    for old in (root / "b").glob("damaged.*"):
        old.unlink()
    (root / "b" / f"damaged{suffix}").write_bytes(mutate(VALID_PNG, *mutation))
    out = expect_clean("image-folder/damaged", load_dataset, root, None)
    assert out is None or dataset_ok(out)


# --- config JSON -------------------------------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)
FIELDS = {section: list(getattr(Config(), section).__dataclass_fields__) for section in _SECTIONS}


@st.composite
def config_dicts(draw):
    """Real section and key names with values of any JSON type (plus an odd unknown key now and then)."""
    data: dict = {}
    for _ in range(draw(st.integers(1, 4))):
        section = draw(st.sampled_from([*_SECTIONS, "bogus"]))
        names = [*FIELDS.get(section, ["x"]), "unknown"]
        values = data.setdefault(section, {})
        values[draw(st.sampled_from(names))] = draw(
            json_values | st.sampled_from(["nan", "inf", "-1", "1e999", "0", "none", "true", "fast", "1,2"])
        )
    if draw(st.booleans()):
        data["preset"] = draw(json_values)
    return data


@FUZZ
@given(data=config_dicts())
def test_config_dicts_with_any_values(data):
    config = expect_clean("config/dict", config_from_dict, data)
    assert config is None or isinstance(config, Config)


@FUZZ
@given(data=json_values)
@example(data={"\n": None})  # found by a 300-example session: the message quoted the key's line break
def test_config_any_json(data):
    expect_clean("config/json", config_from_dict, data)


@FUZZ
@given(data=st.binary(max_size=200) | st.text(max_size=200).map(str.encode))
def test_config_files_with_any_bytes(data):
    path = SCRATCH / "config.json"
    path.write_bytes(data)
    expect_clean("config/file", load_config_file, path)


def test_config_file_edge_cases(tmp_path):
    (tmp_path / "deep.json").write_text("[" * 100_000 + "]" * 100_000)
    for path in (tmp_path / "deep.json", tmp_path, tmp_path / "missing.json"):
        with pytest.raises(JemlabError, match=str(path.name)):
            TRIED["config/file"] += 1
            load_config_file(path)


# --- checkpoints -------------------------------------------------------------------------------------------------

VALID_CHECKPOINT = save_checkpoint(
    SCRATCH / "valid.safetensors",
    {"model": {"w": torch.arange(6.0).reshape(2, 3)}, "optimizer": {"state": {0: {"step": torch.tensor(3.0)}}}},
    {"progress": {"step": 3}},
).read_bytes()


@FUZZ
@given(data=st.binary(max_size=300))
def test_checkpoint_random_bytes(data):
    path = SCRATCH / "random.safetensors"
    path.write_bytes(data)
    expect_clean("checkpoint/random", load_checkpoint, path)


@FUZZ
@given(mutation=mutations)
def test_checkpoint_cut_and_changed(mutation):
    path = SCRATCH / "mutated.safetensors"
    path.write_bytes(mutate(VALID_CHECKPOINT, *mutation))
    out = expect_clean("checkpoint/mutated", load_checkpoint, path)
    assert out is None or (isinstance(out[0], dict) and isinstance(out[1], dict))


@FUZZ
@given(
    header=st.dictionaries(
        st.sampled_from(["format", "format_version", "state", "meta", "other"]),
        st.text(max_size=40) | json_values.map(json.dumps) | st.just("jemlab-checkpoint") | st.just("1"),
    ),
    tensors=st.dictionaries(st.sampled_from(["s.w", "s.model.w", "x"]), st.integers(0, 4), max_size=2),
)
def test_checkpoint_headers_with_any_metadata(header, tensors):
    from safetensors.torch import save_file

    path = SCRATCH / "header.safetensors"
    save_file({k: torch.ones(n) for k, n in tensors.items()}, path, metadata=header)
    expect_clean("checkpoint/header", load_checkpoint, path)
