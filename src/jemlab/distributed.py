"""Data-parallel training across processes (``torchrun``): one small module, and 1 or N processes take the same path.

``torchrun --nproc_per_node N -m jemlab train ...`` starts N copies of the same command; each reads its rank from the
environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT, set by torchrun) and `init_distributed` joins the
process group: NCCL when the run uses CUDA GPUs (one per local rank), gloo on CPUs. With one process (no torchrun)
there is no process group and every collective below returns its input unchanged, so the training loop calls the
same functions either way.

What each rank does (docs/distributed.md):
- the model is wrapped in DistributedDataParallel for the training loss only (`LossForward`); the SGLD chains run
  through the plain module, so sampling never triggers a gradient all-reduce;
- each rank trains on its own slice of a global batch (`RankBatcher`: one shared shuffle, rank r takes the r-th
  block of every global batch), samples its own chains from its own shard of the replay buffer, and seeds its random
  sources with ``base * world + rank`` (`DistEnv.seed`);
- diagnostics are averaged across ranks before anything decides on them (`DistEnv.mean`), so divergence checks,
  stop requests and time budgets come out the same on every rank.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from jemlab.data.batching import RandomBatcher
from jemlab.data.dataset import ArrayDataset
from jemlab.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistEnv:
    """Where this process stands in the job.

    Attributes:
        rank: global rank, 0 … world_size − 1.
        world_size: number of processes.
        local_rank: rank on this machine (picks the GPU).
        device: the training device of this process.
        backend: "nccl", "gloo", or None for a single process without a process group.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    backend: str | None = None

    @property
    def active(self) -> bool:
        """True when there is more than one process (collectives do something)."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0 writes logs, metrics, checkpoints and samples."""
        return self.rank == 0

    def seed(self, base: int) -> int:
        """The seed of one random stream on this rank: ``base * world + rank`` (= base with one process)."""
        return int(base) * self.world_size + self.rank

    # --- collectives (identity with one process) -------------------------------------------------------------

    def _comm(self, tensor: torch.Tensor) -> torch.Tensor:
        """NCCL only moves CUDA tensors; gloo works on CPU tensors."""
        return tensor.to(self.device if self.backend == "nccl" else "cpu")

    def mean(self, values: dict[str, float | torch.Tensor]) -> dict[str, float]:
        """Average scalars over ranks with one all-reduce (keys must be the same on every rank)."""
        keys = sorted(values)
        if not keys:
            return {}
        flat = torch.stack([torch.as_tensor(values[k], dtype=torch.float64).detach().cpu() for k in keys])
        if self.active:
            flat = self._comm(flat)
            dist.all_reduce(flat)
            flat = flat.cpu() / self.world_size
        return dict(zip(keys, flat.tolist(), strict=True))

    def weighted_mean(self, values: dict[str, float], weight: float, keys: list[str]) -> dict[str, float]:
        """Average per-rank means weighted by each rank's count (sharded evaluation); missing keys count as 0."""
        if not self.active:
            return {k: values[k] for k in keys if k in values}
        flat = torch.tensor([values.get(k, 0.0) * weight for k in keys] + [weight], dtype=torch.float64)
        flat = self._comm(flat)
        dist.all_reduce(flat)
        flat = flat.cpu()
        total = float(flat[-1])
        return {} if total == 0 else {k: float(flat[i]) / total for i, k in enumerate(keys)}

    def any(self, *flags: bool) -> tuple[bool, ...]:
        """For each flag, whether it is set on any rank (one all-reduce of a few bytes)."""
        if not self.active:
            return tuple(bool(f) for f in flags)
        flat = self._comm(torch.tensor([1.0 if f else 0.0 for f in flags]))
        dist.all_reduce(flat, op=dist.ReduceOp.MAX)
        return tuple(bool(v) for v in flat.cpu().tolist())

    def all_gather(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        """Every rank's `tensor` (CPU copies, rank order); the first dimension may differ between ranks."""
        tensor = tensor.detach()
        if not self.active:
            return [tensor.cpu()]
        size = self._comm(torch.tensor([tensor.shape[0]], dtype=torch.int64))
        sizes = [torch.zeros_like(size) for _ in range(self.world_size)]
        dist.all_gather(sizes, size)
        longest = max(int(s) for s in sizes)
        padded = torch.zeros((longest, *tensor.shape[1:]), dtype=tensor.dtype)
        padded[: tensor.shape[0]] = tensor.cpu()
        padded = self._comm(padded)
        out = [torch.empty_like(padded) for _ in range(self.world_size)]
        dist.all_gather(out, padded)
        return [o.cpu()[: int(s)] for o, s in zip(out, sizes, strict=True)]

    def average_gradients(self, parameters: list[torch.nn.Parameter]) -> None:
        """Replace each gradient by its mean over ranks (one all-reduce of the flattened gradients).

        For objectives that cannot go through the DDP wrapper: EGC differentiates the energy twice (its noise
        estimate is an input gradient), which DDP's bucketed all-reduce hooks do not support.
        """
        if not self.active:
            return
        grads = [p.grad for p in parameters if p.grad is not None]
        if not grads:
            return
        flat = self._comm(torch.cat([g.reshape(-1) for g in grads]))
        dist.all_reduce(flat)
        flat = flat.to(grads[0].device) / self.world_size
        offset = 0
        for g in grads:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()

    def barrier(self) -> None:
        if self.active:
            dist.barrier()


def init_distributed(device: str = "auto") -> DistEnv:
    """Join the torchrun job described by the environment, or describe a single process.

    Args:
        device: the config's train.device (auto, cpu, cuda, cuda:N). With several processes a CUDA run puts local
            rank i on cuda:i, whatever N says.

    Returns:
        The process's `DistEnv` (the process group is created once and reused by later calls).
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    use_cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if use_cuda and not torch.cuda.is_available():
        raise ConfigError(f"train.device={device} but this torch build sees no CUDA GPU; use --device cpu")
    if world <= 1:
        if use_cuda:
            return DistEnv(device=torch.device("cuda" if device == "auto" else device))
        return DistEnv()
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", str(rank)))
    backend = "nccl" if use_cuda else "gloo"
    if use_cuda:
        if local_rank >= torch.cuda.device_count():
            raise ConfigError(
                f"local rank {local_rank} but only {torch.cuda.device_count()} GPUs are visible; "
                f"start at most that many processes per node (--nproc_per_node)"
            )
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
    elif dist.get_world_size() != world:
        raise ConfigError(f"a process group of {dist.get_world_size()} exists but WORLD_SIZE={world}")
    return DistEnv(rank=dist.get_rank(), world_size=world, local_rank=local_rank, device=dev, backend=backend)


def shutdown() -> None:
    """Leave the process group (end of a torchrun job); nothing to do for a single process."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


# --- the model ---------------------------------------------------------------------------------------------------


class LossForward(nn.Module):
    """``forward`` = the energy model's ``logits_and_energy``.

    DistributedDataParallel only intercepts ``forward``. The JEM loss evaluates data, p(x) samples and p(x|y) samples
    in one concatenated batch (objectives/jem.py), so routing that single call through this module gives exactly one
    DDP forward and one gradient all-reduce per step. Every other use of the network (SGLD chains, evaluation,
    samples) calls the plain module and never touches DDP.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.model.logits_and_energy(x)


class LossView:
    """What `jem_loss` calls on a model (``logits_and_energy``), routed through the (possibly DDP-wrapped) module."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def logits_and_energy(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.module(x)


def wrap_for_loss(model: nn.Module, env: DistEnv) -> LossView:
    """The model as the loss sees it: under DDP with several processes, the plain model with one.

    DDP averages gradients over ranks. Each rank's loss is a mean over its own data and samples, and every rank has
    the same batch sizes, so the averaged gradient is the gradient of the loss over the concatenated global batch.
    BatchNorm layers (JEM++'s WRN) keep per-rank batch statistics (no SyncBatchNorm: it would also synchronise
    inside every SGLD step); rank 0's running averages are broadcast at each forward.
    """
    module: nn.Module = LossForward(model)
    if env.active:
        from torch.nn.parallel import DistributedDataParallel

        ids = [env.device.index] if env.device.type == "cuda" else None
        module = DistributedDataParallel(module, device_ids=ids)  # buffers (BN statistics) follow rank 0
    return LossView(module)


# --- data ----------------------------------------------------------------------------------------------------------


class RankBatcher(RandomBatcher):
    """A `RandomBatcher` over global batches of ``batch_size × world`` images of which this rank takes its block.

    Every rank draws the same permutation (same seed), so together the ranks see each image once per epoch, and the
    state (generator, epoch, position in global batches) is the same on every rank: rank 0's copy in a checkpoint
    serves all. With one process it is exactly a `RandomBatcher`.

    Args:
        dataset: training images.
        batch_size: images per rank per step.
        seed: shuffling seed (shared by all ranks).
        env: the process's place in the job.
    """

    def __init__(self, dataset: ArrayDataset, batch_size: int, seed: int, env: DistEnv) -> None:
        super().__init__(dataset, batch_size * env.world_size, seed)
        self.local_batch_size = batch_size
        self.rank = env.rank

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._epoch_done():
            self._start_epoch()
        assert self._perm is not None
        start = self._position * self.batch_size + self.rank * self.local_batch_size
        index = self._perm[start : start + self.local_batch_size]
        self._position += 1
        return self.dataset.batch(index.to(self.dataset.images.device))


def rescale_batcher_state(state: dict[str, Any], batch_size: int) -> dict[str, Any]:
    """A batcher state saved with another global batch size, moved to `batch_size`: same epoch, same shuffle, the
    position converted from batches to images and back (rounded down), so a run can resume on another world size."""
    old = int(state["batch_size"])
    if old == batch_size:
        return state
    state = dict(state)
    state["position"] = int(state["position"]) * old // batch_size
    state["batch_size"] = batch_size
    return state
