"""jemlab.allocator: glibc malloc keeps freed tensor memory, so repeated allocations stop page-faulting."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

from jemlab import allocator
from jemlab.errors import ConfigError

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"

# Allocate 40 tensors of 2 MiB and free them, ten times, and count the minor page faults per round: first with
# glibc's thresholds pinned at its static defaults (128 KiB: every block is mmap'ed and unmapped again, 20,480
# faults a round; glibc's own dynamic thresholds make the count depend on the process's history, 51 or 20,449 in
# two identical runs here), then after `tune_allocator`.
FAULTS = """
import ctypes, resource, torch
from jemlab.allocator import tune_allocator
def once():
    xs = [torch.ones(2**19) for _ in range(40)]
    del xs
def faults_per_round():
    once(); once()
    start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(10):
        once()
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start) / 10
libc = ctypes.CDLL("libc.so.6")
assert libc.mallopt(-3, 128 * 1024) == 1 and libc.mallopt(-1, 128 * 1024) == 1
before = faults_per_round()
assert tune_allocator()["tuned"]
print(before, faults_per_round())
"""


@pytest.mark.skipif(not GLIBC, reason="glibc's mallopt is Linux/glibc only")
def test_tuned_allocator_stops_the_page_faults_of_repeated_allocations():
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("JEMLAB_MALLOC", None)
    out = subprocess.run([sys.executable, "-c", FAULTS], capture_output=True, text=True, env=env, check=True)
    before, after = map(float, out.stdout.split()[-2:])
    assert before > 5000  # 80 MiB = 20,480 pages given back and faulted in again every round
    assert after < 1000


@pytest.fixture
def fresh_status(monkeypatch):
    """Run a test as if the process had not been tuned yet (mallopt itself is stubbed where it would be called)."""
    monkeypatch.setattr(allocator, "_STATUS", {"tuned": False, "reason": "not requested"})
    monkeypatch.delenv("JEMLAB_MALLOC", raising=False)
    monkeypatch.delenv("LD_PRELOAD", raising=False)


def test_jemlab_malloc_default_leaves_glibc_alone(fresh_status, monkeypatch):
    monkeypatch.setenv("JEMLAB_MALLOC", "default")
    status = allocator.tune_allocator()
    assert status == {"tuned": False, "reason": "JEMLAB_MALLOC=default"}


def test_preloaded_allocator_is_left_alone(fresh_status, monkeypatch):
    monkeypatch.setenv("LD_PRELOAD", "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2")
    status = allocator.tune_allocator()
    assert not status["tuned"] and "preloaded" in status["reason"]


def test_bad_settings_are_clear_errors(fresh_status, monkeypatch):
    with pytest.raises(ValueError, match="mmap_threshold"):
        allocator.tune_allocator(mmap_threshold=64 * 2**20)
    with pytest.raises(ValueError, match="trim_threshold"):
        allocator.tune_allocator(trim_threshold=-1)
    monkeypatch.setenv("JEMLAB_MALLOC", "jemalloc")
    with pytest.raises(ConfigError, match="JEMLAB_MALLOC must be 'tuned' or 'default'"):
        allocator.tune_allocator()


@pytest.mark.skipif(not GLIBC, reason="glibc's mallopt is Linux/glibc only")
def test_tuning_is_reported_and_sticks(fresh_status, monkeypatch):
    status = allocator.tune_allocator()
    assert status["tuned"] and "mmap_threshold=" in status["reason"]
    monkeypatch.setenv("JEMLAB_MALLOC", "default")  # too late: the process is tuned already
    assert allocator.tune_allocator() == status == allocator.allocator_status()


def test_cli_reports_a_bad_jemlab_malloc_in_one_line(fresh_status, monkeypatch, capsys):
    from jemlab.cli import main

    monkeypatch.setenv("JEMLAB_MALLOC", "yes")
    assert main(["presets"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: JEMLAB_MALLOC must be") and "\n" not in err
