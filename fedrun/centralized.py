"""The centralized baseline: one model on the whole train split for R x E epochs.

Data-parallel over ranks with DistributedDataParallel: each global batch of optim.batch_size
images (one seeded permutation per epoch, the same on every rank) is dealt out to the ranks
(image i of the batch to rank i % world_size), so the effective batch and the order of images
do not depend on the number of ranks. DDP averages gradients over ranks with equal weights, so
each rank scales its loss by its share of the batch: a short last batch (or an empty slice on
a rank) still gives the full batch's mean gradient. Noise and noise levels come from each
rank's own (seed, epoch, rank) stream, so 1 and N ranks train statistically alike, not bit-alike.
A "round" here is E epochs, so checkpoints, resume and metrics.jsonl work as in FedAvg; the
learning-rate schedule and the EMA (fedrun.ema) advance once per round too, exactly as in a
federated run of the same rounds, so the two stay comparable. Like ``FederatedRounds``,
``CentralizedRounds`` loads what it saves (``resume``) and saves it when due (``run``).
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from . import checkpoint, dist, seeding
from .checkpoint import Checkpointer
from .config import Config
from .data import ImageSet
from .diffusion import Diffusion
from .ema import PowerEMA
from .evaluation.evaluator import Evaluator
from .flat import flatten
from .local_training import local_steps, lr_at_round, train_step
from .logs import RunLogger
from .precision import autocast_dtype


class CentralizedRounds:
    """The centralized baseline's "rounds" on this rank: E epochs each, one Adam for the run."""

    def __init__(self, cfg: Config, info: dist.DistInfo, model: nn.Module, diffusion: Diffusion,
                 train_set: ImageSet, log: RunLogger, evaluator: Evaluator, checkpointer: Checkpointer,
                 ema: PowerEMA):
        self.cfg, self.info, self.model, self.diffusion = cfg, info, model, diffusion
        self.train_set = train_set
        self.log, self.evaluator, self.checkpointer, self.ema = log, evaluator, checkpointer, ema
        o = cfg.optim
        # One Adam for the whole run (the authors' centralized notebook), restored on resume.
        trained = [p for p in model.parameters() if p.requires_grad]  # model.trainable
        self.opt = torch.optim.Adam(trained, lr=o.lr, betas=(o.beta1, o.beta2), weight_decay=o.weight_decay,
                                    foreach=True)

    def resume(self) -> int:
        """Restore the newest usable checkpoint (model, EMA, Adam, random state); its round, or 0."""
        resumed = self.checkpointer.load()
        if resumed is None:
            return 0
        self.model.load_state_dict(resumed.model)
        self.ema.load_state_dict(resumed.ema, self.info.device)
        if resumed.optimizer is not None:
            self.opt.load_state_dict(resumed.optimizer)
        checkpoint.set_rng_state(resumed.rng)
        self.log.print(f"resuming from {resumed.path} (round {resumed.round})")
        return resumed.round

    def run(self, start_round: int) -> list[dict[str, Any]]:
        """Rounds start_round + 1 .. fed.rounds; returns their records."""
        cfg, info, model, diffusion = self.cfg, self.info, self.model, self.diffusion
        train_set, log, evaluator, ema, opt = self.train_set, self.log, self.evaluator, self.ema, self.opt
        device, o, seed = info.device, cfg.optim, cfg.run.seed
        net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None) \
            if info.distributed else model
        amp = autocast_dtype(cfg.train.precision, device)
        scaler = torch.amp.GradScaler(device.type, enabled=amp is torch.float16)
        memory_format = torch.channels_last if cfg.train.channels_last else torch.contiguous_format
        n, E = len(train_set), cfg.fed.local_epochs
        batches = local_steps(n, o.batch_size, 1)
        history: list[dict[str, Any]] = []

        for r in range(start_round + 1, cfg.fed.rounds + 1):
            t0 = time.perf_counter()
            log.start_round(r, E * batches)
            loss_sum = torch.zeros((), device=device)
            for group in opt.param_groups:
                group["lr"] = lr_at_round(o, r, cfg.fed.rounds)
            net.train()
            for e in range((r - 1) * E, r * E):
                torch.manual_seed(seeding.derive_seed(seeding.CLIENT, seed, e, info.rank))
                order = seeding.generator("cpu", seeding.SHUFFLE, seed, e)
                perm = torch.randperm(n, generator=order).to(device)
                sobol = seeding.sobol_engine(seed, e, info.rank)
                for b in range(batches):
                    batch = perm[b * o.batch_size:(b + 1) * o.batch_size]
                    idx = batch[info.rank::info.world_size]
                    share = len(idx) / len(batch)  # this rank's part of the batch (1.0 on one rank)
                    # DDP averages over ranks: scaled by world * share, each image weighs the same
                    loss = train_step(net, diffusion, opt, scaler, train_set, idx, sobol, cfg, amp,
                                      memory_format, loss_scale=share * info.world_size)
                    if len(idx):  # (an empty slice's mean is NaN) the batch mean, summed by the all_reduce
                        loss_sum += loss * share
                    log.step()
            loss_sum = dist.all_reduce_sum(loss_sum)
            wall = time.perf_counter() - t0
            if ema.enabled:
                ema.update(flatten(model), r)
            self.checkpointer.save(r, model, optimizer=opt, ema=ema, last_round=r == cfg.fed.rounds)
            record = {"round": r, "epochs": r * E, "loss": float(loss_sum) / (E * batches),
                      "images": n * E, "wall_s": round(wall, 4), "img_per_s": round(n * E / wall, 2),
                      "world_size": info.world_size}
            scores = evaluator.evaluate(ema.module(), diffusion, r) if evaluator.due(r) else None
            if scores is not None:
                record["scores"] = scores
            history.append(record)
            log.end_round(record, f"epochs {r * E:>5}  loss {record['loss']:.4f}  {wall:6.2f}s  "
                                  f"{record['img_per_s']:8.1f} img/s")
        return history
