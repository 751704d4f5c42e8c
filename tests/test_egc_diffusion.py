"""EGC's diffusion pieces against known answers: ε̂ = √(1 − ᾱ_t)∇ₓE by finite differences, the forward marginals,
DDIM/DDPM with an exact noise oracle on Gaussian data, and fixed-seed determinism of generation."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from jemlab.config import build_config
from jemlab.diffusion import NoiseSchedule, sample, timestep_subsequence
from jemlab.generate.egc import generate_egc, guided_eps
from jemlab.models import build_model


def tiny_egc(
    energy: str = "map",
    conditional: bool = True,
    pool: str = "mean",
    seed: int = 0,
    energy_scale: str = "none",
    energy_base: str = "none",
) -> torch.nn.Module:
    """A small EGC network on 8×8 images with every weight random (the zero-initialised ones too)."""
    torch.manual_seed(seed)
    options = {"width": 8, "channel_mult": [1, 2], "num_res_blocks": 1, "attention": [2], "energy": energy}
    options["energy_scale"], options["energy_base"] = energy_scale, energy_base
    model = build_model("egc_unet", (1, 8, 8), 3, options={**options, "pool": pool, "label_conditioning": conditional})
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    return model


@pytest.mark.parametrize(
    ("energy", "conditional", "pool", "scale", "base"),
    [
        ("map", True, "mean", "none", "none"),
        ("pooled", False, "attention", "none", "none"),
        ("map", False, "mean", "none", "none"),
        ("map", True, "mean", "sigma", "none"),
        ("map", True, "mean", "sigma", "gaussian"),
        ("map", False, "mean", "none", "gaussian"),
    ],
)
def test_eps_is_scaled_energy_gradient_by_finite_differences(energy, conditional, pool, scale, base):
    model = tiny_egc(energy, conditional, pool, energy_scale=scale, energy_base=base).double().eval()
    x = torch.randn(2, 1, 8, 8, dtype=torch.float64)
    t = torch.tensor([3, 700])
    y = torch.tensor([1, 3]) if conditional else None  # 3 = the "no label" token
    sigma = torch.tensor([0.3, 0.9], dtype=torch.float64).view(2, 1, 1, 1)
    eps = model.eps(x, t, sigma, y=y)
    h = 1e-6
    for index in [(0, 0, 0, 0), (0, 0, 3, 5), (1, 0, 7, 2), (1, 0, 4, 4)]:
        bump = torch.zeros_like(x)
        bump[index] = h
        diff = (model.energy_t(x + bump, t, y) - model.energy_t(x - bump, t, y)) / (2 * h)  # (N,)
        n = index[0]
        # energy_scale="sigma": the network's energy is g with E = g / σ, so ε̂ = σ·∇E = ∇g
        factor = 1.0 if scale == "sigma" else sigma[n].item()
        # energy_base="gaussian": E gains ½‖x‖², whose gradient x enters ε̂ as σ·x
        base_term = sigma[n].item() * x[index].item() if base == "gaussian" else 0.0
        assert eps[index].item() == pytest.approx(factor * diff[n].item() + base_term, rel=1e-5, abs=1e-8)


@pytest.mark.parametrize(("scale", "base"), [("none", "none"), ("sigma", "none"), ("sigma", "gaussian")])
def test_training_loss_and_samplers_read_the_same_noise_estimate(scale, base):
    """The EGC loss's ε̂ is exactly what `model.eps` (the samplers' call) returns, for each energy form."""
    from jemlab.objectives import EGCWeights, egc_loss
    from jemlab.objectives.egc import _noised

    model = tiny_egc("map", energy_scale=scale, energy_base=base).double()
    schedule = NoiseSchedule("linear", 100)
    x0, y = (torch.rand(4, 1, 8, 8) * 2 - 1).double(), torch.tensor([0, 1, 2, 0])
    weights = EGCWeights(gamma=0.0, gamma_clean=0.0)
    _, stats = egc_loss(model, schedule, x0, y, weights, torch.Generator().manual_seed(5))
    t, noise, x_t, y_eps = _noised(model, schedule, x0, y, weights.label_dropout, torch.Generator().manual_seed(5))
    eps = model.eps(x_t, t, schedule.sigma(t, x0), y_eps)
    assert stats["mse"].item() == pytest.approx((eps - noise).pow(2).mean().item(), rel=1e-9)


def test_energy_at_t0_is_the_evaluation_interface():
    model = tiny_egc("pooled", conditional=False).eval()
    x = torch.randn(3, 1, 8, 8)
    logits, energy = model.logits_and_energy(x)
    assert torch.allclose(logits, model.logits(x)) and torch.allclose(energy, model.energy(x))
    # With the pooled energy, E(x, 0) is the JEM energy of the t = 0 classifier.
    assert torch.allclose(energy, -torch.logsumexp(logits, dim=1), atol=1e-5)
    map_model = tiny_egc("map").eval()
    m = map_model.logit_map(x, 0)
    assert torch.allclose(map_model.energy(x), -torch.logsumexp(m, dim=1).sum(dim=(1, 2)), atol=1e-4)


def test_double_backprop_reaches_every_weight():
    from jemlab.objectives import EGCWeights, egc_loss

    model = tiny_egc("map")
    schedule = NoiseSchedule("linear", 100)
    x0, y = torch.rand(4, 1, 8, 8) * 2 - 1, torch.tensor([0, 1, 2, 0])
    loss, stats = egc_loss(model, schedule, x0, y, EGCWeights(), torch.Generator().manual_seed(0))
    loss.backward()
    assert {"mse", "ce", "ce_noisy", "train_accuracy"} <= set(stats)
    missing = [name for name, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing


def test_bf16_autocast_loss_is_finite():
    from jemlab.objectives import EGCWeights, egc_loss

    model = tiny_egc("map")
    x0, y = torch.rand(4, 1, 8, 8) * 2 - 1, torch.tensor([0, 1, 2, 0])
    loss, _ = egc_loss(
        model, NoiseSchedule("cosine", 50), x0, y, EGCWeights(), torch.Generator().manual_seed(0), torch.bfloat16
    )
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_forward_process_has_the_right_marginals(name):
    schedule = NoiseSchedule(name, 1000)
    alpha_bar = schedule.alpha_bar
    assert torch.all(alpha_bar[1:] < alpha_bar[:-1]) and alpha_bar[0] > 0.99 and alpha_bar[-1] < 1e-3
    # Gaussian data N(μ, s²): x_t ~ N(√ᾱ μ, ᾱ s² + 1 − ᾱ), for each of three noise levels.
    gen = torch.Generator().manual_seed(0)
    n, mu, s = 200_000, 0.4, 0.5
    t = torch.tensor([10, 400, 900]).repeat_interleave(n)
    x0 = mu + s * torch.randn(3 * n, 1, generator=gen, dtype=torch.float64)
    x_t = schedule.q_sample(x0, t, torch.randn(x0.shape, generator=gen, dtype=torch.float64)).view(3, n)
    ab = alpha_bar[[10, 400, 900]]
    assert torch.allclose(x_t.mean(1), ab.sqrt() * mu, atol=5e-3)
    assert torch.allclose(x_t.var(1), ab * s**2 + 1 - ab, atol=1e-2)


def _gaussian_oracle(schedule: NoiseSchedule, mu: float, s: float):
    """The exact E[ε | x_t] for data N(μ, s²): σ_t (x_t − √ᾱ μ)/(ᾱ s² + σ_t²)."""

    def eps_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        root, sigma = schedule.signal(t, x), schedule.sigma(t, x)
        return sigma * (x - root * mu) / (root**2 * s**2 + sigma**2)

    return eps_fn


@pytest.mark.parametrize(("eta", "steps", "tolerance"), [(0.0, 100, 0.02), (0.0, 1000, 0.005), (1.0, 1000, 0.01)])
def test_sampler_with_perfect_oracle_recovers_gaussian_data(eta, steps, tolerance):
    """DDIM (η = 0) and DDPM (η = 1) driven by the exact E[ε | x_t] of Gaussian data reach that data's mean and
    spread; DDIM's 100-step discretisation shrinks the spread slightly, and 1,000 steps remove that."""
    schedule, mu, s = NoiseSchedule("linear", 1000), 0.3, 0.5
    gen = torch.Generator().manual_seed(1)
    x_T = torch.randn(10_000, 1, 2, 2, generator=gen, dtype=torch.float64)
    def randn_like(x: torch.Tensor) -> torch.Tensor:
        return torch.randn(x.shape, generator=gen, dtype=x.dtype)

    oracle = _gaussian_oracle(schedule, mu, s)
    x0 = sample(oracle, schedule, x_T, steps=steps, eta=eta, clip_x0=False, randn_like=randn_like)
    assert x0.mean().item() == pytest.approx(mu, abs=0.01)
    assert x0.std().item() == pytest.approx(s, abs=tolerance)


def test_timestep_subsequence_spans_the_schedule():
    taus = timestep_subsequence(1000, 50)
    assert len(taus) == 50 and taus[0] == 999 and taus[-1] == 0 and torch.all(taus[1:] < taus[:-1])
    assert torch.equal(timestep_subsequence(10, 10), torch.arange(9, -1, -1))


def _source(model: torch.nn.Module, **egc) -> SimpleNamespace:
    config = build_config("egc", [(f"egc.{k}", v) for k, v in egc.items()])
    return SimpleNamespace(model=model.eval(), config=config, device=torch.device("cpu"), image_shape=(1, 8, 8))


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_generation_with_a_fixed_generator_is_deterministic(sampler):
    source = _source(tiny_egc("map"), sampler=sampler, sample_steps=4, guidance=1.0)
    labels = torch.tensor([0, 1, 2, 1])
    runs = [
        generate_egc(source, 4, labels=labels, generator=torch.Generator().manual_seed(seed))[0] for seed in (5, 5, 6)
    ]
    assert runs[0].shape == (4, 1, 8, 8) and runs[0].abs().max() <= 1
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])
    _, protocol = generate_egc(source, 3, generator=torch.Generator().manual_seed(5))
    assert protocol["sampler"] == sampler and protocol["steps"] == 4 and not protocol["conditional"]


@pytest.mark.parametrize(("scale", "base"), [("none", "none"), ("sigma", "none"), ("sigma", "gaussian")])
def test_guidance_adds_the_classifier_gradient(scale, base):
    """ε̂ − s·σ·∇ₓ log p(y | x_t, t) at either energy scale (at "sigma" the energy gradient is not multiplied by σ
    but the classifier's is)."""
    model = tiny_egc("map", conditional=False, energy_scale=scale, energy_base=base).eval()
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([100, 500])
    sigma, y = torch.tensor([0.5, 0.8]).view(2, 1, 1, 1), torch.tensor([2, 0])
    plain = guided_eps(model, x, t, sigma, y, guidance=0.0)
    assert torch.allclose(plain, model.eps(x, t, sigma), atol=1e-6)
    x_in = x.clone().requires_grad_(True)
    log_py = torch.log_softmax(model.logits_t(x_in, t), 1).gather(1, y.view(-1, 1)).sum()
    (grad_log_py,) = torch.autograd.grad(log_py, x_in)
    guided = guided_eps(model, x, t, sigma, y, guidance=2.0)
    assert torch.allclose(guided, plain - 2.0 * sigma * grad_log_py, atol=1e-5)


@pytest.mark.parametrize(("scale", "base"), [("none", "none"), ("sigma", "gaussian")])
def test_label_guidance_extrapolates_from_the_label_free_energy(scale, base):
    """Classifier-free weight w: ε̂ = ε̂_free + w·(ε̂_y − ε̂_free), with classifier guidance added on top unchanged."""
    model = tiny_egc("map", conditional=True, pool="mean_log_softmax", energy_scale=scale, energy_base=base).eval()
    x, t = torch.randn(3, 1, 8, 8), torch.tensor([20, 300, 900])
    sigma, y = torch.tensor([0.1, 0.6, 0.9]).view(3, 1, 1, 1), torch.tensor([2, 0, 1])
    free, conditional = model.eps(x, t, sigma), model.eps(x, t, sigma, y)
    assert torch.allclose(guided_eps(model, x, t, sigma, y), conditional, atol=1e-6)  # w = 1: the conditional
    assert torch.allclose(guided_eps(model, x, t, sigma, y, label_guidance=0.0), free, atol=1e-6)
    w3 = guided_eps(model, x, t, sigma, y, label_guidance=3.0)
    assert torch.allclose(w3, free + 3.0 * (conditional - free), atol=1e-5)
    classifier_only = guided_eps(model, x, t, sigma, y, guidance=2.0) - conditional
    assert classifier_only.abs().max() > 1e-4
    both = guided_eps(model, x, t, sigma, y, guidance=2.0, label_guidance=3.0)
    assert torch.allclose(both, w3 + classifier_only, atol=1e-5)


def test_label_guidance_of_the_control_and_of_an_unconditioned_network():
    from jemlab.errors import JemlabError

    torch.manual_seed(0)
    options = {"width": 8, "channel_mult": [1, 2], "num_res_blocks": 1, "attention": [2], "output": "epsilon"}
    control = build_model("egc_unet", (1, 8, 8), 3, options=options).eval()
    with torch.no_grad():
        for p in control.parameters():
            p.normal_(0, 0.2)
    x, t, sigma, y = torch.randn(2, 1, 8, 8), torch.tensor([10, 700]), torch.ones(2, 1, 1, 1), torch.tensor([1, 2])
    free, conditional = control.eps(x, t, sigma), control.eps(x, t, sigma, y)
    assert not torch.allclose(free, conditional)
    w = guided_eps(control, x, t, sigma, y, label_guidance=2.5)
    assert torch.allclose(w, free + 2.5 * (conditional - free), atol=1e-5)
    unconditioned = tiny_egc("map", conditional=False)
    with pytest.raises(JemlabError, match=r"needs a label-conditioned network.*--label-guidance 1"):
        guided_eps(unconditioned, x, t, sigma, y, label_guidance=2.0)
    assert torch.allclose(guided_eps(unconditioned, x, t, sigma, y), unconditioned.eps(x, t, sigma), atol=1e-6)


@pytest.mark.parametrize("scale", ["none", "sigma"])
def test_langevin_at_t0_steps_the_true_t0_energy(scale):
    """The refinement defence's step on `model.energy(x)` is α = σ_0²/2 on E(x, 0) = energy(x)·(1 or 1/σ_0)."""
    from jemlab.generate.egc import langevin_at_t0

    config = build_config(preset="egc", overrides=[("model.energy_scale", scale)])
    model = build_model("egc_unet", (1, 28, 28), 10, options=config.model.options)
    step, noise = langevin_at_t0(config, model)
    sigma0 = noise
    assert sigma0 == pytest.approx(0.01, rel=1e-3)  # the linear schedule's √β_1
    assert step == pytest.approx(sigma0**2 / 2 * (1 / sigma0 if scale == "sigma" else 1.0))


def test_log_softmax_pooling_ignores_the_level_that_the_map_energy_reads():
    """pool=mean_log_softmax: a per-pixel shift of the whole map moves the energy but not one logit (with the
    plain mean it moves the logits too); it is refused with the pooled energy, which would read its own logits."""
    from jemlab.errors import ConfigError

    split = tiny_egc("map", pool="mean_log_softmax").eval()
    plain = tiny_egc("map", pool="mean").eval()
    m = torch.randn(2, 3, 8, 8)
    shift = torch.randn(2, 1, 8, 8)
    assert torch.allclose(split.pool_logits(m + shift), split.pool_logits(m), atol=1e-5)
    assert not torch.allclose(plain.pool_logits(m + shift), plain.pool_logits(m), atol=1e-2)
    assert not torch.allclose(split.energy_from_map(m + shift), split.energy_from_map(m), atol=1e-2)
    # the logits are an average of per-pixel log-probabilities
    assert torch.allclose(split.pool_logits(m), torch.log_softmax(m, 1).mean(dim=(2, 3)), atol=1e-6)
    with pytest.raises(ConfigError, match=r"pool=mean_log_softmax .* use energy=map"):
        tiny_egc("pooled", pool="mean_log_softmax")


def test_min_snr_weight_is_one_for_noisy_images_and_gamma_over_snr_for_clean_ones():
    schedule = NoiseSchedule("linear", 1000)
    t = torch.arange(1000)
    weight = schedule.min_snr_weight(t, 5.0, torch.zeros(1000)).reshape(-1).double()
    snr = schedule.alpha_bar / (1 - schedule.alpha_bar)
    noisy = snr <= 5
    assert noisy.any() and (~noisy).any()
    assert torch.equal(weight[noisy], torch.ones(int(noisy.sum()), dtype=torch.float64))
    assert torch.allclose(weight[~noisy], 5 / snr[~noisy], rtol=1e-6)
    assert weight[0] < 1e-3  # t = 0: SNR ≈ 10^4 on the linear schedule


@pytest.mark.parametrize("parameterisation", ["energy", "epsilon"])
def test_min_snr_weights_the_denoising_term_and_leaves_the_logged_mse_alone(parameterisation):
    """EGC and the control weight each image's ε error by min(SNR_t, γ)/SNR_t; the logged `mse` stays unweighted,
    and a γ above every SNR of the schedule is the uniform loss."""
    from jemlab.objectives import EGCWeights, egc_loss, epsilon_loss
    from jemlab.objectives.egc import _noised

    if parameterisation == "energy":
        model, loss_fn = tiny_egc("map").double(), egc_loss
    else:
        torch.manual_seed(0)
        options = {"width": 8, "channel_mult": [1, 2], "num_res_blocks": 1, "attention": [2], "output": "epsilon"}
        model, loss_fn = build_model("egc_unet", (1, 8, 8), 3, options=options).double(), epsilon_loss
    schedule = NoiseSchedule("linear", 1000)
    x0, y = (torch.rand(16, 1, 8, 8) * 2 - 1).double(), torch.arange(16) % 3

    def run(min_snr: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        weights = EGCWeights(gamma=0.0, gamma_clean=0.0, min_snr=min_snr)
        return loss_fn(model, schedule, x0, y, weights, torch.Generator().manual_seed(3))

    uniform, stats_uniform = run(0.0)
    weighted, stats_weighted = run(5.0)
    t, noise, x_t, y_eps = _noised(model, schedule, x0, y, 0.1, torch.Generator().manual_seed(3))
    errors = (model.eps(x_t, t, schedule.sigma(t, x0), y_eps) - noise).pow(2).mean(dim=(1, 2, 3))
    weight = schedule.min_snr_weight(t, 5.0, errors)
    assert (weight < 1).any() and (weight == 1).any()  # the draw holds both kinds of timestep
    expected = (errors * weight).mean()
    assert weighted.item() == pytest.approx(expected.item(), rel=1e-9)
    assert weighted.item() < uniform.item()
    assert stats_weighted["mse"].item() == pytest.approx(stats_uniform["mse"].item(), rel=1e-12)
    above_every_snr = float((schedule.alpha_bar / (1 - schedule.alpha_bar)).max()) * 2
    assert run(above_every_snr)[0].item() == pytest.approx(uniform.item(), rel=1e-12)
