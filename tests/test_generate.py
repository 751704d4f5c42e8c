"""Generation from a run: shapes, determinism, the buffer is left alone, class samples start in their class."""

from __future__ import annotations

import torch

from jemlab.config import build_config
from jemlab.generate import generate
from jemlab.training.loop import Trainer


def _trainer(tmp_path, overrides):
    trainer = Trainer(build_config("default", overrides), tmp_path / "run")
    for _ in range(3):
        trainer.train_step(*trainer.batcher.next_batch(), epoch=0)
    return trainer


def test_generate_is_deterministic_and_pure(tmp_path, tiny_config_overrides):
    trainer = _trainer(tmp_path, tiny_config_overrides)
    before = trainer.buffer.images.clone()
    a, protocol = generate(trainer, 6, generator=torch.Generator().manual_seed(5))
    b, _ = generate(trainer, 6, generator=torch.Generator().manual_seed(5))
    assert a.shape == (6, 1, 28, 28) and torch.equal(a, b)
    assert protocol["init"] == "buffer" and protocol["steps"] == trainer.config.sampler.steps
    assert torch.equal(trainer.buffer.images, before)
    c, protocol = generate(trainer, 4, init="noise", steps=2, generator=torch.Generator().manual_seed(5))
    assert protocol == {**protocol, "init": "noise", "steps": 2} and c.min() >= -1 and c.max() <= 1


def test_class_samples_start_from_buffer_images_of_that_class(tmp_path, tiny_config_overrides):
    trainer = _trainer(tmp_path, tiny_config_overrides)
    labels = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 8, 9] * 2)
    x, _ = generate(trainer, len(labels), labels=labels, steps=0, generator=torch.Generator().manual_seed(0))
    # With zero steps the samples are the chosen starting points: buffer images the model assigns to the class
    # (or, for a class no buffer image is assigned to, the most class-like ones).
    buffer = trainer.buffer.images
    assert all(any(torch.equal(xi, b) for b in buffer) for xi in x)
    with torch.no_grad():
        predicted = trainer.model.logits(x).argmax(1)
        buffer_predicted = trainer.model.logits(buffer).argmax(1)
    present = torch.tensor([bool((buffer_predicted == c).any()) for c in labels.tolist()])
    assert torch.equal(predicted[present], labels[present])
