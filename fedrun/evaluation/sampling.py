"""Drawing images from a model, sharded over ranks, independent of the number of ranks, and
the labels they are drawn for.

The N requested labels are cut into fixed chunks of ``chunk`` images; chunk j is drawn with the
generator ``generators(j)`` (a registered stream of ``fedrun.seeding`` at chunk j) by rank
j % world_size. The same config therefore produces the same images on 1 rank or on 8; rank 0
gathers them in order.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from .. import dist
from ..data import to_uint8
from ..diffusion import Diffusion
from ..dist import DistInfo


def class_balanced_labels(counts: list[int] | torch.Tensor) -> torch.Tensor:
    """Labels in class order, counts[c] of class c (e.g. a reference split's class counts)."""
    counts = torch.as_tensor(counts, dtype=torch.long)
    return torch.repeat_interleave(torch.arange(len(counts)), counts)


def eval_labels(test_labels: torch.Tensor, num_classes: int, n: int) -> torch.Tensor:
    """n labels in class order whose class mix follows the test split (largest remainder)."""
    counts = torch.bincount(test_labels.cpu(), minlength=num_classes).double()
    exact = counts / counts.sum() * n
    out = exact.floor().long()
    order = torch.argsort(exact - out, descending=True, stable=True)
    out[order[: n - int(out.sum())]] += 1
    return class_balanced_labels(out)


@torch.no_grad()
def sample_sharded(model: nn.Module, diffusion: Diffusion, labels: torch.Tensor,
                   image_shape: tuple[int, int, int], steps: int, eta: float,
                   generators: Callable[[int], torch.Generator], info: DistInfo, chunk: int = 256,
                   autocast_dtype: torch.dtype | None = None) -> torch.Tensor | None:
    """All ranks call this; rank 0 gets uint8 images [N, C, H, W] (CPU), the others None.
    ``generators(j)``: the generator of chunk j, on ``info.device``."""
    was_training = model.training
    model.eval()
    n_chunks = math.ceil(len(labels) / chunk)
    mine: list[tuple[int, torch.Tensor]] = []
    for j in range(info.rank, n_chunks, info.world_size):
        lab = labels[j * chunk:(j + 1) * chunk].to(info.device)
        g = generators(j)
        x = diffusion.sample(model, lab, image_shape, steps, eta, generator=g, autocast_dtype=autocast_dtype)
        mine.append((j, to_uint8(x).cpu()))
    model.train(was_training)
    if info.world_size > 1:
        gathered = dist.gather_object_to_main(mine)
        if gathered is None:  # not rank 0
            return None
        mine = [item for part in gathered for item in part]  # type: ignore[attr-defined]
    mine.sort(key=lambda item: item[0])
    if not mine:
        return torch.empty(0, *image_shape, dtype=torch.uint8)
    return torch.cat([x for _, x in mine])
