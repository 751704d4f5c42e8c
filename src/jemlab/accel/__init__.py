"""Speed-ups and the hardware they depend on, apart from the maths they speed up.

- `probe`: what this device can do, found out on this machine (tried on tiny inputs, or as torch reports it).
- `choices`: the precision and the fallbacks, each decision with its reason.
- `gradient`: the SGLD input gradient, explicit where it can run, autograd otherwise.
- `explicit`: the hand-written input gradient of plain layer sequences.
- `fast`, `cuda_graph`: the SGLD chain executed with less overhead (in-place steps, chain groups on CPU threads,
  torch.compile, CUDA graphs): the same Langevin step (`jemlab.samplers.langevin`), the same random numbers.
- `private_ops`: the only module that calls private torch operators, each with its self-test.
"""

from jemlab.accel.choices import (
    AUTOCAST_DTYPES,
    GRADIENTS,
    PRECISIONS,
    Choice,
    choose_precision,
    fallbacks,
)
from jemlab.accel.fast import compile_status, fast_sgld
from jemlab.accel.gradient import choose_gradient, input_gradient
from jemlab.accel.probe import CAPABILITIES, probe, reset_probes

__all__ = [
    "AUTOCAST_DTYPES",
    "CAPABILITIES",
    "GRADIENTS",
    "PRECISIONS",
    "Choice",
    "choose_gradient",
    "choose_precision",
    "compile_status",
    "fallbacks",
    "fast_sgld",
    "input_gradient",
    "probe",
    "reset_probes",
]
