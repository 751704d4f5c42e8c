"""PGD attacks against closed-form worst cases of linear models, and the differentiable JEM defence."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from jemlab.errors import JemlabError
from jemlab.evaluation import robustness as rob


def _linear(d: int, c: int, seed: int) -> nn.Linear:
    torch.manual_seed(seed)
    lin = nn.Linear(d, c).double()
    return lin


def _inputs(n: int, d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    # Away from the box boundary: |x| <= 0.4, and the attacks below move each pixel by <= 0.2.
    return (torch.rand(n, d, generator=g, dtype=torch.float64) * 0.8 - 0.4).reshape(n, 1, 4, 4)


def _fn(lin: nn.Linear):
    return lambda x: lin(x.flatten(1))


def test_eps_zero_changes_nothing():
    lin = _linear(16, 3, 0)
    x = _inputs(20, 16, 1)
    y = torch.randint(0, 3, (20,))
    x_adv = rob.pgd_attack(_fn(lin), x, y, eps=0.0, steps=5)
    assert torch.equal(x_adv, x)
    r = rob.evaluate_attack(_fn(lin), x, y, eps=0.0, steps=5)
    assert r["robust_accuracy"] == r["clean_accuracy"]


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_binary_linear_model_reaches_closed_form_worst_case(norm):
    d = 16
    lin = _linear(d, 2, 2)
    x = _inputs(32, d, 3)
    y = torch.randint(0, 2, (32,), generator=torch.Generator().manual_seed(4))
    eps = 0.1  # [0, 1] units → 0.2 in [-1, 1]
    w = lin.weight.detach()
    dw = w[y] - w[1 - y]  # (n, d): margin m(x) = dw·x + db
    bound = 2 * eps * (dw.abs().sum(1) if norm == "linf" else dw.norm(dim=1))

    def margin(z):
        out = lin(z.flatten(1)).detach()
        return out.gather(1, y[:, None]).squeeze(1) - out.gather(1, (1 - y)[:, None]).squeeze(1)

    x_adv = rob.pgd_attack(_fn(lin), x, y, eps=eps, norm=norm, steps=10, random_start=False)
    delta = (x_adv - x).flatten(1)
    if norm == "linf":
        assert delta.abs().max() <= 2 * eps + 1e-12
    else:
        assert delta.norm(dim=1).max() <= 2 * eps + 1e-12
    torch.testing.assert_close(margin(x) - margin(x_adv), bound, atol=1e-9, rtol=1e-9)

    # With random starts the attack can never beat the bound, and gets (almost) all of it (L2 PGD
    # only shrinks the random start's off-direction component geometrically, hence 97%).
    g = torch.Generator().manual_seed(5)
    x_adv = rob.pgd_attack(_fn(lin), x, y, eps=eps, norm=norm, steps=40, restarts=2, generator=g)
    reduction = margin(x) - margin(x_adv)
    assert (reduction <= bound + 1e-9).all()
    assert (reduction >= (0.99 if norm == "linf" else 0.97) * bound).all()


def test_multiclass_linear_targeted_and_untargeted():
    d, c = 16, 4
    lin = _linear(d, c, 6)
    x = _inputs(40, d, 7)
    logits = lin(x.flatten(1)).detach()
    y = logits.argmax(1)  # correctly classified by construction
    t = (y + 1) % c
    w = lin.weight.detach()
    eps = 0.05
    fn = _fn(lin)

    # Targeted margin f_t - f_y is linear: PGD L∞ gains exactly 2·eps·||w_t - w_y||_1.
    x_adv = rob.pgd_attack(fn, x, y, eps=eps, steps=10, loss="margin", targets=t, random_start=False)

    def gap(z):
        out = lin(z.flatten(1)).detach()
        return (out.gather(1, t[:, None]) - out.gather(1, y[:, None])).squeeze(1)

    torch.testing.assert_close(gap(x_adv) - gap(x), 2 * eps * (w[t] - w[y]).abs().sum(1))

    # Untargeted: the best achievable max_{j≠y} f_j - f_y is max_j [gap_j(x) + 2·eps·||w_j - w_y||_1].
    optimum = torch.full((len(x),), -float("inf"), dtype=torch.float64)
    for j in range(c):
        val = logits[:, j] - logits.gather(1, y[:, None]).squeeze(1)
        val = val + 2 * eps * (w[j] - w[y]).abs().sum(1)
        optimum = torch.where(y == j, optimum, torch.maximum(optimum, val))
    g = torch.Generator().manual_seed(8)
    x_adv = rob.pgd_attack(fn, x, y, eps=eps, steps=20, restarts=3, loss="margin", generator=g)
    out = lin(x_adv.flatten(1)).detach()
    other = out.clone()
    other.scatter_(1, y[:, None], -float("inf"))
    achieved = other.max(1).values - out.gather(1, y[:, None]).squeeze(1)
    assert (achieved <= optimum + 1e-9).all()
    assert ((achieved - optimum).abs() < 1e-6).double().mean() >= 0.9

    # CE attack lowers robust accuracy monotonically with eps on this model.
    curve = rob.robustness_curve(fn, x, y, [0.0, 0.02, 0.2], steps=10, generator=torch.Generator().manual_seed(0))
    acc = curve["robust_accuracy"]
    assert acc[0] == 1.0 and acc[0] >= acc[1] >= acc[2] and acc[2] < 1.0


def test_attack_leaves_parameter_grads_untouched_and_respects_box():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.Tanh(), nn.Linear(8, 3))
    x = torch.rand(10, 1, 4, 4) * 2 - 1  # includes pixels near ±1
    y = torch.randint(0, 3, (10,))
    x_adv = rob.pgd_attack(net, x, y, eps=0.3, norm="linf", steps=5, generator=torch.Generator().manual_seed(1))
    assert x_adv.min() >= -1 and x_adv.max() <= 1
    assert (x_adv - x).abs().max() <= 0.6 + 1e-6
    assert all(p.grad is None for p in net.parameters())
    with pytest.raises(JemlabError, match="norm"):
        rob.pgd_attack(net, x, y, eps=0.1, norm="l1")


def test_langevin_refine_is_differentiable_with_exact_gradient():
    c, alpha, k = 0.5, 0.4, 3
    energy = lambda z: 0.5 * c * (z.flatten(1) ** 2).sum(1)  # noqa: E731
    x = (torch.rand(4, 1, 2, 2, dtype=torch.float64) * 0.5).requires_grad_(True)
    out = rob.langevin_refine(energy, x, steps=k, step_size=alpha, noise_std=0.0)
    # x_K = (1 - α c)^K x, no clamping inside [-1, 1].
    torch.testing.assert_close(out, (1 - alpha * c) ** k * x)
    (g,) = torch.autograd.grad(out.sum(), [x])
    torch.testing.assert_close(g, torch.full_like(x, (1 - alpha * c) ** k))
    detached = rob.langevin_refine(energy, x, steps=k, step_size=alpha, noise_std=0.0, differentiable=False)
    assert not detached.requires_grad
    torch.testing.assert_close(detached, (1 - alpha * c) ** k * x.detach())  # the library's sgld, same chain


def test_jem_defence_eot_attack_runs_through_refinement():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.Tanh(), nn.Linear(8, 3))
    energy = lambda z: -torch.logsumexp(net(z), 1)  # noqa: E731
    g = torch.Generator().manual_seed(2)
    defend = rob.langevin_defence(energy, steps=2, step_size=0.1, noise_std=0.01, init_noise_std=0.03, generator=g)
    fn = rob.defended_logits_fn(net, defend, n_chains=3)
    x = torch.rand(6, 1, 4, 4) * 2 - 1
    assert fn(x).shape == (6, 3)
    # The EOT gradient is non-zero and flows through the refinement.
    xg = x.clone().requires_grad_(True)
    (gx,) = torch.autograd.grad(fn(xg).sum(), [xg])
    assert gx.abs().sum() > 0
    y = net(x).argmax(1)
    r = rob.evaluate_attack(fn, x, y, eps=0.1, steps=3, eot_samples=2, generator=g)
    assert 0.0 <= r["robust_accuracy"] <= r["clean_accuracy"] <= 1.0
    assert all(p.grad is None for p in net.parameters())


def test_robustness_plot(tmp_path):
    c = {"eps": [0.0, 0.1], "robust_accuracy": [0.9, 0.2]}
    p = rob.plot_robustness_curves({"plain": c, "defended": c}, tmp_path / "r.png")
    assert p.read_bytes()[:4] == b"\x89PNG"


def test_margin_loss_sees_through_a_saturated_softmax_that_masks_the_cross_entropy():
    """Logits scaled ×10⁴ in float32: the softmax of a correct prediction is exactly one-hot, so the cross-entropy's
    input gradient is exactly zero and CE-PGD cannot move; the margin's gradient is w_j − w_y whatever the scale."""
    lin = _linear(16, 3, 7).float()
    x = _inputs(40, 16, 8).float()
    with torch.no_grad():
        y = lin(x.flatten(1)).argmax(1)  # every image correctly classified

    def fn(z):
        return 1e4 * lin(z.flatten(1))

    kw = dict(eps=0.2, steps=20, random_start=False)  # L∞ 0.2 in [0, 1] units flips every prediction of this model
    ce = rob.evaluate_attack(fn, x, y, loss="ce", **kw)
    margin = rob.evaluate_attack(fn, x, y, loss="margin", **kw)
    assert ce["clean_accuracy"] == 1.0
    assert ce["robust_accuracy"] == 1.0  # masked: the attack never leaves x
    assert margin["robust_accuracy"] < 0.2
