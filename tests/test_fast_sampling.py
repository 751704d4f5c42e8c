"""Fast sampling (issue 4): the fast/compiled SGLD equals the reference chain, JEM++'s per-class Gaussian
initialiser recovers known moments, PYLD agrees with the full gradient where the chain rule says it must, and the
jempp presets run end to end."""

from __future__ import annotations

import os
import shutil

import pytest
import torch
from torch import nn

from jemlab.accel import compile_status, fast_sgld
from jemlab.accel import fast as fast_module
from jemlab.config import build_config
from jemlab.errors import ConfigError
from jemlab.models import build_model
from jemlab.samplers import (
    ClassGaussians,
    build_initializer,
    fit_class_gaussians,
    pyld,
    sgld,
    split_first_layer,
)
from jemlab.sampling import run_chains
from jemlab.training.checkpoint import load_checkpoint, save_checkpoint


def tiny_energy_model(seed: int = 0):
    torch.manual_seed(seed)
    model = build_model("course_cnn", (1, 12, 12), 10, "separate", {"hidden": 4})
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def chain_inputs(n: int = 6, size: int = 12, seed: int = 1) -> torch.Tensor:
    return torch.rand((n, 1, size, size), generator=torch.Generator().manual_seed(seed)) * 2 - 1


# --- fast SGLD == reference SGLD -----------------------------------------------------------------------------------


@pytest.mark.parametrize("noise_first", [False, True])
@pytest.mark.parametrize("grad_clamp", [None, 0.03])
def test_fast_sgld_equals_reference_chain(noise_first, grad_clamp):
    model = tiny_energy_model()
    x0 = chain_inputs()
    kwargs = dict(steps=5, step_size=2.0, noise=0.05, grad_clamp=grad_clamp, noise_first=noise_first)
    ref, ref_stats = sgld(model.energy, x0, generator=torch.Generator().manual_seed(3), **kwargs)
    out, stats = fast_sgld(model.energy, x0, generator=torch.Generator().manual_seed(3), **kwargs)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)
    assert stats.energy == pytest.approx(ref_stats.energy, rel=1e-5)
    assert stats.grad_norm == pytest.approx(ref_stats.grad_norm, rel=1e-5)
    assert not torch.equal(out, x0)  # the chain moved


def test_fast_sgld_keeps_channels_last_and_matches_nchw():
    model = tiny_energy_model()
    x0 = chain_inputs()
    kwargs = dict(steps=4, step_size=1.0, noise=0.01, generator=None)
    ref, _ = sgld(model.energy, x0, **{**kwargs, "generator": torch.Generator().manual_seed(0)})
    model_nhwc = model.to(memory_format=torch.channels_last)
    x_nhwc = x0.contiguous(memory_format=torch.channels_last)
    out, _ = fast_sgld(model_nhwc.energy, x_nhwc, **{**kwargs, "generator": torch.Generator().manual_seed(0)})
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)


def test_fast_sgld_bf16_matches_reference_bf16_and_stays_close_to_fp32():
    model = tiny_energy_model()
    x0 = chain_inputs()
    kwargs = dict(steps=3, step_size=1.0, noise=0.01)
    ref, _ = sgld(model.energy, x0, generator=torch.Generator().manual_seed(0), autocast_dtype=torch.bfloat16, **kwargs)
    out, _ = fast_sgld(
        model.energy, x0, generator=torch.Generator().manual_seed(0), autocast_dtype=torch.bfloat16, **kwargs
    )
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)
    fp32, _ = sgld(model.energy, x0, generator=torch.Generator().manual_seed(0), **kwargs)
    assert (out - fp32).abs().max() < 0.05  # bf16 gradients move the chain by about the same amount


def test_fast_sgld_is_deterministic_given_generator_and_leaves_input_alone():
    model = tiny_energy_model()
    x0 = chain_inputs()
    x0_copy = x0.clone()
    a, _ = fast_sgld(model.energy, x0, steps=3, step_size=1.0, noise=0.1, generator=torch.Generator().manual_seed(5))
    b, _ = fast_sgld(model.energy, x0, steps=3, step_size=1.0, noise=0.1, generator=torch.Generator().manual_seed(5))
    c, _ = fast_sgld(model.energy, x0, steps=3, step_size=1.0, noise=0.1, generator=torch.Generator().manual_seed(6))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert torch.equal(x0, x0_copy)
    assert not a.requires_grad
    assert all(p.grad is None for p in model.parameters())


def test_fast_sgld_zero_steps_returns_a_copy():
    x0 = chain_inputs()
    out, _ = fast_sgld(lambda x: x.sum((1, 2, 3)), x0, steps=0, step_size=1.0, noise=0.1)
    assert torch.equal(out, x0) and out is not x0


def test_compile_failure_falls_back_to_the_eager_chain(monkeypatch):
    fast_module.reset_compile_state()

    def broken_compile(*args, **kwargs):
        raise RuntimeError("no C++ compiler (simulated)")

    monkeypatch.setattr(torch, "compile", broken_compile)
    model = tiny_energy_model()
    x0 = chain_inputs()
    kwargs = dict(steps=3, step_size=1.0, noise=0.02)
    ref, _ = sgld(model.energy, x0, generator=torch.Generator().manual_seed(0), **kwargs)
    out, _ = fast_sgld(model.energy, x0, generator=torch.Generator().manual_seed(0), compile=True, **kwargs)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)
    status = compile_status()
    assert status["requested"] and not status["used"] and "no C++ compiler" in status["reason"]
    fast_module.reset_compile_state()


def check_compiled_chain_equals_eager_chain() -> None:
    fast_module.reset_compile_state()
    model = tiny_energy_model()
    x0 = chain_inputs(n=4)
    kwargs = dict(steps=3, step_size=2.0, noise=0.05, grad_clamp=0.03, noise_first=True)
    ref, ref_stats = sgld(model.energy, x0, generator=torch.Generator().manual_seed(0), **kwargs)
    out, stats = fast_sgld(model.energy, x0, generator=torch.Generator().manual_seed(0), compile=True, **kwargs)
    status = compile_status()
    fast_module.reset_compile_state()
    if not status["used"]:
        pytest.skip(f"torch.compile is unavailable here: {status['reason']}")
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)
    assert stats.energy == pytest.approx(ref_stats.energy, rel=1e-4)


def test_compiled_step_traces_to_the_eager_chain(monkeypatch):
    # The compiled step is traced with torch.func into one graph; the aot_eager backend runs that very graph
    # without generating C++, so this checks the traced step in seconds.
    monkeypatch.setattr(fast_module, "COMPILE_BACKEND", "aot_eager")
    check_compiled_chain_equals_eager_chain()


@pytest.mark.slow
@pytest.mark.skipif(
    os.environ.get("JEMLAB_TEST_INDUCTOR") != "1",
    reason="Inductor builds C++ for ~1 minute on a 2-core CPU; set JEMLAB_TEST_INDUCTOR=1 to run it",
)
def test_inductor_compiled_chain_equals_eager_chain():
    if shutil.which("gcc") is None and shutil.which("cc") is None:
        pytest.skip("torch.compile on the CPU needs a C++ compiler (gcc) and none is installed")
    check_compiled_chain_equals_eager_chain()


def test_run_chains_fast_impl_matches_reference_impl():
    model = tiny_energy_model()
    x0 = chain_inputs()
    cfg = build_config("course").sampler
    cfg.steps = 4
    ref, _ = run_chains(model, x0, cfg, generator=torch.Generator().manual_seed(0))
    cfg.impl = "fast"
    out, _ = run_chains(model, x0, cfg, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)


# --- per-class Gaussian initialiser --------------------------------------------------------------------------------


def synthetic_classes(n_per_class: int = 4000, seed: int = 0):
    """Two classes of 2×2 one-channel "images" from known Gaussians well inside [−1, 1]."""
    gen = torch.Generator().manual_seed(seed)
    means = torch.tensor([[0.2, -0.1, 0.0, 0.3], [-0.3, 0.1, 0.2, -0.2]])
    a = torch.tensor([[0.10, 0.0, 0.0, 0.0], [0.05, 0.08, 0.0, 0.0], [0.0, 0.02, 0.06, 0.0], [0.03, 0.0, 0.01, 0.04]])
    covs = torch.stack([a @ a.T, 0.5 * a @ a.T + 0.001 * torch.eye(4)])
    xs, ys = [], []
    for c in range(2):
        chol = torch.linalg.cholesky(covs[c])
        xs.append(means[c] + torch.randn(n_per_class, 4, generator=gen) @ chol.T)
        ys.append(torch.full((n_per_class,), c))
    return torch.cat(xs).view(-1, 1, 2, 2), torch.cat(ys), means, covs


def test_full_covariance_fit_recovers_means_and_covariances():
    x, y, _, covs = synthetic_classes()
    g = fit_class_gaussians(x, y, 2, covariance="full", jitter=0.0)
    for c in range(2):
        xc = x[y == c].view(-1, 4).double()
        sample_cov = torch.cov(xc.T, correction=0).float()
        torch.testing.assert_close(g.means[c], xc.mean(0).float(), rtol=0, atol=1e-6)
        torch.testing.assert_close(g.covariance(c), sample_cov, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(g.covariance(c), covs[c], rtol=0, atol=1.5e-3)  # and the true one


def test_diag_and_lowrank_fits_keep_the_per_pixel_variances():
    x, y, _, _ = synthetic_classes()
    diag = fit_class_gaussians(x, y, 2, covariance="diag", min_std=0.0)
    lowrank = fit_class_gaussians(x, y, 2, covariance="lowrank", rank=2, min_std=0.0)
    full_rank = fit_class_gaussians(x, y, 2, covariance="lowrank", rank=4, min_std=0.0)
    for c in range(2):
        sample_cov = torch.cov(x[y == c].view(-1, 4).double().T, correction=0).float()
        torch.testing.assert_close(torch.diag(diag.covariance(c)), torch.diag(sample_cov), rtol=1e-4, atol=1e-7)
        assert torch.count_nonzero(diag.covariance(c) - torch.diag(torch.diag(diag.covariance(c)))) == 0
        torch.testing.assert_close(torch.diag(lowrank.covariance(c)), torch.diag(sample_cov), rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(full_rank.covariance(c), sample_cov, rtol=1e-4, atol=1e-6)  # rank = D is exact
    assert lowrank.rank == 2


def test_gaussian_draws_follow_the_fitted_class():
    x, y, _, _ = synthetic_classes()
    g = fit_class_gaussians(x, y, 2, covariance="full", jitter=0.0)
    labels = torch.ones(20000, dtype=torch.long)
    draws = g(len(labels), labels, torch.Generator().manual_seed(0)).view(-1, 4)
    torch.testing.assert_close(draws.mean(0), g.means[1], rtol=0, atol=3e-3)
    torch.testing.assert_close(torch.cov(draws.T), g.covariance(1), rtol=0, atol=5e-4)
    a = g(5, None, torch.Generator().manual_seed(1))
    b = g(5, None, torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and a.shape == (5, 1, 2, 2)


def test_uint8_images_are_scaled_to_the_pixel_range_and_draws_are_clamped():
    images = torch.tensor([0, 255, 0, 255], dtype=torch.uint8).view(4, 1, 1, 1).repeat(1, 1, 2, 2)
    labels = torch.tensor([0, 0, 1, 1])
    g = fit_class_gaussians(images, labels, 2, covariance="diag")
    torch.testing.assert_close(g.means, torch.zeros(2, 4))
    torch.testing.assert_close(g.diag_std, torch.ones(2, 4))  # pixels at −1 and +1: std 1
    draws = g(500, None, torch.Generator().manual_seed(0))
    assert draws.min() >= -1 and draws.max() <= 1


def test_gaussian_init_works_for_colour_images_and_survives_a_checkpoint(tmp_path):
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (60, 3, 32, 32), dtype=torch.uint8, generator=gen)
    labels = torch.arange(3).repeat(20)
    g = fit_class_gaussians(images, labels, 3, covariance="lowrank", rank=8)
    assert g.factors.shape == (3, 3 * 32 * 32, 8)
    assert g(4, torch.tensor([0, 1, 2, 0]), gen).shape == (4, 3, 32, 32)
    path = save_checkpoint(tmp_path / "init.safetensors", {"init": g.state_dict()}, {})
    state, _ = load_checkpoint(path)
    restored = build_initializer("gaussian", (3, 32, 32), state=state["init"])
    for key, value in g.state_dict().items():
        assert torch.equal(restored.state_dict()[key], value)
    a = g(3, None, torch.Generator().manual_seed(2))
    b = restored(3, None, torch.Generator().manual_seed(2))
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)  # BLAS may round differently for other alignments


def test_gaussian_init_errors_name_the_fix():
    with pytest.raises(ConfigError, match=r"sampler\.init=uniform"):
        build_initializer("gaussian", (1, 2, 2))
    with pytest.raises(ConfigError, match="init_covariance"):
        fit_class_gaussians(torch.zeros(4, 1, 2, 2), torch.tensor([0, 0, 1, 1]), 2, covariance="dense")
    with pytest.raises(ConfigError, match="class 1 has 1"):
        fit_class_gaussians(torch.zeros(3, 1, 2, 2), torch.tensor([0, 0, 1]), 2)
    with pytest.raises(ConfigError, match="refit"):
        ClassGaussians(torch.zeros(2, 4), torch.zeros(2, 4, 0), torch.zeros(2, 4), (1, 3, 3))


# --- PYLD ----------------------------------------------------------------------------------------------------------


class TwoLayer(nn.Module):
    """E(x) = w₂ · tanh(W₁ x + b₁) on flattened 2×2 images: a first layer and the rest."""

    def __init__(self, hidden: int = 5) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.first = nn.Linear(4, hidden)
        self.second = nn.Linear(hidden, 1)

    def energy(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(torch.tanh(self.first(x.flatten(1)))).squeeze(1)


def test_pyld_inner_gradient_equals_the_full_gradient_at_the_costate_point():
    net = TwoLayer()
    x = torch.rand(8, 1, 2, 2) * 2 - 1
    energy_and_features, first_layer = split_first_layer(net, net.energy, x)
    assert first_layer is not None
    xg = x.clone().requires_grad_(True)
    e, z = energy_and_features(xg)
    torch.testing.assert_close(e, net.energy(x))
    full, costate = torch.autograd.grad(e.sum(), [xg, z])
    xi = x.clone().requires_grad_(True)
    (inner,) = torch.autograd.grad((first_layer(xi) * costate).sum(), xi)
    torch.testing.assert_close(inner, full)  # ∇ₓ⟨p, f₁(x)⟩ = J_f₁ᵀ ∂E/∂z = ∇ₓE(x)


def test_pyld_without_inner_steps_is_proximal_sgld():
    net = TwoLayer()
    x0 = torch.rand(8, 1, 2, 2) * 2 - 1
    energy_and_features, first_layer = split_first_layer(net, net.energy, x0)
    kwargs = dict(steps=4, step_size=0.5, noise=0.0, grad_clamp=0.2)
    out, _ = pyld(energy_and_features, first_layer, x0, inner_steps=0, inner_step_size=0.2, **kwargs)
    ref, _ = sgld(net.energy, x0, **kwargs)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)


def test_pyld_inner_steps_with_a_linear_first_layer_use_a_constant_gradient():
    # f₁(x) = W₁x + b₁ has Jacobian W₁ everywhere, so every inner step moves x by −β·clip(W₁ᵀp).
    net = TwoLayer()
    x0 = torch.rand(3, 1, 2, 2) * 0.2
    energy_and_features, first_layer = split_first_layer(net, net.energy, x0)
    out, _ = pyld(
        energy_and_features, first_layer, x0, steps=1, step_size=0.1, noise=0.0, inner_steps=3,
        inner_step_size=0.05, inner_clamp=None, bounds=None,
    )  # fmt: skip
    xg = x0.clone().requires_grad_(True)
    e, z = energy_and_features(xg)
    full, costate = torch.autograd.grad(e.sum(), [xg, z])
    inner = (costate @ net.first.weight).view_as(x0)
    expected = x0 - 0.1 * full - 3 * 0.05 * inner
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)


def test_pyld_is_deterministic_and_runs_from_run_chains_on_the_course_cnn():
    model = tiny_energy_model()
    x0 = chain_inputs()
    cfg = build_config("course").sampler
    cfg.steps, cfg.pyld_steps, cfg.noise = 2, 3, 0.01
    a, stats = run_chains(model, x0, cfg, generator=torch.Generator().manual_seed(0))
    b, _ = run_chains(model, x0, cfg, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b) and a.shape == x0.shape and stats.grad_norm > 0
    assert a.min() >= -1 and a.max() <= 1


def test_pyld_refuses_a_network_that_transforms_its_input_first():
    class Scaled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.first = nn.Linear(4, 1)

        def energy(self, x):
            return self.first(2 * x.flatten(1)).squeeze(1)

    net = Scaled()
    with pytest.raises(ConfigError, match="pyld_steps=0"):
        split_first_layer(net, net.energy, torch.rand(2, 1, 2, 2))


# --- config and presets --------------------------------------------------------------------------------------------


def test_jempp_presets_validate_and_bad_sampler_keys_are_errors():
    fm = build_config("jempp")
    assert fm.sampler.init == "gaussian" and fm.sampler.steps <= 10 and fm.sampler.impl == "fast"
    cifar = build_config("jempp-cifar10")
    assert cifar.data.dataset == "cifar10" and cifar.model.options["norm"] == "batch"
    for key, value in [
        ("sampler.impl", "turbo"),
        ("sampler.init_covariance", "dense"),
        ("sampler.precision", "int8"),
        ("sampler.pyld_steps", "-1"),
    ]:
        with pytest.raises(ConfigError, match=key):
            build_config("default", [(key, value)])
    with pytest.raises(ConfigError, match="impl=fast"):
        build_config("default", [("sampler.impl", "reference"), ("sampler.compile", "true")])


def test_jempp_trains_and_its_fitted_initialiser_is_restored_by_load_run(tiny_config_overrides, tmp_path):
    from jemlab.run import load_run
    from jemlab.training.loop import Trainer

    overrides = [*tiny_config_overrides, ("train.epochs", "1"), ("sampler.init_covariance", "lowrank")]
    trainer = Trainer(build_config("jempp", overrides), tmp_path / "run")
    x, y = trainer.batcher.next_batch()
    stats = trainer.train_step(x, y, 0)
    assert all(torch.isfinite(torch.tensor(v)) for v in stats.values())
    trainer.save()
    run = load_run(tmp_path / "run", device="cpu")
    torch.testing.assert_close(run.init.state_dict()["means"], trainer.init.state_dict()["means"])
    a = run.init(4, torch.arange(4), torch.Generator().manual_seed(0))
    b = trainer.init(4, torch.arange(4), torch.Generator().manual_seed(0))
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


@pytest.mark.parametrize("predraw", [True, False])
@pytest.mark.parametrize("groups", [2, 3])
def test_chain_groups_on_threads_equal_the_reference_chain(groups, predraw, monkeypatch):
    if not predraw:  # the step-by-step path that long generation chains take
        monkeypatch.setattr(fast_module, "_MAX_PREDRAWN_NOISE_BYTES", 0)
    model = tiny_energy_model()
    x0 = chain_inputs(n=7)
    kwargs = dict(steps=4, step_size=2.0, noise=0.05, grad_clamp=0.03, noise_first=True)
    ref, ref_stats = sgld(model.energy, x0, generator=torch.Generator().manual_seed(0), **kwargs)
    threads = torch.get_num_threads()
    out, stats = fast_sgld(model.energy, x0, generator=torch.Generator().manual_seed(0), chain_groups=groups, **kwargs)
    assert torch.get_num_threads() == threads  # restored after the chain
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)
    assert stats.energy == pytest.approx(ref_stats.energy, rel=1e-4)
    assert stats.grad_norm == pytest.approx(ref_stats.grad_norm, rel=1e-4)


def test_chain_groups_sample_conditionals_with_their_own_labels():
    model = build_model("course_cnn", (1, 12, 12), 10, "logsumexp", {"hidden": 4})
    x0 = chain_inputs(n=6)
    labels = torch.tensor([0, 1, 2, 3, 4, 5])
    cfg = build_config("default").sampler
    cfg.steps, cfg.precision = 3, "fp32"
    ref, _ = run_chains(model, x0, cfg, labels=labels, generator=torch.Generator().manual_seed(0))
    cfg.impl, cfg.chain_groups = "fast", 2
    out, _ = run_chains(model, x0, cfg, labels=labels, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)


def test_noise_free_chain_groups_equal_the_reference_chain():
    model = tiny_energy_model()
    x0 = chain_inputs(n=5)
    kwargs = dict(steps=3, step_size=1.0, noise=0.0, grad_clamp=1.0)
    ref, ref_stats = sgld(model.energy, x0, **kwargs)
    out, stats = fast_sgld(model.energy, x0, chain_groups=2, **kwargs)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)
    assert stats.energy == pytest.approx(ref_stats.energy, rel=1e-4)
