"""The model as one flat fp32 vector: every float parameter and buffer, in a fixed order.

One round's whole communication is one all_reduce(SUM) of one buffer laid out as

    [ n_1 theta_1 + ... + n_K theta_K  (P floats) | n | loss * n | images | skipped | trained |
      local training seconds of rank 0 | ... | of rank W-1 ]

where the tail (``TAIL`` statistics, then one timing slot per rank, each written only by its
rank) carries what the server and the telemetry need, so nothing else has to travel: after the
sum every rank knows how long every rank trained, hence how long it waited for the slowest.
Each rank adds its own clients into the buffer tensor by tensor (no flat copy of a model), and
``weighted_average`` turns the summed buffer into the FedAvg average. Update rules may add
regions of their own after the timing slots (SCAFFOLD: sum_k n_k (c_k+ - c_k)); ``RoundBuffer``
owns the layout and is what the round loop fills, all-reduces and reads.
"""

from __future__ import annotations

import torch
from torch import nn

from . import dist
from .parts import Aggregate

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


class RoundBuffer:
    """The one buffer a round all-reduces: [sum_k w_k theta_k | tail | seconds per rank | regions].

    ``regions``: floats each update rule adds (by rule name, in order; zero-sized ones get none).
    """

    def __init__(self, num_params: int, world_size: int, regions: dict[str, int], device: torch.device):
        self.num_params, self.world_size = num_params, world_size
        self._seconds = num_params + TAIL  # first of the per-rank timing slots
        offset = buffer_size(num_params, world_size)
        self._regions: dict[str, tuple[int, int]] = {}
        for name, size in regions.items():
            if size:
                self._regions[name] = (offset, size)
                offset += size
        self.data = torch.zeros(offset, device=device)

    @property
    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size()

    def zero_(self) -> None:
        self.data.zero_()

    def add(self, model: nn.Module, weight: float, loss: float, images: int) -> None:
        """One usable client: weight * theta_k into the sum, and its statistics into the tail."""
        P = self.num_params
        accumulate_(self.data, model, weight)
        self.data[P + N_SLOT] += weight
        self.data[P + LOSS_SLOT] += loss * weight
        self.data[P + IMAGES_SLOT] += images
        self.data[P + TRAINED_SLOT] += 1

    def skip(self) -> None:
        """One client left out of the round (non-finite loss or weights)."""
        self.data[self.num_params + SKIPPED_SLOT] += 1

    def region(self, name: str) -> torch.Tensor:
        """The update rule ``name``'s floats (an empty tensor for a rule that adds none)."""
        start, size = self._regions.get(name, (0, 0))
        return self.data[start:start + size]

    def set_seconds(self, rank: int, seconds: float) -> None:
        self.data[self._seconds + rank] = seconds  # every rank learns every rank's training time

    def all_reduce(self) -> None:
        dist.all_reduce_sum(self.data)  # <- the whole FedAvg communication of the round

    def aggregate(self, round_: int, clients: list[int]) -> Aggregate:
        """The round as every rank sees it after the all_reduce."""
        average, n = weighted_average(self.data, self.num_params)
        return Aggregate(round_, clients, self.data[:self.num_params], n, average,
                         {name: self.region(name) for name in self._regions}, usable=n > 0)

    def stats(self) -> tuple[dict[str, float], list[float]]:
        """(the tail statistics by name, every rank's local training seconds), after the all_reduce."""
        tail = self.data[self.num_params:self._seconds].tolist()
        names = ("n", "loss", "images", "skipped", "trained")  # the order of the *_SLOT constants
        seconds = self.data[self._seconds:self._seconds + self.world_size].tolist()
        return dict(zip(names, tail, strict=True)), seconds
