"""The model as one flat fp32 vector: every float parameter and buffer, in a fixed order.

One round's whole communication is one all_reduce(SUM) of one buffer laid out as

    [ n_1 theta_1 + ... + n_K theta_K  (P floats) | n | loss * n | images | skipped | trained |
      local training seconds of rank 0 | ... | of rank W-1 ]

where the tail (``TAIL`` statistics, then one timing slot per rank, each written only by its
rank) carries what the server and the telemetry need, so nothing else has to travel: after the
sum every rank knows how long every rank trained, hence how long it waited for the slowest.
Each rank adds its own clients into the buffer tensor by tensor (no flat copy of a model), and
``weighted_average`` turns the summed buffer into the FedAvg average.
"""

from __future__ import annotations

import torch
from torch import nn

# Tail slots of the aggregation buffer, after the P parameters.
N_SLOT, LOSS_SLOT, IMAGES_SLOT, SKIPPED_SLOT, TRAINED_SLOT = range(5)
TAIL = 5


def float_tensors(model: nn.Module) -> list[torch.Tensor]:
    """Every float parameter and buffer of ``model``, in the fixed order the buffer uses."""
    return [p for p in model.parameters()] + [b for b in model.buffers() if b.is_floating_point()]


def num_flat(model: nn.Module) -> int:
    return sum(t.numel() for t in float_tensors(model))


def flatten(model: nn.Module) -> torch.Tensor:
    return torch.cat([t.detach().float().reshape(-1) for t in float_tensors(model)])


@torch.no_grad()
def load_flat_(model: nn.Module, flat: torch.Tensor) -> None:
    offset = 0
    for t in float_tensors(model):
        t.copy_(flat[offset:offset + t.numel()].view_as(t))
        offset += t.numel()


@torch.no_grad()
def accumulate_(buffer: torch.Tensor, model: nn.Module, weight: float) -> None:
    """buffer[:P] += weight * theta, tensor by tensor (no temporary copy of the model)."""
    offset = 0
    for t in float_tensors(model):
        buffer[offset:offset + t.numel()].add_(t.reshape(-1).float(), alpha=weight)
        offset += t.numel()


def all_finite(model: nn.Module) -> bool:
    """No NaN/Inf in any float tensor, checked in place (no flat copy of the model)."""
    return bool(torch.stack([torch.isfinite(t).all() for t in float_tensors(model)]).all())


def buffer_size(num_params: int, world_size: int) -> int:
    """Floats in the aggregation buffer: parameters, statistics, one timing slot per rank."""
    return num_params + TAIL + world_size


def weighted_average(buffer: torch.Tensor, num_params: int) -> tuple[torch.Tensor, float]:
    """After the all_reduce: (sum_k n_k theta_k / sum_k n_k, sum_k n_k)."""
    n = float(buffer[num_params + N_SLOT])
    return buffer[:num_params] / max(n, 1.0), n
