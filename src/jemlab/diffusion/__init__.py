"""Diffusion machinery for EGC (SPEC S5): noise schedules, the forward process, DDIM/DDPM samplers, generation.

The samplers see only a noise-estimate function; the network (models/egc_unet.py) knows no schedule.
"""

from jemlab.diffusion.samplers import SAMPLERS, diffusion_step, sample, timestep_subsequence
from jemlab.diffusion.schedule import SCHEDULES, NoiseSchedule

__all__ = ["SAMPLERS", "SCHEDULES", "NoiseSchedule", "diffusion_step", "sample", "timestep_subsequence"]
