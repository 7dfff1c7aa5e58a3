"""Server rules: how the global model moves, given the weighted average of the client models.

Every rule sees the same two flat vectors each round: ``global_flat`` (x_t, the model the clients
started from) and ``average`` (sum_k n_k x_k / sum_k n_k). Plain FedAvg returns the average.
The others follow Reddi et al., "Adaptive Federated Optimization" (ICLR 2021), Algorithm 2,
and treat

    delta_t = x_t - average            (a pseudo-gradient: the server descends along it)

so that a step is x_{t+1} = x_t - server_lr * (something built from delta). With that sign,
FedAvgM with momentum 0 and lr 1 is FedAvg again. Moments start at zero, as in Flower; Reddi et
al.'s v_{-1} >= tau^2 only matters for the very first step, where tau keeps the denominator away
from zero anyway.

Each rule is a small class with its hyperparameters as named fields and its state (the
moments) as tensors that ``state_dict`` hands to the checkpoint; resuming restores them exactly.
It registers itself in ``SERVER_RULES`` (``fed.server_opt``) with its settings, the
``fed.server_*`` keys it reads (fedrun.registry); ``build_server_optimizer`` builds the chosen one.

``RuleServer`` is the round's server step (fedrun.parts.ServerStep): the update rules' server
halves (SCAFFOLD's control variate, FedDyn's correction) and then the server rule. Privacy wraps
it (fedrun.privacy.mechanisms).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from ..config import FEDERATED, Config, ConfigError
from ..parts import Aggregate, ServerHalf, UpdateRule
from ..registry import Registry, Settings

SERVER_RULES = Registry(
    "fed.server_opt", "fedavg", "Server rule: \"fedavg\" | \"fedavgm\" (server momentum) | "
    "\"fedadam\" | \"fedyogi\" | \"fedadagrad\" (Reddi et al. 2021); fedrun/federated/server.py.",
    applies=FEDERATED)


@dataclass
class ServerLRSettings(Settings):
    """The keys every server rule but FedAvg reads."""

    server_lr: float = 1.0
    """Server learning rate (all but fedavg)."""
    server_momentum: float = 0.9
    """fedavgm's momentum; beta1 of fedadam / fedyogi / fedadagrad."""

    def validate(self) -> None:
        if not self.server_lr > 0:
            raise ConfigError(f"fed.server_lr: must be > 0, got {self.server_lr}")
        if not 0 <= self.server_momentum < 1:
            raise ConfigError(f"fed.server_momentum: must be in [0, 1), got {self.server_momentum}")


@dataclass
class AdagradSettings(ServerLRSettings):
    """FedAdagrad's keys: its adaptivity besides the learning rate and momentum."""

    server_tau: float = 1e-3
    """Adaptivity of fedadam / fedyogi / fedadagrad: x -= lr * m / (sqrt(v) + tau)."""

    def validate(self) -> None:
        super().validate()
        if not self.server_tau > 0:
            raise ConfigError("fed.server_tau: must be > 0 (it keeps 1 / (sqrt(v) + tau) finite), got "
                              f"{self.server_tau}")


@dataclass
class AdaptiveSettings(AdagradSettings):
    """FedAdam's and FedYogi's keys: a second-moment decay as well."""

    server_beta2: float = 0.99
    """Second-moment decay of fedadam / fedyogi."""

    def validate(self) -> None:
        super().validate()
        if not 0 <= self.server_beta2 < 1:
            raise ConfigError(f"fed.server_beta2: must be in [0, 1), got {self.server_beta2}")


@dataclass
class ServerOptimizer:
    """Base: no state, subclasses implement ``step``; ``from_settings`` builds one from its
    registered settings."""

    name: ClassVar[str] = ""
    state: dict[str, torch.Tensor] = field(default_factory=dict, init=False, repr=False)

    @classmethod
    def from_settings(cls, settings: Any) -> ServerOptimizer:
        return cls()

    def step(self, global_flat: torch.Tensor, average: torch.Tensor) -> torch.Tensor:
        """The next global model, as a new flat tensor (``global_flat`` is not changed)."""
        raise NotImplementedError

    def _moment(self, key: str, like: torch.Tensor) -> torch.Tensor:
        return self.state.setdefault(key, torch.zeros_like(like))

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.cpu() for k, v in self.state.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor], device: torch.device) -> None:
        self.state = {k: v.to(device) for k, v in state.items()}


@SERVER_RULES.register("fedavg")
@dataclass
class FedAvg(ServerOptimizer):
    """McMahan et al. 2017: the next global model is the weighted average of the clients'."""

    name: ClassVar[str] = "fedavg"

    def step(self, global_flat: torch.Tensor, average: torch.Tensor) -> torch.Tensor:
        return average.clone()


@SERVER_RULES.register("fedavgm", ServerLRSettings)
@dataclass
class FedAvgM(ServerOptimizer):
    """Hsu et al. 2019, server momentum: m = momentum * m + delta; x = x - lr * m."""

    name: ClassVar[str] = "fedavgm"
    lr: float = 1.0
    """server learning rate (``fed.server_lr``)"""
    momentum: float = 0.9
    """heavy-ball momentum of the pseudo-gradient (``fed.server_momentum``)"""

    @classmethod
    def from_settings(cls, settings: ServerLRSettings) -> FedAvgM:
        return cls(lr=settings.server_lr, momentum=settings.server_momentum)

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

    @classmethod
    def from_settings(cls, settings: AdagradSettings) -> _Adaptive:
        return cls(lr=settings.server_lr, beta1=settings.server_momentum,
                   beta2=getattr(settings, "server_beta2", cls.beta2), tau=settings.server_tau)

    def _second_moment(self, v: torch.Tensor, delta: torch.Tensor) -> None:
        raise NotImplementedError

    def step(self, global_flat: torch.Tensor, average: torch.Tensor) -> torch.Tensor:
        delta = global_flat - average
        m, v = self._moment("m", delta), self._moment("v", delta)
        m.mul_(self.beta1).add_(delta, alpha=1 - self.beta1)
        self._second_moment(v, delta)
        return global_flat - self.lr * m / (v.sqrt() + self.tau)


@SERVER_RULES.register("fedadam", AdaptiveSettings)
@dataclass
class FedAdam(_Adaptive):
    """Reddi et al. 2021, FedAdam: v = beta2 v + (1 - beta2) delta^2."""

    name: ClassVar[str] = "fedadam"

    def _second_moment(self, v: torch.Tensor, delta: torch.Tensor) -> None:
        v.mul_(self.beta2).addcmul_(delta, delta, value=1 - self.beta2)


@SERVER_RULES.register("fedyogi", AdaptiveSettings)
@dataclass
class FedYogi(_Adaptive):
    """Reddi et al. 2021, FedYogi: v = v - (1 - beta2) delta^2 sign(v - delta^2), which grows as fast
    as Adam's v and shrinks slower."""

    name: ClassVar[str] = "fedyogi"

    def _second_moment(self, v: torch.Tensor, delta: torch.Tensor) -> None:
        d2 = delta * delta
        v.sub_(d2 * torch.sign(v - d2), alpha=1 - self.beta2)


@SERVER_RULES.register("fedadagrad", AdagradSettings)
@dataclass
class FedAdagrad(_Adaptive):
    """Reddi et al. 2021, FedAdagrad: v = v + delta^2."""

    name: ClassVar[str] = "fedadagrad"

    def _second_moment(self, v: torch.Tensor, delta: torch.Tensor) -> None:
        v.addcmul_(delta, delta)


def build_server_optimizer(cfg: Config) -> ServerOptimizer:
    """The rule ``fed.server_opt`` names, with its settings."""
    choice = SERVER_RULES.selected(cfg)
    return choice.target.from_settings(SERVER_RULES.settings(cfg))


class RuleServer:
    """The server step without privacy: nothing to do without a usable update; else the rules'
    server halves turn the average into the one the server rule steps toward, in order."""

    def __init__(self, rule: ServerOptimizer, rules: Sequence[UpdateRule] = ()):
        self.rule = rule
        self.rules = [r for r in rules if isinstance(r, ServerHalf)]  # the update chain's server halves

    def step(self, global_flat: torch.Tensor, agg: Aggregate) -> torch.Tensor | None:
        if not agg.usable:
            return None
        # FedBuff's sum holds changes from each client's start version: step toward theta + their mean
        average = global_flat + agg.average if agg.changes else agg.average
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
