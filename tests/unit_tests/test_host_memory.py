"""fedrun.host_memory: with the thresholds raised, a freed 48 MiB block stays with the process.

glibc serves a block above its mmap threshold (at most 32 MiB by default) with fresh pages and
unmaps it on free, so the next step faults the same pages in again; with fedrun's 64 MiB
threshold the block comes from the heap, and freeing it keeps its pages for the next step.
Seen from outside as the resident set after the free: back to where it was with glibc's
defaults, 48 MiB higher with fedrun's. Each case runs in a fresh process, so the allocator's
state starts the same.
"""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(
    sys.platform != "linux" or platform.libc_ver()[0] != "glibc", reason="mallopt's thresholds are glibc's")

MIB = 1 << 20
PROGRAM = """
import os, sys
import numpy as np
from fedrun.host_memory import keep_freed_memory
if sys.argv[1] == "kept":
    assert keep_freed_memory()
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
np.ones(1024)  # numpy's own first allocations, before measuring
before = rss()
a = np.ones((48 << 20) // 4, dtype=np.float32)  # 48 MiB, every page written
del a
print(rss() - before)
"""


def resident_after_free(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", PROGRAM, mode], capture_output=True, text=True, check=True)
    return int(out.stdout.strip())


def test_system_allocator_returns_a_freed_block() -> None:
    assert resident_after_free("system") < 8 * MIB


def test_kept_memory_keeps_a_freed_block_for_the_next_step() -> None:
    assert resident_after_free("kept") >= 40 * MIB
