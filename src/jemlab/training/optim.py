"""The optimiser of a run: its construction, the learning-rate schedule, and the global gradient norm (clipped)."""

from __future__ import annotations

import math

import torch

from jemlab.config import Config


def build_optimizer(model: torch.nn.Module, config: Config) -> torch.optim.Optimizer:
    """Adam, AdamW or SGD (``optim.name``) over the model's trainable parameters."""
    opt = config.optim
    params = [p for p in model.parameters() if p.requires_grad]
    if opt.name == "adam":
        return torch.optim.Adam(params, lr=opt.lr, betas=opt.betas, weight_decay=opt.weight_decay)
    if opt.name == "adamw":
        return torch.optim.AdamW(params, lr=opt.lr, betas=opt.betas, weight_decay=opt.weight_decay)
    return torch.optim.SGD(params, lr=opt.lr, momentum=opt.momentum, weight_decay=opt.weight_decay)


def learning_rate(config: Config, step: int, epoch: int) -> float:
    """Learning rate at iteration `step` (0-based) in epoch `epoch` (0-based): linear warm-up × schedule."""
    opt = config.optim
    lr = opt.lr
    if opt.warmup_steps > 0:
        lr *= min(1.0, (step + 1) / opt.warmup_steps)
    if opt.schedule == "step":
        lr *= opt.gamma ** (epoch // opt.step_epochs)
    elif opt.schedule == "multistep":
        lr *= opt.gamma ** sum(epoch >= m for m in opt.milestones)
    elif opt.schedule == "cosine":
        lr *= 0.5 * (1 + math.cos(math.pi * min(1.0, epoch / config.train.epochs)))
    return lr


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def gradient_norm(parameters: list[torch.nn.Parameter], clip: float | None = None) -> float:
    """Global L2 norm of the parameter gradients (before clipping); clips them to `clip` when given."""
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return 0.0
    if clip is not None:
        return float(torch.nn.utils.clip_grad_norm_(parameters, clip))
    total_norm = getattr(torch.nn.utils, "get_total_norm", None)  # torch >= 2.6: one fused reduction
    if total_norm is not None:
        return float(total_norm(grads))
    return float(torch.linalg.vector_norm(torch.stack([g.detach().float().norm() for g in grads])))
