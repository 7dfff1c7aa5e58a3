"""What a round cost: its timings (``RoundTimer``) and memory figures for metrics.jsonl.

Host: the process's peak resident set size since it started (getrusage; no extra dependency),
so a rising value from round to round means memory grows. GPU: the peak of allocated memory
within the round (the counter is reset when a round starts).
"""

from __future__ import annotations

import resource
import sys
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager

import torch


def host_peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB (ru_maxrss: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def reset_device_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def device_peak_mb(device: torch.device) -> float | None:
    """Peak allocated GPU memory since the last reset_device_peak, in MiB (None on CPU)."""
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2**20


def memory_record(device: torch.device) -> dict[str, float | None]:
    gpu = device_peak_mb(device)
    return {"peak_rss_mb": round(host_peak_rss_mb(), 1),
            "peak_gpu_mb": None if gpu is None else round(gpu, 1)}


class RoundTimer:
    """The wall time of one round, split into named phases. Phases nest and are exclusive: while
    an inner phase runs (a client's grid inside local training), the outer one's clock stops, so
    no phase's seconds count twice and the loop subtracts nothing. A phase opened with
    ``evaluation=True`` counts as evaluation, not training (img/s leaves it out)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.start = time.perf_counter()
        # wall-clock start (ns since the epoch): comparable between ranks, which the round's
        # buffer uses to tell how long each rank waited at the all_reduce
        self.start_ns = time.time_ns()
        self.seconds: dict[str, float] = defaultdict(float)
        self._evaluation: set[str] = set()
        self._open: list[list] = []  # [name, start of its current stretch]

    @contextmanager
    def phase(self, name: str, evaluation: bool = False, sync: bool = False) -> Iterator[None]:
        """Time the body as ``name``; ``sync``: wait for the device's queued work before stopping
        the clock (what a GPU phase really took, not what it queued)."""
        now = time.perf_counter()
        if self._open:
            outer = self._open[-1]
            self.seconds[outer[0]] += now - outer[1]
        if evaluation:
            self._evaluation.add(name)
        self._open.append([name, now])
        try:
            yield
        finally:
            if sync and self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            now = time.perf_counter()
            inner = self._open.pop()
            self.seconds[inner[0]] += now - inner[1]
            if self._open:
                self._open[-1][1] = now  # the outer phase's clock runs again

    def __getitem__(self, name: str) -> float:
        return self.seconds.get(name, 0.0)

    def wall(self) -> float:
        """Seconds since the round started."""
        return time.perf_counter() - self.start

    def now_ns(self) -> int:
        """The wall clock now (ns since the epoch), as ``start_ns``: the same clock on every rank of a
        node, and within NTP's few milliseconds across nodes."""
        return time.time_ns()

    def evaluation(self) -> float:
        """Seconds spent in evaluation phases so far."""
        return sum(self.seconds[name] for name in self._evaluation)

    def training(self) -> float:
        """Seconds of the round so far that were not evaluation: the base of img/s."""
        return self.wall() - self.evaluation()
