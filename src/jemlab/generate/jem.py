"""Generation from a JEM run: SGLD chains on the model's energy, started from the replay buffer or the initialiser.

Where chains start:
- ``"buffer"`` (default when the run kept one): persistent chains from the replay buffer, continued for K more
  steps; this is how JEM shows its samples (Grathwohl et al., 2020, App. H).
- ``"noise"``: fresh chains from the initialiser, the only option for short-run models (SPEC S3); PCD-trained
  models usually need many more steps from noise.

Class-conditional samples (labels given) follow p(x|y) ∝ exp(f(x)[y]). From a class-partitioned buffer they start
in their class's partition; from an unconditional buffer they start from buffer images the classifier already
assigns to y, so the chain refines a y-like image rather than turning another class into an adversarial y.

Every random choice of sample i (its buffer slot or initial image, its Langevin noise) comes from generators of its
own (`seeds.py`), so sample i does not depend on the batch size or on how many samples are drawn with it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from jemlab.errors import JemlabError
from jemlab.generate.seeds import SampleGenerators, draw_seeds
from jemlab.sampling import run_chains

if TYPE_CHECKING:
    from jemlab.generate import SamplingSource


#: Class-conditional samples start from buffer images of their class among this lowest-energy fraction of the buffer:
#: the highest-energy tenth holds the chains just restarted from the initialiser. A quarter, as before, left about
#: 50 images per class of a 5,000-image buffer, so 100 samples per class started twice from each, and half were
#: near-copies; measured on a default-preset checkpoint (3,861 iterations, 100 samples per class, docs/tuning.md):
#: near-copies 400/1000 at 0.25, 184 at 0.5, 0 at 0.75, 0.9 and 1.0; per-class Fréchet distance 33.1, 13.8, 8.1,
#: 6.7 and 7.0 (the buffer's own: 9.3).
START_ENERGY_QUANTILE = 0.9


def _distinct(candidates: torch.Tensor, count: int, seed: int) -> torch.Tensor:
    """`count` entries of `candidates`, all different while there are enough: the k-th is entry k of one seeded
    permutation (cycled), so it depends on the seed and on k only, not on how many are drawn or in what batches."""
    order = candidates[torch.randperm(len(candidates), generator=torch.Generator().manual_seed(seed))]
    return order[torch.arange(count) % len(order)]


def _start_points(
    source: SamplingSource,
    labels: torch.Tensor | None,
    init: str,
    generators: SampleGenerators,
    seed: int,
) -> torch.Tensor:
    """(n, C, H, W) starting images on the CPU.

    From the initialiser, sample i's draw comes from ``generators[i]``. From the buffer, samples take *different*
    buffer images while the buffer (or the class's share of it) has enough: drawn independently, a few images were
    drawn again and again, and their chains ended as near-copies of each other. The k-th sample of a class takes
    entry k of a permutation seeded by `seed` and the class."""
    buffer = source.buffer
    if init == "noise" or buffer is None:
        draws = [
            source.init(1, None if labels is None else labels[i : i + 1], g)
            for i, g in enumerate(generators.generators)
        ]
        return torch.cat(draws)
    if labels is None:
        return buffer.images[_distinct(torch.arange(len(buffer)), len(generators), seed)].clone()
    if buffer.class_conditional:
        pick = torch.empty(len(labels), dtype=torch.long)
        for c in labels.unique().tolist():
            rows = (labels == c).nonzero().squeeze(1)
            slots = c * buffer.per_class + torch.arange(buffer.per_class)
            pick[rows] = _distinct(slots, len(rows), _class_seed(seed, c))
        return buffer.images[pick].clone()
    probs, energy = _buffer_scores(source)
    predicted = probs.argmax(1)
    energy_cut = energy.quantile(START_ENERGY_QUANTILE)
    starts = torch.empty((len(labels), *buffer.shape))
    for c in labels.unique().tolist():
        rows = (labels == c).nonzero().squeeze(1)
        candidates = (predicted == c).nonzero().squeeze(1)
        if len(candidates) == 0:  # no image of this class in the buffer: take the most y-like ones
            candidates = probs[:, c].topk(min(len(probs), 64)).indices
        # Of those, leave out the highest-energy ones (START_ENERGY_QUANTILE): chains that never left the noise they
        # started from also get a label, and they must not seed a class sample. Failing that, the 16 most probable
        # candidates.
        probable = candidates[energy[candidates] <= energy_cut]
        candidates = probable if len(probable) > 0 else candidates[energy[candidates].argsort()[:16]]
        starts[rows] = buffer.images[: len(buffer)][_distinct(candidates, len(rows), _class_seed(seed, c))]
    return starts


def _class_seed(seed: int, c: int) -> int:
    return (seed * 1_000_003 + c + 1) % 2**63


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


def _langevin(
    source: SamplingSource,
    x_start: torch.Tensor,
    labels: torch.Tensor | None,
    steps: int,
    generators: SampleGenerators,
    batch_size: int,
) -> torch.Tensor:
    """Run each sample's chain from x_start (CPU) and return the samples as float32 on the CPU.

    The chains run `batch_size` at a time; each chain's Langevin noise comes from its own generator (the
    sampler's ``randn_like`` stacks one draw per sample), so a chain does not depend on the batch it runs in.
    """
    cfg = source.config.sampler
    out = []
    for i in range(0, len(x_start), batch_size):
        rows = slice(i, i + batch_size)
        x, _ = run_chains(
            source.model,
            x_start[rows].to(source.device),
            cfg,
            labels=None if labels is None else labels[rows].to(source.device),
            steps=steps,
            randn_like=generators[rows].randn_like,
            channels_last=source.config.train.channels_last,
        )
        out.append(x.float().cpu())
    return torch.cat(out)


def generate_jem(
    source: SamplingSource,
    n: int,
    *,
    labels: torch.Tensor | None = None,
    steps: int | None = None,
    init: str = "auto",
    generator: torch.Generator | None = None,
    batch_size: int = 256,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Draw n SGLD samples from a JEM run (images in [−1, 1], on the CPU) without changing its buffer.

    Args as for `jemlab.generate.generate` (`steps`: SGLD steps, default the run's sampler.steps).

    Returns:
        (images, protocol): the samples and a dict describing how they were made.
    """
    if init == "buffer" and source.buffer is None:
        raise JemlabError("this run has no replay buffer (short-run sampler); use init 'noise'")
    if labels is not None and len(labels) != n:
        raise JemlabError(f"got {len(labels)} labels for {n} samples")
    mode = "buffer" if init in ("auto", "buffer") and source.buffer is not None else "noise"
    cfg = source.config.sampler
    steps = cfg.steps if steps is None else steps
    # Sample i: its start from a CPU generator seeded start_seed + i (buffer and initialiser live on the CPU), its
    # Langevin noise from one on the model's device seeded noise_seed + i.
    start_seed, noise_seed = draw_seeds(generator, 2)
    starts = SampleGenerators.seeded(start_seed, n, "cpu")
    x_start = _start_points(source, None if labels is None else labels.cpu(), mode, starts, start_seed)
    noises = SampleGenerators.seeded(noise_seed, n, source.device)
    x = _langevin(source, x_start, labels, steps, noises, batch_size)
    protocol = {
        "init": mode,
        "steps": steps,
        "step_size": cfg.step_size,
        "noise": cfg.noise,
        "conditional": labels is not None,
        "n": n,
    }
    return x.contiguous(), protocol
