"""The hand-written input gradient (accel/explicit.py) equals autograd's, and the chain it drives equals the
reference SGLD chain; unsupported networks fall back or fail with a clear error."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from jemlab.accel import explicit as explicit_module
from jemlab.accel import reset_probes
from jemlab.accel.explicit import ExplicitGradient, explicit_gradient, explicit_support, subpixel_weight
from jemlab.config import build_config
from jemlab.errors import ConfigError
from jemlab.models import build_model
from jemlab.samplers import sgld
from jemlab.sampling import run_chains

MODELS = {
    "course": ("course_cnn", "separate", {"hidden": 4}, (1, 28, 28)),
    "cnn-swish": ("cnn", "logsumexp", {"width": 4, "features": 16, "act": "swish"}, (1, 28, 28)),
    "cnn-leaky-rgb": ("cnn", "logsumexp", {"width": 4, "features": 16, "act": "leaky_relu"}, (3, 32, 32)),
    "cnn-relu-odd": ("cnn", "logsumexp", {"width": 4, "features": 8, "act": "relu"}, (1, 13, 13)),
    "mlp": ("mlp", "logsumexp", {"hidden": (32, 16)}, (1, 12, 12)),
}


def make(name: str, seed: int = 0):
    torch.manual_seed(seed)
    backbone, head, options, shape = MODELS[name]
    model = build_model(backbone, shape, 10, head, options).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, shape


def autograd_energy_and_grad(model, x, labels=None, dtype=None):
    x = x.detach().clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        e = model.energy(x) if labels is None else model.joint_energy(x, labels)
    (g,) = torch.autograd.grad(e.sum(), x)
    return e.detach().float(), g


@pytest.mark.parametrize(
    "k,s,p,size",
    [
        (5, 2, 4, 28),
        (3, 2, 1, 16),
        (3, 2, 1, 7),
        (3, 1, 1, 9),
        (4, 2, 1, 16),
        (3, 2, 0, 15),
        (3, 3, 1, 17),
        (1, 1, 0, 5),
    ],
)
def test_subpixel_kernel_equals_the_transposed_convolution(k, s, p, size):
    gen = torch.Generator().manual_seed(k * 100 + s * 10 + p)
    weight = torch.randn(5, 3, k, k, generator=gen, dtype=torch.float64)
    out = (size + 2 * p - k) // s + 1
    g = torch.randn(2, 5, out, out, generator=gen, dtype=torch.float64)
    expected = F.conv_transpose2d(g, weight, stride=s, padding=p, output_padding=size - ((out - 1) * s - 2 * p + k))
    kernel, before, after = subpixel_weight(weight, s, p, size, out)
    y = F.conv2d(F.pad(g, (before, after, before, after)), kernel)
    got = explicit_module.depth_to_space(y, s)[..., :size, :size] if s > 1 else y
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("nhwc", [False, True])
@pytest.mark.parametrize("conditional", [False, True])
def test_explicit_energy_and_gradient_equal_autograd(name, nhwc, conditional):
    model, shape = make(name)
    x = torch.rand((6, *shape), generator=torch.Generator().manual_seed(1)) * 2 - 1
    if nhwc:
        x = x.contiguous(memory_format=torch.channels_last)
    labels = torch.arange(6) % 10 if conditional else None
    e_ref, g_ref = autograd_energy_and_grad(model, x, labels)
    e, g = ExplicitGradient(model, tuple(x.shape), torch.float32, nhwc)(x, labels)
    torch.testing.assert_close(e, e_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-7)
    assert g.is_contiguous(memory_format=torch.channels_last if nhwc else torch.contiguous_format)


@pytest.mark.parametrize("name", ["course", "cnn-swish"])
def test_bf16_explicit_gradient_is_as_close_to_fp32_as_autocast(name):
    model, shape = make(name)
    x = (torch.rand((8, *shape), generator=torch.Generator().manual_seed(2)) * 2 - 1).contiguous(
        memory_format=torch.channels_last
    )
    _, g32 = autograd_energy_and_grad(model, x)
    _, g_autocast = autograd_energy_and_grad(model, x, dtype=torch.bfloat16)
    _, g = ExplicitGradient(model, tuple(x.shape), torch.bfloat16, True)(x)
    autocast_error = float((g_autocast - g32).norm() / g32.norm())
    error = float((g - g32).norm() / g32.norm())
    assert 0 < error < max(3 * autocast_error, 0.02)


@pytest.mark.parametrize("nhwc", [False, True])
def test_without_packing_or_fused_backwards_the_public_operators_give_the_same_gradient(monkeypatch, nhwc):
    """The plan's fallbacks when the probe finds the private operators missing (JEMLAB_PROBE stands in for that)."""
    model, shape = make("course")
    x = torch.rand((4, *shape), generator=torch.Generator().manual_seed(3)) * 2 - 1
    if nhwc:
        x = x.contiguous(memory_format=torch.channels_last)
    fast_plan = ExplicitGradient(model, tuple(x.shape), torch.float32, nhwc)
    monkeypatch.setenv("JEMLAB_PROBE", "packed_conv_fp32=0,activation_backward=0")
    reset_probes()
    plain_plan = ExplicitGradient(model, tuple(x.shape), torch.float32, nhwc)
    assert not plain_plan.packed
    torch.testing.assert_close(plain_plan(x), fast_plan(x), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(plain_plan(x)[1], autograd_energy_and_grad(model, x)[1], rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("nhwc", [False, True])
def test_reused_padded_buffers_leak_nothing_between_calls_or_threads(nhwc):
    """Activation backwards write into per-thread zero-padded buffers kept by the plan (course CNN: layers 2-4)."""
    import threading

    model, shape = make("course")
    fmt = torch.channels_last if nhwc else torch.contiguous_format
    gen = torch.Generator().manual_seed(6)
    x1, x2 = ((torch.rand((4, *shape), generator=gen) * 2 - 1).contiguous(memory_format=fmt) for _ in range(2))
    plan = ExplicitGradient(model, tuple(x1.shape), torch.float32, nhwc)
    first = plan(x1)[1].clone()
    plan(x2)
    torch.testing.assert_close(plan(x1)[1], first, rtol=0, atol=0)  # same buffers, no trace of x2
    torch.testing.assert_close(first, autograd_energy_and_grad(model, x1)[1], rtol=1e-4, atol=1e-7)
    results = {}
    work = [(1, x1), (2, x2)]
    threads = [threading.Thread(target=lambda k=k, x=x: results.__setitem__(k, plan(x)[1])) for k, x in work]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    torch.testing.assert_close(results[1], first, rtol=0, atol=0)
    torch.testing.assert_close(results[2], plan(x2)[1], rtol=0, atol=0)


def test_the_cached_plan_follows_an_in_place_parameter_update():
    model, shape = make("cnn-swish")
    x = torch.rand((4, *shape), generator=torch.Generator().manual_seed(4)) * 2 - 1
    plan = explicit_gradient(model, tuple(x.shape), torch.float32, False)
    assert explicit_gradient(model, tuple(x.shape), torch.float32, False) is plan  # cached while nothing changes
    with torch.no_grad():
        next(model.parameters()).mul_(1.5)  # what an optimiser step does: an in-place update
    new_plan = explicit_gradient(model, tuple(x.shape), torch.float32, False)
    assert new_plan is not plan
    torch.testing.assert_close(new_plan(x)[1], autograd_energy_and_grad(model, x)[1], rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("noise_first,clamp", [(True, 0.03), (False, None)])
def test_the_explicit_chain_equals_the_reference_chain(noise_first, clamp):
    model, shape = make("course")
    x0 = torch.rand((6, *shape), generator=torch.Generator().manual_seed(5)) * 2 - 1
    cfg = build_config("course").sampler
    cfg.steps, cfg.precision, cfg.noise_first, cfg.grad_clamp = 5, "fp32", noise_first, clamp
    cfg.impl, cfg.chain_groups = "fast", 1
    assert cfg.gradient == "auto"
    out, stats = run_chains(model, x0, cfg, generator=torch.Generator().manual_seed(0))
    ref, ref_stats = sgld(
        model.energy,
        x0,
        steps=5,
        step_size=cfg.step_size,
        noise=cfg.noise,
        grad_clamp=clamp,
        noise_first=noise_first,
        generator=torch.Generator().manual_seed(0),
    )
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)
    assert stats.energy == pytest.approx(ref_stats.energy, rel=1e-5)
    assert stats.grad_norm == pytest.approx(ref_stats.grad_norm, rel=1e-4)
    assert not torch.equal(out, x0)


def test_unsupported_networks_fall_back_to_autograd_or_fail_clearly():
    model = build_model("wide_resnet", (3, 8, 8), 10, "logsumexp", {"depth": 10, "widen": 1}).eval()
    reason = explicit_support(model, "cpu")
    assert reason is not None and "WideResNet" in reason
    supported, _ = make("course")
    assert explicit_support(supported, "cpu") is None
    assert "CPU" in explicit_support(supported, "meta")
    x0 = torch.rand(2, 3, 8, 8) * 2 - 1
    cfg = build_config("default").sampler
    cfg.steps, cfg.impl, cfg.precision, cfg.chain_groups = 2, "fast", "fp32", 1
    auto, _ = run_chains(model, x0, cfg, generator=torch.Generator().manual_seed(0))  # auto: autograd, no error
    cfg.gradient = "autograd"
    plain, _ = run_chains(model, x0, cfg, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(auto, plain)
    cfg.gradient = "explicit"
    with pytest.raises(ConfigError, match=r"sampler\.gradient=auto"):
        run_chains(model, x0, cfg, generator=torch.Generator().manual_seed(0))


def test_gradient_setting_is_validated():
    with pytest.raises(ConfigError, match=r"sampler\.gradient"):
        build_config("default", [("sampler.gradient", "numeric")])
    with pytest.raises(ConfigError, match="impl=fast"):
        build_config("default", [("sampler.gradient", "explicit"), ("sampler.impl", "reference")])
