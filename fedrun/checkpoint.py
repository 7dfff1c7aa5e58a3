"""Checkpoints: when they are written, what they hold, and how a run resumes from them.

``Checkpointer`` owns all three for both training modes: ``save(round_, ..., last_round=...)``
decides whether this round is due (every ``checkpoint.every`` rounds, and always the last),
builds the payload (round, model, server and optimizer state, the EMA, what clients keep
between rounds, config and its hash, RNG state),
writes it on rank 0 and holds every rank at a barrier until it is on disk; ``load()`` returns the
newest usable checkpoint of the run (or None) on every rank.

File layout: ``torch.save`` payload | sha256(payload) (32 bytes) | MAGIC (8 bytes). A file cut
short by a crash or a full disk fails the checksum and is skipped in favour of the previous one.
Writing goes to a temporary file in the same folder, which is fsynced and then renamed over
the final name, so a reader never sees half a checkpoint.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle  # only for its exception type: loading goes through torch.load(weights_only=True)
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch

from . import dist, faults
from .errors import CheckpointError

if TYPE_CHECKING:
    from .config import Config


class HasState(Protocol):
    """A server rule or a torch optimizer: anything whose state goes into a checkpoint."""

    def state_dict(self) -> dict[str, Any]: ...

MAGIC = b"FEDRUN01"
_NAME = re.compile(r"round_(\d+)\.pt$")


def save_atomic(state: dict[str, Any], path: Path) -> None:
    buf = io.BytesIO()
    torch.save(state, buf)
    payload = buf.getvalue()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(payload)
            f.write(hashlib.sha256(payload).digest())
            f.write(MAGIC)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:  # e.g. a full disk: leave no half-written temporary file behind
        tmp.unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)  # make the rename itself durable
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def load_verified(path: Path) -> dict[str, Any]:
    """Load one checkpoint, or raise CheckpointError if it is truncated or corrupted."""
    blob = Path(path).read_bytes()
    if len(blob) < 40 or blob[-8:] != MAGIC:
        raise CheckpointError(f"{path}: truncated or not a fedrun checkpoint")
    payload, digest = blob[:-40], blob[-40:-8]
    if hashlib.sha256(payload).digest() != digest:
        raise CheckpointError(f"{path}: checksum mismatch (corrupted file)")
    try:
        return torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:  # a valid checksum over objects other than tensors
        raise CheckpointError(f"{path}: holds Python objects that weights_only loading refuses; "
                              f"it is not a fedrun checkpoint") from None


def checkpoint_path(run_dir: Path, round_: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"round_{round_:04d}.pt"


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Checkpoints of a run, newest first."""
    folder = Path(run_dir) / "checkpoints"
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found, reverse=True)]


def save_checkpoint(run_dir: Path, round_: int, state: dict[str, Any], keep: int) -> Path:
    path = checkpoint_path(run_dir, round_)
    save_atomic(state, path)
    for old in list_checkpoints(run_dir)[keep:]:
        old.unlink(missing_ok=True)
    return path


def load_latest(run_dir: Path) -> tuple[dict[str, Any], Path] | None:
    """Newest checkpoint that passes its checksum; broken ones are skipped with a warning."""
    paths = list_checkpoints(run_dir)
    for path in paths:
        try:
            return load_verified(path), path
        except (CheckpointError, OSError, RuntimeError) as exc:
            warnings.warn(f"skipping unusable checkpoint {path}: {exc}", stacklevel=2)
    if paths:
        raise CheckpointError(f"checkpoint: every checkpoint in {Path(run_dir) / 'checkpoints'} is "
                              f"unusable; delete the folder to start over, or restore a good copy")
    return None


def rng_state() -> dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# --------------------------------------------------------------------------------------------
# Cadence and contents


@dataclass
class Resumed:
    """What a run continues from: the round it completed and the state saved after it."""

    round: int
    model: dict[str, torch.Tensor]
    server: dict[str, torch.Tensor]
    optimizer: dict[str, Any] | None
    rng: dict[str, torch.Tensor]
    path: Path
    ema: dict[str, torch.Tensor]
    clients: dict[str, Any] | None
    extra: dict[str, Any]


class Checkpointer:
    """Writes and finds the checkpoints of one run. Every rank holds one; rank 0 writes."""

    def __init__(self, cfg: Config, info: dist.DistInfo, identity: dict[str, str] | None = None):
        """``identity``: what else, besides the config hash, a checkpoint must match to be resumed
        ("section.key" -> a description of the value, e.g. the init's checksum): stored in every
        checkpoint when not empty, compared on load."""
        self.identity = dict(identity or {})
        self.run_dir = cfg.run_dir
        self.every, self.keep = cfg.checkpoint.every, cfg.checkpoint.keep
        self.force = cfg.checkpoint.resume == "force"
        self.config_hash, self.config = cfg.hash(), cfg.to_dict()
        self.is_main = info.is_main

    def due(self, round_: int, last_round: bool = False) -> bool:
        return last_round or round_ % self.every == 0

    def save(self, round_: int, model: torch.nn.Module, *, last_round: bool,
             server: HasState | None = None, optimizer: HasState | None = None,
             ema: HasState | None = None, clients: Any = None,
             extra: dict[str, HasState] | None = None) -> bool:
        """Checkpoint round ``round_`` if it is due; True if one was written. All ranks call it.

        ``server`` / ``optimizer`` / ``ema`` / ``extra`` values are read (``state_dict()``, a copy
        to the host) only when a checkpoint is due, and only on rank 0, the rank that writes it.
        ``clients`` (federated.client_state.ClientStates) is gathered from every rank when due.
        """
        if not self.due(round_, last_round):
            return False
        client_state = clients.gather() if clients is not None and clients.active else None
        if self.is_main:
            save_checkpoint(self.run_dir, round_, {
                "round": round_,
                "model": {k: v.cpu() for k, v in model.state_dict().items()},
                "server": server.state_dict() if server is not None else {},
                **({"optimizer": optimizer.state_dict()} if optimizer is not None else {}),
                **({"ema": ema.state_dict()} if ema is not None else {}),
                **({"clients": client_state} if client_state is not None else {}),
                **({"extra": {k: v.state_dict() for k, v in extra.items()}} if extra else {}),
                "config_hash": self.config_hash,
                "config": self.config,
                **({"identity": self.identity} if self.identity else {}),
                "rng": rng_state(),
            }, keep=self.keep)
            faults.after_checkpoint(round_)  # test-only: kill -9 here if FEDRUN_FAULT_AT=ckpt:R
        dist.barrier()  # nobody races ahead of a checkpoint that may be needed to resume
        return True

    def load(self) -> Resumed | None:
        """The newest usable checkpoint (read by rank 0, sent to all), or None if there is none.

        Raises CheckpointError if it was written by a different config (unless resume = force).
        """
        found = load_latest(self.run_dir) if self.is_main else None
        found = dist.broadcast_object(found)
        if found is None:
            return None
        state, path = found
        if state["config_hash"] != self.config_hash and not self.force:
            raise CheckpointError(f"{path}: written by a different config; pass --checkpoint.resume "
                                  f"force, or use another --run.name")
        saved = state.get("identity") or {}
        for key in sorted(set(saved) | set(self.identity)):
            if saved.get(key) != self.identity.get(key) and not self.force:
                raise CheckpointError(
                    f"{key}: {path} continues a run started with {saved.get(key, f'no {key}')}, this "
                    f"config gives {self.identity.get(key, f'no {key}')}; resume with what the run started "
                    f"with, use another --run.name, or pass --checkpoint.resume force")
        return Resumed(int(state["round"]), state["model"], state.get("server", {}),
                       state.get("optimizer"), state["rng"], path, state.get("ema", {}),
                       state.get("clients"), state.get("extra", {}))
