"""What this device can do: one probe per device, run lazily, once per process, and cached.

jemlab never decides a code path from the CPU it was developed on. Each capability is found out on the machine it
runs on, in one of two ways:

- **Does it work?** The operator is tried on a tiny input and compared with a plain reference (an exception or a
  wrong answer means "no"): oneDNN's packed convolutions in fp32 and bf16, the fused activation backwards, the
  tensor version counter (`jemlab.accel.private_ops` holds these operators and their self-tests).
- **Is it fast?** From what torch itself reports about the device: bf16 counts as native on a CPU only where torch's
  CPU detection finds AVX512_BF16 or AMX (or the OS lists AVX-NE-CONVERT), and on a CUDA GPU where
  ``torch.cuda.is_bf16_supported()`` says so. Elsewhere bf16 still runs, emulated, at a fraction of fp32's speed
  (about a sixth on an AVX2 CPU in `benchmarks/sgld.py`), so ``precision: auto`` does not pick it there.

``JEMLAB_PROBE`` overrides the findings, so that the paths of another machine can be exercised anywhere:
``JEMLAB_PROBE=avx2`` answers as an AVX2 CPU without AVX-512 would (no native bf16, no bf16 weight packing), and
``JEMLAB_PROBE=name=0,name=1,...`` sets single capabilities (names in `CAPABILITIES`).
"""

from __future__ import annotations

import functools
import importlib.util
import os
import platform
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from jemlab.accel import private_ops
from jemlab.errors import ConfigError

ENV_VAR = "JEMLAB_PROBE"

# capability → what it means (the names accepted by JEMLAB_PROBE)
CAPABILITIES = {
    "bf16_native": "bf16 matrix/convolution arithmetic runs natively (not emulated)",
    "fp16_native": "fp16 arithmetic runs natively",
    "bf16_works": "a bf16 convolution runs and gives the fp32 answer within bf16 rounding",
    "packed_conv_fp32": "oneDNN packed fp32 convolutions run and are correct",
    "packed_conv_bf16": "oneDNN packed bf16 convolutions run and are correct",
    "activation_backward": "fused ATen activation backwards that write into a given tensor run and are correct",
    "version_counter": "in-place updates move a tensor's version counter (cached plans see weight changes)",
    "compile": "torch.compile has what it needs (a C++ compiler on CPU, Triton on CUDA)",
}

# named machine profiles for JEMLAB_PROBE: what such a CPU answers
PROFILES = {
    # an x86-64 CPU with AVX2 and FMA but no AVX-512, AVX512_BF16, AMX or AVX-NE-CONVERT (e.g. Zen 2/3, Haswell)
    "avx2": {"bf16_native": False, "fp16_native": False, "packed_conv_bf16": False},
}


@dataclass(frozen=True)
class Capability:
    """One finding: whether the device has it, and why we believe so (one line)."""

    ok: bool
    reason: str


class DeviceProbe:
    """The capabilities of one device, each found out on first use (see the module docstring)."""

    def __init__(self, device: torch.device, overrides: dict[str, bool]) -> None:
        self.device = device
        self._overrides = overrides
        self._found: dict[str, Capability] = {}

    def __getitem__(self, name: str) -> Capability:
        if name not in CAPABILITIES:
            raise KeyError(f"unknown capability {name!r}; known: {', '.join(CAPABILITIES)}")
        if name not in self._found:
            if name in self._overrides:
                self._found[name] = Capability(self._overrides[name], f"set by {ENV_VAR}")
            else:
                self._found[name] = _CHECKS[name](self)
        return self._found[name]

    def ok(self, name: str) -> bool:
        return self[name].ok

    @functools.cached_property
    def name(self) -> str:
        """The processor's name as the OS or the CUDA driver gives it."""
        if self.device.type == "cuda":
            return torch.cuda.get_device_name(self.device)
        return _cpu_model_name()

    @functools.cached_property
    def isa(self) -> dict[str, bool]:
        """CPU instruction sets as torch detects them (empty for a GPU)."""
        return private_ops.torch_cpu_isa() if self.device.type == "cpu" else {}

    def summary(self) -> dict[str, object]:
        """Everything found, for run headers, metrics.json and benchmark records (runs every check)."""
        facts: dict[str, object] = {"device": str(self.device), "name": self.name}
        if self.device.type == "cpu":
            facts["machine"] = platform.machine()
            facts["torch_cpu_capability"] = torch.backends.cpu.get_cpu_capability()
            facts["isa"] = sorted(k for k, v in self.isa.items() if v)
        else:
            facts["cuda_capability"] = ".".join(map(str, torch.cuda.get_device_capability(self.device)))
        facts["capabilities"] = {k: {"ok": self[k].ok, "reason": self[k].reason} for k in CAPABILITIES}
        if self._overrides:
            facts["overridden"] = sorted(self._overrides)
        return facts


# --- the checks ----------------------------------------------------------------------------------------------------


def _cpu_only(fn: Callable[[DeviceProbe], Capability]) -> Callable[[DeviceProbe], Capability]:
    @functools.wraps(fn)
    def check(p: DeviceProbe) -> Capability:
        if p.device.type != "cpu":
            return Capability(False, f"a CPU path (device {p.device.type})")
        return fn(p)

    return check


def _bf16_native(p: DeviceProbe) -> Capability:
    if p.device.type == "cuda":
        ok = torch.cuda.is_bf16_supported()
        return Capability(ok, f"torch.cuda.is_bf16_supported() = {ok} on {p.name}")
    works = p["bf16_works"]
    if not works.ok:
        return Capability(False, f"bf16 does not run here ({works.reason})")
    found = [name for name in ("avx512_bf16", "amx_tile") if p.isa.get(name)]
    if not found and p.isa.get("avx2") and "avx_ne_convert" in private_ops.os_cpu_flags():
        found = ["avx_ne_convert"]
    if found:
        return Capability(True, f"torch reports {'+'.join(found).upper()} on this CPU")
    cap = torch.backends.cpu.get_cpu_capability()
    return Capability(False, f"no AVX512_BF16, AMX or AVX-NE-CONVERT (torch CPU capability {cap}): bf16 is emulated")


def _fp16_native(p: DeviceProbe) -> Capability:
    if p.device.type == "cuda":
        return Capability(True, f"CUDA device {p.name}")
    if p.isa.get("amx_fp16"):
        return Capability(True, "torch reports AMX-FP16 on this CPU")
    return Capability(False, "no AMX-FP16 on this CPU: fp16 is emulated")


def _bf16_works(p: DeviceProbe) -> Capability:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 8, 8, generator=g).to(p.device)
    w = torch.randn(4, 3, 3, 3, generator=g).to(p.device)
    try:
        got = torch.nn.functional.conv2d(x.bfloat16(), w.bfloat16(), padding=1).float()
    except Exception as exc:
        return Capability(False, f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:200]}")
    want = torch.nn.functional.conv2d(x, w, padding=1)
    error = float((got - want).abs().max() / want.abs().max())
    ok = error < 5e-2
    return Capability(ok, f"a tiny bf16 convolution is within {error:.1g} of fp32" + ("" if ok else ": wrong answer"))


def _packed(dtype: torch.dtype) -> Callable[[DeviceProbe], Capability]:
    @_cpu_only
    def check(p: DeviceProbe) -> Capability:
        if dtype == torch.bfloat16 and not p.ok("bf16_works"):
            return Capability(False, "bf16 does not run here")
        reasons = [private_ops.check_packed_conv(dtype, channels_last) for channels_last in (False, True)]
        failed = [r for r in reasons if r is not None]
        return Capability(not failed, failed[0] if failed else "tried on a tiny input (NCHW and NHWC): correct")

    return check


@_cpu_only
def _activation_backward(p: DeviceProbe) -> Capability:
    reason = private_ops.check_activation_backward(torch.float32)
    return Capability(reason is None, reason or "tried on a tiny input: correct")


def _version_counter(p: DeviceProbe) -> Capability:
    reason = private_ops.check_version_counter()
    return Capability(reason is None, reason or "tried: an in-place add moves it")


def _compile(p: DeviceProbe) -> Capability:
    if not hasattr(torch, "compile"):
        return Capability(False, "this torch has no torch.compile")
    if p.device.type == "cuda":
        ok = importlib.util.find_spec("triton") is not None
        return Capability(ok, "Triton is installed" if ok else "Triton is not installed")
    compiler = os.environ.get("CXX") or next((c for c in ("c++", "g++", "clang++") if shutil.which(c)), None)
    if compiler is None:
        return Capability(False, "no C++ compiler on PATH for Inductor")
    return Capability(True, f"C++ compiler {compiler} found (compilation itself is tried on first use)")


_CHECKS: dict[str, Callable[[DeviceProbe], Capability]] = {
    "bf16_native": _bf16_native,
    "fp16_native": _fp16_native,
    "bf16_works": _bf16_works,
    "packed_conv_fp32": _packed(torch.float32),
    "packed_conv_bf16": _packed(torch.bfloat16),
    "activation_backward": _activation_backward,
    "version_counter": _version_counter,
    "compile": _compile,
}


# --- one probe per device, per process -----------------------------------------------------------------------------

_PROBES: dict[str, DeviceProbe] = {}


def probe(device: torch.device | str = "cpu") -> DeviceProbe:
    """The (cached) probe of `device`; ``cuda`` means the current CUDA device."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    key = str(device)
    if key not in _PROBES:
        _PROBES[key] = DeviceProbe(device, parse_overrides(os.environ.get(ENV_VAR, "")))
    return _PROBES[key]


def reset_probes() -> None:
    """Forget every finding (tests; or after changing ``JEMLAB_PROBE`` in this process)."""
    _PROBES.clear()


def parse_overrides(text: str) -> dict[str, bool]:
    """``avx2`` or ``name=0|1,...`` (see the module docstring) → {capability: value}; bad text is a ConfigError."""
    overrides: dict[str, bool] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        if item in PROFILES:
            overrides.update(PROFILES[item])
            continue
        name, sep, value = item.partition("=")
        if not sep or name not in CAPABILITIES or value not in ("0", "1"):
            raise ConfigError(
                f"{ENV_VAR}={text!r}: cannot read {item!r}; use a profile ({', '.join(PROFILES)}) or name=0|1 with "
                f"a name among {', '.join(CAPABILITIES)}"
            )
        overrides[name] = value == "1"
    return overrides


def _cpu_model_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.split(":", 1)[0].strip() in ("model name", "Model", "Hardware"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"
