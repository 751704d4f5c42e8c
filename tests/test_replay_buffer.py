"""Replay buffer: draws, re-initialisation, write-back, class partitions, queue mode and state round trip."""

from __future__ import annotations

import torch

from jemlab.samplers import ReplayBuffer, uniform_init


def _buffer(**kw):
    gen = torch.Generator().manual_seed(0)
    return ReplayBuffer(kw.pop("capacity", 100), (1, 4, 4), uniform_init((1, 4, 4)), generator=gen, **kw)


def test_fixed_buffer_starts_uniform_and_writes_back():
    buf = _buffer(reinit_prob=0.0)
    assert buf.images.min() >= -1 and buf.images.max() <= 1 and len(buf) == 100
    draw = buf.sample(10, generator=torch.Generator().manual_seed(1))
    assert torch.equal(draw.x, buf.images[draw.slots])
    buf.update(draw, torch.full_like(draw.x, 0.5))
    assert torch.all(buf.images[draw.slots] == 0.5)


def test_reinit_fraction():
    buf = _buffer(capacity=1000, reinit_prob=0.05)
    buf.images.fill_(0.25)
    draw = buf.sample(20000, generator=torch.Generator().manual_seed(2))
    fresh = (draw.x != 0.25).flatten(1).any(1).float().mean()
    assert abs(float(fresh) - 0.05) < 0.01


def test_class_conditional_partitions():
    buf = _buffer(capacity=100, num_classes=10, class_conditional=True, reinit_prob=0.0)
    labels = torch.tensor([3, 3, 7])
    draw = buf.sample(3, labels=labels, generator=torch.Generator().manual_seed(0))
    assert torch.equal(draw.slots // buf.per_class, labels)
    assert torch.equal(buf.slot_labels()[draw.slots], labels)


def test_queue_mode_pushes_newest_and_caps_size():
    buf = _buffer(capacity=10, mode="queue", initial_size=4, reinit_prob=0.0)
    assert len(buf) == 4
    draw = buf.sample(6, generator=torch.Generator().manual_seed(0))
    buf.update(draw, torch.full_like(draw.x, 0.1))
    assert len(buf) == 10
    draw = buf.sample(3, generator=torch.Generator().manual_seed(0))
    buf.update(draw, torch.full_like(draw.x, 0.9))
    assert len(buf) == 10
    assert int((buf.images == 0.9).flatten(1).all(1).sum()) == 3  # the oldest three were dropped


def test_state_dict_round_trip():
    buf = _buffer(capacity=50, mode="queue", initial_size=5)
    draw = buf.sample(8, generator=torch.Generator().manual_seed(0))
    buf.update(draw, draw.x * 0.5)
    other = _buffer(capacity=50, mode="queue", initial_size=5)
    other.load_state_dict(buf.state_dict())
    assert torch.equal(other.images, buf.images) and len(other) == len(buf) and other.head == buf.head
