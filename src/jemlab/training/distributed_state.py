"""What a data-parallel run writes into a checkpoint and how each rank takes its part back.

Saved (by rank 0, after gathering): the model and optimizer (the same on every rank, DDP keeps them in step), the
whole replay buffer in its one-process layout (samplers/buffer_shards.py), the shared batcher, rank 0's random
generators under ``rng`` (what a one-process resume uses) and every rank's under ``rng.ranks``, and
``world_size`` in the metadata. The file is therefore an ordinary checkpoint that ``jemlab sample``/``eval`` read.

Resumed on the same number of processes, every rank gets its own shard and generators back: the run continues as
if never stopped (fixed-mode buffers). On another number, the buffer is re-cut into shards, the batcher keeps its
epoch and shuffle with the position converted to the new global batch size, and the chain generators are reseeded
from the run seed, the step and the rank (the old per-rank streams have no meaning there).
"""

from __future__ import annotations

from typing import Any

import torch

from jemlab.distributed import DistEnv, RankBatcher, rescale_batcher_state
from jemlab.samplers import ReplayBuffer
from jemlab.samplers.buffer_shards import gather_buffer, load_buffer_shard

_RNG_KEYS = ("torch", "cpu_generator", "noise_generator")


def checkpoint_state(
    state: dict[str, Any], env: DistEnv, buffer: ReplayBuffer | None, buffer_size: int, step: int
) -> dict[str, Any]:
    """A trainer's state for a checkpoint; with several processes a collective that every rank must call.

    Args:
        state: this rank's state (``Trainer.state_dict``).
        env: the process group.
        buffer: this rank's replay-buffer shard (None: the run keeps no buffer).
        buffer_size: the whole buffer's size (``sampler.buffer_size``).
        step: the iteration (seeds the fill of slots that no shard holds).

    Returns:
        `state` itself with one process; else a copy with the whole buffer and every rank's generators.
    """
    if not env.active:
        return state
    if buffer is not None:
        fill = torch.Generator().manual_seed(step)  # for slots no shard holds (buffer_size % world)
        state["buffer"] = gather_buffer(buffer, env, buffer_size, fill)
    rng = dict(state["rng"])
    rng["ranks"] = {key: torch.cat(env.all_gather(rng[key].reshape(1, -1))) for key in _RNG_KEYS}  # (world, n)
    state["rng"] = rng
    return state


def local_state(
    state: dict[str, Any],
    meta: dict[str, Any],
    *,
    env: DistEnv,
    buffer: ReplayBuffer | None,
    batcher: RankBatcher,
    seed: int,
    device: torch.device,
) -> tuple[dict[str, Any], int]:
    """This rank's part of a checkpoint's state, and the step to continue from.

    Loads the buffer shard into `buffer` itself (the returned state then has no buffer).

    Args:
        state: the checkpoint's state.
        meta: the checkpoint's metadata (``world_size``: processes that wrote it, 1 when absent).
        env: this run's process group.
        buffer: this rank's (empty) replay-buffer shard, or None.
        batcher: this run's batcher (its global batch size and batches per epoch).
        seed: the run seed (``train.seed``), for generators that cannot be carried over.
        device: the training device (of the noise generator).

    Returns:
        (state for `Trainer.load_state_dict`, step).
    """
    saved_world = int(meta.get("world_size", 1))
    step = int(meta["progress"]["step"])
    if saved_world == 1 and not env.active:
        return state, step  # one process to one process: exactly what was saved
    state = dict(state)
    if buffer is not None and state.get("buffer") is not None:
        load_buffer_shard(buffer, state["buffer"], env)
        state["buffer"] = None
    rescaled = rescale_batcher_state(state["batcher"], batcher.batch_size)
    if rescaled is not state["batcher"]:  # another global batch size: count steps in the new batches
        epoch, position = int(rescaled["epoch"]), int(rescaled["position"])
        step = 0 if epoch == 0 else (epoch - 1) * len(batcher) + position
    state["batcher"] = rescaled
    ranks = state["rng"].get("ranks")
    if saved_world == env.world_size and ranks is not None:
        state["rng"] = {key: ranks[key][env.rank].clone() for key in _RNG_KEYS}
    else:
        base = seed + 7919 * (step + 1)
        state["rng"] = {
            "torch": torch.Generator().manual_seed(env.seed(base)).get_state(),
            "cpu_generator": torch.Generator().manual_seed(env.seed(base + 1)).get_state(),
            "noise_generator": torch.Generator(device=device).manual_seed(env.seed(base + 2)).get_state(),
        }
    return state, step
