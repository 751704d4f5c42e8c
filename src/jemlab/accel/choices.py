"""Which precision and which gradient path a run uses, decided from the probe, each with the reason why.

Every choice is a `Choice` (value + one-line reason) so that the run header, ``train.log`` and ``metrics.json`` can
say what was picked and why. A fast path that fails at run time despite the probe is recorded with `fall_back`:
it is logged once, the slower path takes over for the rest of the process, and the run goes on.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from jemlab.accel.probe import probe
from jemlab.errors import ConfigError

log = logging.getLogger(__name__)

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
GRADIENTS = ("auto", "autograd", "explicit")

# precision name → the autocast dtype of the network evaluation (None: plain fp32)
AUTOCAST_DTYPES: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Choice:
    """A decision and the reason for it (one line)."""

    value: str
    reason: str

    def __str__(self) -> str:
        return f"{self.value} ({self.reason})"

    def as_dict(self) -> dict[str, str]:
        return {"value": self.value, "reason": self.reason}


# --- precision -----------------------------------------------------------------------------------------------------

_WARNED: set[str] = set()


def choose_precision(requested: str, device: torch.device | str, key: str) -> Choice:
    """The precision for `key` (``sampler.precision``, ``train.precision`` or ``egc.precision``) on `device`.

    ``auto`` takes bf16 only where it is native: for the SGLD chains' network evaluation and the EGC training step
    on a CPU with native bf16 or a bf16-capable GPU, and for the JEM training step on such a GPU (on a CPU the JEM
    step stays fp32; bf16 autocast of its loss there is opt-in). The EGC step, whose cost is the UNet's double
    back-propagation, measured 1.5× faster in bf16 autocast on an AVX512_BF16 CPU with the fp32 gradient's
    direction (cosine 0.999; docs/egc.md). A forced ``bf16`` where it is emulated runs (correctly, slowly) with a
    warning; a precision that does not run on the device at all is a one-line ConfigError naming the fix.
    """
    device = torch.device(device)
    p = probe(device)
    if requested not in PRECISIONS:
        raise ConfigError(f"{key} must be one of {', '.join(PRECISIONS)}, got '{requested}'")
    if requested == "auto":
        native = p["bf16_native"]
        if key == "train.precision" and device.type != "cuda":
            return Choice("fp32", "auto: the training step stays fp32 on a CPU")
        if native.ok:
            return Choice("bf16", f"auto: {native.reason}")
        return Choice("fp32", f"auto: {native.reason}")
    if requested == "fp32":
        return Choice("fp32", "requested")
    if requested == "fp16":
        if device.type != "cuda":
            raise ConfigError(f"{key}=fp16 needs a CUDA GPU (this run is on {device}); use {key}=auto or bf16")
        return Choice("fp16", "requested")
    if p.ok("bf16_native"):
        return Choice("bf16", "requested; native on this device")
    if not p.ok("bf16_works"):
        raise ConfigError(f"{key}=bf16 does not run on this {device.type} ({p['bf16_works'].reason}); use {key}=auto")
    reason = f"requested, but emulated here ({p['bf16_native'].reason}): several times slower than fp32"
    if key not in _WARNED:
        _WARNED.add(key)
        log.warning(f"{key}=bf16: {reason}; {key}=auto would use fp32")
    return Choice("bf16", reason)


# --- run-time fallbacks --------------------------------------------------------------------------------------------

_FALLBACKS: dict[str, str] = {}


def fall_back(path: str, instead: str, exc: BaseException) -> None:
    """Record that fast path `path` failed at run time; log it once. Callers then use `instead` for good."""
    if path in _FALLBACKS:
        return
    first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else "(no message)"
    _FALLBACKS[path] = f"{type(exc).__name__}: {first}"
    log.warning(f"{path} failed at run time ({_FALLBACKS[path]}); using {instead} from now on in this process")


def failed(path: str) -> str | None:
    """The recorded failure of `path` in this process, or None."""
    return _FALLBACKS.get(path)


def fallbacks() -> dict[str, str]:
    """Every fast path that failed in this process → its error (for metrics.json)."""
    return dict(_FALLBACKS)


def reset_fallbacks() -> None:
    """Forget recorded failures and warnings (tests)."""
    _FALLBACKS.clear()
    _WARNED.clear()
