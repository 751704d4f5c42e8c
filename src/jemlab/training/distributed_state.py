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

from typing import TYPE_CHECKING, Any

import torch

from jemlab.distributed import rescale_batcher_state
from jemlab.samplers.buffer_shards import gather_buffer, load_buffer_shard

if TYPE_CHECKING:
    from jemlab.training.loop import Trainer

_RNG_KEYS = ("torch", "cpu_generator", "noise_generator")


def checkpoint_state(trainer: Trainer) -> dict[str, Any]:
    """The trainer's state for a checkpoint; with several processes a collective that every rank must call."""
    state = trainer.state_dict()
    env = trainer.dist
    if not env.active:
        return state
    if trainer.buffer is not None:
        fill = torch.Generator().manual_seed(trainer.step)  # for slots no shard holds (buffer_size % world)
        state["buffer"] = gather_buffer(trainer.buffer, env, trainer.config.sampler.buffer_size, fill)
    rng = dict(state["rng"])
    rng["ranks"] = {key: torch.cat(env.all_gather(rng[key].reshape(1, -1))) for key in _RNG_KEYS}  # (world, n)
    state["rng"] = rng
    return state


def local_state(trainer: Trainer, state: dict[str, Any], meta: dict[str, Any]) -> tuple[dict[str, Any], int]:
    """This rank's part of a checkpoint's state, and the step to continue from.

    Loads the buffer shard into ``trainer.buffer`` itself (the returned state then has no buffer).

    Args:
        trainer: the trainer to resume (its `dist`, buffer shard and batcher are set up).
        state: the checkpoint's state.
        meta: the checkpoint's metadata (``world_size``: processes that wrote it, 1 when absent).

    Returns:
        (state for `Trainer.load_state_dict`, step).
    """
    env = trainer.dist
    saved_world = int(meta.get("world_size", 1))
    step = int(meta["progress"]["step"])
    if saved_world == 1 and not env.active:
        return state, step  # one process to one process: exactly what was saved
    state = dict(state)
    if trainer.buffer is not None and state.get("buffer") is not None:
        load_buffer_shard(trainer.buffer, state["buffer"], env)
        state["buffer"] = None
    batcher = rescale_batcher_state(state["batcher"], trainer.batcher.batch_size)
    if batcher is not state["batcher"]:  # another global batch size: count steps in the new batches
        epoch, position = int(batcher["epoch"]), int(batcher["position"])
        step = 0 if epoch == 0 else (epoch - 1) * len(trainer.batcher) + position
    state["batcher"] = batcher
    ranks = state["rng"].get("ranks")
    if saved_world == env.world_size and ranks is not None:
        state["rng"] = {key: ranks[key][env.rank].clone() for key in _RNG_KEYS}
    else:
        base = trainer.config.train.seed + 7919 * (step + 1)
        state["rng"] = {
            "torch": torch.Generator().manual_seed(env.seed(base)).get_state(),
            "cpu_generator": torch.Generator().manual_seed(env.seed(base + 1)).get_state(),
            "noise_generator": torch.Generator(device=trainer.device).manual_seed(env.seed(base + 2)).get_state(),
        }
    return state, step
