"""Keep freed tensor memory in the process, so that a training loop stops paying page faults for it.

Every SGLD step and training iteration allocates and frees the same activation-sized buffers (about 1 MiB each for
the course CNN at batch 64). With glibc's default malloc settings those buffers are served by ``mmap`` and given back
to the kernel on ``free``, or the top of the heap is trimmed after each step; either way the next step touches
fresh pages and the kernel zero-fills them, one minor page fault per 4 KiB. glibc raises its mmap threshold on its
own after some frees (its "dynamic threshold"), so whether a loop faults depends on what else the process did
before: on the 2-core development machine the eager SGLD reference loop took 1,400–2,100 minor faults per step and
6–9 ms in some benchmark processes, 0 faults and 3–4.7 ms in others, depending on which modes had run first
(docs/sampling.md, "Allocator").

`tune_allocator` fixes both thresholds with glibc's ``mallopt``: blocks below `mmap_threshold` come from the heap,
and the heap is trimmed only when more than `trim_threshold` bytes are free at its top. Freed activations are then
reused without faults, in every process, whatever ran before. The cost is memory that stays mapped after a peak
(at most the trim threshold per malloc arena). This is the dependency-free form of the PyTorch performance guide's
advice to preload jemalloc or tcmalloc on CPU; with one of those preloaded, glibc's settings do not matter and
nothing is changed.

The ``jemlab`` command tunes the allocator at start-up; set ``JEMLAB_MALLOC=default`` to leave glibc's defaults.
Library users call `tune_allocator()` themselves (importing jemlab changes nothing).
"""

from __future__ import annotations

import ctypes
import os
import platform

from jemlab.errors import ConfigError

# glibc's mallopt parameter numbers (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# glibc refuses mmap thresholds above HEAP_MAX_SIZE / 2, which is 32 MiB on 64-bit systems
MAX_MMAP_THRESHOLD = 32 * 2**20
DEFAULT_TRIM_THRESHOLD = 512 * 2**20

_STATUS: dict[str, object] = {"tuned": False, "reason": "not requested"}


def allocator_status() -> dict[str, object]:
    """Whether `tune_allocator` changed malloc's settings in this process, and why (not)."""
    return dict(_STATUS)


def tune_allocator(
    mmap_threshold: int = MAX_MMAP_THRESHOLD, trim_threshold: int = DEFAULT_TRIM_THRESHOLD, *, force: bool = False
) -> dict[str, object]:
    """Set glibc malloc's mmap and trim thresholds (see the module docstring); returns `allocator_status()`.

    Does nothing, and says why, when ``JEMLAB_MALLOC=default`` is set (unless `force`), when the C library is not
    glibc, or when jemalloc/tcmalloc is preloaded. Safe to call more than once: once tuned, the process stays
    tuned (glibc's dynamic thresholds cannot be restored) and later calls return the status unchanged.

    Raises:
        ValueError: a threshold out of glibc's range (mmap 0 … 32 MiB, trim ≥ 0).
        ConfigError: JEMLAB_MALLOC is set to something other than ``tuned`` or ``default``.
    """
    if not 0 <= mmap_threshold <= MAX_MMAP_THRESHOLD:
        raise ValueError(f"mmap_threshold must be between 0 and {MAX_MMAP_THRESHOLD} bytes, got {mmap_threshold}")
    if trim_threshold < 0:
        raise ValueError(f"trim_threshold must be >= 0 bytes, got {trim_threshold}")
    setting = os.environ.get("JEMLAB_MALLOC", "tuned").strip().lower()
    if setting not in ("tuned", "default"):
        raise ConfigError(f"JEMLAB_MALLOC must be 'tuned' or 'default', got {setting!r}; unset it or pick one")
    if _STATUS["tuned"]:  # glibc cannot go back to its dynamic thresholds; a second call changes nothing
        return allocator_status()
    if setting == "default" and not force:
        return _set(False, "JEMLAB_MALLOC=default")
    preload = os.environ.get("LD_PRELOAD", "")
    if "jemalloc" in preload or "tcmalloc" in preload:
        return _set(False, f"a different allocator is preloaded ({preload})")
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return _set(False, f"not glibc ({platform.system()} {platform.libc_ver()[0] or 'unknown libc'})")
    try:
        libc = ctypes.CDLL("libc.so.6")
        ok = libc.mallopt(_M_MMAP_THRESHOLD, int(mmap_threshold)) == 1
        ok = libc.mallopt(_M_TRIM_THRESHOLD, int(trim_threshold)) == 1 and ok
    except (OSError, AttributeError) as err:
        return _set(False, f"mallopt unavailable ({err})")
    if not ok:
        return _set(False, "mallopt refused the settings")
    return _set(True, f"mmap_threshold={mmap_threshold} trim_threshold={trim_threshold}")


def _set(tuned: bool, reason: str) -> dict[str, object]:
    _STATUS.update(tuned=tuned, reason=reason)
    return allocator_status()
