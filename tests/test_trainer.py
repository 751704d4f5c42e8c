"""Trainer iterations with the optional p(x|y) term and the short-run (no buffer) sampler."""

from __future__ import annotations

import torch

from jemlab.config import build_config
from jemlab.training.loop import Trainer


def test_pxy_term_uses_class_partitions_of_the_buffer(tmp_path, tiny_config_overrides):
    overrides = [*tiny_config_overrides, ("objective.pxy", "1.0"), ("sampler.class_conditional", "true")]
    trainer = Trainer(build_config("default", overrides), None)
    before = trainer.buffer.images.clone()
    stats = trainer.train_step(*trainer.batcher.next_batch(), epoch=0)
    assert "cd_xy" in stats and "cd" in stats
    changed = (trainer.buffer.images != before).flatten(1).any(1)
    n_px = trainer.config.sampler.batch_size  # 64 chains for p(x), one per data image (32) for p(x|y)
    assert n_px < int(changed.sum()) <= n_px + 32  # both kinds of chains were written back


def test_short_run_sampler_keeps_no_buffer(tmp_path, tiny_config_overrides):
    trainer = Trainer(build_config("mlp", tiny_config_overrides), None)
    assert trainer.buffer is None
    x, stats = trainer.negatives(5)
    assert x.shape == (5, 1, 28, 28) and stats["sgld_grad_norm"] >= 0
    x, _ = trainer.negatives(3, labels=torch.tensor([0, 1, 2]))
    assert x.shape == (3, 1, 28, 28)
