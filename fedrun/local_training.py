"""The diffusion training step that every trainer shares: FedAvg clients, DP-SGD clients and the
centralized baseline.

* ``batch_loss``: the loss of one batch (flip, label dropout for classifier-free guidance, Sobol
  noise levels, autocast);
* ``client_adam``: a client's Adam for one round (fresh, or resuming its kept moments) at the
  round's learning rate (``lr_at_round``);
* ``train_step``: one optimizer step (backward, an optional gradient term, clipping);
* ``local_steps`` and ``LocalResult``: what one client's local training costs and returns;
* ``CLIENT_OPTIMIZERS`` (``fed.client_optimizer``): a fresh Adam per client and round (the
  authors), or one whose moments each client keeps.

It sits in the core so that ``fedrun.federated`` (the plain client), ``fedrun.privacy`` (DP-SGD)
and ``fedrun.centralized`` can all import it without importing each other.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .config import FEDERATED, HASHED_WHEN_SET, Config, OptimConfig
from .data import ImageSet, random_hflip
from .diffusion import Diffusion
from .registry import Registry

CLIENT_OPTIMIZERS = Registry(
    "fed.client_optimizer", "reset", "\"reset\": fresh Adam per client per round (authors) | \"keep\": "
    "each client keeps its Adam moments across rounds.", hashed=HASHED_WHEN_SET, applies=FEDERATED,
    federated=True)


@CLIENT_OPTIMIZERS.register("reset")
class FreshAdam:
    """A fresh Adam per client per round (the authors): nothing but the weights leaves a client."""

    state_kinds: tuple[str, ...] = ()


@CLIENT_OPTIMIZERS.register("keep")
class KeptAdam:
    """Each client keeps its Adam moments across rounds (state kind "optimizer", on its home rank)."""

    state_kinds: tuple[str, ...] = ("optimizer",)


def keeps_optimizer(cfg: Config) -> bool:
    """Does each client keep its Adam state between rounds (``fed.client_optimizer``)?"""
    return "optimizer" in CLIENT_OPTIMIZERS.selected(cfg).target.state_kinds


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
    message: torch.Tensor | None = None  # what the client sends instead of its model (rows of records)

    @property
    def state(self) -> dict[str, Any]:
        """What the client keeps from this round, by kind (``{"optimizer": ...}`` with kept Adam)."""
        return {} if self.optimizer_state is None else {"optimizer": self.optimizer_state}


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
    # what trains (model.trainable): every parameter by default, the adapters and a few layers with LoRA
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=o.lr,
                           betas=(o.beta1, o.beta2), weight_decay=o.weight_decay, foreach=True)
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


class ShardTrainer:
    """A client trainer of the round loop (fedrun.parts.ClientTrainer) that trains one client at a
    time on its shard with ``train_fn``: FedAvg's ``train_local``; a privacy mechanism swaps in
    DP-SGD's ``train_local_dp`` (``using``).

    ``model`` is what local training calls (e.g. ``torch.compile`` of the global model's module:
    it shares its parameters); ``shards`` maps each client to its train indices on the device.
    """

    def __init__(self, train_fn: Callable[..., LocalResult], model: nn.Module, diffusion: Diffusion,
                 data: ImageSet, shards: dict[int, torch.Tensor], cfg: Config,
                 on_step: Callable[[], None] | None = None):
        self.train_fn = train_fn  # (model, diffusion, data, shard, cfg, round, client, **kw)
        self.model, self.diffusion, self.data, self.shards, self.cfg = model, diffusion, data, shards, cfg
        self.on_step = on_step
        self.state_kinds: tuple[str, ...] = CLIENT_OPTIMIZERS.selected(cfg).target.state_kinds

    def using(self, train_fn: Callable[..., LocalResult]) -> ShardTrainer:
        """The same trainer with another local-training function (same contract as ``train_fn``)."""
        return ShardTrainer(train_fn, self.model, self.diffusion, self.data, self.shards, self.cfg,
                            self.on_step)

    def begin_round(self, round_: int, clients: Iterable[int]) -> Iterable[int]:
        return clients  # one client at a time: nothing to prepare, trained in the order taken

    def train(self, round_: int, client: int, state: dict[str, Any],
              grad_term: Callable[[], None] | None) -> LocalResult:
        return self.train_fn(self.model, self.diffusion, self.data, self.shards[client], self.cfg,
                             round_, client, on_step=self.on_step,
                             optimizer_state=state.get("optimizer"), adjust_grads=grad_term)
