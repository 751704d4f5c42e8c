"""Shuffled mini-batches that can be checkpointed and resumed exactly."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from jemlab.data.dataset import ArrayDataset
from jemlab.errors import CheckpointError, ConfigError

_STATE_VERSION = 1


class RandomBatcher:
    """Iterate an ``ArrayDataset`` in shuffled mini-batches, reproducibly and resumably.

    Each epoch draws one ``torch.randperm`` from the batcher's own ``torch.Generator`` (seeded with
    ``seed``), so the order does not depend on, or disturb, the global RNG that samplers and dropout
    use. Iterating (``for x, y in batcher``) yields the remaining batches of the current epoch; the
    next iteration starts a new epoch. ``next_batch()`` rolls over epochs by itself, for step-based
    training loops.

    ``state_dict()`` records the generator state at the start of the current epoch and how many
    batches of it were consumed; ``load_state_dict()`` redraws the same permutation and skips those
    batches, so a resumed run gets exactly the batch the interrupted run would have got next.

    Args:
        dataset: the examples to batch.
        batch_size: examples per batch.
        seed: seed of the shuffling generator.
        drop_last: drop the final incomplete batch of each epoch (keeps batch statistics and step
            counts uniform); with False the last batch may be smaller.
    """

    def __init__(self, dataset: ArrayDataset, batch_size: int, seed: int, drop_last: bool = True) -> None:
        if batch_size <= 0:
            raise ConfigError(f"batch_size must be positive, got {batch_size}; pass --batch-size 1 or more")
        if drop_last and len(dataset) < batch_size:
            raise ConfigError(
                f"batch_size {batch_size} is larger than the {len(dataset)} training images, so an "
                f"epoch would have no batch; lower --batch-size or raise --limit"
            )
        if len(dataset) == 0:
            raise ConfigError("cannot batch an empty dataset; check --limit and --val-size")
        self.dataset = dataset
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.drop_last = bool(drop_last)
        self._generator = torch.Generator().manual_seed(self.seed)
        self._epoch_start_state: torch.Tensor | None = None  # generator state before this epoch's randperm
        self._perm: torch.Tensor | None = None
        self._position = 0  # batches of the current epoch already handed out
        self._epoch = 0  # epochs started so far

    def __len__(self) -> int:
        """Number of batches per epoch."""
        n = len(self.dataset)
        if self.drop_last:
            return n // self.batch_size
        return -(-n // self.batch_size)

    @property
    def epoch(self) -> int:
        """Number of epochs started so far (0 before the first batch)."""
        return self._epoch

    @property
    def position(self) -> int:
        """Number of batches of the current epoch already handed out."""
        return self._position

    def _start_epoch(self) -> None:
        self._epoch_start_state = self._generator.get_state()
        self._perm = torch.randperm(len(self.dataset), generator=self._generator)
        self._position = 0
        self._epoch += 1

    def _epoch_done(self) -> bool:
        return self._perm is None or self._position >= len(self)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The next batch, starting a new epoch when the current one is used up.

        Returns:
            ``(x, y)``: float32 images in [-1, 1] and int64 labels.
        """
        if self._epoch_done():
            self._start_epoch()
        assert self._perm is not None
        start = self._position * self.batch_size
        index = self._perm[start : start + self.batch_size]
        # Count the batch before handing it out, so a state_dict taken while the caller holds it
        # resumes with the batch after it.
        self._position += 1
        return self.dataset.batch(index.to(self.dataset.images.device))

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield the rest of the current epoch (a whole new epoch if the last one is finished)."""
        if self._epoch_done():
            self._start_epoch()
        while self._position < len(self):
            yield self.next_batch()

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue with the same next batch.

        Returns:
            A dict of ints, bools and one uint8 tensor (the generator state), safe for
            ``torch.save``.
        """
        return {
            "version": _STATE_VERSION,
            "seed": self.seed,
            "batch_size": self.batch_size,
            "drop_last": self.drop_last,
            "dataset_size": len(self.dataset),
            "epoch": self._epoch,
            "position": self._position,
            "epoch_start_state": (None if self._epoch_start_state is None else self._epoch_start_state.clone()),
            "generator_state": self._generator.get_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a state from ``state_dict()``.

        Args:
            state: a dict returned by ``state_dict()``, possibly after a save/load round trip.
        """
        if state.get("version") != _STATE_VERSION:
            raise CheckpointError(
                f"batcher state has format version {state.get('version')!r}, this jemlab reads "
                f"{_STATE_VERSION}; resume with the jemlab version that wrote the checkpoint"
            )
        saved = (int(state["dataset_size"]), int(state["batch_size"]), bool(state["drop_last"]))
        current = (len(self.dataset), self.batch_size, self.drop_last)
        if saved != current:
            raise CheckpointError(
                f"batcher state was saved for {saved[0]} training images in batches of {saved[1]} "
                f"(drop_last={saved[2]}) but this run has {current[0]} in batches of {current[1]} "
                f"(drop_last={current[2]}); resume with the same dataset, --limit, --val-size and "
                f"--batch-size"
            )
        self.seed = int(state["seed"])
        self._epoch = int(state["epoch"])
        self._position = int(state["position"])
        start_state = state["epoch_start_state"]
        if start_state is None:
            self._epoch_start_state = None
            self._perm = None
        else:
            # Redraw this epoch's permutation rather than storing it: a few KB instead of 8 bytes
            # per image in every checkpoint.
            self._epoch_start_state = start_state.clone()
            self._generator.set_state(self._epoch_start_state)
            self._perm = torch.randperm(len(self.dataset), generator=self._generator)
        self._generator.set_state(state["generator_state"].clone())
