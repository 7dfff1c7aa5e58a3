"""Which dtype autocast uses, from ``train.precision`` and the device: one answer for training,
sampling and evaluation alike."""

from __future__ import annotations

import torch


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """None means full fp32. "auto": bf16 on GPU (no GradScaler needed), fp32 on CPU."""
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[precision]
