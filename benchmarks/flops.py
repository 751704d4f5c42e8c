"""FLOP counts and the machine's peak, for stating achieved GFLOP/s as a fraction of what the hardware can do."""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

# FLOPs per cycle per core of one fused multiply-add unit, by the widest vector ISA: lanes × 2 (multiply + add).
_FMA_FLOPS = {"avx512f": 32, "avx2": 16, "avx": 8}


def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs of one call of `fn` (matrix multiplies and convolutions, forward and backward, as torch counts them)."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def cpu_peak(fma_units: int = 2) -> dict[str, Any]:
    """Theoretical fp32 peak of the CPU cores this process may use.

    peak = cores × clock × FMA units × (vector lanes × 2). The clock is the highest MHz the kernel reports
    (a VM often shows only the base clock, which makes this a lower bound of the true peak); Zen 4/5 and
    recent Xeons have two FMA units per core. bf16 dot-product instructions (AVX512_BF16) double the rate.

    Args:
        fma_units: FMA pipes per core (2 on AMD Zen 4/5 and Xeon Gold/Platinum).
    """
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    flags = set(re.findall(r"^flags\s*:\s*(.*)$", text, re.M)[0].split()) if "flags" in text else set()
    mhz = [float(v) for v in re.findall(r"^cpu MHz\s*:\s*([\d.]+)$", text, re.M)]
    max_mhz = Path("/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq")
    if max_mhz.exists():
        mhz.append(int(max_mhz.read_text()) / 1000)
    isa = next((name for name in _FMA_FLOPS if name in flags), None)
    per_cycle = _FMA_FLOPS.get(isa, 4) * fma_units
    cores = torch.get_num_threads()
    ghz = max(mhz) / 1000 if mhz else float("nan")
    return {
        "fp32_peak_gflops": cores * ghz * per_cycle,
        "formula": f"{cores} threads × {ghz:.2f} GHz × {fma_units} FMA units × {_FMA_FLOPS.get(isa, 4)} FLOP ({isa})",
        "bf16_dot_product": "avx512_bf16" in flags,
        "amx": any(f.startswith("amx") for f in flags),
        "cores_visible": os.cpu_count(),
    }


def measured_matmul_gflops(n: int = 1024, repeats: int = 5) -> float:
    """Best-of-`repeats` fp32 GFLOP/s of an n×n matrix product: the practical peak of BLAS on this machine."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e9
