"""One training job from config to summary.json: the order in which the pieces are called.

config (validated) -> run-dir checks -> data + partition (CPU) -> privacy budget -> process
group -> model -> the round's parts (``build_round_parts``) -> resume -> FedAvg or centralized
rounds -> final sample grid -> summary.json
Every user error is raised before the process group starts or any GPU time is spent.
"""

from __future__ import annotations

import json
import time
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from rich.table import Table
from torch import nn

from . import checkpoint, dist
from .adapters import count_trainable, make_trainable
from .centralized import run_centralized
from .config import Config, load_config
from .data import ImageSet, load_split
from .diffusion import Diffusion
from .ema import PowerEMA
from .errors import ConfigError, RunDirError
from .evaluation.evaluator import (
    Evaluator,
    check_eval_sizes,
    check_inception_weights,
    clients_table,
    scores_table,
)
from .evaluation.grids import save_partition_histogram
from .experimental.multiclient import GroupedClientTrainer
from .federated import placement
from .federated.client import PlainTrainer
from .federated.client_state import ClientStates
from .federated.compression import compression_rules
from .federated.drift import drift_rules
from .federated.participation import (
    SimulatedParticipation,
    Simulation,
    UniformParticipation,
    sample_clients,
    selected_per_round,
)
from .federated.rounds import FederatedRounds, RoundHook, RoundParts
from .federated.server import RuleServer, build_server_optimizer
from .flat import num_flat
from .init_from import apply_init, init_identity, read_init
from .logs import RunLogger
from .models import build, build_model, count_parameters
from .partition import class_counts, client_shards
from .privacy.mechanisms import Mechanism, build_mechanism


def check_run_dir(cfg: Config) -> bool:
    """Is this a resume? Refuses a run dir that holds a different config (unless forced)."""
    run_dir = cfg.run_dir
    saved = run_dir / "config.toml"
    has_ckpt = bool(checkpoint.list_checkpoints(run_dir))
    if saved.exists():
        try:
            old = load_config(saved)
        except ConfigError as exc:
            raise RunDirError(f"{saved}: unreadable saved config ({exc}); choose another run.name "
                              f"or delete {run_dir}") from None
        if old.hash() != cfg.hash() and cfg.checkpoint.resume != "force":
            raise RunDirError(f"run.name: {run_dir} holds a run with a different config; choose "
                              f"another --run.name, delete the folder, or pass --checkpoint.resume "
                              f"force to continue it with the new settings")
    if has_ckpt and cfg.checkpoint.resume == "never":
        raise RunDirError(f"checkpoint.resume: {run_dir} already holds checkpoints and resume is "
                          f"'never'; choose another --run.name or delete the folder")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / f".write_test_{id(cfg)}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        raise RunDirError(f"run.out_dir: cannot write to {run_dir} ({exc.strerror}); pick a "
                          f"writable --run.out_dir") from None
    return has_ckpt and cfg.checkpoint.resume != "never"


def communication(rounds: list[dict[str, Any]], num_params: int) -> dict[str, Any] | None:
    """summary.json's "communication" block from the rounds' records (None without bytes: a
    centralized run): what a real client sends and receives, the run's totals, and how many
    times fewer bytes each client sends than its fp32 update (4 bytes a float of the flat model)."""
    sent = [r for r in rounds if "bytes_up_total" in r]
    if not sent:
        return None
    last = sent[-1]
    return {"bytes_up_per_client": last["bytes_up_per_client"],
            "bytes_down_per_client": last["bytes_down_per_client"],
            "bytes_up_per_round": last["bytes_up_total"] / last["round"],
            "bytes_down_per_round": last["bytes_down_total"] / last["round"],
            "bytes_up_total": last["bytes_up_total"], "bytes_down_total": last["bytes_down_total"],
            "uplink_reduction": 4 * num_params / last["bytes_up_per_client"]}


def trained_part(cfg: Config, model: nn.Module) -> str:
    """" (0.02M train: lora r=8)" for the start line; "" when every parameter trains."""
    if cfg.model.trainable == "all":
        return ""
    what = f"lora r={cfg.model.lora_rank}" if cfg.model.trainable == "lora" else cfg.model.trainable
    return f" ({count_trainable(model) / 1e6:.3f}M train: {what})"


def partition_table(counts: np.ndarray) -> Table:
    table = Table(title="client x class (images)", show_lines=False)
    table.add_column("client", justify="right")
    for c in range(counts.shape[1]):
        table.add_column(str(c), justify="right")
    table.add_column("total", justify="right", style="bold")
    for k, row in enumerate(counts):
        table.add_row(str(k), *[str(v) for v in row], str(row.sum()))
    return table


def build_round_parts(cfg: Config, info: dist.DistInfo, model: nn.Module, diffusion: Diffusion,
                      train_set: ImageSet, shards: list[np.ndarray], mechanism: Mechanism,
                      on_step: Callable[[], None] | None = None) -> RoundParts:
    """The parts of a federated run (fedrun.parts), built once from the config: where each
    method joins the round (README "Adding a method")."""
    f, device, world = cfg.fed, info.device, info.world_size
    sizes = {k: len(s) for k, s in enumerate(shards)}
    shard_idx = {k: torch.as_tensor(s, dtype=torch.long, device=device) for k, s in enumerate(shards)}
    # the compiled module wraps the same parameters: training goes through it, while
    # aggregation, checkpoints and sampling keep using `model` (plain state_dict keys)
    net = torch.compile(model) if cfg.train.compile else model
    # K clients at once is experimental (fedrun/experimental/): injected here, never imported by the loop
    trainer_class = GroupedClientTrainer if cfg.train.clients_at_once > 1 else PlainTrainer
    trainer = mechanism.trainer_class(trainer_class)(net, diffusion, train_set, shard_idx, cfg, on_step)
    # compression first: later links (FedDyn's state, DP-FedAvg's clip, which must be last to
    # bound what is summed) see the update as the server receives it
    rules = compression_rules(cfg, model) + drift_rules(cfg, num_flat(model), sum(sizes.values()), device) \
        + mechanism.rules()
    kinds = trainer.state_kinds + tuple(kind for rule in rules for kind in rule.state_kinds)
    states = ClientStates(kinds, device, rules, memory_mb=f.client_state_memory_mb)  # host memory, then files
    # by cost (local steps and a set-up), on demand, or by size; clients that keep state train
    # where it lives (home ranks); the model does not depend on it (fedrun.flat's exact sum)
    where = placement.build_placement(cfg, sizes, world, stateful=states.active)
    participation = mechanism.participation(UniformParticipation(f.num_clients, selected_per_round(cfg),
                                                                 cfg.run.seed))
    simulation = Simulation.from_config(cfg, sizes)  # None unless availability/stragglers are set
    if simulation is not None:  # keep the fastest clients_per_round reports (all of a Poisson sample)
        participation = SimulatedParticipation(participation, simulation,
                                               None if cfg.privacy.level == "client" else f.clients_per_round)
    server = mechanism.wrap_server(RuleServer(build_server_optimizer(f), rules))
    return RoundParts(participation, where, trainer, rules, server, states)


def train(cfg: Config, on_round_end: list[RoundHook] | None = None) -> dict[str, Any]:
    """Run the job described by ``cfg`` on this process's rank; returns the summary (rank 0).

    ``on_round_end``: hooks called on every rank with each FedAvg round's record (benchmarks).
    """
    t_start = time.perf_counter()
    resuming = check_run_dir(cfg)
    check_inception_weights(cfg)
    train_set = load_split(cfg.data, "train")
    test_set = load_split(cfg.data, "test") if cfg.eval.enabled else None
    check_eval_sizes(cfg, test_set)
    f = cfg.fed
    shards = client_shards(cfg, train_set.labels.numpy())

    sizes = {k: len(s) for k, s in enumerate(shards)}
    if cfg.run.mode == "fedavg":  # availability/speed traces and the deadline, before any process group
        Simulation.from_config(cfg, sizes)
    # the privacy budget is checked here, before any process group or GPU
    plan = [sample_clients(f.num_clients, f.clients_per_round, cfg.run.seed, r)
            for r in range(1, f.rounds + 1)] if cfg.privacy.level == "sample" else None
    # privacy.noise_multiplier = 0 is solved here; mechanism.run_config(cfg) holds the solved value
    mechanism = build_mechanism(cfg, list(sizes.values()), plan, num_classes=train_set.num_classes)
    init = read_init(cfg, train_set.num_classes)  # model.init_from, checked before any process group
    with torch.device("meta"):  # model.trainable's errors (a LoRA rank too large for a layer), no memory
        probe = build_model(cfg.model, cfg.data.channels, train_set.num_classes)
        make_trainable(probe, cfg.model, cfg.run.seed)

    info = dist.init(cfg.run.device, cfg.run.threads)
    try:
        if cfg.run.mode == "centralized" and cfg.optim.batch_size % info.world_size:
            raise ConfigError(f"optim.batch_size: {cfg.optim.batch_size} does not split evenly over "
                              f"{info.world_size} ranks; use a multiple of {info.world_size}")
        log = RunLogger(cfg.run_dir, info.is_main, f.rounds, tensorboard=cfg.run.tensorboard)
        counts = class_counts(train_set.labels.numpy(), shards, train_set.num_classes)
        if cfg.run.mode == "fedavg":
            log.console.print(partition_table(counts)) if info.is_main else None
            empty = [k for k, s in enumerate(shards) if len(s) == 0]
            if empty and info.is_main:
                warnings.warn(f"clients {empty} received no images (fed.alpha={f.alpha}); they "
                              f"contribute nothing. Set fed.min_client_size to avoid this.", stacklevel=2)
        evaluator = Evaluator(cfg, info, train_set, test_set,  # reference stats before training
                              shards=shards if cfg.run.mode == "fedavg" else None)
        train_set = train_set.to(info.device)
        model, diffusion = build(cfg, train_set.num_classes, info.device)
        apply_init(model, init)  # model.init_from's weights, before anything copies the model
        # after the base weights are final (model.init_from loads them above this line): adapters
        # start at zero on top of them, and only what trains from here on enters fedrun.flat
        make_trainable(model, cfg.model, cfg.run.seed)
        ema = PowerEMA(cfg.ema, model)
        # a resume must also match the init's checksum and a solved noise multiplier
        checkpointer = checkpoint.Checkpointer(cfg, info, identity={**init_identity(init),
                                                                    **mechanism.identity()})
        parts = build_round_parts(mechanism.run_config(cfg), info, model, diffusion, train_set, shards,
                                  mechanism, log.step) \
            if cfg.run.mode == "fedavg" else None

        start_round, optimizer_state = 0, None
        resumed = checkpointer.load() if resuming else None
        if resumed is not None:
            model.load_state_dict(resumed.model)
            ema.load_state_dict(resumed.ema, info.device)
            if parts is not None:
                parts.server.load_state_dict(resumed.server, info.device)
                parts.server.load_extra_state(resumed.extra)
                home = placement.home_clients(cfg, sizes, info.world_size, info.rank)
                parts.states.load_state_dict(resumed.clients, home)
            optimizer_state = resumed.optimizer
            checkpoint.set_rng_state(resumed.rng)
            start_round = resumed.round
            log.print(f"resuming from {resumed.path} (round {start_round})")
        log.drop_after(start_round)  # rounds after the checkpoint run again: forget their old lines
        if info.is_main:
            (cfg.run_dir / "config.toml").write_text(cfg.to_toml())
            (cfg.run_dir / "partition.json").write_text(json.dumps(
                {"counts": counts.tolist(), "sizes": [len(s) for s in shards]}))
            if cfg.run.mode == "fedavg":
                save_partition_histogram(counts, cfg.run_dir / "partition.png")
            log.print(f"fedrun: {cfg.run.mode} on {cfg.data.name}, {info.world_size} rank(s) on "
                      f"{info.device.type}, model {count_parameters(model) / 1e6:.2f}M parameters"
                      f"{trained_part(cfg, model)}, "
                      f"run dir {cfg.run_dir}")
        if log.progress is not None:
            log.progress.update(log.rounds_task, completed=start_round)

        if parts is not None:
            FederatedRounds(cfg, info, model, diffusion, sizes, parts, log, evaluator, checkpointer, ema,
                            on_round_end).run(start_round)
        else:
            run_centralized(cfg, info, model, diffusion, train_set, start_round, optimizer_state, log,
                            evaluator, checkpointer, ema)
        if start_round == f.rounds:  # nothing left to train: was the last round's record written?
            logged = dist.broadcast_object(log.has_round(f.rounds) if info.is_main else None)
            if not logged:  # killed after the last checkpoint, during its evaluation: finish it
                due = evaluator.due(f.rounds)
                scores = evaluator.evaluate(ema.module(), diffusion, f.rounds) if due else None
                log.end_round({"round": f.rounds, **({"scores": scores} if scores else {}),
                               "evaluated_after_resume": True},
                              f"round {f.rounds:>4}/{f.rounds}  (evaluated after resume)")
        log.close()

        grid = evaluator.final_grid(ema.module(), diffusion)  # the EMA model when enabled
        if info.is_main:
            # from metrics.jsonl, so that a resumed run reports its earlier rounds too
            rounds = [json.loads(line) for line in log.metrics_path.read_text().splitlines()]
            scored = [{"round": r["round"], **r["scores"]} for r in rounds if "scores" in r]
            client_scores = {str(r["round"]): r["client_scores"] for r in rounds if "client_scores" in r}
            summary = {
                "config": cfg.to_dict(),
                "rounds": f.rounds,
                "final_loss": next((r["loss"] for r in reversed(rounds) if "loss" in r), None),
                "world_size": info.world_size,
                "parameters": count_parameters(model),
                "trainable_parameters": count_trainable(model),  # model.trainable: what travels
                "wall_s": round(time.perf_counter() - t_start, 2),
                "scores": scored[-1] if scored else {},
                "score_history": scored,
                "client_scores": client_scores,  # round -> one row per client scored then
            }
            if mechanism.summary() is not None:
                summary["privacy"] = mechanism.summary()
            if traffic := communication(rounds, num_flat(model)):
                summary["communication"] = traffic
            if scored:
                log.console.print(scores_table(scored))
            if client_scores:
                last = max(client_scores, key=int)
                final = scored[-1] if scored else {}
                log.console.print(clients_table(
                    client_scores[last], final.get("clients"),
                    title=f"per client: local models at round {last}, global model at round "
                          f"{final.get('round', '-')}"))
            (cfg.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
            log.print(f"done in {summary['wall_s']:.1f}s. outputs in {cfg.run_dir}/: samples/final.png"
                      f"{'' if grid else ' (no grid)'}, metrics.jsonl, checkpoints/, summary.json")
            return summary
        return {}
    finally:
        dist.shutdown()
