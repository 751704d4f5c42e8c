"""The course code's training iteration (SPEC S2; UvA DL tutorial 8 style), re-implemented eagerly as a baseline.

Written the way the course notebook writes it: a Python-list buffer of single images, ``random.choices`` for old
samples, ``torch.rand`` for new ones, the SGLD loop of `reference_sgld` below (fp32, NCHW), one forward
pass over real and fake images, loss = α·(E_real² + E_fake²).mean() + (E_real − E_fake).mean() + CE, Adam.
Only the speed of this baseline matters; it uses jemlab's course network so both sides run the same arithmetic.
"""

from __future__ import annotations

import random

import torch
import torch.nn.functional as F

from jemlab.config import Config, SamplerConfig
from jemlab.data import DatasetSplits, RandomBatcher
from jemlab.models import EnergyModel, build_model


def reference_sgld(model: EnergyModel, x_init: torch.Tensor, cfg: SamplerConfig) -> torch.Tensor:
    """(a) The eager loop as the course code writes it (noise → clamp → gradient → clipped step → clamp)."""
    for p in model.parameters():
        p.requires_grad = False
    x = x_init.clone()
    x.requires_grad = True
    noise = torch.randn(x.shape)
    for _ in range(cfg.steps):
        noise.normal_(0, cfg.noise)
        x.data.add_(noise.data)
        x.data.clamp_(min=-1.0, max=1.0)
        energy = model.energy(x)
        energy.sum().backward()
        x.grad.data.clamp_(-cfg.grad_clamp, cfg.grad_clamp)
        x.data.add_(-cfg.step_size * x.grad.data)
        x.grad.detach_()
        x.grad.zero_()
        x.data.clamp_(min=-1.0, max=1.0)
    for p in model.parameters():
        p.requires_grad = True
    return x.detach()


class EagerCourseTrainer:
    """One course-code training iteration per `train_step` call, on the course network in fp32."""

    def __init__(self, config: Config, splits: DatasetSplits, seed: int = 0) -> None:
        torch.manual_seed(seed)
        random.seed(seed)
        self.config = config
        self.model = build_model("course_cnn", splits.image_shape, splits.num_classes, "separate", {})
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=config.optim.lr, betas=config.optim.betas)
        self.batcher = RandomBatcher(splits.train, config.train.batch_size, seed=seed)
        self.shape = splits.image_shape
        self.buffer = [(torch.rand((1, *self.shape)) * 2 - 1) for _ in range(config.train.batch_size)]

    def sample(self, n: int) -> torch.Tensor:
        s = self.config.sampler
        n_new = int(torch.distributions.Binomial(n, s.reinit_prob).sample())
        fresh = torch.rand((n_new, *self.shape)) * 2 - 1
        old = torch.cat(random.choices(self.buffer, k=n - n_new), dim=0)
        x = reference_sgld(self.model, torch.cat([fresh, old]), s)
        self.buffer = list(x.chunk(n, dim=0)) + self.buffer
        self.buffer = self.buffer[: s.buffer_size]
        return x

    def train_step(self) -> float:
        x, y = self.batcher.next_batch()
        x = (x + self.config.objective.input_noise * torch.randn_like(x)).clamp(-1, 1)
        fake = self.sample(len(x))
        self.model.train()
        logits, energy = self.model.logits_and_energy(torch.cat([x, fake]))
        e_real, e_fake = energy.chunk(2)
        loss = (
            self.config.objective.energy_l2 * (e_real**2 + e_fake**2).mean()
            + (e_real.mean() - e_fake.mean())
            + F.cross_entropy(logits[: len(x)], y)
        )
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        return float(loss)
