"""Host memory: let glibc's malloc keep freed memory for the next step instead of returning it.

By default glibc serves every allocation above its mmap threshold (128 KiB at start, raised to
the size of each such block freed, up to 32 MiB) with fresh pages from the kernel, hands them
back on free, and trims the heap's top whenever more than 128 KiB of it is free. A training or
sampling step allocates and frees the same activation tensors every time, so each step faults
its pages in again. With a 64 MiB mmap threshold and a 1 GiB trim threshold the freed blocks stay
in the heap and the next step reuses them. On the digits default (20 rounds, 2 ranks, 2 cores;
``benchmarks/results/host_allocator_cpu.json``): minor page faults 0.12x, system CPU time 0.23x,
the job 0.96x and its final evaluation 0.94x glibc's defaults, peak RSS 1.00x, every bit the same.

The cost: a process keeps the heap it has used at its peak (up to 1 GiB of free heap top) rather
than shrinking between steps. ``run.keep_freed_memory = false`` keeps glibc's defaults. Other C
libraries (musl, macOS) have no ``mallopt`` and are left alone.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

M_TRIM_THRESHOLD = -1  # glibc's malloc.h parameter numbers
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 64 << 20
TRIM_THRESHOLD = 1 << 30


def keep_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds for this process. True if glibc took both."""
    if not sys.platform.startswith("linux"):
        return False
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):  # no C library by that name, or no mallopt
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
