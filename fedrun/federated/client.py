"""One client's local training: Adam, E epochs over its own shard, optional drift terms; and
``PlainTrainer``, the round loop's client trainer (fedrun.parts.ClientTrainer) around it.

By default (the authors' method) each client starts a fresh Adam every round and nothing but its
weights leaves it. Options: the client keeps its Adam moments across rounds
(``fed.client_optimizer = "keep"``: the state stays with the client, nothing extra travels), the
round's learning rate follows ``optim.lr_schedule``, and a gradient term from fedrun.federated.drift
(FedProx, SCAFFOLD) is added after each backward pass.

Everything random here (shuffling, Sobol noise levels, Gaussian noise, dropout, flips) is
seeded by (seed, round, client), so the result does not depend on which rank trains the client
or on what that rank did before.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .. import faults, seeding
from ..config import Config
from ..data import ImageSet
from ..diffusion import Diffusion
from ..local_training import LocalResult, ShardTrainer, client_adam, keeps_optimizer, train_step
from ..precision import autocast_dtype


def train_local(model: nn.Module, diffusion: Diffusion, data: ImageSet, indices: torch.Tensor,
                cfg: Config, round_: int, client: int,
                on_step: Callable[[], None] | None = None, *,
                optimizer_state: dict[str, Any] | None = None,
                adjust_grads: Callable[[], None] | None = None) -> LocalResult:
    """Train ``model`` in place on ``data[indices]`` for ``cfg.fed.local_epochs`` epochs.

    ``optimizer_state``: the client's Adam state from its previous round (client_optimizer =
    "keep"), None for a fresh Adam; with "keep" the result carries the new state.
    ``adjust_grads``: a drift term (fedrun.federated.drift) applied after every backward pass.
    """
    device = data.images.device
    o, seed = cfg.optim, cfg.run.seed
    torch.manual_seed(seeding.derive_seed(seeding.CLIENT, seed, round_, client))
    shuffle = seeding.generator("cpu", seeding.SHUFFLE, seed, round_, client)
    sobol = seeding.sobol_engine(seed, round_, client)  # one engine, kept across all steps
    # Re-created for every client and round, as the authors do: no optimizer state travels.
    # With client_optimizer = "keep" it resumes the moments this client left last time.
    opt = client_adam(model, cfg, round_, optimizer_state)
    amp = autocast_dtype(cfg.train.precision, device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp is torch.float16)
    memory_format = torch.channels_last if cfg.train.channels_last else torch.contiguous_format

    model.train()
    n = len(indices)
    loss_sum = torch.zeros((), device=device)
    steps = 0
    for _ in range(cfg.fed.local_epochs):
        order = indices[torch.randperm(n, generator=shuffle).to(device, non_blocking=True)]
        for start in range(0, n, o.batch_size):
            idx = order[start:start + o.batch_size]
            loss = train_step(model, diffusion, opt, scaler, data, idx, sobol, cfg, amp, memory_format,
                              adjust_grads=adjust_grads)
            loss_sum += loss  # stays on the device: no host sync per step
            steps += 1
            if faults.PLAN is not None:  # test-only fault injection (FEDRUN_FAULT_AT); off = one lookup
                faults.at_step(model, round_, client, steps)
            if on_step is not None:
                on_step()
    kept = opt.state_dict() if keeps_optimizer(cfg) else None
    return LocalResult(loss_sum, steps, n * cfg.fed.local_epochs, kept)


def plain_trainer(model: nn.Module, diffusion: Diffusion, data: ImageSet, shards: dict[int, torch.Tensor],
                  cfg: Config, on_step: Callable[[], None] | None = None) -> ShardTrainer:
    """The client trainer of FedAvg and its drift variants: ``train_local`` on the client's shard."""
    return ShardTrainer(train_local, model, diffusion, data, shards, cfg, on_step)
