"""A replay buffer split across data-parallel ranks, saved as one buffer.

With N processes each rank keeps ``buffer_size // N`` chains (its shard) and runs only those. A checkpoint stores
the buffer a single process would have (`gather_buffer`: same capacity, same layout), so ``jemlab sample``/``eval``
read it like any other and a run can resume on any number of processes (`load_buffer_shard` cuts the rank's shard
back out of it).

Layouts of the saved buffer, by mode:
- fixed: shard r holds slots ``[r·S, (r+1)·S)``; slots no shard holds (``buffer_size`` not a multiple of N) are
  filled with fresh chains from the initialiser when saving.
- fixed, class-conditional: the same within every class block (``[class 0 | class 1 | …]``).
- queue: the chains of all shards, each shard oldest first, then shard after shard; ``head`` points after them.
  The queue order is rebuilt on resume, so queue-mode runs resume with the same chains in other slots.
"""

from __future__ import annotations

import torch

from jemlab.distributed import DistEnv
from jemlab.errors import ConfigError
from jemlab.samplers.replay_buffer import ReplayBuffer


def shard_capacity(buffer_size: int, env: DistEnv) -> int:
    """Chains per rank: ``buffer_size // world``."""
    capacity = buffer_size // env.world_size
    if capacity < 1:
        raise ConfigError(
            f"sampler.buffer_size={buffer_size} gives no chains to each of {env.world_size} processes; raise it"
        )
    return capacity


def _oldest_first(images: torch.Tensor, size: int, head: int) -> torch.Tensor:
    """The stored chains of a queue buffer from oldest to newest."""
    if size < len(images):
        return images[:size]
    return torch.roll(images, -head, dims=0)


def gather_buffer(
    buffer: ReplayBuffer, env: DistEnv, buffer_size: int, generator: torch.Generator
) -> dict[str, torch.Tensor]:
    """Collect every rank's shard into the state of one buffer of `buffer_size` chains (a collective).

    Args:
        buffer: this rank's shard.
        env: the process's place in the job.
        buffer_size: the config's sampler.buffer_size (the whole buffer).
        generator: random source for slots no shard holds.

    Returns:
        A `ReplayBuffer.state_dict()` for one process (identical on every rank).
    """
    if not env.active:
        return buffer.state_dict()
    shape = buffer.shape
    if buffer.mode == "queue":
        mine = _oldest_first(buffer.images, buffer.size, buffer.head)
        chains = torch.cat(env.all_gather(mine))  # (n, C, H, W), n <= buffer_size
        images = torch.zeros((buffer_size, *shape), dtype=buffer.images.dtype)
        images[: len(chains)] = chains
        size = len(chains)
        return {"images": images, "size": torch.tensor(size), "head": torch.tensor(size % buffer_size)}
    shards = env.all_gather(buffer.images)
    if not buffer.class_conditional:
        images = torch.cat(shards)
        missing = buffer_size - len(images)
        if missing > 0:
            images = torch.cat([images, buffer.init(missing, None, generator).to(images)])
    else:
        classes = buffer.num_classes
        per_class = buffer_size // classes
        blocks = torch.stack([s.reshape(classes, -1, *shape) for s in shards], 1)  # (K, world, p, C, H, W)
        blocks = blocks.reshape(classes, -1, *shape)  # (K, world·p, C, H, W)
        missing = per_class - blocks.shape[1]
        if missing > 0:
            labels = torch.arange(classes).repeat_interleave(missing)
            fresh = buffer.init(classes * missing, labels, generator).to(blocks).reshape(classes, missing, *shape)
            blocks = torch.cat([blocks, fresh], 1)
        images = blocks.reshape(-1, *shape)
    return {"images": images, "size": torch.tensor(len(images)), "head": torch.tensor(0)}


def load_buffer_shard(buffer: ReplayBuffer, state: dict[str, torch.Tensor], env: DistEnv) -> None:
    """Load this rank's shard out of a saved single-buffer state (written by any number of processes).

    Args:
        buffer: this rank's shard, built with `shard_capacity` chains.
        state: the checkpoint's buffer state (one buffer of sampler.buffer_size chains).
        env: the process's place in the job.
    """
    if not env.active:
        buffer.load_state_dict(state)  # one process: exactly the saved buffer
        return
    images = state["images"]
    rank, shard = env.rank, buffer.capacity
    if buffer.mode == "queue":
        chains = _oldest_first(images, int(state["size"]), int(state["head"]))
        mine = chains.tensor_split(env.world_size)[rank][-shard:]
        if len(mine) > 0:  # an empty share keeps the shard's initial chains
            buffer.images[: len(mine)] = mine
            buffer.size = len(mine)
            buffer.head = len(mine) % shard
        return
    if not buffer.class_conditional:
        part = images[rank * shard : (rank + 1) * shard]
    else:
        classes = buffer.num_classes
        per_shard = buffer.per_class
        blocks = images.reshape(classes, -1, *buffer.shape)
        part = blocks[:, rank * per_shard : (rank + 1) * per_shard].reshape(-1, *buffer.shape)
    if part.shape != buffer.images.shape:
        raise ConfigError(
            f"replay buffer in the checkpoint has {len(images)} chains, too few for {env.world_size} shards of "
            f"{shard}; keep sampler.buffer_size and class_conditional as in the run"
        )
    buffer.images = part.clone()
    buffer.size = len(part)
    buffer.head = 0
