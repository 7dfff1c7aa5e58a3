"""What clients keep between rounds, where it lives, and how it reaches a checkpoint.

Two kinds of per-client state exist: the client's Adam moments (``fed.client_optimizer =
"keep"``) and its SCAFFOLD control variate c_k; plus the SCAFFOLD server control c, which every
rank holds identically. None of it travels during a round: a client is always trained on its
home rank (``dist.home_ranks``: fixed for the run, balanced by data size), which holds its state.
A client's state therefore depends only on the client's own history, never on which rank or how
many ranks trained it. When a checkpoint is due, one gather_object brings every client's state
to rank 0, which writes it; on resume each rank keeps the states of its own home clients (the
world size may have changed: homes are recomputed, states follow their clients).
"""

from __future__ import annotations

from typing import Any

import torch

from .. import dist
from ..config import Config


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
    """Per-client Adam states and SCAFFOLD control variates of this rank's home clients."""

    def __init__(self, cfg: Config, num_flat: int, device: torch.device):
        self.keep_optimizer = cfg.fed.client_optimizer == "keep"
        self.scaffold = cfg.fed.drift == "scaffold"
        self.device = device
        self.optimizer: dict[int, dict[str, Any]] = {}
        self.control: dict[int, torch.Tensor] = {}
        self.server_control = torch.zeros(num_flat, device=device) if self.scaffold else None

    @property
    def active(self) -> bool:
        return self.keep_optimizer or self.scaffold

    def gather(self) -> dict[str, Any] | None:
        """All ranks call it; rank 0 gets every client's state (CPU tensors), the others None."""
        mine = {str(k): {"optimizer": _to(self.optimizer.get(k), "cpu"),
                         "control": _to(self.control.get(k), "cpu")}
                for k in sorted(set(self.optimizer) | set(self.control))}
        parts = dist.gather_object_to_main(mine)
        if parts is None:
            return None
        clients: dict[str, Any] = {}
        for part in parts:
            clients.update(part)  # type: ignore[arg-type]
        control = self.server_control.cpu() if self.server_control is not None else None
        return {"clients": clients, "server_control": control}

    def load_state_dict(self, state: dict[str, Any] | None, home: set[int]) -> None:
        """Restore the states of the clients in ``home`` (this rank's) and the server control."""
        if not state:
            return
        for key, entry in state.get("clients", {}).items():
            k = int(key)
            if k not in home:
                continue
            if entry.get("optimizer") is not None and self.keep_optimizer:
                self.optimizer[k] = _to(entry["optimizer"], self.device)
            if entry.get("control") is not None and self.scaffold:
                self.control[k] = entry["control"].to(self.device)
        if self.scaffold and state.get("server_control") is not None:
            self.server_control = state["server_control"].to(self.device)
