"""The Python API (`import jemlab`): load/train, classify, energy, OOD scores, samples, input forms, docs, example."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

import jemlab
from jemlab.config import build_config
from jemlab.data.testing import make_images, write_idx_dataset
from jemlab.errors import ConfigError, JemlabError

ROOT = Path(__file__).resolve().parents[1]


def tiny_overrides(data: Path) -> dict[str, object]:
    return {
        "data.data_dir": str(data),
        "data.download": False,
        "data.val_size": 50,
        "train.batch_size": 32,
        "train.epochs": 2,
        "train.log_every": 3,
        "train.progress": False,
        "train.tensorboard": False,
        "sampler.steps": 3,
        "sampler.buffer_size": 100,
        "optim.warmup_steps": 3,
        "quality.every": 0,  # sample-quality tracking has its own tests (test_quality_tracking.py)
    }


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_idx_dataset(tmp_path_factory.mktemp("api-data"), n_train=300, n_test=100, seed=0)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data):
    """A tiny JEM trained through `jemlab.train` into a run directory, with the callback's records."""
    run_dir = tmp_path_factory.mktemp("api-run") / "run"
    records: list[dict] = []
    model = jemlab.train("default", run_dir, tiny_overrides(data), callback=records.append)
    return run_dir, model, records


@pytest.fixture(scope="module")
def model(trained):
    return jemlab.load(trained[0], device="cpu")


@pytest.fixture(scope="module")
def egc_model(data):
    """A tiny EGC trained in memory (no run directory)."""
    return jemlab.train("egc", None, {**tiny_overrides(data), "train.epochs": 1, "egc.sample_steps": 4})


@pytest.fixture(scope="module")
def images():
    """uint8 (12, 28, 28) images like the training data (one blob per class), and their labels."""
    labels = np.arange(12) % 10
    return make_images(labels, rng=np.random.default_rng(5))[:, 0], labels


# --- import and surface -------------------------------------------------------------------------------------------


def test_import_jemlab_stays_light_and_exports_the_api():
    code = "import sys, jemlab; assert 'torch' not in sys.modules, 'import jemlab imported torch'; print(jemlab.Model)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "jemlab.api.model.Model" in result.stdout
    from jemlab import api

    for name in jemlab.__all__:
        assert getattr(jemlab, name) is getattr(api, name, None) or name == "JemlabError"
        assert name in dir(jemlab)
    with pytest.raises(AttributeError, match="no attribute 'lod'"):
        jemlab.lod  # noqa: B018


def test_every_public_call_has_a_docstring_with_an_example():
    for name in ("load", "train"):
        doc = getattr(jemlab, name).__doc__
        assert "Args:" in doc and "Returns:" in doc and "Example:" in doc, name
    methods = ("predict_proba", "predict", "energy", "fit_reference", "ood_score", "sample", "draw", "self_agreement")
    for name in methods:
        doc = getattr(jemlab.Model, name).__doc__
        assert "Args:" in doc and "Returns:" in doc and "Example:" in doc, name


# --- train and load -----------------------------------------------------------------------------------------------


def test_train_calls_back_with_every_metrics_record(trained):
    run_dir, model, records = trained
    written = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [r["step"] for r in written]
    assert [sorted(r) for r in records] == [sorted(r) for r in written]
    iterations = [r for r in records if "loss" in r]
    assert iterations and all({"step", "loss", "train_accuracy", "ce"} <= set(r) for r in iterations)
    assert [r["step"] for r in iterations] == sorted(r["step"] for r in iterations)
    assert "test_accuracy" in records[-1]
    assert model.path is not None and model.path.parent == run_dir / "checkpoints"


def test_load_describes_the_model(model, trained):
    assert model.kind == "jem"
    assert model.image_shape == (1, 28, 28) and model.num_classes == 10
    assert model.class_names[:2] == ["T-shirt/top", "Trouser"] and len(model.class_names) == 10
    assert model.config.preset == "default" and model.config.train.epochs == 2
    assert str(trained[0]) in repr(model)
    # A checkpoint file loads the same model as its run directory.
    same = jemlab.load(model.path, device="cpu")
    x = torch.rand(3, 1, 28, 28)
    assert torch.equal(same.energy(x), model.energy(x))


def test_train_in_memory_keeps_nothing_on_disk(egc_model):
    assert egc_model.path is None and egc_model.kind == "egc"
    assert egc_model.predict_proba(torch.rand(2, 28, 28)).shape == (2, 10)


def test_train_refuses_bad_configs_and_used_run_dirs(trained, data):
    with pytest.raises(ConfigError, match="unknown preset 'nope'"):
        jemlab.train("nope")
    with pytest.raises(ConfigError) as err:
        jemlab.train("default", None, {"train.epoch": 1})
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="already holds a run"):
        jemlab.train("default", trained[0], tiny_overrides(data))
    with pytest.raises(ConfigError, match="dict or"):
        jemlab.train("default", None, ["train.epochs=1"])
    config = build_config("default")
    with pytest.raises(ConfigError):
        jemlab.train(config, None, {"train.epochs": 0})
    assert config.train.epochs == build_config("default").train.epochs  # the caller's config is not changed


# --- classifier and energy ----------------------------------------------------------------------------------------


def test_predict_proba_predict_and_energy_agree_with_the_network(model, images):
    x_u8, labels = images
    probs = model.predict_proba(x_u8)
    assert probs.shape == (12, 10) and probs.dtype == torch.float32
    assert torch.allclose(probs.sum(1), torch.ones(12), atol=1e-5) and float(probs.min()) >= 0
    assert torch.equal(model.predict(x_u8), probs.argmax(1))
    assert float((model.predict(x_u8) == torch.from_numpy(labels)).float().mean()) > 0.5  # it learned something
    energy = model.energy(x_u8)
    # Known answer: E(x) = −logsumexp f(x) of the network on the same images in [−1, 1].
    x = torch.from_numpy(x_u8).float().div(255).unsqueeze(1) * 2 - 1
    with torch.no_grad():
        expected = -torch.logsumexp(model.run.model.logits(x), dim=1)
    assert energy.shape == (12,) and torch.allclose(energy, expected, atol=1e-5)


def test_uint8_and_float_inputs_agree(model, images):
    x_u8 = images[0]
    reference = model.predict_proba(x_u8)
    x_float = torch.from_numpy(x_u8).float() / 255
    forms = {
        "uint8 (N, H, W, C)": x_u8[..., None],
        "uint8 (N, C, H, W)": x_u8[:, None],
        "uint8 tensor": torch.from_numpy(x_u8),
        "float (N, H, W)": x_float,
        "float (N, C, H, W)": x_float[:, None],
        "float64 numpy": x_u8.astype(np.float64) / 255,
    }
    for name, form in forms.items():
        assert torch.allclose(model.predict_proba(form), reference, atol=1e-5), name
        assert torch.equal(model.predict(form), reference.argmax(1)), name


@pytest.mark.parametrize(
    "make, fix",
    [
        (lambda: torch.rand(2, 1, 28, 28) * 2 - 1, "(x + 1) / 2"),
        (lambda: torch.rand(2, 1, 28, 28) * 255, "x / 255"),
        (lambda: torch.rand(2, 28, 28, 1), "permute(0, 3, 1, 2)"),
        (lambda: torch.rand(2, 1, 32, 32), "(N, 1, 28, 28)"),
        (lambda: torch.rand(1, 28, 28)[0], "(N, 1, 28, 28)"),
        (lambda: np.zeros((2, 28, 28), dtype=np.int64), "uint8"),
        (lambda: np.zeros((28, 28), dtype=np.uint8), "x[None]"),
        (lambda: np.zeros((2, 28, 27), dtype=np.uint8), "(N, 28, 28, 1)"),
        (lambda: torch.zeros(0, 1, 28, 28), "N >= 1"),
        (lambda: torch.full((1, 1, 28, 28), float("nan")), "finite"),
        (lambda: [[0.0] * 28] * 28, "torch.Tensor or numpy array"),
    ],
)
def test_bad_inputs_are_one_line_errors_that_name_the_fix(model, make, fix):
    with pytest.raises(JemlabError) as err:
        model.predict(make())
    assert fix in str(err.value) and "\n" not in str(err.value)


# --- out-of-distribution scores -------------------------------------------------------------------------------------


def test_ood_score_matches_the_demo_servers_verdict(model, trained, images):
    from jemlab.serve import create_app

    reference = model.fit_reference(size=50)  # the same 50 test images as serve's --reference-size 50
    assert reference.size == 50 and reference.source == "50 random fashion-mnist test images"
    noise = torch.rand(4, 1, 28, 28)
    x = torch.cat([torch.from_numpy(images[0][:4]).float().div(255).unsqueeze(1), noise])
    scores = model.ood_score(x)
    assert scores.log_px.shape == scores.grad_norm.shape == scores.score.shape == (8,)
    assert ((scores.log_px_percentile >= 0) & (scores.log_px_percentile <= 1)).all()
    assert torch.equal(scores.score, torch.minimum(scores.log_px_percentile, scores.grad_percentile))
    assert torch.equal(scores.out_of_distribution, scores.score < 0.025)
    assert torch.allclose(scores.log_px, -model.energy(x), atol=1e-5)
    app = create_app(trained[0], reference_size=50)
    for i in range(len(x)):
        served = app.predict({"pixels": x[i].flatten().tolist()})
        assert served["percentile"] == pytest.approx(float(scores.log_px_percentile[i]), abs=1e-6)
        assert served["grad_percentile"] == pytest.approx(float(scores.grad_percentile[i]), abs=1e-6)
        assert served["verdict"] == ("out-of-distribution" if scores.out_of_distribution[i] else "in-distribution")
        assert served["reasons"] == scores.reasons[i]


def test_ood_score_fits_its_reference_once_and_takes_given_images(model, images):
    fresh = jemlab.Model(model.run)
    assert fresh.reference is None
    fresh.ood_score(images[0][:2])
    assert fresh.reference is not None and fresh.reference.size == 100  # all 100 test images (1,000 asked)
    first = fresh.reference
    fresh.ood_score(images[0][:2])
    assert fresh.reference is first
    ref = fresh.fit_reference(images[0], labels=images[1])
    assert ref.size == 12 and 0 <= ref.accuracy <= 1 and fresh.reference is ref
    with pytest.raises(JemlabError, match="quantile"):
        fresh.ood_score(images[0], quantile=1.5)
    with pytest.raises(JemlabError, match="2 labels for 12"):
        fresh.fit_reference(images[0], labels=[0, 1])


# --- samples ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["model", "egc_model"])
def test_samples_are_images_in_unit_range_reproducible_with_a_seed(which, request):
    m = request.getfixturevalue(which)
    x = m.sample(5, seed=3)
    assert x.shape == (5, 1, 28, 28) and x.dtype == torch.float32
    assert float(x.min()) >= 0 and float(x.max()) <= 1
    assert torch.equal(x, m.sample(5, seed=3))
    assert not torch.equal(x, m.sample(5, seed=4))
    # Sample i depends on the seed and i only (up to float rounding of batched EGC denoising).
    assert torch.allclose(m.sample(3, seed=3), x[:3], atol=1e-4)
    per_class = m.draw(10, labels=torch.arange(10), seed=0)
    assert per_class.images.shape == (10, 1, 28, 28) and per_class.labels.tolist() == list(range(10))
    assert per_class.protocol["conditional"] is True and 0 <= m.self_agreement(per_class) <= 1
    assert torch.equal(per_class.images, ((per_class.x + 1) / 2).clamp(0, 1))


def test_sample_labels_by_index_name_or_list(model):
    by_name = model.draw(2, labels="Sandal", steps=1)
    assert by_name.labels.tolist() == [5, 5]
    assert torch.equal(by_name.images, model.sample(2, labels=5, steps=1))
    assert torch.equal(model.sample(2, labels=[5, "Sandal"], steps=1), by_name.images)
    assert model.draw(3, steps=0, init="noise").protocol["init"] == "noise"


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"n": 0}, "n must be an integer >= 1"),
        ({"n": 2, "labels": [1]}, "got 1 labels for 2 samples"),
        ({"n": 1, "labels": "Sandals"}, "unknown class name 'Sandals'"),
        ({"n": 1, "labels": 10}, "classes 0 to 9"),
        ({"n": 1, "labels": torch.tensor([0.5])}, "integer array"),
        ({"n": 1, "steps": -1}, "steps must be"),
        ({"n": 1, "seed": -1}, "seed must be"),
        ({"n": 1, "init": "buffers"}, "unknown init 'buffers'"),
    ],
)
def test_bad_sample_requests_are_one_line_errors(model, kwargs, message):
    with pytest.raises(JemlabError, match=message.replace("(", r"\(")) as err:
        model.sample(**kwargs)
    assert "\n" not in str(err.value)


def test_self_agreement_needs_labels(model):
    with pytest.raises(JemlabError, match="labels="):
        model.self_agreement(model.draw(1, steps=0))


# --- the example and the API reference ----------------------------------------------------------------------------


def test_quickstart_example_runs(tmp_path):
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "quickstart.py"), "--out", str(tmp_path), "--epochs", "1"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    for expected in ("p(y|x) of the first image", "energy E(x)", "uniform noise: typicality", "sandals classified"):
        assert expected in result.stdout


def _docs_builder():
    pytest.importorskip("pdoc")
    spec = importlib.util.spec_from_file_location("build_api_docs", ROOT / "scripts" / "build_api_docs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_api_reference_builds_without_warnings_or_broken_references(tmp_path):
    problems = _docs_builder().build(tmp_path / "api")
    assert problems == []
    page = (tmp_path / "api" / "jemlab.html").read_text()
    for anchor in ('id="load"', 'id="train"', 'id="Model.sample"', 'id="Model.ood_score"', 'id="OODScores.score"'):
        assert anchor in page


def test_api_reference_check_fails_on_broken_references(tmp_path, monkeypatch):
    package = tmp_path / "src" / "brokendocs"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(
        textwrap.dedent(
            '''
            """A package whose docs point at `brokendocs.gone` and `Thing.nothing`, and at `Thing.there`."""

            __all__ = ["Thing", "missing"]


            class Thing:
                """A class."""

                def there(self) -> None:
                    """A method."""
            '''
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path / "src"))
    problems = _docs_builder().build(tmp_path / "api", modules=("brokendocs",))
    assert any("unresolved reference `brokendocs.gone`" in p for p in problems)
    assert any("unresolved reference `Thing.nothing`" in p for p in problems)
    assert not any("Thing.there" in p for p in problems)
    assert any(p.startswith("pdoc warning:") and "missing" in p for p in problems)
