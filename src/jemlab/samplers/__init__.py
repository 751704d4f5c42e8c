"""Samplers: SGLD as a pure function, the replay buffer, and chain initialisers."""

from jemlab.samplers.init import INITIALIZERS, build_initializer, uniform_init
from jemlab.samplers.replay_buffer import BufferDraw, ReplayBuffer
from jemlab.samplers.sgld import SGLDStats, sgld

__all__ = [
    "INITIALIZERS",
    "BufferDraw",
    "ReplayBuffer",
    "SGLDStats",
    "build_initializer",
    "sgld",
    "uniform_init",
]
