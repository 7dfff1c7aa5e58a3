"""One training job from config to summary.json: the order in which the pieces are called.

config (validated) -> data + partition (CPU) -> the parts that need no process group
(participation, the privacy mechanism: the noise solved, the budget checked; from here on the
run has one config, ``mechanism.cfg``) -> run-dir checks -> process group -> model -> the
round's parts (``build_round_parts``) -> resume -> FedAvg or centralized rounds -> final sample
grid -> summary.json
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
from .centralized import CentralizedRounds
from .config import Config, default_of, hashed_values, load_config
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
from .federated.client import plain_trainer
from .federated.client_state import ClientStates
from .federated.compression import compression_rules
from .federated.drift import drift_rules
from .federated.fedbuff import model_source
from .federated.participation import build_participation, planned_clients
from .federated.placement import build_placement
from .federated.rounds import FederatedRounds, RoundHook, RoundParts
from .federated.server import RuleServer, build_server_optimizer
from .flat import RoundBuffer, num_flat
from .init_from import apply_init, init_identity, read_init
from .logs import RunLogger
from .models import build, build_model, count_parameters
from .partition import class_counts, client_shards
from .parts import Participation, SumsExtra, check_chain
from .privacy.base import Stack
from .privacy.mechanisms import build_mechanism
from .registry import kept_state


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
            raise RunDirError(f"run.name: {run_dir} holds a run with a different config "
                              f"({config_differences(old, cfg)}); choose another --run.name, delete the "
                              f"folder, or pass --checkpoint.resume force to continue it with the new "
                              f"settings")
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


def config_differences(old: Config, new: Config, most: int = 3) -> str:
    """The hashed keys whose values differ, "key OLD there, NEW here", the first ``most``."""
    a, b = hashed_values(old), hashed_values(new)
    keys = [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    shown = [f"{k} {a.get(k, default_of(k))} there, {b.get(k, default_of(k))} here" for k in keys[:most]]
    return "; ".join(shown) + (f"; and {len(keys) - most} more" if len(keys) > most else "")


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
    """" (0.020M train: lora)" for the start line; "" when every parameter trains."""
    trained = count_trainable(model)
    if trained == count_parameters(model):
        return ""
    return f" ({trained / 1e6:.3f}M train: {cfg.model.trainable})"


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
                      train_set: ImageSet, shards: list[np.ndarray], mechanism: Stack,
                      participation: Participation, on_step: Callable[[], None] | None = None) -> RoundParts:
    """The parts of a federated run (fedrun.parts), built once from the config, each from its
    registry (fedrun.registry), the privacy mechanism wrapping what it changes: where each method
    joins the round (docs/methods.md "Adding a method")."""
    device, world = info.device, info.world_size
    sizes = {k: len(s) for k, s in enumerate(shards)}
    shard_idx = {k: torch.as_tensor(s, dtype=torch.long, device=device) for k, s in enumerate(shards)}
    # the compiled module wraps the same parameters: training goes through it, while
    # aggregation, checkpoints and sampling keep using `model` (plain state_dict keys)
    net = torch.compile(model) if cfg.train.compile else model
    # K clients at once is experimental (fedrun/experimental/): injected here, never imported by the loop
    make_trainer = GroupedClientTrainer if cfg.train.clients_at_once > 1 else plain_trainer
    trainer = mechanism.wrap_trainer(make_trainer(net, diffusion, train_set, shard_idx, cfg, on_step))
    P = num_flat(model)
    source = model_source(participation, device)  # the global model, or FedBuff's versions
    rules = check_chain(compression_rules(cfg, model) + drift_rules(cfg, P, sum(sizes.values()), device)
                        + source.update_rules() + mechanism.update_rules())
    kinds = trainer.state_kinds + tuple(kind for rule in rules for kind in rule.state_kinds)
    # whether clients keep state (and so train on their home ranks) is decided once, from the
    # config (fedrun.registry.kept_state); the parts built from it keep exactly those kinds
    stateful = kept_state(cfg)
    assert sorted(kinds) == sorted(stateful), (kinds, stateful)
    states = ClientStates(kinds, device, rules, memory_mb=cfg.fed.client_state_memory_mb)
    placement = build_placement(cfg, sizes, world, stateful=bool(stateful))
    server = mechanism.wrap_server(RuleServer(build_server_optimizer(cfg), rules))
    # the exact sum's range: at most N clients a round, weights up to the largest client's size
    regions = {r.name: r.extra_floats(P) for r in rules if isinstance(r, SumsExtra)}
    buffer = RoundBuffer(P, world, regions, device, rank=info.rank, max_clients=len(sizes),
                         max_weight=max(sizes.values(), default=1),
                         track_clients=len(sizes) if mechanism.tracks else 0, encoder=mechanism.encoder(P),
                         changes=source.changes)
    source.attach(buffer)  # FedBuff: the versions its clients started from, by number
    mechanism.attach(buffer)  # secure aggregation's masks
    return RoundParts(participation, placement, trainer, rules, server, states, buffer,
                      mechanism.wire_formats(), source)


def write_summary(cfg: Config, info: dist.DistInfo, log: RunLogger, model: nn.Module, mechanism: Stack,
                  t_start: float, grid: Any) -> dict[str, Any]:
    """summary.json from metrics.jsonl (so that a resumed run reports its earlier rounds too), and
    the final tables on the terminal (rank 0)."""
    rounds = [json.loads(line) for line in log.metrics_path.read_text().splitlines()]
    scored = [{"round": r["round"], **r["scores"]} for r in rounds if "scores" in r]
    client_scores = {str(r["round"]): r["client_scores"] for r in rounds if "client_scores" in r}
    summary = {
        "config": cfg.to_dict(),
        "rounds": cfg.fed.rounds,
        "final_loss": next((r["loss"] for r in reversed(rounds) if "loss" in r), None),
        "world_size": info.world_size,
        "parameters": count_parameters(model),
        "trainable_parameters": count_trainable(model),  # model.trainable: what travels
        "wall_s": round(time.perf_counter() - t_start, 2),
        "scores": scored[-1] if scored else {},
        "score_history": scored,
        "client_scores": client_scores,  # round -> one row per client scored then
    }
    summary.update(mechanism.summaries())  # "privacy", "secure_aggregation"
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


def train(cfg: Config, on_round_end: list[RoundHook] | None = None) -> dict[str, Any]:
    """Run the job described by ``cfg`` on this process's rank; returns the summary (rank 0).

    ``on_round_end``: hooks called on every rank with each FedAvg round's record (benchmarks).
    """
    t_start = time.perf_counter()
    federated = cfg.run.mode == "fedavg"
    check_inception_weights(cfg)
    train_set = load_split(cfg.data, "train")
    test_set = load_split(cfg.data, "test") if cfg.eval.enabled else None
    check_eval_sizes(cfg, test_set)
    shards = client_shards(cfg, train_set.labels.numpy())
    sizes = {k: len(s) for k, s in enumerate(shards)}
    # the privacy mechanism, before any process group or GPU: noise solved, budget checked; its
    # config (with the solved noise) is the run's one config from here on
    mechanism = build_mechanism(cfg, list(sizes.values()), planned_clients(cfg, sizes) if federated else None,
                                num_classes=train_set.num_classes)
    cfg = mechanism.cfg
    # who takes part (traces read, deadlines checked): no process group needed either
    participation = build_participation(cfg, sizes, mechanism.wrap_participation) if federated else None
    resuming = check_run_dir(cfg)
    init = read_init(cfg, train_set.num_classes)  # model.init_from, checked before any process group
    with torch.device("meta"):  # model.trainable's errors (a LoRA rank too large for a layer), no memory
        make_trainable(build_model(cfg.model, cfg.data.channels, train_set.num_classes), cfg, cfg.run.seed)

    info = dist.init(cfg.run.device, cfg.run.threads, cfg.run.keep_freed_memory)
    try:
        if not federated and cfg.optim.batch_size % info.world_size:
            raise ConfigError(f"optim.batch_size: {cfg.optim.batch_size} does not split evenly over "
                              f"{info.world_size} ranks; use a multiple of {info.world_size}")
        log = RunLogger(cfg.run_dir, info.is_main, cfg.fed.rounds, tensorboard=cfg.run.tensorboard)
        counts = class_counts(train_set.labels.numpy(), shards, train_set.num_classes)
        if federated:
            log.console.print(partition_table(counts)) if info.is_main else None
            empty = [k for k, s in enumerate(shards) if len(s) == 0]
            if empty and info.is_main:
                warnings.warn(f"clients {empty} received no images (fed.alpha={cfg.fed.alpha}); they "
                              f"contribute nothing. Set fed.min_client_size to avoid this.", stacklevel=2)
        evaluator = Evaluator(cfg, info, train_set, test_set,  # reference stats before training
                              shards=shards if federated else None,
                              local_models=mechanism.local_models_visible)
        train_set = train_set.to(info.device)
        model, diffusion = build(cfg, train_set.num_classes, info.device)
        apply_init(model, init)  # model.init_from's weights, before anything copies the model
        # after the base weights are final (model.init_from loads them above this line): adapters
        # start at zero on top of them, and only what trains from here on enters fedrun.flat
        make_trainable(model, cfg, cfg.run.seed)
        ema = PowerEMA(cfg.ema, model)
        checkpointer = checkpoint.Checkpointer(cfg, info, identity=init_identity(init))  # the init's checksum
        if federated:
            assert participation is not None
            parts = build_round_parts(cfg, info, model, diffusion, train_set, shards, mechanism,
                                      participation, log.step)
            rounds: FederatedRounds | CentralizedRounds = FederatedRounds(
                cfg, info, model, diffusion, sizes, parts, log, evaluator, checkpointer, ema, on_round_end)
        else:
            rounds = CentralizedRounds(cfg, info, model, diffusion, train_set, log, evaluator, checkpointer,
                                       ema)
        start_round = rounds.resume() if resuming else 0
        log.drop_after(start_round)  # rounds after the checkpoint run again: forget their old lines
        if info.is_main:
            (cfg.run_dir / "config.toml").write_text(cfg.to_toml())
            (cfg.run_dir / "partition.json").write_text(json.dumps(
                {"counts": counts.tolist(), "sizes": [len(s) for s in shards]}))
            if federated:
                save_partition_histogram(counts, cfg.run_dir / "partition.png")
            log.print(f"fedrun: {cfg.run.mode} on {cfg.data.name}, {info.world_size} rank(s) on "
                      f"{info.device.type}, model {count_parameters(model) / 1e6:.2f}M parameters"
                      f"{trained_part(cfg, model)}, run dir {cfg.run_dir}")
        if log.progress is not None:
            log.progress.update(log.rounds_task, completed=start_round)

        rounds.run(start_round)
        if start_round == cfg.fed.rounds:  # nothing left to train: was the last round's record written?
            finish_last_round(cfg, info, log, evaluator, ema, diffusion)
        log.close()

        grid = evaluator.final_grid(ema.module(), diffusion)  # the EMA model when enabled
        return write_summary(cfg, info, log, model, mechanism, t_start, grid) if info.is_main else {}
    finally:
        dist.shutdown()


def finish_last_round(cfg: Config, info: dist.DistInfo, log: RunLogger, evaluator: Evaluator, ema: PowerEMA,
                      diffusion: Diffusion) -> None:
    """A run killed after its last checkpoint, during that round's evaluation: write the record."""
    R = cfg.fed.rounds
    logged = dist.broadcast_object(log.has_round(R) if info.is_main else None)
    if not logged:
        scores = evaluator.evaluate(ema.module(), diffusion, R) if evaluator.due(R) else None
        log.end_round({"round": R, **({"scores": scores} if scores else {}), "evaluated_after_resume": True},
                      f"round {R:>4}/{R}  (evaluated after resume)")
