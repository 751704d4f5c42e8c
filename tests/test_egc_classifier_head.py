"""EGC's classifier apart from its energy: a convolutional head on the trunk's features (``model.classifier=head``)
and the share of the cross-entropy's gradient that reaches the trunk (``egc.ce_trunk_grad``)."""

from __future__ import annotations

import re

import pytest
import torch

from jemlab.config import build_config
from jemlab.diffusion import NoiseSchedule
from jemlab.errors import ConfigError
from jemlab.generate.egc import guided_eps
from jemlab.models import build_model
from jemlab.objectives import EGCWeights, egc_loss


def tiny(classifier: str, conditional: bool = True, seed: int = 0, energy: str = "map") -> torch.nn.Module:
    """A small EGC network on 8×8 images with every weight random (the zero-initialised ones too)."""
    torch.manual_seed(seed)
    options = {"width": 8, "channel_mult": [1, 2], "num_res_blocks": 1, "attention": [2], "energy": energy}
    options.update(classifier=classifier, label_conditioning=conditional)
    model = build_model("egc_unet", (1, 8, 8), 3, options=options)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    return model


def trunk_and_classifier(model: torch.nn.Module) -> tuple[list[str], list[str]]:
    """Names of the trunk's weights and of the classifier's own (the head, or the output convolution it reads)."""
    own = "classifier_head." if model.classifier_head is not None else "out."
    names = [name for name, _ in model.named_parameters() if name != "label_embed.weight"]
    return [n for n in names if not n.startswith(("classifier_head.", "out."))], [n for n in names if n.startswith(own)]


def test_head_reads_the_trunk_and_leaves_the_energy_to_the_map():
    model = tiny("head").eval()
    x = torch.randn(3, 1, 8, 8)
    logits, energy = model.logits_and_energy(x)
    assert logits.shape == (3, 3)
    assert torch.allclose(logits, model.logits(x)) and torch.allclose(energy, model.energy(x))
    m = model.logit_map(x, 0)
    assert torch.allclose(energy, -torch.logsumexp(m, dim=1).sum(dim=(1, 2)), atol=1e-4)
    # The head is not a pooling of the map: a map that classifies differently leaves the logits as they are.
    assert not torch.allclose(logits, m.mean(dim=(2, 3)), atol=1e-2)
    with pytest.raises(ConfigError, match="classifier=head"):
        model.pool_logits(m)
    with pytest.raises(ConfigError, match=r"classifier=head reads .* use energy=map"):
        tiny("head", energy="pooled")


@pytest.mark.parametrize("classifier", ["map", "head"])
def test_trunk_grad_scales_the_gradient_that_reaches_the_trunk(classifier):
    """The logits keep their values; the trunk gets trunk_grad × their gradient, the classifier's own layers all
    of it; at 0 the trunk gets none."""
    model = tiny(classifier).double()
    x, t = torch.randn(4, 1, 8, 8, dtype=torch.float64), torch.tensor([0, 5, 50, 90])
    trunk, own = trunk_and_classifier(model)
    grads, values = {}, {}
    for share in (1.0, 0.25, 0.0):
        model.zero_grad(set_to_none=True)
        logits = model.logits_t(x, t, trunk_grad=share)
        torch.log_softmax(logits, 1)[:, 1].sum().backward()
        values[share] = logits.detach()
        grads[share] = {n: p.grad for n, p in model.named_parameters()}
    assert torch.allclose(values[0.25], values[1.0]) and torch.allclose(values[0.0], values[1.0])
    for name in trunk:
        assert grads[1.0][name] is not None and grads[1.0][name].abs().sum() > 0, name
        assert torch.allclose(grads[0.25][name], 0.25 * grads[1.0][name], atol=1e-12), name
        assert grads[0.0][name] is None, name
    for name in own:
        assert grads[1.0][name].abs().sum() > 0, name
        assert torch.allclose(grads[0.0][name], grads[1.0][name], atol=1e-12), name


def test_ce_terms_without_trunk_gradient_leave_the_trunk_to_the_denoiser():
    """With egc.ce_trunk_grad = 0 the trunk's gradient is exactly the denoising term's (the same draws without CE
    terms), while the head learns from the CE terms."""
    model = tiny("head").double()
    schedule = NoiseSchedule("linear", 100)
    x0, y = torch.rand(6, 1, 8, 8, dtype=torch.float64) * 2 - 1, torch.tensor([0, 1, 2, 0, 1, 2])
    trunk, head = trunk_and_classifier(model)

    def grads(weights: EGCWeights) -> dict[str, torch.Tensor | None]:
        model.zero_grad(set_to_none=True)
        loss, _ = egc_loss(model, schedule, x0, y, weights, torch.Generator().manual_seed(4))
        loss.backward()
        return {n: p.grad for n, p in model.named_parameters()}

    with_ce = grads(EGCWeights(gamma=0.1, gamma_clean=1.0, trunk_grad=0.0))
    without = grads(EGCWeights(gamma=0.0, gamma_clean=0.0))
    shared = grads(EGCWeights(gamma=0.1, gamma_clean=1.0, trunk_grad=1.0))
    for name in trunk:
        assert torch.allclose(with_ce[name], without[name], atol=1e-10), name
    assert any(not torch.allclose(shared[name], without[name], atol=1e-6) for name in trunk)
    assert all(with_ce[name].abs().sum() > 0 for name in head)
    assert all(without[name] is None or without[name].abs().sum() == 0 for name in head)


@pytest.mark.parametrize("conditional", [True, False])
def test_guidance_reads_the_head(conditional):
    """Classifier guidance with a head classifier: ε̂ − s·σ·∇ₓ log p(y | x_t, t) with p read from the head."""
    model = tiny("head", conditional=conditional).eval()
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([100, 60])
    sigma, y = torch.tensor([0.5, 0.8]).view(2, 1, 1, 1), torch.tensor([2, 0])
    plain = guided_eps(model, x, t, sigma, y, guidance=0.0)
    assert torch.allclose(plain, model.eps(x, t, sigma, y if conditional else None), atol=1e-6)
    x_in = x.clone().requires_grad_(True)
    log_py = torch.log_softmax(model.logits_t(x_in, t), 1).gather(1, y.view(-1, 1)).sum()
    (grad_log_py,) = torch.autograd.grad(log_py, x_in)
    guided = guided_eps(model, x, t, sigma, y, guidance=2.0)
    assert torch.allclose(guided, plain - 2.0 * sigma * grad_log_py, atol=1e-5)


def test_sampling_without_classifier_guidance_never_runs_the_head(monkeypatch):
    model = tiny("head", conditional=False).eval()
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([100, 60])
    sigma, y = torch.tensor([0.5, 0.8]).view(2, 1, 1, 1), torch.tensor([2, 0])
    expected = model.eps(x, t, sigma)
    calls = []
    monkeypatch.setattr(model.classifier_head, "forward", lambda h: calls.append(h.shape) or torch.zeros(len(h), 3))
    assert torch.allclose(guided_eps(model, x, t, sigma, y, guidance=0.0), expected, atol=1e-6)
    assert calls == []
    guided_eps(model, x, t, sigma, y, guidance=1.0)
    assert len(calls) == 1  # with guidance, one head pass per call


def test_config_refuses_out_of_range_settings():
    with pytest.raises(ConfigError, match=re.escape("egc.ce_trunk_grad must be in [0, 1]")):
        build_config("egc", [("egc.ce_trunk_grad", 1.5)])
    with pytest.raises(ConfigError, match=re.escape("model.classifier must be map or head")):
        build_config("egc", [("model.classifier", "linear")])
    config = build_config("egc", [("model.classifier", "head"), ("egc.ce_trunk_grad", 0.0)])
    assert (config.model.options["classifier"], config.egc.ce_trunk_grad) == ("head", 0.0)
