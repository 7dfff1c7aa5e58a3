"""FedAvg: client sampling, the flat-buffer weighted average, server optimizers, the round loop.

One round, on every rank at once:
  1. the round's clients are drawn from (seed, round): the same list everywhere;
  2. they are split over ranks by data size (dist.assign_clients);
  3. each rank trains its clients one after another, starting each from the global weights,
     and adds n_k * theta_k into ONE flat fp32 buffer (n_k and a few statistics in its tail);
  4. one all_reduce(SUM) of that buffer is the whole communication of the round;
  5. theta = buffer / n, passed through the server optimizer (plain FedAvg by default).
"""

from __future__ import annotations

import time
import warnings
from typing import Any

import numpy as np
import torch
from torch import nn

from . import checkpoint, dist, faults, seeding
from .config import Config
from .data import ImageSet
from .diffusion import Diffusion
from .evaluate import Evaluator
from .local import train_local
from .logs import RunLogger
from .multiclient import ClientBatcher
from .telemetry import memory_record, reset_device_peak

# Tail slots of the aggregation buffer, after the P parameters.
N_SLOT, LOSS_SLOT, IMAGES_SLOT, SKIPPED_SLOT, TRAINED_SLOT = range(5)
TAIL = 5


class AllClientsFailedError(RuntimeError):
    """Too many rounds in a row without a single usable client update."""


# --------------------------------------------------------------------------------------------
# The model as one flat vector: every float parameter and buffer, in a fixed order


def float_tensors(model: nn.Module) -> list[torch.Tensor]:
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


def weighted_average(buffer: torch.Tensor) -> tuple[torch.Tensor, float]:
    """After the all_reduce: (sum_k n_k theta_k / sum_k n_k, sum_k n_k)."""
    n = float(buffer[-TAIL + N_SLOT])
    return buffer[:-TAIL] / max(n, 1.0), n


# --------------------------------------------------------------------------------------------
# Server optimizers: FedAvg, FedAvgM (server momentum), FedAdam (Reddi et al. 2021)


class ServerOptimizer:
    """Turns (global, average of client models) into the next global model.

    FedAvgM and FedAdam treat delta = global - average as a pseudo-gradient.
    """

    def __init__(self, kind: str, lr: float, momentum: float):
        self.kind, self.lr, self.momentum = kind, lr, momentum
        self.state: dict[str, torch.Tensor] = {}

    def step(self, global_flat: torch.Tensor, average: torch.Tensor) -> torch.Tensor:
        if self.kind == "fedavg":
            return average.clone()
        delta = global_flat - average
        if self.kind == "fedavgm":
            m = self.state.setdefault("m", torch.zeros_like(delta))
            m.mul_(self.momentum).add_(delta)
            return global_flat - self.lr * m
        # fedadam: beta1 = momentum, beta2 = 0.99, tau = 1e-3 as in Reddi et al.
        m = self.state.setdefault("m", torch.zeros_like(delta))
        v = self.state.setdefault("v", torch.zeros_like(delta))
        m.mul_(self.momentum).add_(delta, alpha=1 - self.momentum)
        v.mul_(0.99).addcmul_(delta, delta, value=0.01)
        return global_flat - self.lr * m / (v.sqrt() + 1e-3)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.cpu() for k, v in self.state.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor], device: torch.device) -> None:
        self.state = {k: v.to(device) for k, v in state.items()}


def sample_clients(num_clients: int, per_round: int, seed: int, round_: int) -> list[int]:
    """Uniform without replacement, from (seed, round): identical on every rank."""
    if per_round >= num_clients:
        return list(range(num_clients))
    rng = np.random.default_rng(seeding.derive_seed(seeding.SELECT, seed, round_))
    return sorted(int(c) for c in rng.choice(num_clients, per_round, replace=False))


# --------------------------------------------------------------------------------------------
# The round loop


def run_fedavg(cfg: Config, info: dist.DistInfo, model: nn.Module, diffusion: Diffusion,
               train_set: ImageSet, shards: list[np.ndarray], start_round: int,
               server: ServerOptimizer, log: RunLogger, evaluator: Evaluator,
               train_model: nn.Module | None = None) -> list[dict[str, Any]]:
    """Rounds start_round+1 .. fed.rounds. ``model`` holds the global weights on entry and exit.

    ``train_model``: what local training calls (e.g. torch.compile(model)); it must share
    ``model``'s parameters, which the flat-buffer code reads and writes.
    """
    device, f = info.device, cfg.fed
    net = model if train_model is None else train_model  # what local training calls
    run_dir = cfg.run_dir
    sizes = {k: len(s) for k, s in enumerate(shards)}
    shard_idx = {k: torch.as_tensor(s, dtype=torch.long, device=device) for k, s in enumerate(shards)}
    global_flat = flatten(model)
    P = global_flat.numel()
    buffer = torch.zeros(P + TAIL, device=device)
    bad_rounds = 0
    warned_idle = False
    history: list[dict[str, Any]] = []

    for r in range(start_round + 1, f.rounds + 1):
        t0 = time.perf_counter()
        reset_device_peak(device)
        clients = sample_clients(f.num_clients, f.clients_per_round, cfg.run.seed, r)
        assignment = dist.assign_clients(clients, sizes, info.world_size)
        mine = assignment[info.rank]
        if info.is_main and not warned_idle and not all(assignment):
            warnings.warn(f"round {r}: {sum(not a for a in assignment)} rank(s) have no client: more "
                          f"ranks ({info.world_size}) than clients per round ({len(clients)}); they add zeros")
            warned_idle = True
        steps_of = {k: f.local_epochs * -(-sizes[k] // cfg.optim.batch_size) for k in mine}
        log.start_round(r, sum(steps_of.values()))

        buffer.zero_()
        # train.clients_at_once > 1: K of this rank's clients train together (same maths)
        batcher = ClientBatcher(model, diffusion, train_set, {k: shard_idx[k] for k in mine if sizes[k]},
                                cfg, r, on_step=log.step) if cfg.train.clients_at_once > 1 else None
        for k in mine:
            if sizes[k] == 0:
                continue  # an empty client has nothing to train on and weight zero
            log.describe(f"round {r}/{f.rounds} client {k}")
            load_flat_(model, global_flat)
            res = batcher.result(k) if batcher is not None else \
                train_local(net, diffusion, train_set, shard_idx[k], cfg, r, k, on_step=log.step)
            if r in evaluator.client_rounds():  # personalization: what this client's model draws
                evaluator.client_grid(model, diffusion, r, k)
            loss = float(res.loss_sum) / max(res.steps, 1)  # one host sync per client
            if not (np.isfinite(loss) and all_finite(model)):
                warnings.warn(f"round {r}: client {k} produced a non-finite loss or weights; "
                              f"it is left out of this round's average")
                buffer[P + SKIPPED_SLOT] += 1
                continue
            accumulate_(buffer, model, float(sizes[k]))
            buffer[P + N_SLOT] += sizes[k]
            buffer[P + LOSS_SLOT] += loss * sizes[k]
            buffer[P + IMAGES_SLOT] += res.images
            buffer[P + TRAINED_SLOT] += 1
        if device.type == "cuda":
            torch.cuda.synchronize()
        t_local = time.perf_counter() - t0

        t1 = time.perf_counter()
        dist.all_reduce_sum(buffer)  # <- the whole FedAvg communication of the round
        if device.type == "cuda":
            torch.cuda.synchronize()  # .tolist() below syncs anyway; this times the collective alone
        t_allreduce = time.perf_counter() - t1  # includes waiting for the slowest rank
        average, n = weighted_average(buffer)
        stats = buffer[P:].tolist()
        t_agg = time.perf_counter() - t1

        if n > 0:
            global_flat = server.step(global_flat, average)
            bad_rounds = 0
        else:  # every client failed: keep the global model as it was
            bad_rounds += 1
            warnings.warn(f"round {r}: no usable client update; the global model is unchanged")
            if bad_rounds >= f.max_bad_rounds:
                raise AllClientsFailedError(
                    f"fed.max_bad_rounds: {bad_rounds} rounds in a row without a usable client "
                    f"update (non-finite losses or weights); lower optim.lr, set optim.grad_clip, or "
                    f"check the data")
        load_flat_(model, global_flat)

        t2 = time.perf_counter()
        if r % cfg.checkpoint.every == 0 or r == f.rounds:
            if info.is_main:
                checkpoint.save_checkpoint(run_dir, r, {
                    "round": r,
                    "model": {k: v.cpu() for k, v in model.state_dict().items()},
                    "server": server.state_dict(),
                    "config_hash": cfg.hash(),
                    "config": cfg.to_dict(),
                    "rng": checkpoint.rng_state(),
                }, keep=cfg.checkpoint.keep)
                faults.after_checkpoint(r)  # test-only: kill -9 here if FEDRUN_FAULT_AT=ckpt:r
            dist.barrier()  # nobody races ahead of a checkpoint that may be needed to resume
        t_ckpt = time.perf_counter() - t2
        t_train = time.perf_counter() - t0  # the round without evaluation: the throughput base

        t3 = time.perf_counter()
        scores = evaluator.evaluate(model, diffusion, r) if evaluator.due(r) else None
        t_eval = time.perf_counter() - t3
        wall = time.perf_counter() - t0
        images = stats[IMAGES_SLOT]
        record = {
            "round": r,
            "loss": stats[LOSS_SLOT] / n if n > 0 else float("nan"),
            "clients": clients,
            "clients_trained": int(stats[TRAINED_SLOT]),
            "clients_skipped": int(stats[SKIPPED_SLOT]),
            "images": int(images),
            "wall_s": round(wall, 4),
            "local_train_s": round(t_local, 4),
            "aggregate_s": round(t_agg, 4),
            "checkpoint_s": round(t_ckpt, 4),
            "eval_s": round(t_eval, 4),
            "img_per_s": round(images / t_train, 2),
            "allreduce_bytes": buffer.numel() * buffer.element_size(),
            "allreduce_ms": round(1e3 * t_allreduce, 3),
            "world_size": info.world_size,
            **memory_record(device),
        }
        if scores is not None:
            record["scores"] = scores
        history.append(record)
        log.end_round(record, f"round {r:>4}/{f.rounds}  loss {record['loss']:.4f}  "
                              f"{wall:6.2f}s  {record['img_per_s']:8.1f} img/s"
                              + (f"  skipped {record['clients_skipped']}" if record["clients_skipped"] else ""))
    return history
