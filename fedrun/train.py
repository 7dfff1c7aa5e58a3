"""One training job from config to summary.json: the order in which the pieces are called.

config (validated) -> run-dir checks -> data + partition (CPU) -> process group -> model
-> resume -> FedAvg or centralized rounds -> final sample grid -> summary.json
Every user error is raised before the process group starts or any GPU time is spent.
"""

from __future__ import annotations

import json
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.table import Table

from . import checkpoint, dist, seeding
from .centralized import run_centralized
from .config import Config, ConfigError
from .data import ImageSet, load_split
from .diffusion import Diffusion
from .evaluate import GRID, Evaluator, check_inception_weights, grid_scale, scores_table
from .federated import ServerOptimizer, run_fedavg
from .grids import save_class_grid, save_partition_histogram
from .local import autocast_dtype
from .logs import RunLogger
from .models import build_model, count_parameters
from .partition import class_counts, partition
from .sampling import class_balanced_labels, sample_sharded


class RunDirError(RuntimeError):
    """The run directory cannot be used as asked; the message says how to fix it."""


def check_run_dir(cfg: Config) -> bool:
    """Is this a resume? Refuses a run dir that holds a different config (unless forced)."""
    run_dir = cfg.run_dir
    saved = run_dir / "config.toml"
    has_ckpt = bool(checkpoint.list_checkpoints(run_dir))
    if saved.exists():
        from .config import load_config
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


def partition_table(counts: np.ndarray) -> Table:
    table = Table(title="client x class (images)", show_lines=False)
    table.add_column("client", justify="right")
    for c in range(counts.shape[1]):
        table.add_column(str(c), justify="right")
    table.add_column("total", justify="right", style="bold")
    for k, row in enumerate(counts):
        table.add_row(str(k), *[str(v) for v in row], str(row.sum()))
    return table


def build(cfg: Config, train_set: ImageSet, device: torch.device) -> tuple[torch.nn.Module, Diffusion]:
    torch.manual_seed(seeding.derive_seed(seeding.INIT, cfg.run.seed))  # same init on every rank
    model = build_model(cfg.model, cfg.data.channels, train_set.num_classes).to(device)
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model, Diffusion(cfg.diffusion)


def save_final_grid(cfg: Config, info: dist.DistInfo, model: torch.nn.Module, diffusion: Diffusion,
                    num_classes: int) -> Path | None:
    if cfg.sample.per_class == 0:
        return None
    labels = class_balanced_labels([cfg.sample.per_class] * num_classes)
    images = sample_sharded(model, diffusion, labels, (cfg.data.channels, cfg.data.image_size, cfg.data.image_size),
                            cfg.sample.steps or cfg.diffusion.sample_steps, cfg.diffusion.eta,
                            (cfg.run.seed, cfg.fed.rounds, GRID), info,
                            autocast_dtype=autocast_dtype(cfg.train.precision, info.device))
    if images is None:
        return None
    path = cfg.run_dir / "samples" / "final.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    save_class_grid(images, labels, path, padding=1, scale=grid_scale(cfg.data.image_size))
    return path


def train(cfg: Config) -> dict[str, Any]:
    """Run the job described by ``cfg`` on this process's rank; returns the summary."""
    t_start = time.perf_counter()
    resuming = check_run_dir(cfg)
    check_inception_weights(cfg)
    train_set = load_split(cfg.data, "train")
    test_set = load_split(cfg.data, "test") if cfg.eval.enabled else None
    f = cfg.fed
    shards = partition(train_set.labels.numpy(), f.num_clients, f.partition, f.alpha, cfg.run.seed,
                       f.min_client_size, f.max_resample) if cfg.run.mode == "fedavg" else [np.arange(len(train_set))]

    info = dist.init(cfg.run.device, cfg.run.threads)
    try:
        if cfg.run.mode == "centralized" and cfg.optim.batch_size % info.world_size:
            raise ConfigError(f"optim.batch_size: {cfg.optim.batch_size} does not split evenly over "
                              f"{info.world_size} ranks; use a multiple of {info.world_size}")
        log = RunLogger(cfg.run_dir, info.is_main, f.rounds)
        counts = class_counts(train_set.labels.numpy(), shards, train_set.num_classes)
        if cfg.run.mode == "fedavg":
            log.console.print(partition_table(counts)) if info.is_main else None
            empty = [k for k, s in enumerate(shards) if len(s) == 0]
            if empty and info.is_main:
                warnings.warn(f"clients {empty} received no images (fed.alpha={f.alpha}); they "
                              f"contribute nothing. Set fed.min_client_size to avoid this.")
        evaluator = Evaluator(cfg, info, train_set, test_set)  # reference stats before training
        train_set = train_set.to(info.device)
        model, diffusion = build(cfg, train_set, info.device)
        server = ServerOptimizer(f.server_opt, f.server_lr, f.server_momentum)

        start_round, optimizer_state = 0, None
        if resuming:
            found = checkpoint.load_latest(cfg.run_dir) if info.is_main else None
            found = dist.broadcast_object(found)
            if found is not None:
                state, path = found
                if state["config_hash"] != cfg.hash() and cfg.checkpoint.resume != "force":
                    raise checkpoint.CheckpointError(
                        f"{path}: written by a different config; pass --checkpoint.resume force, "
                        f"or use another --run.name")
                model.load_state_dict(state["model"])
                server.load_state_dict(state["server"], info.device)
                optimizer_state = state.get("optimizer")
                checkpoint.set_rng_state(state["rng"])
                start_round = int(state["round"])
                log.print(f"resuming from {path} (round {start_round})")
        log.drop_after(start_round)  # rounds after the checkpoint run again: forget their old lines
        if info.is_main:
            (cfg.run_dir / "config.toml").write_text(cfg.to_toml())
            (cfg.run_dir / "partition.json").write_text(json.dumps(
                {"counts": counts.tolist(), "sizes": [len(s) for s in shards]}))
            if cfg.run.mode == "fedavg":
                save_partition_histogram(counts, cfg.run_dir / "partition.png")
            log.print(f"fedrun: {cfg.run.mode} on {cfg.data.name}, {info.world_size} rank(s) on "
                      f"{info.device.type}, model {count_parameters(model) / 1e6:.2f}M parameters, "
                      f"run dir {cfg.run_dir}")
        if log.progress is not None:
            log.progress.update(log.rounds_task, completed=start_round)

        if cfg.run.mode == "fedavg":
            # the compiled module wraps the same parameters: training goes through it, while
            # aggregation, checkpoints and sampling keep using `model` (plain state_dict keys)
            net = torch.compile(model) if cfg.train.compile else None
            run_fedavg(cfg, info, model, diffusion, train_set, shards, start_round, server, log, evaluator,
                       train_model=net)
        else:
            run_centralized(cfg, info, model, diffusion, train_set, start_round, optimizer_state, log, evaluator)
        log.close()

        grid = save_final_grid(cfg, info, model, diffusion, train_set.num_classes)
        if info.is_main:
            # from metrics.jsonl, so that a resumed run reports its earlier rounds too
            rounds = [json.loads(line) for line in log.metrics_path.read_text().splitlines()]
            scored = [{"round": r["round"], **r["scores"]} for r in rounds if "scores" in r]
            summary = {
                "config": cfg.to_dict(),
                "rounds": f.rounds,
                "final_loss": rounds[-1]["loss"] if rounds else None,
                "world_size": info.world_size,
                "parameters": count_parameters(model),
                "wall_s": round(time.perf_counter() - t_start, 2),
                "scores": scored[-1] if scored else {},
                "score_history": scored,
            }
            if scored:
                log.console.print(scores_table(scored))
            (cfg.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
            log.print(f"done in {summary['wall_s']:.1f}s. outputs in {cfg.run_dir}/: samples/final.png"
                      f"{'' if grid else ' (no grid)'}, metrics.jsonl, checkpoints/, summary.json")
            return summary
        return {}
    finally:
        dist.shutdown()
