"""Known answers for Fréchet distance, KID, mode coverage; the feature net; and a run_suite smoke test."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
import torch
from torch import nn

from jemlab.errors import JemlabError
from jemlab.evaluation.suite import SuiteOptions, run_suite
from jemlab.quality import metrics as sq
from jemlab.quality.feature_net import (
    FeatureNet,
    load_feature_net,
    save_feature_net,
    to_model_range,
    train_feature_net,
)

# ------------------------------------------------------------------------------------ Fréchet / KID


def test_frechet_distance_of_a_set_with_itself_is_zero():
    f = np.random.default_rng(0).normal(size=(500, 8)) @ np.random.default_rng(1).normal(size=(8, 8))
    assert sq.frechet_distance_from_features(f, f) == pytest.approx(0.0, abs=1e-8)


def test_frechet_distance_closed_forms():
    # 1-D: (m1 - m2)² + (s1 - s2)²
    assert sq.frechet_distance([1.0], [[4.0]], [3.0], [[9.0]]) == pytest.approx(4.0 + 1.0)
    # Commuting (diagonal) covariances: ||Δμ||² + Σ (√a - √b)²
    a, b = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 16.0])
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    expected = 5.0 + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert sq.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected)


def test_frechet_distance_matches_sqrtm_formula_for_non_commuting_covariances():
    scipy_linalg = pytest.importorskip("scipy.linalg")
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=(5, 5)), rng.normal(size=(5, 5))
    s1, s2 = a @ a.T + 0.1 * np.eye(5), b @ b.T + 0.1 * np.eye(5)
    mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
    covmean = scipy_linalg.sqrtm(s1 @ s2).real
    ref = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean)
    assert sq.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(ref, rel=1e-8)


def test_frechet_distance_from_samples_approaches_closed_form():
    rng = np.random.default_rng(3)
    f1 = rng.normal(size=(40_000, 3))
    f2 = rng.normal(size=(40_000, 3)) * np.array([2.0, 1.0, 1.0]) + np.array([1.0, 0.0, 0.0])
    # ||Δμ||² = 1, (√4 - √1)² = 1 → 2
    assert sq.frechet_distance_from_features(f1, f2) == pytest.approx(2.0, abs=0.05)


def test_polynomial_mmd_matches_brute_force():
    rng = np.random.default_rng(4)
    x, y = rng.normal(size=(6, 3)), rng.normal(size=(5, 3)) + 0.5

    def k(a, b):
        return (a @ b / 3 + 1) ** 3

    xx = sum(k(x[i], x[j]) for i in range(6) for j in range(6) if i != j) / 30
    yy = sum(k(y[i], y[j]) for i in range(5) for j in range(5) if i != j) / 20
    xy = sum(k(x[i], y[j]) for i in range(6) for j in range(5)) / 30
    assert sq.polynomial_mmd2_unbiased(x, y) == pytest.approx(xx + yy - 2 * xy)


def test_kid_same_distribution_near_zero_and_shift_positive():
    rng = np.random.default_rng(5)
    a, b = rng.normal(size=(1000, 16)), rng.normal(size=(1000, 16))
    same_mean, same_std = sq.kernel_inception_distance(a, b, n_subsets=5, subset_size=500)
    shift_mean, _ = sq.kernel_inception_distance(a, b + 1.0, n_subsets=5, subset_size=500)
    assert abs(same_mean) < 0.01 and same_std >= 0
    assert shift_mean > 0.1 and shift_mean > 20 * abs(same_mean)


def test_class_histogram_entropy_and_sample_accuracy():
    assert sq.class_histogram_entropy(np.arange(100) % 10, 10) == pytest.approx(1.0)
    h0 = sq.class_histogram_entropy(np.zeros(50, int), 10)
    assert h0 == 0.0 and str(h0) == "0.0"
    assert sq.class_histogram_entropy(np.arange(10) % 2, 4) == pytest.approx(0.5)
    logits = np.eye(3)[[0, 1, 1, 2]]
    r = sq.sample_class_accuracy(logits, [0, 1, 2, 2])
    assert r["accuracy"] == 0.75
    assert r["per_class_accuracy"] == {"0": 1.0, "1": 1.0, "2": 0.5}


def test_inception_is_reported_unavailable(tmp_path):
    ok, reason = sq.inception_available()
    assert ok is False and "unavailable" in reason
    (tmp_path / "w.pth").write_bytes(b"x")
    assert sq.inception_available(tmp_path / "w.pth")[0] is False


def test_image_grid_shape():
    grid = sq.image_grid(torch.zeros(5, 1, 4, 4), nrow=3, pad=1)
    assert grid.shape == (2 * 5 + 1, 3 * 5 + 1, 3)


# ------------------------------------------------------------------------------------ feature net


def _toy_images(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """uint8 8×8 images: class 0 bright top half, class 1 bright bottom half, plus noise."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    x = rng.integers(0, 60, (n, 8, 8)).astype(np.int64)
    for i in range(n):
        if y[i] == 0:
            x[i, :4] += 180
        else:
            x[i, 4:] += 180
    return x.astype(np.uint8), y


def test_to_model_range():
    x = to_model_range(np.array([[[0, 255]]], dtype=np.uint8))
    assert x.shape == (1, 1, 1, 2) and x.flatten().tolist() == [-1.0, 1.0]
    assert to_model_range(np.zeros((2, 5, 5, 3), np.uint8)).shape == (2, 3, 5, 5)
    with pytest.raises(JemlabError, match=r"\[-1, 1\]"):
        to_model_range(np.full((1, 1, 2, 2), 200.0, np.float32))


def test_feature_net_trains_saves_and_loads(tmp_path):
    x, y = _toy_images(400, 0)
    net = train_feature_net(x, y, 2, epochs=2, batch_size=64, seed=0, dataset_name="toy", widths=(8, 16, 32))
    assert net.meta["accuracy"] > 0.9 and net.meta["dataset"] == "toy"
    assert net.meta["image_shape"] == [1, 8, 8]
    xt = to_model_range(x[:10])
    feats = net.features(xt)
    assert feats.shape == (10, 32)
    path = save_feature_net(net, tmp_path / "fnet.safetensors")
    raw = path.read_bytes()
    header_len = struct.unpack("<Q", raw[:8])[0]
    assert raw[8:9] == b"{" and header_len < len(raw)  # safetensors, not pickle
    side = json.loads((tmp_path / "fnet.json").read_text())
    assert side["dataset"] == "toy" and side["epochs"] == 2 and side["widths"] == [8, 16, 32]
    assert side["pool"] == "max"
    loaded = load_feature_net(path)
    torch.testing.assert_close(loaded.features(xt), feats.detach())
    assert loaded.meta["accuracy"] == net.meta["accuracy"]
    (tmp_path / "fnet.json").unlink()
    with pytest.raises(JemlabError, match="sidecar"):
        load_feature_net(path)


def test_cached_feature_nets_are_keyed_by_the_test_split_not_just_the_name(tmp_path):
    from jemlab.data import load_dataset
    from jemlab.data.testing import write_idx_dataset
    from jemlab.quality.reference import feature_net_path

    one = write_idx_dataset(tmp_path / "one", n_train=200, n_test=50, seed=0)
    other = write_idx_dataset(tmp_path / "other", n_train=200, n_test=50, seed=1)
    split = load_dataset("fashion-mnist", one, val_size=20, seed=0, download=False)
    resplit = load_dataset("fashion-mnist", one, val_size=50, seed=3, download=False, limit=100)
    stand_in = load_dataset("fashion-mnist", other, val_size=20, seed=0, download=False)
    # the same files share one net whatever the validation split, seed or limit; other files under the name do not
    assert feature_net_path(split, tmp_path) == feature_net_path(resplit, tmp_path)
    assert feature_net_path(stand_in, tmp_path) != feature_net_path(split, tmp_path)
    assert feature_net_path(split, tmp_path).parent.parent == tmp_path / "feature_nets" / "fashion-mnist"


# ------------------------------------------------------------------------------------ suite


class _DS:
    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.y)

    def batch(self, idx: torch.Tensor):
        return self.x[idx], self.y[idx]


class _Splits:
    def __init__(self, val, test) -> None:
        self.val, self.test = val, test


class _TinyJEM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.Tanh(), nn.Linear(16, 2))

    def logits(self, x):
        return self.net(x)

    def energy(self, x):
        return -torch.logsumexp(self.logits(x), 1)


def test_run_suite_end_to_end(tmp_path):
    torch.manual_seed(0)
    x, y = _toy_images(300, 1)
    xs, ys = to_model_range(x), torch.as_tensor(y)
    splits = _Splits(_DS(xs[:100], ys[:100]), _DS(xs[100:], ys[100:]))
    model = _TinyJEM()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(30):
        loss = nn.functional.cross_entropy(model.logits(xs[:100]), ys[:100])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.train()
    fnet = FeatureNet(1, 2, widths=(4, 8, 8)).eval()
    calls = []

    def sample_fn(n, labels, gen):
        calls.append(labels is None)
        return torch.rand(n, 1, 8, 8, generator=gen) * 2 - 1

    options = SuiteOptions.quick(
        n_test=120,
        n_ood=50,
        pgd_n=16,
        pgd_steps=3,
        n_samples=40,
        sample_batch=20,
        defence_steps=1,
        defence_n=4,
        kid_subset_size=20,
        dataset_name="toy",
    )
    metrics = run_suite(
        model,
        splits,
        tmp_path / "rep",
        ood_sets={"noise": torch.zeros(30, 1, 8, 8)},
        sample_fn=sample_fn,
        feature_net=fnet,
        options=options,
    )
    assert model.training  # mode restored
    assert metrics["classification"]["accuracy"] > 0.9
    assert metrics["calibration"]["temperature"] > 0
    assert metrics["ood"]["energy_equals_log_px"] is True
    assert set(metrics["ood"]["max_softmax"]) == {"noise", "uniform", "gaussian", "interp", "vflip", "hflip", "invert"}
    assert metrics["ood"]["grad_norm"]["noise"]["n_out"] == 30
    lin = metrics["robustness"]["linf"]
    assert lin["undefended"]["robust_accuracy"][0] == lin["undefended"]["clean_accuracy"]
    assert "SGLD defence K=1" in lin
    assert set(metrics["samples"]["feature_space"]) >= {"frechet_unconditional", "kid_unconditional"}
    assert True in calls and False in calls
    out = tmp_path / "rep"
    for name in ("metrics.json", "report.html", "report.md", "samples_unconditional.npz"):
        assert (out / name).is_file()
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") >= 8
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["classification"]["accuracy"] == metrics["classification"]["accuracy"]
    npz = np.load(out / "samples_conditional.npz")
    assert npz["images"].shape == (40, 1, 8, 8) and npz["labels"].shape == (40,)
    assert npz["images"].min() >= 0 and npz["images"].max() <= 1 and npz["labels"].dtype == np.int64
    assert all(p.grad is None or p.grad.abs().sum() >= 0 for p in model.parameters())


def test_suite_options_validation():
    with pytest.raises(JemlabError, match="unknown suite parts"):
        SuiteOptions(parts=("classification", "nope"))
    with pytest.raises(JemlabError, match="OOD scores"):
        SuiteOptions(ood_scores=("bogus",))


def test_the_suite_runs_the_parts_the_cli_and_options_know_in_the_same_order():
    from jemlab.evaluation.defaults import PARTS as PART_NAMES
    from jemlab.evaluation.suite import PARTS

    assert tuple(PARTS) == PART_NAMES
