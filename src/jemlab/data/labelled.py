"""Few labels (semi-supervised JEM): a class-balanced labelled subset and the endless stream of its batches.

JEM trains with few labels by splitting each iteration's data in two (the reference code's ``--labels_per_class``,
wgrathwohl/JEM train_wrn_ebm.py): cross-entropy, log p(y|x), on a batch drawn from a small labelled subset, and the
log p(x) terms on a batch drawn from every training image, labelled or not. The full set drives the epochs; the
labelled subset is cycled through as often as that takes.

- `labelled_subset` picks N images of each class with the run seed (the same on every process and on resume).
  The N images of a class are the first N of one seeded shuffle of that class, so a larger budget contains a
  smaller one (seed fixed): 10 labels per class are among the 100.
- `LabelledBatcher` hands out batches of the subset from one pass after another, each pass a fresh seeded shuffle.
  Batches may span two passes (the subset can be smaller than a batch: 10 classes × 10 labels < 128), and every
  labelled image is drawn equally often. With several processes every rank draws the same stream and takes its
  block of each global batch; the state counts images, so it resumes exactly on any number of processes.
- `px_pool` is every training image for the log p(x) batch: the training split plus the dataset's images without
  any label (``DatasetSplits.unlabelled``, docs/data.md), which join the log p(x) pool only.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import torch

from jemlab.data.dataset import ArrayDataset, DatasetSplits
from jemlab.errors import CheckpointError, ConfigError, DataError

_STATE_VERSION = 1


def labelled_subset(
    labels: torch.Tensor,
    per_class: int,
    num_classes: int,
    seed: int,
    class_names: Sequence[str] | None = None,
) -> torch.Tensor:
    """Indices of `per_class` images of every class, chosen with `seed`.

    Args:
        labels: (N,) int64 labels of the training split.
        per_class: labelled images per class (``data.labels_per_class``).
        num_classes: number of classes; every one must have `per_class` images.
        seed: the run seed (``train.seed``).
        class_names: for the error message.

    Returns:
        (per_class · num_classes,) int64 indices into `labels`, sorted.

    Raises:
        DataError: a class has fewer than `per_class` images.
    """
    if per_class < 1:
        raise ConfigError(f"data.labels_per_class must be a positive integer, got {per_class}")
    generator = torch.Generator().manual_seed(int(seed))
    chosen = []
    for c in range(num_classes):
        index = (labels == c).nonzero().squeeze(1)
        if len(index) < per_class:
            name = f" ({class_names[c]})" if class_names is not None and c < len(class_names) else ""
            raise DataError(
                f"data.labels_per_class={per_class} but class {c}{name} has only {len(index)} training images; "
                f"lower data.labels_per_class to {len(index)} or less, or train on more images (data.limit)"
            )
        # One full shuffle per class whatever the budget: the first N of it are the labelled ones (nested budgets).
        chosen.append(index[torch.randperm(len(index), generator=generator)[:per_class]])
    return torch.cat(chosen).sort().values


def subset_digest(index: torch.Tensor) -> str:
    """SHA-256 of a subset's indices: a checkpoint records it so that a resume on other data is refused."""
    return hashlib.sha256(index.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()


def px_pool(splits: DatasetSplits) -> ArrayDataset:
    """Every training image, for the log p(x) batch: the training split, then the unlabelled images (label −1).

    Args:
        splits: the dataset; its ``unlabelled`` images (None when it has none) follow the training split.

    Returns:
        The training split itself when there are no unlabelled images, else a new dataset holding both.
    """
    train, unlabelled = splits.train, splits.unlabelled
    if unlabelled is None or len(unlabelled) == 0:
        return train
    return ArrayDataset(torch.cat([train.images, unlabelled.images]), torch.cat([train.labels, unlabelled.labels]))


class LabelledBatcher:
    """Endless batches of a labelled subset: seeded shuffles of the subset, one pass after another.

    Args:
        dataset: the training split.
        index: the labelled images' indices into `dataset` (`labelled_subset`).
        batch_size: images per rank per batch.
        seed: seed of the shuffles (the same on every rank).
        rank: this process's rank; it takes the rank-th block of every global batch.
        world_size: number of processes; a global batch is ``batch_size × world_size`` images.
    """

    def __init__(
        self,
        dataset: ArrayDataset,
        index: torch.Tensor,
        batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if len(index) == 0:
            raise ConfigError("the labelled subset is empty; set data.labels_per_class to 1 or more")
        if batch_size <= 0:
            raise ConfigError(f"batch_size must be positive, got {batch_size}; pass --batch-size 1 or more")
        self.dataset = dataset
        self.index = index.to(torch.int64)
        self.batch_size = int(batch_size)
        self.rank, self.world_size = int(rank), int(world_size)
        self.seed = int(seed)
        self.digest = subset_digest(self.index)
        self._generator = torch.Generator().manual_seed(self.seed)
        self._pass_start_state: torch.Tensor | None = None  # generator state before this pass's shuffle
        self._perm: torch.Tensor | None = None
        self._offset = 0  # images of the current pass already handed out (all ranks together)
        self._passes = 0  # passes started so far

    def __len__(self) -> int:
        """The number of labelled images."""
        return len(self.index)

    @property
    def passes(self) -> int:
        """Passes over the labelled subset started so far."""
        return self._passes

    def _start_pass(self) -> None:
        self._pass_start_state = self._generator.get_state()
        self._perm = torch.randperm(len(self.index), generator=self._generator)
        self._offset = 0
        self._passes += 1

    def _take(self, n: int) -> torch.Tensor:
        """The next `n` positions of the stream (crossing into new passes as needed)."""
        parts = []
        while n > 0:
            if self._perm is None or self._offset >= len(self._perm):
                self._start_pass()
            assert self._perm is not None
            k = min(n, len(self._perm) - self._offset)
            parts.append(self._perm[self._offset : self._offset + k])
            self._offset += k
            n -= k
        return torch.cat(parts)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's block of the next global batch.

        Returns:
            ``(x, y)``: float32 images (batch_size, C, H, W) in [-1, 1] and their int64 labels.
        """
        positions = self._take(self.batch_size * self.world_size)  # the same on every rank
        mine = positions[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]
        return self.dataset.batch(self.index[mine].to(self.dataset.images.device))

    def state_dict(self) -> dict[str, Any]:
        """The stream's position (in images, so any number of processes can continue it) and the subset's digest."""
        return {
            "version": _STATE_VERSION,
            "seed": self.seed,
            "subset_size": len(self.index),
            "subset_sha256": self.digest,
            "passes": self._passes,
            "offset": self._offset,
            "pass_start_state": None if self._pass_start_state is None else self._pass_start_state.clone(),
            "generator_state": self._generator.get_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue the stream saved by `state_dict`; refuse a state saved for another labelled subset."""
        if state.get("version") != _STATE_VERSION:
            raise CheckpointError(
                f"labelled-batcher state has format version {state.get('version')!r}, this jemlab reads "
                f"{_STATE_VERSION}; resume with the jemlab version that wrote the checkpoint"
            )
        if int(state["subset_size"]) != len(self.index) or state["subset_sha256"] != self.digest:
            raise CheckpointError(
                f"the checkpoint was trained on another labelled subset ({state['subset_size']} images) than this "
                f"run selects ({len(self.index)}); resume with the same dataset, data.limit, data.val_size, "
                f"data.labels_per_class and train.seed"
            )
        self.seed = int(state["seed"])
        self._passes = int(state["passes"])
        self._offset = int(state["offset"])
        start = state["pass_start_state"]
        if start is None:
            self._pass_start_state, self._perm = None, None
        else:
            # Redraw this pass's shuffle rather than storing it.
            self._pass_start_state = start.clone()
            self._generator.set_state(self._pass_start_state)
            self._perm = torch.randperm(len(self.index), generator=self._generator)
        self._generator.set_state(state["generator_state"].clone())
