"""A finished (or interrupted) run, opened again: what ``fedrun eval``, ``fedrun audit``, the
benchmarks and the tests look at.

``open_run(run_dir)`` gives the run's config (``run_dir/config.toml`` plus overrides), its train
and test splits, the clients' shards drawn again from the config (``partition.client_shards``,
as training draws them), and the model built by ``fedrun.models.build`` exactly as training
builds it, with the weights of a checkpoint: the one asked for, or else the newest one that
passes its checksum (``checkpoint.load_latest``: a checkpoint cut short by a crash is skipped
with a warning, as resume skips it). When the checkpoint holds an EMA of the model's size, the
EMA is loaded (what the run sampled and scored); ``SavedRun.weights`` says which.

A core module: it imports no sub-package (evaluation, federated, privacy, experimental).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from . import checkpoint as ckpt
from . import dist
from .adapters import make_trainable
from .config import Config, load_config
from .data import ImageSet, load_split
from .diffusion import Diffusion
from .errors import CheckpointError, ConfigError
from .flat import load_flat_, num_flat
from .models import build
from .partition import client_shards


@dataclass
class SavedRun:
    """A run directory opened for evaluation; see ``open_run``."""

    run_dir: Path
    cfg: Config  # config.toml with the overrides; run.out_dir / run.name point at run_dir
    train: ImageSet  # CPU
    test: ImageSet | None  # None unless asked for
    shards: list[np.ndarray]  # each client's train indices; centralized: one shard of all
    model: nn.Module  # in eval mode, on the requested device
    diffusion: Diffusion
    weights: str  # "ema" or "model": which weights of the checkpoint the model holds
    round: int
    checkpoint: Path

    @property
    def clients(self) -> list[np.ndarray] | None:
        """The clients' shards of a FedAvg run; None for a centralized one (no clients)."""
        return self.shards if self.cfg.run.mode == "fedavg" else None


def load_run_config(run_dir: Path, overrides: dict[str, str] | None = None) -> Config:
    """``run_dir/config.toml`` with ``overrides`` (dotted keys), validated; outputs go to run_dir."""
    run_dir = Path(run_dir)
    path = run_dir / "config.toml"
    if not path.is_file():
        raise ConfigError(f"RUN_DIR: {run_dir} holds no config.toml; pass a run directory made by fedrun "
                          f"(runs/<run.name>)")
    cfg = load_config(path, overrides)
    # the run is where it is now, even if it was moved since it was trained
    cfg.run.out_dir, cfg.run.name = str(run_dir.parent), run_dir.name
    return cfg


def read_checkpoint(run_dir: Path, path: Path | None = None,
                    key: str = "--checkpoint") -> tuple[dict[str, Any], Path]:
    """The checkpoint at ``path``, or the newest valid one of the run; CheckpointError if none.
    ``key``: what the messages name (fedrun eval's ``--checkpoint``, or ``model.init_from``)."""
    run_dir = Path(run_dir)
    ours = key == "--checkpoint"
    newest = "leave --checkpoint out" if ours else f"set {key} to the run directory"
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise CheckpointError(f"{key}: no file at {path}; pass a checkpoint of "
                                  f"{run_dir / 'checkpoints'}, or {newest} for the newest valid one")
        try:
            return ckpt.load_verified(path), path
        except CheckpointError as exc:
            raise CheckpointError(f"{key}: {exc}; pass another one, or {newest} for the newest "
                                  f"valid one") from None
    where = "checkpoint" if ours else key
    try:
        found = ckpt.load_latest(run_dir)
    except CheckpointError:  # resume's message says "start over": not what a reader should do
        raise CheckpointError(f"{where}: every checkpoint in {run_dir / 'checkpoints'} is truncated or "
                              f"corrupted; restore a good copy, or train the run again") from None
    if found is None:
        raise CheckpointError(f"{where}: {run_dir / 'checkpoints'} holds no checkpoint; train the run "
                              f"first")
    return found


def mismatch(model: nn.Module, weights: Any) -> str | None:
    """Why the saved ``weights`` (a state dict) cannot be loaded into ``model``, in words naming the
    first differing layer (name and both shapes) or the missing / extra keys; None if they fit."""
    if not isinstance(weights, dict):
        return "it holds no model weights"
    ours = model.state_dict()
    for name, t in ours.items():
        saved = weights.get(name)
        if isinstance(saved, torch.Tensor) and tuple(saved.shape) != tuple(t.shape):
            return (f"layer {name} is {list(saved.shape)} in the checkpoint and {list(t.shape)} in this "
                    f"model")
    missing = [k for k in ours if k not in weights]
    extra = [k for k in weights if k not in ours]
    if missing or extra:
        def few(keys: list[str]) -> str:
            return ", ".join(keys[:3]) + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")
        said = [f"it lacks {len(missing)} key(s) of this model ({few(missing)})"] if missing else []
        said += [f"it has {len(extra)} key(s) this model lacks ({few(extra)})"] if extra else []
        return "; ".join(said)
    return None


def load_weights(model: nn.Module, state: dict[str, Any], path: Path) -> str:
    """Load a checkpoint's model, then its EMA if it holds one of the model's size: "ema" or "model"."""
    why = mismatch(model, state.get("model"))
    if why is not None:  # another architecture (model.* overridden) or no model
        raise CheckpointError(f"{path}: its weights do not fit the model of the run's config.toml "
                              f"({why}); leave model.* unchanged, or pass this run's own "
                              f"checkpoint")
    model.load_state_dict(state["model"])
    ema = state.get("ema")
    flat = ema.get("flat") if isinstance(ema, dict) else ema  # {"flat": tensor}, {} when EMA is off
    if isinstance(flat, torch.Tensor) and flat.numel() == num_flat(model):
        load_flat_(model, flat.to(next(model.parameters()).device))
        return "ema"
    return "model"


def open_run(run_dir: str | Path, checkpoint: str | Path | None = None,
             device: torch.device | str | None = None, overrides: dict[str, str] | None = None,
             test_split: bool = True) -> SavedRun:
    """Open ``run_dir`` (see the module docstring). ``device``: where the model goes; None = the
    device this process would train on (run.device, the launcher's local rank). The checks that
    need no data come first: no config.toml (ConfigError), no checkpoint or none usable
    (CheckpointError)."""
    run_dir = Path(run_dir)
    cfg = load_run_config(run_dir, overrides)
    state, path = read_checkpoint(run_dir, Path(checkpoint) if checkpoint is not None else None)
    train = load_split(cfg.data, "train")
    test = load_split(cfg.data, "test") if test_split else None
    shards = client_shards(cfg, train.labels.numpy())
    if device is None:
        device = dist.pick_device(cfg.run.device, dist.local_rank())
    model, diffusion = build(cfg, train.num_classes, torch.device(device))
    make_trainable(model, cfg.model, cfg.run.seed)  # LoRA runs: the adapters their checkpoints hold
    weights = load_weights(model, state, path)
    model.eval()
    return SavedRun(run_dir, cfg, train, test, shards, model, diffusion, weights,
                    int(state.get("round", 0)), path)
