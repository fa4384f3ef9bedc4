"""meso_jax.host_memory: glibc's malloc settings applied on Linux, and not when turned off."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.conftest import REPO_ROOT

_APPLY = "from meso_jax import host_memory; print(host_memory.reuse_freed_memory())"


def _apply_in_a_fresh_process(**environment: str) -> str:
    """The result of reuse_freed_memory() in a new interpreter (the settings last for the process)."""
    done = subprocess.run([sys.executable, "-c", _APPLY], cwd=REPO_ROOT, capture_output=True, text=True,
                          env={**os.environ, **environment}, check=True, timeout=60)
    return done.stdout.strip()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mallopt is glibc's (Linux)")
def test_settings_apply_on_linux_unless_turned_off():
    assert _apply_in_a_fresh_process() == "True"
    assert _apply_in_a_fresh_process(MESO_JAX_REUSE_FREED_MEMORY="0") == "False"


# A worker thread allocates, fills and frees a block larger than glibc's 64 MiB per-thread arenas three
# times and prints the page faults of each round.
_THREAD_ROUNDS = """
import ctypes, resource, threading
from meso_jax import host_memory
host_memory.reuse_freed_memory()
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
size = 100 * 2**20
faults = []
def rounds():
    for _ in range(3):
        before = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
        block = libc.malloc(size)
        ctypes.memset(block, 1, size)
        libc.free(block)
        faults.append(resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - before)
worker = threading.Thread(target=rounds)
worker.start()
worker.join()
print(*faults)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mallopt and RUSAGE_THREAD are Linux's")
def test_a_worker_threads_large_block_is_reused_not_mapped_again():
    """What XLA:CPU's dispatch thread does with a training step's ~100 MiB temporary buffer: after the
    first round the block comes back from the heap, without a page fault per page."""
    done = subprocess.run([sys.executable, "-c", _THREAD_ROUNDS], cwd=REPO_ROOT, capture_output=True, text=True,
                          check=True, timeout=60)
    first, *later = (int(count) for count in done.stdout.split())
    pages = 100 * 2**20 // 4096
    if first < pages // 2:
        pytest.skip(f"the first round faulted only {first} times for {pages} pages (huge pages?): nothing to compare")
    assert max(later) < pages // 10, f"page faults per round {first}, {later}: the freed block was not reused"
