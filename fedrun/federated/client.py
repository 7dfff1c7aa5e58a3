"""One client's local training: Adam, E epochs over its own shard, optional drift terms.

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

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .. import faults, seeding
from ..config import Config, OptimConfig
from ..data import ImageSet, random_hflip
from ..diffusion import Diffusion
from ..precision import autocast_dtype


def local_steps(num_images: int, batch_size: int, epochs: int) -> int:
    """Optimizer steps of ``epochs`` passes over ``num_images`` (the last batch may be short)."""
    return epochs * -(-num_images // batch_size)


def lr_at_round(o: OptimConfig, round_: int, rounds: int) -> float:
    """The learning rate of round ``round_`` (1-based) of ``rounds``: constant, or a cosine from
    optim.lr in round 1 down to optim.lr * optim.min_lr_ratio in the last round."""
    if o.lr_schedule == "constant" or rounds <= 1:
        return o.lr
    progress = (round_ - 1) / (rounds - 1)
    return o.lr * (o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


@dataclass
class LocalResult:
    loss_sum: torch.Tensor  # on the device: summed batch losses, read once per client
    steps: int
    images: int
    optimizer_state: dict[str, Any] | None = None  # the client's Adam state, when it keeps it


def batch_loss(model: nn.Module, diffusion: Diffusion, data: ImageSet, idx: torch.Tensor,
               sobol: torch.quasirandom.SobolEngine, cfg: Config, amp: torch.dtype | None,
               memory_format: torch.memory_format) -> torch.Tensor:
    """The diffusion loss of data[idx]: flip, label dropout, Sobol noise levels, autocast.
    Shared by ``train_step`` and DP-SGD (fedrun.privacy.dp_sgd), which steps differently."""
    x, y = data.images[idx], data.labels[idx]
    if cfg.data.hflip:
        x = random_hflip(x)
    if cfg.model.label_dropout > 0:  # classifier-free guidance: some labels become the null class
        drop = torch.rand(len(y), device=y.device) < cfg.model.label_dropout
        y = y.masked_fill(drop, data.num_classes)
    x = x.contiguous(memory_format=memory_format)
    u = sobol.draw(len(idx))[:, 0].to(x.device, non_blocking=True)
    with torch.autocast(x.device.type, dtype=amp or torch.float32, enabled=amp is not None):
        return diffusion.loss(model, x, y, u)


def client_adam(model: nn.Module, cfg: Config, round_: int,
                state: dict[str, Any] | None = None) -> torch.optim.Adam:
    """The client's Adam for round ``round_``: fresh (the authors), or resuming ``state``
    (client_optimizer = "keep"), at the round's learning rate."""
    o = cfg.optim
    opt = torch.optim.Adam(model.parameters(), lr=o.lr, betas=(o.beta1, o.beta2),
                           weight_decay=o.weight_decay, foreach=True)
    if state is not None:
        opt.load_state_dict(state)
    lr = lr_at_round(o, round_, cfg.fed.rounds)
    for group in opt.param_groups:
        group["lr"] = lr  # the round's rate (also over a loaded state's old one)
    return opt


def train_step(model: nn.Module, diffusion: Diffusion, opt: torch.optim.Optimizer,
               scaler: torch.amp.GradScaler, data: ImageSet, idx: torch.Tensor,
               sobol: torch.quasirandom.SobolEngine, cfg: Config, amp: torch.dtype | None,
               memory_format: torch.memory_format, loss_scale: float = 1.0,
               adjust_grads: Callable[[], None] | None = None) -> torch.Tensor:
    """One optimizer step on data[idx] (flip, label dropout, Sobol noise levels, autocast,
    drift term, clip); the loss is returned detached and on the device. Shared by FedAvg clients
    and the centralized run. ``loss_scale`` multiplies the loss before backward (DDP: this rank's
    share of the batch); ``adjust_grads`` edits the unscaled gradients before clipping."""
    loss = batch_loss(model, diffusion, data, idx, sobol, cfg, amp, memory_format)
    opt.zero_grad(set_to_none=True)
    scaler.scale(loss * loss_scale).backward()  # x 1.0 is exact: the default changes no bit
    if cfg.optim.grad_clip or adjust_grads is not None:
        scaler.unscale_(opt)  # a no-op unless fp16
    if adjust_grads is not None:
        adjust_grads()
    if cfg.optim.grad_clip:
        nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
    scaler.step(opt)
    scaler.update()
    return loss.detach()


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
    kept = opt.state_dict() if cfg.fed.client_optimizer == "keep" else None
    return LocalResult(loss_sum, steps, n * cfg.fed.local_epochs, kept)
