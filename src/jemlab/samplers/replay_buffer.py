"""The persistent replay buffer of PCD-style EBM training (Du & Mordatch, 2019; JEM, Grathwohl et al., 2020).

Two modes:
- ``"fixed"`` (JEM): a fixed array of `capacity` images initialised from the initialiser; a draw picks random
  slots, the sampler refines them, and the results are written back into the same slots. With
  ``class_conditional`` the array is split into one equal partition per class so p(x|y) chains stay with y.
- ``"queue"`` (the course code, SPEC S2): starts with one batch of noise, every refined batch is pushed in front,
  and the oldest images fall off once `capacity` is reached; draws are uniform with replacement.

In both modes each drawn image is replaced by a fresh initialisation with probability `reinit_prob`, which keeps
the chains from collapsing onto a few modes. All randomness comes from the generator passed to `sample`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from jemlab.errors import ConfigError
from jemlab.samplers.init import Initializer


@dataclass
class BufferDraw:
    """What `sample` hands out: starting points and where to put the refined chains back."""

    x: torch.Tensor  # (n, C, H, W) starting points
    slots: torch.Tensor  # (n,) int64 buffer slots for "fixed" mode; empty for "queue" mode
    labels: torch.Tensor | None  # (n,) class of each chain when class-conditional


class ReplayBuffer:
    """A buffer of persistent SGLD chains.

    Args:
        capacity: number of stored images (10,000 in JEM, 8,192 in the course code).
        shape: per-image shape (C, H, W).
        init: initialiser for the buffer and for re-initialised chains.
        reinit_prob: probability that a drawn chain restarts from `init` (0.05 in JEM).
        mode: "fixed" or "queue" (see module docstring).
        num_classes: number of classes; required when class_conditional.
        class_conditional: partition the buffer by class (fixed mode only).
        generator: random source for the initial fill.
    """

    def __init__(
        self,
        capacity: int,
        shape: tuple[int, ...],
        init: Initializer,
        *,
        reinit_prob: float = 0.05,
        mode: str = "fixed",
        num_classes: int | None = None,
        class_conditional: bool = False,
        initial_size: int = 64,
        generator: torch.Generator | None = None,
    ) -> None:
        if mode not in ("fixed", "queue"):
            raise ConfigError(f"unknown buffer mode '{mode}'; choose fixed or queue")
        if class_conditional and (mode != "fixed" or not num_classes):
            raise ConfigError("a class-conditional buffer needs buffer mode 'fixed' and num_classes")
        if class_conditional and capacity < num_classes:
            raise ConfigError(f"buffer capacity {capacity} is smaller than the {num_classes} classes")
        self.capacity = capacity
        self.shape = tuple(shape)
        self.init = init
        self.reinit_prob = reinit_prob
        self.mode = mode
        self.num_classes = num_classes
        self.class_conditional = class_conditional
        if class_conditional:
            self.per_class = capacity // num_classes
            self.capacity = capacity = self.per_class * num_classes
        if mode == "fixed":
            labels = None
            if class_conditional:
                labels = torch.arange(num_classes).repeat_interleave(self.per_class)
            self.images = init(capacity, labels, generator)
            self.size = capacity
        else:
            self.images = torch.zeros((capacity, *self.shape))
            self.images[:initial_size] = init(min(initial_size, capacity), None, generator)
            self.size = min(initial_size, capacity)
        self.head = self.size % capacity  # next slot to overwrite in queue mode

    def __len__(self) -> int:
        return self.size

    def slot_labels(self) -> torch.Tensor | None:
        """Class of every slot for a class-conditional buffer, else None."""
        if not self.class_conditional:
            return None
        return torch.arange(self.num_classes).repeat_interleave(self.per_class)

    def sample(
        self, n: int, labels: torch.Tensor | None = None, generator: torch.Generator | None = None
    ) -> BufferDraw:
        """Draw n starting points (a fraction restarted from the initialiser).

        Args:
            n: number of chains.
            labels: (n,) classes of the chains; required for a class-conditional buffer, drawn uniformly if None.
            generator: random source.
        """
        if self.class_conditional:
            if labels is None:
                labels = torch.randint(0, self.num_classes, (n,), generator=generator)
            offsets = torch.randint(0, self.per_class, (n,), generator=generator)
            slots = labels.cpu() * self.per_class + offsets
        else:
            slots = torch.randint(0, self.size, (n,), generator=generator)
        x = self.images[slots].clone()
        restart = torch.rand(n, generator=generator) < self.reinit_prob
        if restart.any():
            idx = restart.nonzero().squeeze(1)
            x[idx] = self.init(len(idx), None if labels is None else labels[idx], generator).to(x)
        if self.mode == "queue":
            slots = torch.empty(0, dtype=torch.long)
        return BufferDraw(x=x, slots=slots, labels=labels)

    def update(self, draw: BufferDraw, x_new: torch.Tensor) -> None:
        """Store refined chains: back into their slots (fixed) or in front of the queue (queue)."""
        x_new = x_new.detach().to(self.images.device, self.images.dtype)
        if self.mode == "fixed":
            self.images[draw.slots] = x_new
            return
        for chunk in x_new.split(self.capacity):
            n = len(chunk)
            idx = (self.head + torch.arange(n)) % self.capacity
            self.images[idx] = chunk
            self.head = (self.head + n) % self.capacity
            self.size = min(self.size + n, self.capacity)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors only, so the buffer can live in a safetensors checkpoint."""
        return {
            "images": self.images,
            "size": torch.tensor(self.size),
            "head": torch.tensor(self.head),
        }

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        images = state["images"]
        if images.shape != self.images.shape:
            raise ConfigError(
                f"replay buffer in the checkpoint has shape {tuple(images.shape)} but the config asks for "
                f"{tuple(self.images.shape)}; keep sampler.buffer_size and class_conditional as in the run"
            )
        self.images = images.clone()
        self.size = int(state["size"])
        self.head = int(state["head"])
