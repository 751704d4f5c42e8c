"""The default preset on a CPU without AVX-512: train, sample, evaluate and serve under QEMU's Haswell model.

QEMU's user-mode emulation presents an x86-64 CPU with AVX2 and FMA but no AVX-512, AVX512_BF16 or AMX, and torch
detects that CPU: oneDNN's bf16 weight packing fails there as on such a machine (the crash this guards against:
"mkldnn_reorder_conv2d_weight: bf16 path needs the cpu support avx_ne_convert or avx512bw ..."). The other presets
run in `scripts/other_cpu_check.py` (minutes each under emulation; docs/hardware.md).
"""

from __future__ import annotations

import platform
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.skipif(
    platform.system() != "Linux" or platform.machine() != "x86_64" or shutil.which("qemu-x86_64") is None,
    reason="needs qemu-x86_64 on an x86-64 Linux host (apt-get install qemu-user)",
)
def test_default_preset_runs_end_to_end_on_an_avx2_cpu():
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "other_cpu_check.py"), "--presets", "default", "--expect-no-bf16"],
        capture_output=True,
        text=True,
        timeout=1800,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert "CPU as torch sees it: AVX2" in output
    assert "sampler.precision=fp32 (auto: no AVX512_BF16" in output
    assert "all checks passed" in output
