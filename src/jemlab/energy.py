"""The sign convention, stated once.

A classifier f_θ(x) ∈ R^C gives logits. Following the JEM paper (Grathwohl et al., 2020, eq. 5), the same logits
define an energy-based model of the input:

    p_θ(x, y) = exp(f_θ(x)[y]) / Z(θ)        →  joint energy     E_θ(x, y) = −f_θ(x)[y]
    p_θ(x)    = Σ_y exp(f_θ(x)[y]) / Z(θ)    →  marginal energy  E_θ(x)    = −logsumexp_y f_θ(x)[y]
    p_θ(y|x)  = softmax(f_θ(x))[y]            (Z and the energy's shift cancel)

Low energy means probable. Every sampler in jemlab *descends* an energy, every objective lowers the energy of data
and raises the energy of samples. A model with a separate scalar head h_θ(x) (the course variant, SPEC S2) treats
h as an unnormalised log-density, so its energy is E_θ(x) = −h_θ(x); under that model the classifier and the
density are two different distributions that merely share features.
"""

from __future__ import annotations

import torch


def marginal_energy(logits: torch.Tensor) -> torch.Tensor:
    """E(x) = −logsumexp_y f(x)[y].

    Args:
        logits: (N, C) class logits.

    Returns:
        (N,) energies.
    """
    return -torch.logsumexp(logits, dim=-1)


def joint_energy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """E(x, y) = −f(x)[y].

    Args:
        logits: (N, C) class logits.
        labels: (N,) int64 class indices.

    Returns:
        (N,) energies.
    """
    return -logits.gather(1, labels.view(-1, 1)).squeeze(1)


def head_energy(log_density: torch.Tensor) -> torch.Tensor:
    """E(x) = −h(x) for a separate scalar head whose output is an unnormalised log-density.

    Args:
        log_density: (N, 1) or (N,) head outputs.

    Returns:
        (N,) energies.
    """
    return -log_density.reshape(-1)


# --- the same energies with their gradients, for code that differentiates by hand ---------------------------------


def energy_and_logit_gradient(
    logits: torch.Tensor, labels: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """E and ∂E/∂logits: marginal (∂E/∂f = −softmax(f)) or, with labels, joint (∂E/∂f = −onehot(y)).

    Args:
        logits: (N, C) class logits.
        labels: (N,) class indices for the joint energy, or None for the marginal one.

    Returns:
        ((N,) energies, (N, C) gradients).
    """
    if labels is None:
        return marginal_energy(logits), -torch.softmax(logits, dim=-1)
    onehot = torch.zeros_like(logits).scatter_(1, labels.view(-1, 1), 1.0)
    return joint_energy(logits, labels), -onehot


def head_energy_and_gradient(log_density: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """E = −h and ∂E/∂h = −1 for a separate scalar head.

    Args:
        log_density: (N, 1) head outputs.

    Returns:
        ((N,) energies, (N, 1) gradients).
    """
    return head_energy(log_density), -torch.ones_like(log_density)
