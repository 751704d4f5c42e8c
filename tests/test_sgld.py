"""SGLD reaches the right distribution on a Gaussian energy and touches nothing but x."""

from __future__ import annotations

import torch

from jemlab.samplers import sgld


def test_sgld_on_gaussian_energy_matches_mean_and_variance():
    # E(x) = ||x − μ||² / (2 s²) is the energy of N(μ, s² I). Textbook Langevin (σ² = 2α) targets it; the chain
    # x ← x − (α/s²)(x − μ) + σ ε is an AR(1) process whose exact stationary variance is σ² / (1 − (1 − α/s²)²).
    mu, s = torch.tensor([0.3, -0.2]), 0.5

    def energy(x):
        return ((x - mu) ** 2).sum(1) / (2 * s**2)

    step = 2e-3 * s**2
    noise = (2 * step) ** 0.5
    gen = torch.Generator().manual_seed(0)
    x, _ = sgld(energy, torch.zeros(4000, 2), steps=3000, step_size=step, noise=noise, bounds=None, generator=gen)
    a = step / s**2
    expected_var = noise**2 / (1 - (1 - a) ** 2)
    assert torch.allclose(x.mean(0), mu, atol=0.03)
    assert torch.allclose(x.var(0), torch.full((2,), expected_var), rtol=0.08)
    assert abs(expected_var - s**2) / s**2 < 0.01  # which is the target variance up to discretisation


def test_sgld_computes_no_parameter_gradients_and_leaves_input_alone():
    net = torch.nn.Linear(4, 1)
    x0 = torch.randn(8, 4)
    x0_copy = x0.clone()
    x, stats = sgld(lambda x: net(x).squeeze(1), x0, steps=5, step_size=0.1, noise=0.01)
    assert all(p.grad is None for p in net.parameters())
    assert torch.equal(x0, x0_copy)
    assert not x.requires_grad
    assert stats.grad_norm > 0


def test_sgld_clamps_gradient_and_box():
    # Linear energy E = 100·sum(x): gradient 100 everywhere; clamp to 0.03 gives steps of exactly α·0.03.
    x0 = torch.zeros(3, 5)
    x, _ = sgld(lambda x: 100 * x.sum(1), x0, steps=2, step_size=10.0, noise=0.0, grad_clamp=0.03)
    assert torch.allclose(x, torch.full_like(x, -0.6))
    x, _ = sgld(lambda x: 100 * x.sum(1), x0, steps=5, step_size=10.0, noise=0.0, grad_clamp=0.03)
    assert torch.allclose(x, torch.full_like(x, -1.0))  # clamped to the pixel box


def test_sgld_is_deterministic_given_generator():
    def energy(x):
        return (x**2).sum(1)

    x0 = torch.rand(16, 3)
    a, _ = sgld(energy, x0, steps=4, step_size=0.1, noise=0.1, generator=torch.Generator().manual_seed(1))
    b, _ = sgld(energy, x0, steps=4, step_size=0.1, noise=0.1, generator=torch.Generator().manual_seed(1))
    c, _ = sgld(energy, x0, steps=4, step_size=0.1, noise=0.1, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_noise_first_order_matches_course_code():
    # Course order: noise → clamp → gradient step → clamp. With a zero-gradient energy both orders add the same
    # noise, but with noise_first the last operation is the gradient step.
    def energy(x):
        return x.sum(1)

    x0 = torch.zeros(2, 3)
    gen = torch.Generator().manual_seed(0)
    x, _ = sgld(energy, x0, steps=1, step_size=0.1, noise=0.5, noise_first=True, generator=gen)
    eps = torch.randn(2, 3, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(x, ((x0 + 0.5 * eps).clamp(-1, 1) - 0.1).clamp(-1, 1))
