"""How the host's C allocator treats the large temporary buffers XLA:CPU allocates for every run."""

from __future__ import annotations

import ctypes
import os
import sys

# glibc's mallopt() parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD, _M_ARENA_MAX = -1, -2, -3, -8
_SETTINGS = ((_M_MMAP_THRESHOLD, 2**31 - 1), (_M_TRIM_THRESHOLD, 2**31 - 1), (_M_TOP_PAD, 512 * 2**20),
             (_M_ARENA_MAX, 1))


def reuse_freed_memory() -> bool:
    """On Linux with glibc, unless MESO_JAX_REUSE_FREED_MEMORY=0: serve allocations below 2 GiB from the
    heap and keep what is freed there (``mallopt``: no mmap, no trimming, 512 MiB top pad, one arena).

    By default glibc maps large blocks (above a threshold that grows to at most 32 MiB) afresh and
    unmaps them when freed, and hands freed memory at the top of its heap back to the kernel, so the
    activations XLA:CPU allocates and frees for every batch are page-faulted and zeroed by the kernel
    again each time; kept on the heap they are reused (Meso-4 inference at batch 32: ~1.3-1.5x, see
    BENCHMARKS.md). One arena: threads other than the main one otherwise allocate from arenas of at
    most 64 MiB, so a larger block (XLA's ~100 MiB temporary buffer of a training step at batch 32,
    allocated by JAX's dispatch thread) is mapped and unmapped every time whatever the thresholds
    (training step ~1.2x). The process then keeps its peak memory until it exits. Entry scripts call
    this before the first large allocation and before other threads start. Returns whether the
    settings were applied.
    """
    if os.environ.get("MESO_JAX_REUSE_FREED_MEMORY", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (e.g. musl)
        return False
    return all(libc.mallopt(parameter, value) == 1 for parameter, value in _SETTINGS)


__all__ = ["reuse_freed_memory"]
