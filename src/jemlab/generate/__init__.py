"""Generation from a trained run, shared by the training loop's sample grids, ``jemlab sample`` and evaluation.

One entry point, `generate`, for both families:
- JEM runs: SGLD chains from the replay buffer or the initialiser (`jem.py`);
- EGC runs: DDIM/DDPM from noise with the model's own classifier as guidance (`egc.py`).

Every sample has its own random generators, seeded from the caller's generator and the sample's index
(`seeds.py`): a sample is the same whatever the batch size and however many samples are drawn with it.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch

from jemlab.config import Config
from jemlab.errors import JemlabError
from jemlab.generate.egc import generate_egc
from jemlab.generate.jem import generate_jem
from jemlab.models import EnergyModel
from jemlab.samplers import ReplayBuffer
from jemlab.samplers.init import Initializer


class SamplingSource(Protocol):
    """What generation needs: a Trainer or a loaded run both provide it."""

    model: EnergyModel
    config: Config
    buffer: ReplayBuffer | None
    device: torch.device
    init: Initializer


def generate(
    source: SamplingSource,
    n: int,
    *,
    labels: torch.Tensor | None = None,
    steps: int | None = None,
    init: str = "auto",
    generator: torch.Generator | None = None,
    batch_size: int = 256,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Draw n samples (images in [−1, 1], on the CPU) without changing the source's buffer.

    Args:
        source: a Trainer or a loaded run.
        n: number of samples.
        labels: (n,) classes for p(x|y) samples, or None for p(x).
        steps: SGLD steps (default: the run's sampler.steps); for EGC runs, DDIM/DDPM steps (egc.sample_steps).
        init: "auto" (buffer when there is one), "buffer" or "noise".
        generator: random source (CPU or the model's device) of the samples' seeds; fixed seed → same samples.
            Sample i depends only on this generator's state and i, not on `batch_size` or n.
        batch_size: chains run at once (an upper bound: JEM chains with Langevin noise run one at a time, see
            `jem._langevin`).

    Returns:
        (images, protocol): the samples and a dict describing how they were made.
    """
    if init not in ("auto", "buffer", "noise"):
        raise JemlabError(f"unknown init '{init}'; choose auto, buffer or noise")
    if source.config.objective.name == "egc":  # EGC runs sample with DDIM/DDPM from noise
        if init == "buffer":
            raise JemlabError("EGC runs have no replay buffer: their samplers start from noise (init 'noise')")
        return generate_egc(source, n, labels=labels, steps=steps, generator=generator, batch_size=batch_size)
    return generate_jem(source, n, labels=labels, steps=steps, init=init, generator=generator, batch_size=batch_size)


__all__ = ["SamplingSource", "generate", "generate_egc", "generate_jem"]
