"""Diffusion maths for EGC (SPEC S5): noise schedules, the forward process, the DDIM/DDPM sampler.

The sampler sees only a noise-estimate function and its random source; the network (models/egc_unet.py) knows no
schedule, and this package knows no network, config or run: generating from an EGC run is `jemlab.generate.egc`.
"""

from jemlab.diffusion.samplers import SAMPLERS, diffusion_step, sample, timestep_subsequence
from jemlab.diffusion.schedule import SCHEDULES, NoiseSchedule

__all__ = ["SAMPLERS", "SCHEDULES", "NoiseSchedule", "diffusion_step", "sample", "timestep_subsequence"]
