"""Return freed heap memory to the operating system before the optimizer's first step.

On Linux, glibc keeps memory that sampling, teacher scoring and the backward have freed
in its heap for reuse. AdamW allocates its moments on its first step, each as large as a
parameter (an embedding at Qwen's vocabulary is 78 MB), so glibc maps them afresh rather
than from that heap, and they add to what it retains: the first step's peak is their size
above a heap the step no longer uses. `malloc_trim(0)` hands the free pages back first
(benchmarks/README.md, step memory: 1.45 -> 1.35 GB for the default on_policy step at
V = 151,936). Later steps reuse the heap for the same shapes, so trimming them would only
cost page faults. Elsewhere than glibc this does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys


@functools.cache
def _malloc_trim():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc.malloc_trim  # glibc only (musl has none)
    except (OSError, AttributeError):
        return None


def release_freed_heap() -> bool:
    """Give the heap's free pages back to the OS; False where the C library cannot."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True
