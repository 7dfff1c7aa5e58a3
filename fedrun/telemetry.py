"""Memory figures for metrics.jsonl: host peak RSS and the GPU's per-round peak.

Host: the process's peak resident set size since it started (getrusage; no extra dependency),
so a rising value from round to round means memory grows. GPU: the peak of allocated memory
within the round (the counter is reset when a round starts).
"""

from __future__ import annotations

import resource
import sys

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
