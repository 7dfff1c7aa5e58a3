"""What clients keep between rounds, where it lives, and how it reaches a checkpoint.

Per-client state comes in kinds, each owned by the part that uses it: the trainer's Adam
moments (``"optimizer"``, ``fed.client_optimizer = "keep"``), SCAFFOLD's control variate c_k
(``"control"``), FedDyn's gradient state (``"feddyn_grad"``), ... A part declares its kinds
(``state_kinds``); the store keeps, for each client, one entry per kind. State that every rank
holds identically (SCAFFOLD's server control c, FedDyn's h) belongs to its update rule
(``UpdateRule.shared_state``) and is checkpointed with the clients' state.

None of it travels during a round: a client with kept state always trains on its home rank
(``placement.HomeRanks``: fixed for the run, balanced by data size), which holds its state, so
a client's state depends only on its own history, never on which rank or how many ranks trained
it. When a checkpoint is due, one gather_object brings every client's state to rank 0, which
writes it; on resume each rank keeps the states of its own home clients (the world size may
have changed: homes are recomputed, states follow their clients).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from .. import dist
from ..parts import UpdateRule


def _to(obj: Any, device: torch.device | str) -> Any:
    """A copy of a (nested) optimizer state or tensor on ``device``."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to(device, copy=True)
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_to(v, device) for v in obj]
    return obj


class ClientStates:
    """Per-client state of this rank's home clients, by kind, and the rules' shared state."""

    def __init__(self, kinds: Sequence[str], device: torch.device, rules: Sequence[UpdateRule] = ()):
        self.kinds = tuple(kinds)
        self.device = device
        self.rules = list(rules)  # owners of the shared state
        self.entries: dict[int, dict[str, Any]] = {}

    @property
    def active(self) -> bool:
        """Does any client keep anything? (Then clients train on their home ranks.)"""
        return bool(self.kinds)

    def get(self, client: int) -> dict[str, Any]:
        """The client's kept state by kind ({} before its first round)."""
        return self.entries.get(client, {})

    def commit(self, client: int, new_state: dict[str, Any]) -> None:
        """Keep what the client's round produced (only for the kinds of this run)."""
        kept = {kind: v for kind, v in new_state.items() if kind in self.kinds and v is not None}
        if kept:
            self.entries.setdefault(client, {}).update(kept)

    def gather(self) -> dict[str, Any] | None:
        """All ranks call it; rank 0 gets every client's state (CPU tensors), the others None."""
        mine = {str(k): {kind: _to(v, "cpu") for kind, v in self.entries[k].items()}
                for k in sorted(self.entries)}
        parts = dist.gather_object_to_main(mine)
        if parts is None:
            return None
        clients: dict[str, Any] = {}
        for part in parts:
            clients.update(part)  # type: ignore[arg-type]
        shared = {key: t.cpu() for rule in self.rules for key, t in rule.shared_state().items()}
        return {"clients": clients, **shared}

    def load_state_dict(self, state: dict[str, Any] | None, home: set[int]) -> None:
        """Restore the states of the clients in ``home`` (this rank's) and the rules' shared state.

        Reads checkpoints of earlier releases too (every kind written, unused ones as None)."""
        if not state:
            return
        for key, entry in state.get("clients", {}).items():
            k = int(key)
            if k in home:
                self.commit(k, {kind: _to(v, self.device) for kind, v in entry.items()})
        shared = {key: v for key, v in state.items() if key != "clients" and v is not None}
        for rule in self.rules:
            rule.load_shared_state(shared, self.device)
