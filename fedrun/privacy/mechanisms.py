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
When a mechanism is built, before any process group: ``privacy.noise_multiplier = 0`` is solved
from the target (``accountant.solve_noise``; ``Mechanism.cfg`` / ``run_config`` hold the solved
value, ``identity`` puts it in every checkpoint), the budget is checked (``check_budget``), and
client level warns when one round's noise outweighs the clients' average
(``client_dp.noise_to_signal`` > 1).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import torch

from ..adapters import make_trainable
from ..config import Config
from ..dist import launch_rank
from ..flat import num_flat
from ..models import build_model
from ..parts import Aggregate, Participation, ServerStep, UpdateRule
from . import accountant, client_dp
from .dp_sgd import DPSGDTrainer

EPSILON_EVERY = 10  # rounds between the epsilons in metrics.jsonl (and the last round's)


class _LedgerServer:
    """A server step wrapped with a privacy ledger (and its checkpoint entry and metrics).

    The round's record carries the epsilon spent so far every EPSILON_EVERY rounds and in the
    last round, not every round: the PRV accountant takes 0.1-0.2 s of CPU per ledger entry, 1-2 s
    a round for the digits' 10 clients at sample level, as long as the default's round itself
    (summary.json has the final figure in any case)."""

    def __init__(self, inner: ServerStep, cfg: Config, ledger: accountant.PrivacyLedger):
        self.inner, self.cfg, self.ledger = inner, cfg, ledger
        self.round = 0  # the last round stepped

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
        if self.round % EPSILON_EVERY and self.round != self.cfg.fed.rounds:
            return self.inner.metrics()
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
        self.round = agg.round
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
        self.round = agg.round
        self.ledger.record(accountant.FEDERATION, pv.noise_multiplier, self.q, 1)
        delta_sum = agg.total - agg.weight * global_flat
        noised = global_flat + client_dp.noisy_update(delta_sum, pv.noise_multiplier, pv.clip,
                                                      self.cfg.fed.num_clients, self.q, self.cfg.run.seed,
                                                      agg.round)
        return self.inner.step(global_flat, replace(agg, average=noised, usable=True))


class Mechanism:
    """No privacy: every part as given."""

    cfg: Config | None = None  # a privacy level's config, with the solved noise if it was solved
    ledger: accountant.PrivacyLedger | None = None
    solved = False  # privacy.noise_multiplier was 0: self.cfg holds the solved one
    noised: int | None = None  # client level: numbers that get DP-FedAvg's noise (None: unknown)

    def run_config(self, cfg: Config) -> Config:
        """The config the round's parts train with: ``cfg`` itself, or with the solved noise."""
        return cfg if self.cfg is None else self.cfg

    def identity(self) -> dict[str, str]:
        """What a resumed run must match besides its config (fedrun.checkpoint.Checkpointer): the
        solved noise multiplier, when it was solved (more rounds would solve another)."""
        if not self.solved:
            return {}
        pv = self.cfg.privacy
        return {"privacy.noise_multiplier": f"a noise multiplier of {pv.noise_multiplier:g} solved "
                                            f"from privacy.target_epsilon = {pv.target_epsilon:g}"}

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
        pv, f = self.cfg.privacy, self.cfg.fed
        out = {"level": pv.level, "accountant": pv.accountant,
               "delta": pv.delta, "noise_multiplier": pv.noise_multiplier,
               "noise_multiplier_solved": self.solved, "target_epsilon": pv.target_epsilon,
               "clip": pv.clip, "epsilon_max": self.ledger.max_epsilon(pv.delta),
               "epsilon_per_client": (self.ledger.epsilons(pv.delta) if pv.level == "sample" else {})}
        if pv.level == "client":
            q = accountant.client_level_rate(self.cfg)
            out["expected_clients_per_round"] = q * f.num_clients
            out["noise_std"] = client_dp.noise_std(pv.noise_multiplier, pv.clip, f.num_clients, q)
            if self.noised is not None:
                out["noised_numbers"] = self.noised
                out["noise_to_signal"] = client_dp.noise_to_signal(pv.noise_multiplier, self.noised,
                                                                   f.num_clients, q)
        return out


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


def noised_numbers(cfg: Config, num_classes: int) -> int:
    """How many numbers DP-FedAvg noises: the flat model (fedrun.flat: what trains, and the float
    buffers) of ``cfg``, counted on a model built on the meta device (no memory, no weights)."""
    with torch.device("meta"):
        model = build_model(cfg.model, cfg.data.channels, num_classes)
        make_trainable(model, cfg.model, cfg.run.seed)
    return num_flat(model)


def build_mechanism(cfg: Config, sizes: Sequence[int], plan: Sequence[Sequence[int]] | None = None,
                    num_classes: int | None = None) -> Mechanism:
    """The mechanism of ``privacy.level``, before any process group or GPU: the noise solved when
    ``privacy.noise_multiplier = 0`` (one line says which), the planned budget checked, and at
    client level a warning when one round's noise outweighs the clients' average (needs
    ``num_classes``, to count the noised numbers). ``plan``: the clients of every round, known
    in advance at sample level."""
    if cfg.privacy.level == "none":
        return Mechanism()
    participation = plan if cfg.privacy.level == "sample" else None
    solved = accountant.solve_noise(cfg, list(sizes), participation)
    if solved is not None:
        cfg = replace(cfg, privacy=replace(cfg.privacy, noise_multiplier=solved))
    eps = accountant.check_budget(cfg, list(sizes), participation)
    mechanism = LEVELS[cfg.privacy.level](cfg, sizes)
    mechanism.solved = solved is not None
    pv, f = cfg.privacy, cfg.fed
    unit = "the worst client" if pv.level == "sample" else "the federation"
    if solved is not None and launch_rank() == 0:
        print(f"fedrun: privacy.noise_multiplier = {solved:g}, solved from privacy.target_epsilon = "
              f"{pv.target_epsilon:g}: the smallest (to 0.01) that keeps the planned {f.rounds} rounds "
              f"within it (epsilon {eps:.3g} for {unit}, delta {pv.delta:g}, {pv.accountant} "
              f"accountant)", flush=True)
    if pv.level == "client" and num_classes is not None:
        mechanism.noised = noised_numbers(cfg, num_classes)
        q = accountant.client_level_rate(cfg)
        ratio = client_dp.noise_to_signal(pv.noise_multiplier, mechanism.noised, f.num_clients, q)
        if ratio > 1:
            needed = pv.noise_multiplier * mechanism.noised ** 0.5
            warnings.warn(
                f"privacy.level: client-level DP expects q N = {q * f.num_clients:g} clients per round; "
                f"its noise (std z * clip / (q N) on each of the {mechanism.noised:,} noised numbers) "
                f"has {ratio:.3g}x the norm of the largest step their average can take (noise-to-signal "
                f"z sqrt(P) / (q N), z = {pv.noise_multiplier:g}): expect the model to degrade; it takes "
                f"about {needed:,.0f} clients per round (fed.num_clients, fed.clients_per_round) or fewer "
                f"noised numbers (model.trainable) to reach 1", stacklevel=2)
    return mechanism
