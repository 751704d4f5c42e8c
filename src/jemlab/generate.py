"""Generation from a trained model, shared by the training loop's sample grids and ``jemlab sample``.

Where chains start:
- ``"buffer"`` (default when the run kept one): persistent chains from the replay buffer, continued for K more
  steps; this is how JEM shows its samples (Grathwohl et al., 2020, App. H).
- ``"noise"``: fresh chains from the initialiser, the only option for short-run models (SPEC S3); PCD-trained
  models usually need many more steps from noise.

Class-conditional samples (labels given) follow p(x|y) ∝ exp(f(x)[y]). From a class-partitioned buffer they start
in their class's partition; from an unconditional buffer they start from buffer images the classifier already
assigns to y, so the chain refines a y-like image rather than turning another class into an adversarial y.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch

from jemlab.config import Config
from jemlab.errors import JemlabError
from jemlab.models import EnergyModel
from jemlab.samplers import ReplayBuffer
from jemlab.samplers.init import Initializer
from jemlab.sampling import run_chains


class SamplingSource(Protocol):
    """What generation needs: a Trainer or a loaded run both provide it."""

    model: EnergyModel
    config: Config
    buffer: ReplayBuffer | None
    device: torch.device
    init: Initializer


def _start_points(
    source: SamplingSource,
    n: int,
    labels: torch.Tensor | None,
    init: str,
    generator: torch.Generator,
) -> torch.Tensor:
    buffer = source.buffer
    if init == "noise" or buffer is None:
        return source.init(n, labels, generator)
    if labels is None:
        slots = torch.randint(0, len(buffer), (n,), generator=generator)
        return buffer.images[slots].clone()
    if buffer.class_conditional:
        offsets = torch.randint(0, buffer.per_class, (n,), generator=generator)
        return buffer.images[labels * buffer.per_class + offsets].clone()
    probs, energy = _buffer_scores(source)
    predicted = probs.argmax(1)
    energy_cut = energy.quantile(0.25)
    starts = torch.empty((n, *buffer.shape))
    for c in labels.unique().tolist():
        rows = (labels == c).nonzero().squeeze(1)
        candidates = (predicted == c).nonzero().squeeze(1)
        if len(candidates) == 0:  # no image of this class in the buffer: take the most y-like ones
            candidates = probs[:, c].topk(min(len(probs), 64)).indices
        # Of those, keep the ones among the most probable quarter of the buffer: chains that never left the noise
        # they started from also get a label, and they must not seed a class sample. Failing that, the 16 most
        # probable candidates.
        probable = candidates[energy[candidates] <= energy_cut]
        candidates = probable if len(probable) > 0 else candidates[energy[candidates].argsort()[:16]]
        pick = candidates[torch.randint(0, len(candidates), (len(rows),), generator=generator)]
        starts[rows] = buffer.images[: len(buffer)][pick]
    return starts


@torch.no_grad()
def _buffer_scores(source: SamplingSource, batch: int = 1000) -> tuple[torch.Tensor, torch.Tensor]:
    """p(y|x) (N, C) and E(x) (N,) of every image in the buffer."""
    model, images = source.model, source.buffer.images[: len(source.buffer)]
    was_training = model.training
    model.eval()
    probs, energies = [], []
    for i in range(0, len(images), batch):
        logits, energy = model.logits_and_energy(images[i : i + batch].to(source.device))
        probs.append(logits.float().softmax(1).cpu())
        energies.append(energy.float().cpu())
    model.train(was_training)
    return torch.cat(probs), torch.cat(energies)


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
        generator: random source (CPU) for starting points and Langevin noise; fixed seed → same samples.
        batch_size: chains run at once.

    Returns:
        (images, protocol): the samples and a dict describing how they were made.
    """
    if init not in ("auto", "buffer", "noise"):
        raise JemlabError(f"unknown init '{init}'; choose auto, buffer or noise")
    if source.config.objective.name == "egc":  # EGC runs sample with DDIM/DDPM from noise (diffusion/egc.py)
        if init == "buffer":
            raise JemlabError("EGC runs have no replay buffer: their samplers start from noise (init 'noise')")
        from jemlab.diffusion.egc import generate_egc

        return generate_egc(source, n, labels=labels, steps=steps, generator=generator, batch_size=batch_size)
    if init == "buffer" and source.buffer is None:
        raise JemlabError("this run has no replay buffer (short-run sampler); use init 'noise'")
    if labels is not None and len(labels) != n:
        raise JemlabError(f"got {len(labels)} labels for {n} samples")
    mode = "buffer" if init in ("auto", "buffer") and source.buffer is not None else "noise"
    generator = generator or torch.Generator().manual_seed(0)
    cfg = source.config.sampler
    steps = cfg.steps if steps is None else steps
    x_start = _start_points(source, n, None if labels is None else labels.cpu(), mode, generator)
    # The chain noise comes from a generator on the model's device, seeded from the caller's generator.
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    noise_gen = torch.Generator(device=source.device).manual_seed(seed)
    out = []
    for i in range(0, n, batch_size):
        chunk_labels = None if labels is None else labels[i : i + batch_size].to(source.device)
        x, _ = run_chains(
            source.model,
            x_start[i : i + batch_size].to(source.device),
            cfg,
            labels=chunk_labels,
            steps=steps,
            generator=noise_gen,
            channels_last=source.config.train.channels_last,
        )
        out.append(x.float().cpu())
    protocol = {
        "init": mode,
        "steps": steps,
        "step_size": cfg.step_size,
        "noise": cfg.noise,
        "conditional": labels is not None,
        "n": n,
    }
    return torch.cat(out).contiguous(), protocol
