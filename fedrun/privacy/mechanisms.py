"""A privacy level as composable parts of the round (``privacy.level``).

A mechanism contributes to the parts ``fedrun.train`` builds (fedrun.parts), and the round
loop never asks which level it runs:

=============  ===============================  ==========================================
               ``SampleLevel`` (DP-SGD)          ``ClientLevel`` (DP-FedAvg)
=============  ===============================  ==========================================
participation  unchanged (uniform)              Poisson, rate q = clients_per_round / N
trainer        DP-SGD (Opacus) in every client   unchanged
update chain   -                                 clip theta_k - theta to privacy.clip, weight 1
server step    records each participant's        adds noise (seed, round), records one step
               steps in its ledger               of the federation's ledger
=============  ===============================  ==========================================

Both keep a ``PrivacyLedger`` (accountant.py): the same on every rank, since who trains and
for how many noisy steps follows from the config alone; checkpointed as the "privacy" extra.
The budget check (``check_budget``) runs when a mechanism is built, before any process group.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import torch

from ..config import Config
from ..parts import Aggregate, Participation, ServerStep, UpdateRule
from . import accountant, client_dp
from .dp_sgd import DPSGDTrainer


class _LedgerServer:
    """A server step wrapped with a privacy ledger (and its checkpoint entry and metrics)."""

    def __init__(self, inner: ServerStep, cfg: Config, ledger: accountant.PrivacyLedger):
        self.inner, self.cfg, self.ledger = inner, cfg, ledger

    def state_dict(self) -> dict[str, Any]:
        return self.inner.state_dict()

    def load_state_dict(self, state: dict[str, Any], device: torch.device) -> None:
        self.inner.load_state_dict(state, device)

    def extra_state(self) -> dict[str, Any]:
        return {**self.inner.extra_state(), "privacy": self.ledger}

    def load_extra_state(self, extra: dict[str, Any]) -> None:
        self.inner.load_extra_state(extra)
        if "privacy" in extra:
            self.ledger.load_state_dict(extra["privacy"])

    def metrics(self) -> dict[str, Any]:
        delta = self.cfg.privacy.delta
        per_client = self.ledger.epsilons(delta) if self.cfg.privacy.level == "sample" else {}
        return {**self.inner.metrics(), "epsilon": self.ledger.max_epsilon(delta),  # the worst client
                "epsilon_per_client": per_client}


class SampleLevelServer(_LedgerServer):
    """Records, each round, every participant's E * ceil(n_k / B) noisy steps at rate B / n_k."""

    def __init__(self, inner: ServerStep, cfg: Config, ledger: accountant.PrivacyLedger,
                 sizes: Sequence[int]):
        super().__init__(inner, cfg, ledger)
        self.sizes = list(sizes)

    def step(self, global_flat: torch.Tensor, agg: Aggregate) -> torch.Tensor | None:
        for k in agg.clients:
            if self.sizes[k]:
                q, steps = accountant.sample_level_step(self.sizes[k], self.cfg.optim.batch_size,
                                                        self.cfg.fed.local_epochs)
                self.ledger.record(k, self.cfg.privacy.noise_multiplier, q, steps)
        return self.inner.step(global_flat, agg)


class ClientLevelServer(_LedgerServer):
    """DP-FedAvg's server: theta + sum of clipped updates / (q N) + noise, even with no client."""

    def __init__(self, inner: ServerStep, cfg: Config, ledger: accountant.PrivacyLedger, q: float):
        super().__init__(inner, cfg, ledger)
        self.q = q

    def step(self, global_flat: torch.Tensor, agg: Aggregate) -> torch.Tensor | None:
        pv = self.cfg.privacy
        self.ledger.record(accountant.FEDERATION, pv.noise_multiplier, self.q, 1)
        delta_sum = agg.total - agg.weight * global_flat
        noised = global_flat + client_dp.noisy_update(delta_sum, pv.noise_multiplier, pv.clip,
                                                      self.cfg.fed.num_clients, self.q, self.cfg.run.seed,
                                                      agg.round)
        return self.inner.step(global_flat, replace(agg, average=noised, usable=True))


class Mechanism:
    """No privacy: every part as given."""

    ledger: accountant.PrivacyLedger | None = None

    def participation(self, default: Participation) -> Participation:
        return default

    def trainer_class(self, default: type) -> type:
        return default

    def rules(self) -> list[UpdateRule]:
        return []

    def wrap_server(self, server: ServerStep) -> ServerStep:
        return server

    def summary(self) -> dict[str, Any] | None:
        """summary.json's "privacy" block (None without privacy)."""
        if self.ledger is None:
            return None
        return {"level": self.cfg.privacy.level, "accountant": self.cfg.privacy.accountant,
                "delta": self.cfg.privacy.delta, "noise_multiplier": self.cfg.privacy.noise_multiplier,
                "clip": self.cfg.privacy.clip, "epsilon_max": self.ledger.max_epsilon(self.cfg.privacy.delta),
                "epsilon_per_client": (self.ledger.epsilons(self.cfg.privacy.delta)
                                       if self.cfg.privacy.level == "sample" else {})}


class SampleLevel(Mechanism):
    """DP-SGD in every client: one image (a patient) is the unit protected."""

    def __init__(self, cfg: Config, sizes: Sequence[int]):
        self.cfg, self.sizes = cfg, list(sizes)
        self.ledger = accountant.PrivacyLedger(cfg.privacy.accountant)

    def trainer_class(self, default: type) -> type:
        return DPSGDTrainer

    def wrap_server(self, server: ServerStep) -> ServerStep:
        return SampleLevelServer(server, self.cfg, self.ledger, self.sizes)


class ClientLevel(Mechanism):
    """DP-FedAvg: one whole client (a site) is the unit protected."""

    def __init__(self, cfg: Config, sizes: Sequence[int]):
        self.cfg = cfg
        self.q = accountant.client_level_rate(cfg)  # DP-FedAvg's Poisson rate of clients
        self.ledger = accountant.PrivacyLedger(cfg.privacy.accountant)

    def participation(self, default: Participation) -> Participation:
        return client_dp.PoissonParticipation(self.cfg.fed.num_clients, self.q, self.cfg.run.seed)

    def rules(self) -> list[UpdateRule]:
        return [client_dp.ClipUpdate(self.cfg.privacy.clip)]

    def wrap_server(self, server: ServerStep) -> ServerStep:
        return ClientLevelServer(server, self.cfg, self.ledger, self.q)


LEVELS: dict[str, type[Mechanism]] = {"sample": SampleLevel, "client": ClientLevel}


def build_mechanism(cfg: Config, sizes: Sequence[int],
                    plan: Sequence[Sequence[int]] | None = None) -> Mechanism:
    """The mechanism of ``privacy.level``, after checking the planned budget (before any process
    group or GPU). ``plan``: the clients of every round, known in advance at sample level."""
    if cfg.privacy.level == "none":
        return Mechanism()
    accountant.check_budget(cfg, list(sizes), plan if cfg.privacy.level == "sample" else None)
    return LEVELS[cfg.privacy.level](cfg, sizes)
