"""The centralized baseline: one model on the whole train split for R x E epochs.

Data-parallel over ranks with DistributedDataParallel: each global batch of optim.batch_size
images (one seeded permutation per epoch, the same on every rank) is cut into world_size equal
slices, so the effective batch and the order of images do not depend on the number of ranks.
A "round" here is E epochs, so checkpoints, resume and metrics.jsonl work as in FedAvg.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from . import checkpoint, dist, seeding
from .config import Config
from .data import ImageSet
from .diffusion import Diffusion
from .evaluate import Evaluator
from .local import autocast_dtype, train_step
from .logs import RunLogger


def run_centralized(cfg: Config, info: dist.DistInfo, model: nn.Module, diffusion: Diffusion,
                    train_set: ImageSet, start_round: int, optimizer_state: dict | None,
                    log: RunLogger, evaluator: Evaluator) -> list[dict[str, Any]]:
    device, o, seed = info.device, cfg.optim, cfg.run.seed
    net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None) \
        if info.distributed else model
    # One Adam for the whole run (the authors' centralized notebook), restored on resume.
    opt = torch.optim.Adam(model.parameters(), lr=o.lr, betas=(o.beta1, o.beta2),
                           weight_decay=o.weight_decay, foreach=True)
    if optimizer_state is not None:
        opt.load_state_dict(optimizer_state)
    amp = autocast_dtype(cfg.train.precision, device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp is torch.float16)
    memory_format = torch.channels_last if cfg.train.channels_last else torch.contiguous_format
    n, E = len(train_set), cfg.fed.local_epochs
    per_rank = o.batch_size // info.world_size
    batches = -(-n // o.batch_size)
    history: list[dict[str, Any]] = []

    for r in range(start_round + 1, cfg.fed.rounds + 1):
        t0 = time.perf_counter()
        log.start_round(r, E * batches)
        loss_sum = torch.zeros((), device=device)
        net.train()
        for e in range((r - 1) * E, r * E):
            torch.manual_seed(seeding.derive_seed(seeding.CLIENT, seed, e, info.rank))
            perm = torch.randperm(n, generator=seeding.generator("cpu", seeding.SHUFFLE, seed, e)).to(device)
            sobol = seeding.sobol_engine(seed, e, info.rank)
            for b in range(batches):
                batch = perm[b * o.batch_size:(b + 1) * o.batch_size]
                idx = batch[info.rank * per_rank:(info.rank + 1) * per_rank] if info.distributed else batch
                loss_sum += train_step(net, diffusion, opt, scaler, train_set, idx, sobol, cfg, amp,
                                       memory_format)
                log.step()
        stats = dist.all_reduce_sum(torch.stack([loss_sum, torch.tensor(float(E * batches), device=device)]))
        wall = time.perf_counter() - t0
        if r % cfg.checkpoint.every == 0 or r == cfg.fed.rounds:
            if info.is_main:
                checkpoint.save_checkpoint(cfg.run_dir, r, {
                    "round": r,
                    "model": {k: v.cpu() for k, v in model.state_dict().items()},
                    "server": {},
                    "optimizer": opt.state_dict(),
                    "config_hash": cfg.hash(),
                    "config": cfg.to_dict(),
                    "rng": checkpoint.rng_state(),
                }, keep=cfg.checkpoint.keep)
            dist.barrier()
        record = {"round": r, "epochs": r * E, "loss": float(stats[0] / stats[1]),
                  "images": n * E, "wall_s": round(wall, 4), "img_per_s": round(n * E / wall, 2),
                  "world_size": info.world_size}
        scores = evaluator.evaluate(model, diffusion, r) if evaluator.due(r) else None
        if scores is not None:
            record["scores"] = scores
        history.append(record)
        log.end_round(record, f"epochs {r * E:>5}  loss {record['loss']:.4f}  {wall:6.2f}s  "
                              f"{record['img_per_s']:8.1f} img/s")
    return history
