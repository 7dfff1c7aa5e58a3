"""The FedAvg round loop: client sampling, local training, one all_reduce, the server step.

One round, on every rank at once:
  1. the round's clients are drawn from (seed, round): the same list everywhere;
  2. they are split over ranks by data size (dist.assign_clients);
  3. each rank trains its clients one after another, starting each from the global weights
     (plus a drift term and the client's kept state, if configured), and adds n_k * theta_k
     into ONE flat fp32 buffer (n_k and a few statistics in its tail; SCAFFOLD appends the
     sum of n_k * (c_k+ - c_k));
  4. one all_reduce(SUM) of that buffer is the whole communication of the round;
  5. theta = buffer / n, passed through the server rule (plain FedAvg by default); the EMA of
     the global model folds it in;
  6. the checkpointer writes the round if it is due, the evaluator scores it if it is due,
     rank 0 logs one line, and the round-end hooks run (benchmarks use them).
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from .. import dist, seeding
from ..checkpoint import Checkpointer
from ..config import Config
from ..data import ImageSet
from ..diffusion import Diffusion
from ..ema import PowerEMA
from ..errors import TrainingDivergedError
from ..evaluation.evaluator import Evaluator
from ..flat import (
    IMAGES_SLOT,
    LOSS_SLOT,
    N_SLOT,
    SKIPPED_SLOT,
    TAIL,
    TRAINED_SLOT,
    accumulate_,
    all_finite,
    buffer_size,
    flatten,
    load_flat_,
    weighted_average,
)
from ..local_training import local_steps
from ..logs import RunLogger
from ..telemetry import memory_record, reset_device_peak
from . import placement
from .client import train_local
from .client_state import ClientStates
from .drift import FedProx, ScaffoldClient
from .server import ServerOptimizer

if TYPE_CHECKING:
    from ..privacy.accountant import PrivacyLedger

RoundHook = Callable[[dict[str, Any]], None]


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
               checkpointer: Checkpointer, ema: PowerEMA, client_states: ClientStates,
               train_model: nn.Module | None = None,
               on_round_end: list[RoundHook] | None = None,
               ledger: PrivacyLedger | None = None) -> list[dict[str, Any]]:
    """Rounds start_round+1 .. fed.rounds. ``model`` holds the global weights on entry and exit.

    ``ema``: the global model's EMA (sampled and scored instead of it when enabled);
    ``client_states``: what clients keep between rounds, for this rank's home clients.
    ``ledger``: the privacy accountant's record (privacy.level != "none"); every rank keeps the
    same one, since who trains and for how many noisy steps follows from the config alone.

    ``train_model``: what local training calls (e.g. torch.compile(model)); it must share
    ``model``'s parameters, which the flat-buffer code reads and writes. ``on_round_end``: called
    on every rank with the round's record, after it is logged and outside its timings.
    """
    device, f = info.device, cfg.fed
    net = model if train_model is None else train_model  # what local training calls
    sizes = {k: len(s) for k, s in enumerate(shards)}
    shard_idx = {k: torch.as_tensor(s, dtype=torch.long, device=device) for k, s in enumerate(shards)}
    global_flat = flatten(model)
    P = global_flat.numel()
    scaffold = client_states.scaffold
    CONTROL = buffer_size(P, info.world_size)  # SCAFFOLD: sum_k n_k (c_k+ - c_k) from here on
    buffer = torch.zeros(CONTROL + (P if scaffold else 0), device=device)
    TIMES = P + TAIL  # first of the per-rank timing slots
    home = placement.home_ranks(sizes, info.world_size) if client_states.active else None
    total_data = float(sum(sizes.values()))
    pv = cfg.privacy
    train_client = train_local
    if pv.level == "sample":  # DP-SGD in every client (Opacus): the image is the unit
        from ..privacy.dp_sgd import train_local_dp as train_client
    if pv.level != "none":
        from ..privacy import accountant, client_dp
        q_clients = accountant.client_level_rate(cfg)  # DP-FedAvg's Poisson rate of clients
    bad_rounds = 0
    warned_idle = False
    history: list[dict[str, Any]] = []
    hooks = list(on_round_end or [])
    client_grid_rounds = evaluator.client_rounds()
    client_score_rounds = evaluator.client_score_rounds()

    for r in range(start_round + 1, f.rounds + 1):
        t0 = time.perf_counter()
        reset_device_peak(device)
        if pv.level == "client":  # DP-FedAvg: Poisson sampling, the sampling its accountant assumes
            clients = client_dp.poisson_clients(f.num_clients, q_clients, cfg.run.seed, r)
        else:
            clients = sample_clients(f.num_clients, f.clients_per_round, cfg.run.seed, r)
        if home is None:
            assignment = placement.assign_clients(clients, sizes, info.world_size)
        else:  # clients with kept state train where it lives
            order = sorted(clients, key=lambda k: (-sizes[k], k))  # assign_clients' order: same sums
            assignment = [[k for k in order if home[k] == rank] for rank in range(info.world_size)]
        mine = assignment[info.rank]
        if info.is_main and not warned_idle and not all(assignment):
            warnings.warn(f"round {r}: {sum(not a for a in assignment)} rank(s) have no client: more "
                          f"ranks ({info.world_size}) than clients per round ({len(clients)}); "
                          f"they add zeros", stacklevel=2)
            warned_idle = True
        log.start_round(r, sum(local_steps(sizes[k], cfg.optim.batch_size, f.local_epochs) for k in mine))

        buffer.zero_()
        t_grids = 0.0  # client grids and client samples are evaluation, not training: timed apart
        t_client_sample = 0.0
        grouped = None
        if cfg.train.clients_at_once > 1:  # experimental: K of this rank's clients at once (same maths)
            from ..experimental.multiclient import GroupedClientTrainer
            grouped = GroupedClientTrainer(model, diffusion, train_set,
                                           {k: shard_idx[k] for k in mine if sizes[k]}, cfg, r,
                                           on_step=log.step)
        for k in mine:
            if sizes[k] == 0:
                continue  # an empty client has nothing to train on and weight zero
            log.describe(f"round {r}/{f.rounds} client {k}")
            load_flat_(model, global_flat)
            drift: FedProx | ScaffoldClient | None = None
            if f.drift == "fedprox" and f.prox_mu > 0:
                drift = FedProx(f.prox_mu, model, global_flat)
            elif scaffold:
                drift = ScaffoldClient(model, client_states.server_control, client_states.control.get(k))
            res = grouped.result(k) if grouped is not None else \
                train_client(net, diffusion, train_set, shard_idx[k], cfg, r, k, on_step=log.step,
                             optimizer_state=client_states.optimizer.get(k), adjust_grads=drift)
            if r in client_grid_rounds:  # personalization: what this client's model draws
                t_grid = time.perf_counter()
                evaluator.client_grid(model, diffusion, r, k)
                t_grids += time.perf_counter() - t_grid
            if r in client_score_rounds:  # ... and how well: samples scored on rank 0 below
                t_sample = time.perf_counter()
                evaluator.sample_client(model, diffusion, r, k)
                t_sample = time.perf_counter() - t_sample
                t_client_sample += t_sample
                t_grids += t_sample
            loss = float(res.loss_sum) / max(res.steps, 1)  # one host sync per client
            if not (np.isfinite(loss) and all_finite(model)):
                warnings.warn(f"round {r}: client {k} produced a non-finite loss or weights; "
                              f"it is left out of this round's average", stacklevel=2)
                buffer[P + SKIPPED_SLOT] += 1
                continue
            # FedAvg weighs by data size; DP-FedAvg clips each update and weighs clients equally,
            # which bounds one client's influence on the sum by privacy.clip (client_dp.py)
            weight = float(sizes[k])
            if pv.level == "client":
                client_dp.clip_update_(model, global_flat, pv.clip)
                weight = 1.0
            accumulate_(buffer, model, weight)
            if res.optimizer_state is not None:
                client_states.optimizer[k] = res.optimizer_state
            if isinstance(drift, ScaffoldClient):
                new_control = drift.new_control()
                buffer[CONTROL:].add_(new_control - drift.old, alpha=float(sizes[k]))
                client_states.control[k] = new_control
            buffer[P + N_SLOT] += weight
            buffer[P + LOSS_SLOT] += loss * weight
            buffer[P + IMAGES_SLOT] += res.images
            buffer[P + TRAINED_SLOT] += 1
        if device.type == "cuda":
            torch.cuda.synchronize()
        t_local = time.perf_counter() - t0 - t_grids
        buffer[TIMES + info.rank] = t_local  # every rank learns every rank's training time

        t1 = time.perf_counter()
        dist.all_reduce_sum(buffer)  # <- the whole FedAvg communication of the round
        if device.type == "cuda":
            torch.cuda.synchronize()  # .tolist() below syncs anyway; this times the collective alone
        t_allreduce = time.perf_counter() - t1  # includes waiting for the slowest rank
        average, n = weighted_average(buffer, P)
        stats = buffer[P:TIMES].tolist()
        per_rank = buffer[TIMES:TIMES + info.world_size].tolist()
        t_agg = time.perf_counter() - t1

        if pv.level == "client":  # theta + sum of clipped updates / (qN) + noise, even with no client
            delta_sum = buffer[:P] - n * global_flat
            average = global_flat + client_dp.noisy_update(
                delta_sum, pv.noise_multiplier, pv.clip, f.num_clients, q_clients, cfg.run.seed, r)
        if ledger is not None:  # the same record on every rank: it follows from the config
            if pv.level == "client":
                ledger.record(accountant.FEDERATION, pv.noise_multiplier, q_clients, 1)
            else:
                for k in clients:
                    if sizes[k]:
                        q, steps = accountant.sample_level_step(sizes[k], cfg.optim.batch_size,
                                                                f.local_epochs)
                        ledger.record(k, pv.noise_multiplier, q, steps)
        if n > 0 or pv.level == "client":
            global_flat = server.step(global_flat, average)
            if scaffold:  # c stays the data-weighted mean of all clients' c_k
                client_states.server_control.add_(buffer[CONTROL:], alpha=1.0 / total_data)
            bad_rounds = 0
        else:  # every client failed: keep the global model as it was
            bad_rounds += 1
            warnings.warn(f"round {r}: no usable client update; the global model is unchanged", stacklevel=2)
            if bad_rounds >= f.max_bad_rounds:
                raise TrainingDivergedError(
                    f"fed.max_bad_rounds: {bad_rounds} rounds in a row without a usable client "
                    f"update (non-finite losses or weights); lower optim.lr, set optim.grad_clip, or "
                    f"check the data")
        load_flat_(model, global_flat)
        ema.update(global_flat, r)

        t2 = time.perf_counter()
        checkpointer.save(r, model, server=server, ema=ema, clients=client_states, last_round=r == f.rounds,
                          extra={"privacy": ledger} if ledger is not None else None)
        t_ckpt = time.perf_counter() - t2
        t_train = time.perf_counter() - t0 - t_grids  # the round without evaluation: the throughput base

        t3 = time.perf_counter()
        scores = evaluator.evaluate(ema.module(), diffusion, r) if evaluator.due(r) else None
        # one gather_object, only in rounds whose clients are scored (the same on every rank)
        t_client_score = time.perf_counter()
        client_scores = evaluator.score_clients(r) if r in client_score_rounds else None
        t_client_score = time.perf_counter() - t_client_score
        t_eval = time.perf_counter() - t3 + t_grids
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
            "aggregate_s": round(t_agg, 4),  # includes wait_s
            "wait_s": round(max(per_rank) - t_local, 4),  # this rank idle, waiting for the slowest
            "local_train_s_per_rank": [round(t, 4) for t in per_rank],
            "checkpoint_s": round(t_ckpt, 4),
            "eval_s": round(t_eval, 4),
            "img_per_s": round(images / t_train, 2),
            "allreduce_bytes": buffer.numel() * buffer.element_size(),
            "allreduce_ms": round(1e3 * t_allreduce, 3),
            "world_size": info.world_size,
            **memory_record(device),
        }
        if ledger is not None:
            record["epsilon"] = ledger.max_epsilon(pv.delta)  # the worst client (sample level)
            record["epsilon_per_client"] = ledger.epsilons(pv.delta) if pv.level == "sample" else {}
        if scores is not None:
            record["scores"] = scores
        if client_scores is not None:
            record["client_scores"] = client_scores
            record["client_sample_s"] = round(t_client_sample, 4)  # this rank's clients
            record["client_score_s"] = round(t_client_score, 4)  # gather + features + scores
        history.append(record)
        skipped = f"  skipped {record['clients_skipped']}" if record["clients_skipped"] else ""
        waited = f"  waited {record['wait_s']:.2f}s" if info.distributed else ""  # for the slowest rank
        if ledger is not None:
            waited += f"  eps {record['epsilon']:.2f}"
        log.end_round(record, f"round {r:>4}/{f.rounds}  loss {record['loss']:.4f}  "
                              f"{wall:6.2f}s  {record['img_per_s']:8.1f} img/s{waited}{skipped}")
        for hook in hooks:
            hook(record)
    return history
