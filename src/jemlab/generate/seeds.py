"""One random generator per sample, so that a generated image depends on its seed and its index only.

A batch drawn from one generator gives sample i the numbers at its place in the batch's stream: change the batch size
(or the number of samples before it) and sample i changes. Here sample i draws from its own generator, seeded
``base + i``, and a batch stacks one draw per sample (NVlabs/edm's ``StackedRandomGenerator``, Karras et al., 2022),
so an image is the same whatever batch it is drawn in and however many images are drawn with it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from jemlab.errors import JemlabError

SEED_BITS = 62  # a base seed leaves room for base + index below 2**63


def draw_seeds(generator: torch.Generator | None, count: int = 1) -> list[int]:
    """`count` base seeds drawn from the caller's generator (on its own device), or from seed 0's stream when None.

    Drawing (rather than reading the generator's initial seed) means two calls with one generator get new samples,
    as they did when the samples came straight from that generator.
    """
    generator = generator or torch.Generator().manual_seed(0)
    return torch.randint(0, 2**SEED_BITS, (count,), generator=generator, device=generator.device).tolist()


class SampleGenerators:
    """One ``torch.Generator`` per sample; a draw for a batch stacks one draw from each sample's generator.

    Build with `seeded`; slice with ``gens[rows]`` to draw for some of the samples (the slice shares their
    generators, so drawing through it advances them).

    Args:
        generators: one generator per sample, all on `device`.
        device: where the generators live and what they draw is put.
    """

    def __init__(self, generators: Sequence[torch.Generator], device: torch.device) -> None:
        self.generators = list(generators)
        self.device = device

    @classmethod
    def seeded(cls, base: int, n: int, device: torch.device | str = "cpu") -> SampleGenerators:
        """Generators for samples 0 … n − 1, sample i seeded ``base + i``."""
        device = torch.device(device)
        return cls([torch.Generator(device).manual_seed(base + i) for i in range(n)], device)

    def __len__(self) -> int:
        return len(self.generators)

    def __getitem__(self, rows: slice | Sequence[int] | torch.Tensor) -> SampleGenerators:
        if isinstance(rows, slice):
            return SampleGenerators(self.generators[rows], self.device)
        return SampleGenerators([self.generators[int(i)] for i in rows], self.device)

    def randn(self, shape: Sequence[int], dtype: torch.dtype | None = None) -> torch.Tensor:
        """(len(self), *shape) standard normals; row i from generator i."""
        draws = [torch.randn(tuple(shape), generator=g, device=self.device, dtype=dtype) for g in self.generators]
        return torch.stack(draws)

    def randn_like(self, x: torch.Tensor) -> torch.Tensor:
        """Standard normals shaped like x (one row per sample), on x's device: a sampler's noise source."""
        if len(x) != len(self):
            raise JemlabError(f"{len(self)} sample generators cannot draw noise for a batch of {len(x)}")
        return self.randn(x.shape[1:], x.dtype).to(x.device)

    def randint(self, high: int) -> torch.Tensor:
        """(len(self),) int64 uniform on {0, …, high − 1}; entry i from generator i."""
        if len(self) == 0:
            return torch.zeros(0, dtype=torch.long, device=self.device)
        draws = [torch.randint(0, high, (1,), generator=g, device=self.device) for g in self.generators]
        return torch.cat(draws)
