"""What clients keep between rounds, where it lives, and how it reaches a checkpoint.

Per-client state comes in kinds, each owned by the part that uses it: the trainer's Adam
moments (``"optimizer"``, ``fed.client_optimizer = "keep"``), SCAFFOLD's control variate c_k
(``"control"``), FedDyn's gradient state (``"feddyn_grad"``), ... A part declares its kinds
(``state_kinds``); the store keeps, for each client, one entry per kind. State that every rank
holds identically (SCAFFOLD's server control c, FedDyn's h) belongs to its update rule
(``UpdateRule.shared_state``) and is checkpointed with the clients' state.

None of it travels during a round: a client with kept state always trains on its home rank
(``placement.HomeRanks``: fixed for the run, balanced by cost), which holds its state, so
a client's state depends only on its own history, never on which rank or how many ranks trained
it. When a checkpoint is due, one gather_object brings every client's state to rank 0, which
writes it; on resume each rank keeps the states of its own home clients (the world size may
have changed: homes are recomputed, states follow their clients).

Where it lives on the home rank: **off the device** between the client's rounds. A client's
state is copied to the device when it trains (``get``: a copy, so an update that is left out
leaves the kept state as it was) and back to host memory when the round keeps its new state
(``commit``). Host memory holds up to ``fed.client_state_memory_mb`` per rank; past it, the
states that have waited longest go to files in a temporary folder (one ``torch.save`` per
client) and come back memory-mapped (``torch.load(mmap=True)``), so that a cross-device
federation of thousands of clients with kept Adam (2 P floats each) needs neither device nor
host memory for the clients that are not training. Only clients that have trained keep
anything: memory grows with the clients seen, not with N.
"""

from __future__ import annotations

import shutil
import tempfile
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .. import dist
from ..parts import ServerHalf, UpdateRule


def _to(obj: Any, device: torch.device | str) -> Any:
    """A copy of a (nested) optimizer state or tensor on ``device``; scalars (Adam's step count)
    stay on the CPU, where a non-capturable optimizer keeps them."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to(device if obj.dim() else "cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_to(v, device) for v in obj]
    return obj


def _to_host(obj: Any) -> Any:
    """``obj`` with its tensors in host memory: those already there as they are (what a round hands
    over is its own: a fresh optimizer's state, a rule's new tensors), the others copied."""
    if isinstance(obj, torch.Tensor):
        return obj.detach() if obj.device.type == "cpu" else obj.detach().to("cpu")
    if isinstance(obj, dict):
        return {k: _to_host(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_to_host(v) for v in obj]
    return obj


def _nbytes(obj: Any) -> int:
    """Bytes of the tensors in a (nested) state."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_nbytes(v) for v in obj.values())
    if isinstance(obj, list):
        return sum(_nbytes(v) for v in obj)
    return 0


class ClientStates:
    """Per-client state of this rank's home clients, by kind, and the rules' shared state.

    ``memory_mb``: host memory for the states (0 = no limit); past it they go to files in
    ``spill_dir`` (default: a temporary folder, removed with the store)."""

    def __init__(self, kinds: Sequence[str], device: torch.device, rules: Sequence[UpdateRule] = (),
                 memory_mb: int = 0, spill_dir: str | Path | None = None):
        self.kinds = tuple(kinds)
        self.device = device
        self.rules = [r for r in rules if isinstance(r, ServerHalf)]  # owners of the shared state
        self.entries: OrderedDict[int, dict[str, Any]] = OrderedDict()  # in host memory, oldest first
        self.budget = memory_mb * 2**20
        self.held = 0  # bytes in self.entries
        self.spilled: dict[int, Path] = {}
        self._spill_root = spill_dir
        self._spill_dir: Path | None = None

    @property
    def active(self) -> bool:
        """Does any client keep anything? (Then clients train on their home ranks.)"""
        return bool(self.kinds)

    def clients(self) -> list[int]:
        """The clients that have kept state on this rank."""
        return sorted([*self.entries, *self.spilled])

    def get(self, client: int) -> dict[str, Any]:
        """A copy of the client's kept state by kind on the device ({} before its first round)."""
        if client in self.entries:
            return _to(self.entries[client], self.device)
        if client in self.spilled:
            return _to(torch.load(self.spilled[client], mmap=True, weights_only=True), self.device)
        return {}

    def commit(self, client: int, new_state: dict[str, Any]) -> None:
        """Keep what the client's round produced (only for the kinds of this run), in host memory."""
        kept = {kind: _to_host(v) for kind, v in new_state.items() if kind in self.kinds and v is not None}
        if not kept:
            return
        entry = self._take(client)
        entry.update(kept)
        self.entries[client] = entry  # the newest last
        self.held += _nbytes(entry)
        self._spill()

    def _take(self, client: int) -> dict[str, Any]:
        """Remove the client's state from wherever it is and return it (host tensors)."""
        if client in self.entries:
            entry = self.entries.pop(client)
            self.held -= _nbytes(entry)
            return entry
        if client in self.spilled:
            path = self.spilled.pop(client)
            entry = _to(torch.load(path, mmap=True, weights_only=True), "cpu")
            path.unlink(missing_ok=True)
            return entry
        return {}

    def _spill(self) -> None:
        """Move the states that have waited longest to files until the rest fits the budget."""
        while self.budget and self.held > self.budget and len(self.entries) > 1:
            client, entry = self.entries.popitem(last=False)
            self.held -= _nbytes(entry)
            if self._spill_dir is None:
                self._spill_dir = Path(tempfile.mkdtemp(prefix="fedrun-client-state-", dir=self._spill_root))
            path = self._spill_dir / f"client_{client}.pt"
            torch.save(entry, path)
            self.spilled[client] = path

    def close(self) -> None:
        """Remove the spill folder (its files are only a cache of this process's states)."""
        if self._spill_dir is not None:
            shutil.rmtree(self._spill_dir, ignore_errors=True)
            self._spill_dir = None
            self.spilled.clear()

    def __del__(self) -> None:
        self.close()

    def gather(self) -> dict[str, Any] | None:
        """All ranks call it; rank 0 gets every client's state (CPU tensors), the others None."""
        mine = {str(k): {kind: _to(v, "cpu") for kind, v in self._host(k).items()} for k in self.clients()}
        parts = dist.gather_object_to_main(mine)
        if parts is None:
            return None
        clients: dict[str, Any] = {}
        for part in parts:
            clients.update(part)  # type: ignore[arg-type]
        shared = {key: t.cpu() for rule in self.rules for key, t in rule.shared_state().items()}
        return {"clients": clients, **shared}

    def _host(self, client: int) -> dict[str, Any]:
        if client in self.entries:
            return self.entries[client]
        return torch.load(self.spilled[client], mmap=True, weights_only=True)

    def load_state_dict(self, state: dict[str, Any] | None, home: set[int]) -> None:
        """Restore the states of the clients in ``home`` (this rank's) and the rules' shared state.

        A checkpoint may hold every kind, the unused ones as None: those are skipped."""
        if not state:
            return
        for key, entry in state.get("clients", {}).items():
            k = int(key)
            if k in home:
                self.commit(k, entry)
        shared = {key: v for key, v in state.items() if key != "clients" and v is not None}
        for rule in self.rules:
            rule.load_shared_state(shared, self.device)
