"""Samplers: SGLD as a pure function (plus a faster implementation of the same chain and JEM++'s PYLD), the
replay buffer, and chain initialisers (uniform noise, per-class Gaussians)."""

from jemlab.samplers.fast import compile_status, fast_sgld
from jemlab.samplers.init import (
    INITIALIZERS,
    ClassGaussians,
    build_initializer,
    fit_class_gaussians,
    initializer_from_config,
    initializer_state,
    uniform_init,
)
from jemlab.samplers.pyld import pyld, split_first_layer
from jemlab.samplers.replay_buffer import BufferDraw, ReplayBuffer
from jemlab.samplers.sgld import SGLDStats, sgld

__all__ = [
    "INITIALIZERS",
    "BufferDraw",
    "ClassGaussians",
    "ReplayBuffer",
    "SGLDStats",
    "build_initializer",
    "compile_status",
    "fast_sgld",
    "fit_class_gaussians",
    "initializer_from_config",
    "initializer_state",
    "pyld",
    "sgld",
    "split_first_layer",
    "uniform_init",
]
