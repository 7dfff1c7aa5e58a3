"""The FedAvg round loop. It only calls the parts ``fedrun.train`` built (fedrun.parts).

``FederatedRounds`` loads what it saves: ``resume`` restores the newest checkpoint into the
parts (model, EMA, server state, the clients' kept state, the random state) and ``run`` saves
them when due. One round, on every rank at once:
  1. participation: the round's clients, the same list everywhere (drawn from (seed, round));
  2. placement: the clients this rank takes (fixed before the round, or handed out on demand
     while it runs); the progress bar counts what was taken;
  3. each rank trains its clients one after another with the client trainer, each from the
     model the model source gives it (the global weights; with FedBuff the version current at
     its simulated start, fedrun.federated.fedbuff); the update rules add their gradient terms
     to local training, then edit the update (clipping, ...) and add their own sums; the update
     goes into ONE flat buffer of exact fixed-point sums (fedrun.flat), so the result does not
     depend on the placement;
  4. one all_reduce(SUM) of that buffer is the whole communication of the round; it also tells
     every rank when every rank started the round and reached the all_reduce (``wait_s``);
  5. the server step turns the aggregate into the next global model (the rules' server halves,
     the server rule, privacy around them); the EMA of the global model folds it in; the model
     source keeps the new version if a later round's client starts from it;
  6. the checkpointer writes the round if it is due, the evaluator scores it if it is due,
     rank 0 logs one line, and the round-end hooks run (benchmarks use them).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from torch import nn

from .. import checkpoint, dist
from ..checkpoint import Checkpointer
from ..config import Config
from ..diffusion import Diffusion
from ..ema import PowerEMA
from ..errors import TrainingDivergedError
from ..evaluation.evaluator import Evaluator
from ..flat import RoundBuffer, all_finite, flatten, load_flat_
from ..logs import RunLogger
from ..parts import (
    Aggregate,
    ClientTrainer,
    ClientUpdate,
    ModelSource,
    Participation,
    Placement,
    ServerStep,
    UpdateRule,
    WireFormat,
    compose_terms,
)
from ..telemetry import RoundTimer, memory_record, reset_device_peak
from .client_state import ClientStates
from .compression import Traffic
from .fedbuff import LatestModel
from .placement import home_clients

RoundHook = Callable[[dict[str, Any]], None]


@dataclass
class RoundParts:
    """What a federated run is made of, built once from the config by ``fedrun.train``."""

    participation: Participation
    placement: Placement
    trainer: ClientTrainer
    rules: list[UpdateRule]
    """the update chain, in order (``fedrun.parts.check_chain``)"""
    server: ServerStep
    states: ClientStates
    buffer: RoundBuffer
    """the round's one all_reduce buffer (exact sums; regions for the rules that sum extras)"""
    wire: list[WireFormat] = field(default_factory=list)
    """what else changes a real client's messages (secure aggregation's masked vector and keys)"""
    source: ModelSource = field(default_factory=LatestModel)
    """the model each client starts from (FedBuff: past versions, kept while needed)"""


class FederatedRounds:
    """Rounds of one federated run on this rank. ``model`` holds the global weights between
    rounds; the trainer trains it in place (its parameters are the flat buffer's source)."""

    def __init__(self, cfg: Config, info: dist.DistInfo, model: nn.Module, diffusion: Diffusion,
                 sizes: dict[int, int], parts: RoundParts, log: RunLogger, evaluator: Evaluator,
                 checkpointer: Checkpointer, ema: PowerEMA, on_round_end: list[RoundHook] | None = None):
        self.cfg, self.info, self.model, self.diffusion, self.sizes = cfg, info, model, diffusion, sizes
        self.parts, self.log, self.evaluator = parts, log, evaluator
        self.checkpointer, self.ema = checkpointer, ema
        self.hooks = list(on_round_end or [])
        self.global_flat = flatten(model)
        self.buffer = parts.buffer
        self.traffic = Traffic([*parts.rules, *parts.wire], self.global_flat.numel(), sizes,  # real bytes
                               parts.participation)
        self.grid_rounds = evaluator.client_rounds()  # personalization: what local models draw
        self.score_rounds = evaluator.client_score_rounds()  # ... and how well
        self.bad_rounds = 0
        self.warned_idle = False
        parts.source.after_step(0, self.global_flat)  # version 0; a resume replaces what is kept

    def resume(self) -> int:
        """Restore the newest usable checkpoint, if any, into the model, the EMA, the server step
        and this rank's home clients' state (the random state too); returns its round (0: none)."""
        resumed = self.checkpointer.load()
        if resumed is None:
            return 0
        self.model.load_state_dict(resumed.model)
        self.global_flat = flatten(self.model)
        self.ema.load_state_dict(resumed.ema, self.info.device)
        self.parts.server.load_state_dict(resumed.server, self.info.device)
        self.parts.server.load_extra_state(resumed.extra)
        self.parts.source.load_extra_state(resumed.extra)
        home = home_clients(self.cfg, self.sizes, self.info.world_size, self.info.rank)
        self.parts.states.load_state_dict(resumed.clients, home)
        checkpoint.set_rng_state(resumed.rng)
        self.log.print(f"resuming from {resumed.path} (round {resumed.round})")
        return resumed.round

    def run(self, start_round: int) -> list[dict[str, Any]]:
        """Rounds start_round + 1 .. fed.rounds; returns their records."""
        history = []
        f, parts = self.cfg.fed, self.parts
        for r in range(start_round + 1, f.rounds + 1):
            timer = RoundTimer(self.info.device)
            reset_device_peak(self.info.device)
            clients = parts.participation.clients(r)
            self.log.start_round(r)  # the bar counts the steps of the clients this rank takes
            with timer.phase("local_train", sync=True):
                self.buffer.begin_round(r, parts.participation.selected(r))
                for k in parts.trainer.begin_round(r, parts.placement.take(r, clients, self.info.rank)):
                    self._train_client(r, k, timer)
            self.buffer.set_times(timer.start_ns, timer.now_ns())  # this rank reaches the all_reduce
            with timer.phase("aggregate"):
                with timer.phase("allreduce", sync=True):  # includes waiting for the slowest rank
                    self.buffer.all_reduce()
                agg = self.buffer.aggregate(r, clients)
            self._server_step(agg)
            parts.source.after_step(r, self.global_flat)
            with timer.phase("checkpoint"):
                extra = {**parts.server.extra_state(), **parts.source.extra_state()}
                self.checkpointer.save(r, self.model, server=parts.server, ema=self.ema, clients=parts.states,
                                       last_round=r == f.rounds, extra=extra or None)
            trained_s = timer.training()  # the round without evaluation: the throughput base
            scores = client_scores = None  # a round without evaluation times none: eval_s is 0
            if self.evaluator.due(r):
                with timer.phase("evaluate", evaluation=True):
                    scores = self.evaluator.evaluate(self.ema.module(), self.diffusion, r)
            if r in self.score_rounds:
                with timer.phase("client_score", evaluation=True):  # one gather_object, on all ranks
                    client_scores = self.evaluator.score_clients(r)
            record = self._record(agg, timer, trained_s, scores, client_scores)
            self._warn_idle(record)
            history.append(record)
            self._log(record)
            for hook in self.hooks:
                hook(record)
        return history

    def _train_client(self, r: int, k: int, timer: RoundTimer) -> None:
        """Client k's local training and its way into the round's buffer (or out of it)."""
        if not self.sizes[k]:
            return  # an empty client has nothing to train on and weight zero
        self.log.describe(f"round {r}/{self.cfg.fed.rounds} client {k}")
        start = self.parts.source.start(r, k, self.global_flat)  # theta, or FedBuff's theta_v
        load_flat_(self.model, start)
        state, rules = self.parts.states.get(k), self.parts.rules
        terms = [rule.begin_client(self.model, start, state) for rule in rules]
        res = self.parts.trainer.train(r, k, state, compose_terms([t for t in terms if t is not None]))
        loss = float(res.loss_sum) / max(res.steps, 1)  # one host sync per client
        if not (np.isfinite(loss) and all_finite(self.model)):
            warnings.warn(f"round {r}: client {k} produced a non-finite loss or weights; "
                          f"it is left out of this round's average", stacklevel=2)
            self.buffer.skip(res.steps, res.images)
            return
        if r in self.grid_rounds:  # the local model, right after its training
            with timer.phase("client_grid", evaluation=True):
                self.evaluator.client_grid(self.model, self.diffusion, r, k)
        if r in self.score_rounds:  # scored on rank 0 at the end of the round
            with timer.phase("client_sample", evaluation=True):
                self.evaluator.sample_client(self.model, self.diffusion, r, k)
        update = ClientUpdate(k, self.model, start, self.sizes[k], float(self.sizes[k]), state,
                              dict(res.state), round=r, message=res.message)
        with timer.phase("update_chain", sync=True):  # e.g. compression's encode + decode, clipping
            for rule, term in zip(rules, terms, strict=True):
                rule.end_client(update, term, self.buffer.region(rule.name))
        if not self.buffer.add(self.model, update.weight, loss, res.images, res.steps, client=k,
                               update=update):
            warnings.warn(f"round {r}: client {k}'s update holds numbers beyond the exact sum's range "
                          f"(|weight / largest weight x value| > 2^16, fedrun.flat); it is left out of this "
                          f"round's average", stacklevel=2)
            self.buffer.skip(res.steps, res.images)
            return
        self.parts.states.commit(k, update.new_state)

    def _server_step(self, agg: Aggregate) -> None:
        """The next global model, or the same one after a round without a usable update."""
        new = self.parts.server.step(self.global_flat, agg)
        if new is not None:
            self.global_flat, self.bad_rounds = new, 0
        elif agg.abandoned:  # the sum could not be read (secure aggregation): nothing is lost
            warnings.warn(f"round {agg.round}: the round is abandoned ({agg.abandoned}); the global model is "
                          f"unchanged", stacklevel=2)
        elif not agg.clients:  # nobody took part (no selected client reported in time): no update
            warnings.warn(f"round {agg.round}: no client took part (none of the selected reported in "
                          f"time); the global model is unchanged", stacklevel=2)
        else:  # every client failed: keep the global model as it was
            self.bad_rounds += 1
            warnings.warn(f"round {agg.round}: no usable client update; the global model is unchanged",
                          stacklevel=2)
            if self.bad_rounds >= self.cfg.fed.max_bad_rounds:
                raise TrainingDivergedError(
                    f"fed.max_bad_rounds: {self.bad_rounds} rounds in a row without a usable client "
                    f"update (non-finite losses or weights); lower optim.lr, set optim.grad_clip, or "
                    f"check the data")
        load_flat_(self.model, self.global_flat)
        self.ema.update(self.global_flat, agg.round)

    def _warn_idle(self, record: dict[str, Any]) -> None:
        """Once per run: ranks that took no client because the round had fewer than ranks."""
        idle, n = record["clients_per_rank"].count(0), len(record["clients"])
        if self.info.is_main and not self.warned_idle and n and idle and n < self.info.world_size:
            warnings.warn(f"round {record['round']}: {idle} rank(s) had no client: more ranks "
                          f"({self.info.world_size}) than clients per round ({n}); they add zeros",
                          stacklevel=3)
            self.warned_idle = True

    def _record(self, agg: Aggregate, timer: RoundTimer, trained_s: float, scores: dict[str, Any] | None,
                client_scores: list[dict[str, Any]] | None) -> dict[str, Any]:
        """The round's line of metrics.jsonl."""
        stats, ranks = self.buffer.stats()
        n = stats["n"]
        last = max(s["ready_ns"] for s in ranks)  # when the slowest rank reached the all_reduce
        record = {
            "round": agg.round,
            "loss": stats["loss"] / n if n > 0 else float("nan"),
            "clients": agg.clients,
            "clients_trained": int(stats["trained"]),
            "clients_skipped": int(stats["skipped"]),
            "images": int(stats["images"]),
            "wall_s": round(timer.wall(), 4),
            "local_train_s": round(timer["local_train"], 4),
            "aggregate_s": round(timer["aggregate"] + timer["allreduce"], 4),  # includes wait_s
            # idle at the all_reduce until the slowest rank came (wall clocks of the ranks: >= 0)
            "wait_s": round((last - ranks[self.info.rank]["ready_ns"]) / 1e9, 4),
            "wait_s_per_rank": [round((last - s["ready_ns"]) / 1e9, 4) for s in ranks],
            # each rank's time from its round's start to the all_reduce (training, grids, update chain)
            "ready_s_per_rank": [round((s["ready_ns"] - s["start_ns"]) / 1e9, 4) for s in ranks],
            "steps_per_rank": [int(s["steps"]) for s in ranks],
            "clients_per_rank": [int(s["clients"]) for s in ranks],
            "images_per_rank": [int(s["images"]) for s in ranks],  # those trained, skipped ones included
            "checkpoint_s": round(timer["checkpoint"], 4),
            "eval_s": round(timer.evaluation(), 4),
            "img_per_s": round(stats["images"] / trained_s, 2),
            "allreduce_bytes": self.buffer.nbytes,
            "allreduce_ms": round(1e3 * timer["allreduce"], 3),
            "update_chain_s": round(timer["update_chain"], 4),  # this rank's clients, inside the round
            **self.traffic.record(agg.round, agg.clients),  # bytes a real client sends and receives
            **self.parts.participation.record(agg.round),  # e.g. the simulated clock and dropouts
            **self.buffer.record(),  # e.g. secure aggregation's seconds and bytes
            **({"abandoned": agg.abandoned} if agg.abandoned else {}),
            "world_size": self.info.world_size,
            **memory_record(self.info.device),
            **self.parts.server.metrics(),  # e.g. epsilon spent so far
        }
        if scores is not None:
            record["scores"] = scores
        if client_scores is not None:
            record["client_scores"] = client_scores
            record["client_sample_s"] = round(timer["client_sample"], 4)  # this rank's clients
            record["client_score_s"] = round(timer["client_score"], 4)  # gather + features + scores
        return record

    def _log(self, record: dict[str, Any]) -> None:
        r, R = record["round"], self.cfg.fed.rounds
        line = f"round {r:>4}/{R}  loss {record['loss']:.4f}  {record['wall_s']:6.2f}s  " \
               f"{record['img_per_s']:8.1f} img/s"
        if self.info.distributed:
            line += f"  waited {record['wait_s']:.2f}s"  # for the slowest rank
        if "epsilon" in record:
            line += f"  eps {record['epsilon']:.2f}"
        if record["clients_skipped"]:
            line += f"  skipped {record['clients_skipped']}"
        self.log.end_round(record, line)
