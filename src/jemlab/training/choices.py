"""What a run's config resolves to on this machine: precisions and gradient path, each with its reason.

The run header, ``train.log`` and ``metrics.json`` print this so that a run says which paths it took and why
(`jemlab.accel` makes the decisions; this module only asks it about the run's config).
"""

from __future__ import annotations

import torch

from jemlab.accel import AUTOCAST_DTYPES, Choice, choose_gradient, choose_precision, fallbacks, probe
from jemlab.config import Config


def run_choices(config: Config, model: torch.nn.Module, device: torch.device) -> dict[str, Choice]:
    """{setting: Choice} for the precisions and the SGLD gradient path of this run on `device`."""
    s = config.sampler
    if config.objective.name == "egc":
        return {"egc.precision": choose_precision(config.egc.precision, device, "egc.precision")}
    sampler = choose_precision(s.precision, device, "sampler.precision")
    if s.pyld_steps > 0:
        gradient = Choice("autograd", "PYLD (sampler.pyld_steps > 0) differentiates through autograd")
    elif s.impl != "fast":
        gradient = Choice("autograd", "sampler.impl=reference")
    else:
        dtype = AUTOCAST_DTYPES[sampler.value]
        gradient = choose_gradient(s.gradient, model, device, dtype, traced=s.compile or s.cuda_graph)
    return {
        "train.precision": choose_precision(config.train.precision, device, "train.precision"),
        "sampler.precision": sampler,
        "sampler.gradient": gradient,
    }


def header_lines(choices: dict[str, Choice], device: torch.device) -> list[str]:
    """Two log lines: the device as probed, and each choice with its reason."""
    found = probe(device)
    if device.type == "cpu":
        isa = ",".join(k for k, v in found.isa.items() if v) or "none reported"
        where = f"cpu={found.name!r} torch_capability={torch.backends.cpu.get_cpu_capability()} isa={isa}"
    else:
        where = f"gpu={found.name!r}"
    native = found["bf16_native"]
    lines = [f"hardware: {where} bf16={'native' if native.ok else 'not native'} ({native.reason})"]
    lines.append("choices: " + "; ".join(f"{key}={choice}" for key, choice in choices.items()))
    return lines


def hardware_record(choices: dict[str, Choice], device: torch.device) -> dict[str, object]:
    """The probe's findings, the choices and any run-time fallbacks, for metrics.json."""
    return {
        **probe(device).summary(),
        "choices": {key: choice.as_dict() for key, choice in choices.items()},
        "fallbacks": fallbacks(),
    }
