"""Facts recorded with every benchmark result."""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import torch

from jemlab.accel import probe
from jemlab.accel.private_ops import os_cpu_flags
from jemlab.allocator import allocator_status
from jemlab.provenance import git_sha

_VECTOR_FLAGS = ("avx", "fma", "amx", "sse4", "f16c", "asimd", "sve", "bf16", "neon")


_KERNEL_ENV = ("JEMLAB_PROBE", "ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "OMP_NUM_THREADS")


def machine_info() -> dict[str, Any]:
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "malloc": allocator_status(),
        # what the CPU offers as the OS lists it (vector and matrix extensions only) and as torch finds it
        "cpu_flags": sorted(f for f in os_cpu_flags() if f.startswith(_VECTOR_FLAGS)),
        "hardware": probe("cpu").summary(),
        # settings that change which kernels run (ISA caps, probe overrides, thread counts), when set
        "env": {k: os.environ[k] for k in _KERNEL_ENV if k in os.environ},
    }


def write_result(name: str, result: dict[str, Any], folder: str | Path = "benchmarks/results") -> Path:
    """Write `result` with machine facts and git sha to ``folder/<name>-<timestamp>.json``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    record = {
        "benchmark": name,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "git_sha": git_sha(),
        "machine": machine_info(),
        **result,
    }
    path = folder / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    return path
