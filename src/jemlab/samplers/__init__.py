"""Samplers: the Langevin step (written once), SGLD as a pure function, JEM++'s PYLD, the replay buffer, and
chain initialisers (uniform noise, per-class Gaussians). Faster executions of the same chain live in
`jemlab.accel`; `jemlab.sampling` picks one for a config."""

from jemlab.samplers.init import (
    INITIALIZERS,
    ClassGaussians,
    build_initializer,
    fit_class_gaussians,
    initializer_from_config,
    initializer_state,
    uniform_init,
)
from jemlab.samplers.langevin import LangevinSettings, SGLDStats, autograd_gradient, gaussian_noise, langevin_step
from jemlab.samplers.pyld import pyld, split_first_layer
from jemlab.samplers.replay_buffer import BufferDraw, ReplayBuffer
from jemlab.samplers.sgld import sgld

__all__ = [
    "INITIALIZERS",
    "BufferDraw",
    "ClassGaussians",
    "LangevinSettings",
    "ReplayBuffer",
    "SGLDStats",
    "autograd_gradient",
    "build_initializer",
    "fit_class_gaussians",
    "gaussian_noise",
    "initializer_from_config",
    "initializer_state",
    "langevin_step",
    "pyld",
    "sgld",
    "split_first_layer",
    "uniform_init",
]
