"""Known-answer tests for classification, calibration, OOD metrics/scores and the report writer."""

from __future__ import annotations

import base64
import itertools
import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from jemlab.errors import JemlabError
from jemlab.evaluation import calibration as cal
from jemlab.evaluation import classification as cls
from jemlab.evaluation import ood_metrics, ood_scores, ood_sets
from jemlab.evaluation.report import flatten_metrics, write_report

# ------------------------------------------------------------------------------------ classification


def test_accuracy_and_nll_known_values():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 3.0]])
    labels = torch.tensor([0, 0, 1])
    assert cls.accuracy(logits, labels) == pytest.approx(2 / 3)
    expected = (
        -(
            math.log(math.exp(2) / (math.exp(2) + 1))
            + math.log(1 / (1 + math.e))
            + math.log(math.exp(3) / (math.exp(1) + math.exp(3)))
        )
        / 3
    )
    assert cls.nll(logits, labels) == pytest.approx(expected, rel=1e-9)
    # numpy input gives the same numbers
    assert cls.nll(logits.numpy(), labels.numpy()) == pytest.approx(expected, rel=1e-9)


def test_confusion_matrix_and_per_class_accuracy():
    preds = np.array([0, 1, 1, 2])
    labels = np.array([0, 0, 1, 2])
    cm = cls.confusion_matrix(preds, labels, num_classes=4)
    assert cm.tolist() == [[1, 1, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 0]]
    pca = cls.per_class_accuracy(preds, labels, num_classes=4)
    assert pca[:3].tolist() == [0.5, 1.0, 1.0]
    assert np.isnan(pca[3])
    logits = np.eye(4)[preds] * 5.0
    m = cls.classification_metrics(logits, labels)
    assert m["accuracy"] == 0.75
    assert m["per_class_accuracy"]["3"] is None
    assert m["confusion_matrix"] == cm.tolist()


def test_bad_labels_raise_user_error():
    with pytest.raises(JemlabError, match="labels must lie"):
        cls.accuracy(torch.zeros(3, 2), torch.tensor([0, 1, 2]))
    with pytest.raises(JemlabError, match="shape"):
        cls.accuracy(torch.zeros(3, 2), torch.tensor([0, 1]))


def test_collect_logits_batches_and_no_grad():
    lin = nn.Linear(4, 3)
    x = torch.randn(10, 4)
    y = torch.arange(10) % 3
    pairs = [(x[i : i + 4], y[i : i + 4]) for i in range(0, 10, 4)]
    logits, labels = cls.collect_logits(lin, pairs)
    assert logits.shape == (10, 3) and not logits.requires_grad
    assert torch.equal(labels, y)
    torch.testing.assert_close(logits, lin(x).detach())
    logits2, labels2 = cls.collect_logits(lin, [x[:5], x[5:]])
    assert labels2 is None and torch.allclose(logits2, logits)
    assert lin.weight.grad is None


# ------------------------------------------------------------------------------------ calibration


def test_ece_bernoulli_calibrated_predictor_is_near_zero():
    rng = np.random.default_rng(0)
    c = rng.uniform(0.1, 1.0, size=300_000)
    correct = rng.random(c.size) < c
    assert cal.expected_calibration_error(c, correct, n_bins=20) < 0.01


def test_ece_exactly_calibrated_construction_is_zero():
    conf = np.array([0.75, 0.75, 0.75, 0.75, 0.5, 0.5])
    correct = np.array([1, 1, 1, 0, 1, 0])
    assert cal.expected_calibration_error(conf, correct) == pytest.approx(0.0, abs=1e-12)
    assert cal.max_calibration_error(conf, correct) == pytest.approx(0.0, abs=1e-12)
    # Same thing from logits: two classes with p = 0.75 (logit gap log 3) and p = 0.5.
    logits = np.array([[math.log(3), 0]] * 4 + [[0.0, 0.0]] * 2)
    labels = np.array([0, 0, 0, 1, 0, 1])
    m = cal.calibration_metrics(logits, labels)
    assert m["ece"] == pytest.approx(0.0, abs=1e-12)


def test_ece_overconfident_half_right_is_one_half():
    n = 1000
    logits = np.tile([[100.0, 0.0]], (n, 1))
    labels = np.arange(n) % 2
    m = cal.calibration_metrics(logits, labels, n_bins=20)
    assert m["ece"] == pytest.approx(0.5, abs=1e-12)
    assert m["mce"] == pytest.approx(0.5, abs=1e-12)
    rd = cal.reliability_data(np.ones(n), labels == 0, n_bins=20)
    assert rd.bin_count[-1] == n and rd.bin_count[:-1].sum() == 0


def test_brier_known_value():
    probs = np.array([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1]])
    labels = np.array([0, 2])
    # (0.09 + 0.04 + 0.01 + 0.01 + 0.64 + 0.81) / 2
    assert cal.brier_score(probs, labels, from_logits=False) == pytest.approx(0.8)
    # From logits: uniform logits over 4 classes → (3/16 + 9/16) = 0.75
    assert cal.brier_score(np.zeros((5, 4)), np.zeros(5, int)) == pytest.approx(0.75)


@pytest.mark.parametrize("true_t", [0.5, 2.5])
def test_temperature_scaling_recovers_temperature(true_t):
    g = torch.Generator().manual_seed(1)
    true_logits = torch.randn(20_000, 10, generator=g, dtype=torch.float64) * 3.0
    labels = torch.multinomial(torch.softmax(true_logits, 1), 1, generator=g).squeeze(1)
    t = cal.fit_temperature(true_logits * true_t, labels)
    assert t == pytest.approx(true_t, rel=0.05)
    # Scaling back gives lower NLL than the miscalibrated logits.
    scaled = cal.apply_temperature(true_logits * true_t, t)
    assert cls.nll(scaled, labels) < cls.nll(true_logits * true_t, labels)


def test_reliability_plot_writes_png(tmp_path):
    rd = cal.reliability_data(np.linspace(0.05, 1, 50), np.arange(50) % 2, 10)
    p = cal.plot_reliability_diagram({"a": rd, "b": rd}, tmp_path / "r.png")
    assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------------------------ OOD metrics


def _brute_auroc(s_in, s_out):
    tot = 0.0
    for a, b in itertools.product(s_in, s_out):
        tot += 1.0 if a > b else (0.5 if a == b else 0.0)
    return tot / (len(s_in) * len(s_out))


def test_auroc_separable_reversed_identical():
    assert ood_metrics.auroc([3, 4, 5], [0, 1, 2]) == 1.0
    assert ood_metrics.auroc([0, 1, 2], [3, 4, 5]) == 0.0
    s = np.random.default_rng(0).normal(size=50)
    assert ood_metrics.auroc(s, s) == 0.5
    assert ood_metrics.auroc([1, 1, 1], [1, 1]) == 0.5


def test_auroc_hand_example_with_ties_matches_pair_counting():
    s_in = [0.1, 0.4, 0.35, 0.8, 0.4]
    s_out = [0.4, 0.2, 0.5, 0.1]
    # Pairs won: 0.1 → tie with 0.1 (0.5); 0.4 → beats 0.2, 0.1, ties 0.4 (2.5) [x2];
    # 0.35 → beats 0.2, 0.1 (2); 0.8 → beats all (4). Total 0.5 + 5 + 2 + 4 = 11.5 of 20.
    assert ood_metrics.auroc(s_in, s_out) == pytest.approx(11.5 / 20)
    assert ood_metrics.auroc(s_in, s_out) == pytest.approx(_brute_auroc(s_in, s_out))
    rng = np.random.default_rng(3)
    a, b = rng.integers(0, 5, 40), rng.integers(1, 7, 30)  # many ties
    assert ood_metrics.auroc(a, b) == pytest.approx(_brute_auroc(a, b))


def test_rankdata_average_matches_definition():
    r = ood_metrics.rankdata_average(np.array([10, 20, 10, 30, 20, 20]))
    assert r.tolist() == [1.5, 4.0, 1.5, 6.0, 4.0, 4.0]


def test_average_precision_hand_example():
    # Descending: 0.9(+) 0.8(-) 0.6(+) 0.3(-): AP = 1/2·1 + 1/2·2/3.
    assert ood_metrics.aupr([0.9, 0.6], [0.8, 0.3]) == pytest.approx(0.5 + 1 / 3)
    # AUPR-Out: OOD positive with negated scores: -0.3(+) -0.6(-) -0.8(+) -0.9(-).
    assert ood_metrics.aupr([0.9, 0.6], [0.8, 0.3], positive="out") == pytest.approx(0.5 + 1 / 3)
    assert ood_metrics.aupr([3, 4], [1, 2]) == 1.0


def test_fpr_at_95_tpr_hand_example():
    s_in = np.arange(1, 21, dtype=float)  # 20 scores; 95% TPR keeps the top 19 → threshold 2
    s_out = [0.5, 1.5, 2.5, 3.0]
    assert ood_metrics.fpr_at_tpr(s_in, s_out, 0.95) == 0.5
    assert ood_metrics.fpr_at_tpr(s_in, s_out, 0.5) == 0.0  # threshold 11
    assert ood_metrics.fpr_at_tpr(s_in, [100.0], 0.95) == 1.0
    m = ood_metrics.ood_metrics(s_in, s_out)
    assert set(m) >= {"auroc", "aupr_in", "aupr_out", "fpr95"}


def test_nonfinite_scores_are_a_user_error():
    with pytest.raises(JemlabError, match="non-finite"):
        ood_metrics.auroc([1.0, float("nan")], [0.0])


# ------------------------------------------------------------------------------------ OOD scores


class _LinearJEM(nn.Module):
    """logits = W x + b on flattened images; energy = -logsumexp (JEM) or a separate head."""

    def __init__(self, d: int, c: int, separate: bool = False) -> None:
        super().__init__()
        self.lin = nn.Linear(d, c)
        self.head = nn.Linear(d, 1) if separate else None

    def logits(self, x):
        return self.lin(x.flatten(1))

    def energy(self, x):
        if self.head is None:
            return -torch.logsumexp(self.logits(x), dim=1)
        return -self.head(x.flatten(1)).squeeze(1)


def test_log_px_equals_energy_score_for_logsumexp_model_only():
    torch.manual_seed(0)
    x = torch.rand(6, 1, 2, 2) * 2 - 1
    m = _LinearJEM(4, 3)
    torch.testing.assert_close(ood_scores.score_log_px(m, x), ood_scores.score_energy(m, x))
    s = _LinearJEM(4, 3, separate=True)
    assert not torch.allclose(ood_scores.score_log_px(s, x), ood_scores.score_energy(s, x))
    msp = ood_scores.score_max_softmax(m, x)
    assert ((msp >= 1 / 3 - 1e-6) & (msp <= 1)).all()


def test_grad_norm_score_is_analytic_and_leaves_parameter_grads_alone():
    torch.manual_seed(0)
    m = _LinearJEM(4, 3)
    x = torch.rand(5, 1, 2, 2) * 2 - 1
    # E = -LSE(Wx + b) → ∇ₓE = -Wᵀ softmax(Wx + b)
    p = torch.softmax(m.logits(x), 1).detach()
    expected = -(p @ m.lin.weight.detach()).norm(dim=1)
    m.lin.bias.grad = torch.full_like(m.lin.bias, 7.0)  # pre-existing grad must survive
    got = ood_scores.score_grad_norm(m, x)
    torch.testing.assert_close(got, expected)
    assert m.lin.weight.grad is None
    assert torch.equal(m.lin.bias.grad, torch.full_like(m.lin.bias, 7.0))
    assert not x.requires_grad
    batched = ood_scores.compute_scores("grad_norm", m, x, batch_size=2)
    torch.testing.assert_close(batched, expected)


class _FlatFeatures(_LinearJEM):
    def features(self, x):
        return x.flatten(1)


def test_mahalanobis_score_matches_the_closed_form():
    # Two classes with means (±2, 0) and a shared covariance diag(1, 4): the fitted score of a point is minus its
    # squared Mahalanobis distance to the nearer mean (up to sampling error in the fitted mean and covariance).
    g = torch.Generator().manual_seed(0)
    n = 20000
    y = torch.arange(2).repeat(n // 2)
    means = torch.tensor([[-2.0, 0.0], [2.0, 0.0]])
    x = means[y] + torch.randn(n, 2, generator=g) * torch.tensor([1.0, 2.0])
    model = _FlatFeatures(2, 2)
    score = ood_scores.MahalanobisScore(model, x.view(n, 1, 1, 2), y, num_classes=2)
    probe = torch.tensor([[2.0, 0.0], [0.0, 4.0], [-5.0, 2.0]])
    expected = -torch.tensor([0.0, 4.0 + 16.0 / 4.0, 9.0 + 4.0 / 4.0])
    torch.testing.assert_close(score(model, probe.view(3, 1, 1, 2)), expected, atol=0.15, rtol=0.03)
    far = torch.randn(500, 2, generator=g) + torch.tensor([0.0, 30.0])
    near = means[torch.arange(2).repeat(250)] + torch.randn(500, 2, generator=g) * torch.tensor([1.0, 2.0])
    s_in, s_out = score(model, near.view(-1, 1, 1, 2)), score(model, far.view(-1, 1, 1, 2))
    assert ood_metrics.auroc(s_in, s_out) == 1.0


def test_fitted_scores_are_standardised_on_reference_images_and_need_every_class():
    g = torch.Generator().manual_seed(1)
    model = _FlatFeatures(4, 3)
    x = torch.randn(300, 1, 2, 2, generator=g)
    y = torch.arange(3).repeat(100)
    ref = torch.randn(200, 1, 2, 2, generator=g)
    fns = ood_scores.fit_scores(["grad_norm", "grad_norm+mahalanobis"], model, x, y, ref, num_classes=3)
    assert set(fns) == {"grad_norm+mahalanobis"}
    summed = ood_scores.compute_scores(fns["grad_norm+mahalanobis"], model, ref)
    assert abs(float(summed.mean())) < 1e-4  # each part has mean 0 on the reference images
    with pytest.raises(JemlabError, match="classes \\[2\\]"):
        ood_scores.fit_scores(["mahalanobis"], model, x[y < 2], y[y < 2], ref, num_classes=3)


def test_ood_set_builders():
    g = torch.Generator().manual_seed(0)
    n = 8
    # Image k is constant 2^k / 256, so 2·256·(x_i + x_j)/2 has two bits set iff i != j.
    x = torch.stack([torch.full((1, 3, 3), 2.0**k / 256) for k in range(n)])
    inter = ood_sets.interpolations(x, 200, g)
    codes = torch.round(inter[:, 0, 0, 0] * 2 * 256).long()
    assert all(bin(int(c)).count("1") == 2 for c in codes)
    sets = ood_sets.build_ood_sets(x, generator=g)
    assert set(sets) == {"uniform", "gaussian", "interp", "vflip", "hflip", "invert"}
    for v in sets.values():
        assert v.shape == x.shape and v.min() >= -1 and v.max() <= 1
    img = torch.arange(4.0).reshape(1, 1, 2, 2)
    assert ood_sets.flip_vertical(img).flatten().tolist() == [2, 3, 0, 1]
    assert ood_sets.flip_horizontal(img).flatten().tolist() == [1, 0, 3, 2]
    assert torch.equal(ood_sets.invert(img), -img)
    with pytest.raises(JemlabError, match="unknown OOD set"):
        ood_sets.build_ood_sets(x, kinds=("nope",))


def test_score_histogram_png(tmp_path):
    p = ood_metrics.plot_score_histogram(np.random.randn(100), {"noise": np.random.randn(80) - 2}, tmp_path / "h.png")
    assert p.stat().st_size > 1000


# ------------------------------------------------------------------------------------ report


def test_report_embeds_image_and_values(tmp_path):
    png = cal.plot_reliability_diagram(
        cal.reliability_data(np.array([0.9, 0.8]), np.array([1, 0]), 5), tmp_path / "fig.png"
    )
    metrics = {
        "model": "toy",
        "classification": {"accuracy": 0.987654321, "per_class_accuracy": {"0": 1.0, "1": None}},
        "ood": {"log_px": {"uniform": {"auroc": 0.4321}}},
        "weird": {"nan": float("nan"), "arr": np.arange(3), "t": torch.tensor(2.5)},
    }
    paths = write_report(tmp_path / "out", metrics, [("Reliability", png)], ["seed 0", "a<b"])
    html = paths["html"].read_text()
    assert base64.b64encode(png.read_bytes()).decode() in html
    assert "data:image/png;base64," in html
    assert "0.9877" in html and "0.4321" in html and "ood" in html
    assert "a&lt;b" in html
    assert "http://" not in html and "https://" not in html and "<script" not in html
    loaded = json.loads(paths["metrics"].read_text())
    assert loaded["classification"]["accuracy"] == 0.987654321
    assert loaded["weird"] == {"nan": None, "arr": [0, 1, 2], "t": 2.5}
    md = paths["markdown"].read_text()
    assert "| classification.accuracy |" not in md  # section keys are relative
    assert "| accuracy | 0.9877 |" in md and "![Reliability](../fig.png)" in md
    assert ("log_px.uniform.auroc", 0.4321) in flatten_metrics(metrics["ood"])


def test_report_missing_figure_is_user_error(tmp_path):
    with pytest.raises(JemlabError, match="not found"):
        write_report(tmp_path, {"a": 1}, [("x", tmp_path / "missing.png")])
