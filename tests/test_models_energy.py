"""Energies follow the one sign convention; every backbone builds and gives the right shapes."""

from __future__ import annotations

import pytest
import torch

from jemlab.energy import joint_energy, marginal_energy
from jemlab.errors import ConfigError
from jemlab.models import BACKBONES, build_model


def test_marginal_energy_is_negative_logsumexp():
    logits = torch.tensor([[0.0, 0.0], [1.0, 2.0]])
    expected = -torch.log(torch.exp(logits).sum(1))
    assert torch.allclose(marginal_energy(logits), expected)
    assert torch.allclose(marginal_energy(logits)[0], -torch.log(torch.tensor(2.0)))


def test_joint_energy_and_bayes_rule():
    torch.manual_seed(0)
    logits = torch.randn(5, 3)
    y = torch.tensor([0, 2, 1, 1, 0])
    assert torch.equal(joint_energy(logits, y), -logits[torch.arange(5), y])
    # p(y|x) = exp(−E(x,y)) / exp(−E(x)) is the softmax: classifier and EBM are one distribution.
    p = torch.exp(-joint_energy(logits, y) + marginal_energy(logits))
    assert torch.allclose(p, logits.softmax(1)[torch.arange(5), y])


@pytest.mark.parametrize(
    ("name", "options", "shape"),
    [
        ("cnn", {"width": 8}, (1, 28, 28)),
        ("course_cnn", {}, (1, 28, 28)),
        ("mlp", {"hidden": [32]}, (1, 28, 28)),
        ("wide_resnet", {"depth": 10, "widen": 1}, (3, 32, 32)),
        ("cnn", {"width": 8}, (3, 32, 32)),
    ],
)
def test_backbones_build_and_give_energies(name, options, shape):
    head = "separate" if name == "course_cnn" else "logsumexp"
    model = build_model(name, shape, 10, head, options)
    x = torch.rand(4, *shape) * 2 - 1
    logits, energy = model.logits_and_energy(x)
    assert logits.shape == (4, 10) and energy.shape == (4,)
    assert torch.allclose(energy, model.energy(x))
    if head == "logsumexp":
        assert torch.allclose(energy, -torch.logsumexp(logits, 1))


def test_course_cnn_has_256_features():
    model = build_model("course_cnn", (1, 28, 28), 10, "separate")
    assert model.backbone.feature_dim == 256
    assert model.density_head is not None


def test_unknown_model_and_option_errors_list_choices():
    with pytest.raises(ConfigError, match=r"choose one of: .*cnn"):
        build_model("resnet9000", (1, 28, 28), 10)
    with pytest.raises(ConfigError, match="accepts: width"):
        build_model("cnn", (1, 28, 28), 10, options={"depth": 3})
    assert set(BACKBONES) >= {"cnn", "course_cnn", "mlp", "wide_resnet"}


def test_wide_resnet_28_10_size():
    model = build_model("wide_resnet", (3, 32, 32), 10, options={"depth": 28, "widen": 10})
    n = sum(p.numel() for p in model.parameters())
    assert 36e6 < n < 37e6  # WRN-28-10 has about 36.5M parameters


@pytest.mark.parametrize("head", ["logsumexp", "separate"])
@pytest.mark.parametrize("joint", [False, True])
def test_feature_energy_and_gradient_equal_the_energies_and_autograd(head, joint):
    """The by-hand head gradient (used by the explicit SGLD gradient) states the same energies as `energy.py`."""
    from jemlab.models import build_model

    torch.manual_seed(0)
    model = build_model("mlp", (1, 28, 28), 10, head, {})
    x = torch.rand(5, 1, 28, 28) * 2 - 1
    labels = torch.tensor([0, 3, 9, 1, 1]) if joint else None
    features = model.backbone(x).detach().requires_grad_(True)
    energy, grad = model.feature_energy_and_gradient(features, labels)
    expected = model.joint_energy(x, labels) if joint else model.energy(x)
    torch.testing.assert_close(energy, expected)
    heads = model.classifier if (joint or head == "logsumexp") else model.density_head
    reference = (
        -heads(features).gather(1, labels.view(-1, 1)).sum()
        if joint
        else (-torch.logsumexp(heads(features), 1).sum() if head == "logsumexp" else -heads(features).sum())
    )
    (autograd,) = torch.autograd.grad(reference, features)
    torch.testing.assert_close(grad, autograd)


def test_an_explicit_plan_does_not_keep_its_model_alive():
    import gc
    import weakref

    from jemlab.accel.explicit import explicit_gradient
    from jemlab.models import build_model

    model = build_model("course_cnn", (1, 28, 28), 10, "separate", {})
    explicit_gradient(model, (2, 1, 28, 28), torch.float32, False)
    ref = weakref.ref(model)
    del model
    gc.collect()
    assert ref() is None
