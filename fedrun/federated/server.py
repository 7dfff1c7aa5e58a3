"""Server rules: how the global model moves, given the weighted average of the client models.

Every rule sees the same two flat vectors each round: ``global_flat`` (x_t, the model the clients
started from) and ``average`` (sum_k n_k x_k / sum_k n_k). Plain FedAvg returns the average.
The others follow Reddi et al., "Adaptive Federated Optimization" (ICLR 2021), Algorithm 2,
and treat

    delta_t = x_t - average            (a pseudo-gradient: the server descends along it)

so that a step is x_{t+1} = x_t - server_lr * (something built from delta). With that sign,
FedAvgM with momentum 0 and lr 1 is FedAvg again. Moments start at zero, as in Flower and in
fedrun's earlier releases; Reddi et al.'s v_{-1} >= tau^2 only matters for the very first step,
where tau keeps the denominator away from zero anyway.

Each rule is a small class with its hyperparameters as named fields and its state (the
moments) as tensors that ``state_dict`` hands to the checkpoint; resuming restores them exactly.
``build_server_optimizer`` maps ``fed.server_opt`` and the ``fed.server_*`` keys onto them.

``RuleServer`` is the round's server step (fedrun.parts.ServerStep): the update rules' server
halves (SCAFFOLD's control variate, FedDyn's correction) and then the server rule. Privacy wraps
it (fedrun.privacy.mechanisms).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from ..config import FedConfig
from ..parts import Aggregate, UpdateRule


@dataclass
class ServerOptimizer:
    """Base: no state, subclasses implement ``step``."""

    name: ClassVar[str] = ""
    state: dict[str, torch.Tensor] = field(default_factory=dict, init=False, repr=False)

    def step(self, global_flat: torch.Tensor, average: torch.Tensor) -> torch.Tensor:
        """The next global model, as a new flat tensor (``global_flat`` is not changed)."""
        raise NotImplementedError

    def _moment(self, key: str, like: torch.Tensor) -> torch.Tensor:
        return self.state.setdefault(key, torch.zeros_like(like))

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.cpu() for k, v in self.state.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor], device: torch.device) -> None:
        self.state = {k: v.to(device) for k, v in state.items()}


@dataclass
class FedAvg(ServerOptimizer):
    """McMahan et al. 2017: the next global model is the weighted average of the clients'."""

    name: ClassVar[str] = "fedavg"

    def step(self, global_flat: torch.Tensor, average: torch.Tensor) -> torch.Tensor:
        return average.clone()


@dataclass
class FedAvgM(ServerOptimizer):
    """Hsu et al. 2019, server momentum: m = momentum * m + delta; x = x - lr * m."""

    name: ClassVar[str] = "fedavgm"
    lr: float = 1.0
    """server learning rate (``fed.server_lr``)"""
    momentum: float = 0.9
    """heavy-ball momentum of the pseudo-gradient (``fed.server_momentum``)"""

    def step(self, global_flat: torch.Tensor, average: torch.Tensor) -> torch.Tensor:
        delta = global_flat - average
        m = self._moment("m", delta)
        m.mul_(self.momentum).add_(delta)
        return global_flat - self.lr * m


@dataclass
class _Adaptive(ServerOptimizer):
    """Shared by FedAdam, FedYogi and FedAdagrad: m = beta1 m + (1 - beta1) delta, then a
    rule for v, then x = x - lr * m / (sqrt(v) + tau). No bias correction (Reddi et al.)."""

    lr: float = 1.0
    """server learning rate (``fed.server_lr``); Reddi et al. tune it on a log grid"""
    beta1: float = 0.9
    """first-moment decay (``fed.server_momentum``)"""
    beta2: float = 0.99
    """second-moment decay (``fed.server_beta2``); unused by FedAdagrad"""
    tau: float = 1e-3
    """adaptivity: added to sqrt(v), so small tau = more adaptive (``fed.server_tau``)"""

    def _second_moment(self, v: torch.Tensor, delta: torch.Tensor) -> None:
        raise NotImplementedError

    def step(self, global_flat: torch.Tensor, average: torch.Tensor) -> torch.Tensor:
        delta = global_flat - average
        m, v = self._moment("m", delta), self._moment("v", delta)
        m.mul_(self.beta1).add_(delta, alpha=1 - self.beta1)
        self._second_moment(v, delta)
        return global_flat - self.lr * m / (v.sqrt() + self.tau)


@dataclass
class FedAdam(_Adaptive):
    """v = beta2 v + (1 - beta2) delta^2."""

    name: ClassVar[str] = "fedadam"

    def _second_moment(self, v: torch.Tensor, delta: torch.Tensor) -> None:
        v.mul_(self.beta2).addcmul_(delta, delta, value=1 - self.beta2)


@dataclass
class FedYogi(_Adaptive):
    """v = v - (1 - beta2) delta^2 sign(v - delta^2): v grows as fast as Adam's, shrinks slower."""

    name: ClassVar[str] = "fedyogi"

    def _second_moment(self, v: torch.Tensor, delta: torch.Tensor) -> None:
        d2 = delta * delta
        v.sub_(d2 * torch.sign(v - d2), alpha=1 - self.beta2)


@dataclass
class FedAdagrad(_Adaptive):
    """v = v + delta^2 (beta2 is not used)."""

    name: ClassVar[str] = "fedadagrad"

    def _second_moment(self, v: torch.Tensor, delta: torch.Tensor) -> None:
        v.addcmul_(delta, delta)


SERVER_OPTIMIZERS: dict[str, type[ServerOptimizer]] = {
    cls.name: cls for cls in (FedAvg, FedAvgM, FedAdam, FedYogi, FedAdagrad)
}


def build_server_optimizer(fed: FedConfig) -> ServerOptimizer:
    """The rule named by ``fed.server_opt`` with its ``fed.server_*`` hyperparameters."""
    cls = SERVER_OPTIMIZERS[fed.server_opt]
    if cls is FedAvg:
        return FedAvg()
    if cls is FedAvgM:
        return FedAvgM(lr=fed.server_lr, momentum=fed.server_momentum)
    return cls(lr=fed.server_lr, beta1=fed.server_momentum, beta2=fed.server_beta2, tau=fed.server_tau)


class RuleServer:
    """The server step without privacy: nothing to do without a usable update; else the rules'
    server halves turn the average into the one the server rule steps toward, in order."""

    def __init__(self, rule: ServerOptimizer, rules: Sequence[UpdateRule] = ()):
        self.rule, self.rules = rule, list(rules)

    def step(self, global_flat: torch.Tensor, agg: Aggregate) -> torch.Tensor | None:
        if not agg.usable:
            return None
        average = agg.average
        for rule in self.rules:
            average = rule.on_server(global_flat, average, agg)
        return self.rule.step(global_flat, average)

    def state_dict(self) -> dict[str, Any]:
        return self.rule.state_dict()

    def load_state_dict(self, state: dict[str, Any], device: torch.device) -> None:
        self.rule.load_state_dict(state, device)

    def extra_state(self) -> dict[str, Any]:
        return {}

    def load_extra_state(self, extra: dict[str, Any]) -> None:
        pass

    def metrics(self) -> dict[str, Any]:
        return {}
