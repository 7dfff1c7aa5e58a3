"""Privacy mechanisms as objects that wrap the parts of the round they change (``privacy.level``).

A mechanism is built once, before any process group (``build_mechanism``), and wraps the parts
``fedrun.train`` builds (fedrun.parts); the round loop never asks which mechanism runs, and
nothing outside ``fedrun/privacy/`` asks either (pfl-research's shape):

=============  ===============================  ==========================================
               ``SampleLevel`` (DP-SGD)          ``ClientLevel`` (DP-FedAvg)
=============  ===============================  ==========================================
participation  unchanged (uniform)              Poisson, rate q = clients_per_round / N
trainer        its local training becomes        unchanged
               DP-SGD (Opacus)
update chain   -                                 clip theta_k - theta to privacy.clip, weight 1
server step    records each participant's        adds noise (seed, round), records one step
               steps in its ledger               of the federation's ledger
accounting     a ledger per client               one ledger for the federation
=============  ===============================  ==========================================

Each registers itself in ``PRIVACY`` (fedrun.registry) with its keys (``privacy.clip``, ...) and
its checks (what it cannot carry: SCAFFOLD's unprotected control variates, over-selection, ...).
Both keep a ``PrivacyLedger`` (accountant.py): the same on every rank, since who trains and for
how many noisy steps follows from the config alone; checkpointed as the "privacy" extra. What a
mechanism composes for the accountant (``planned``: the ledger of the planned run) is its own, so
the accountant's budget check, its noise solver and the run's summary need no branch either.

When a mechanism is built: ``privacy.noise_multiplier = 0`` is solved from the target
(``accountant.solve_noise``) and written into the run's config (``Mechanism.cfg``: the one config
the run trains, checkpoints and records with from then on), the budget is checked
(``check_budget``), and client level warns when one round's noise outweighs the clients'
average (``client_dp.noise_to_signal`` > 1).
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any, ClassVar

import torch

from .. import seeding
from ..adapters import make_trainable
from ..config import ALWAYS, HASHED_WHEN_SET, Config, ConfigError, setting
from ..dist import launch_rank
from ..flat import Encoder, flatten, num_flat
from ..local_training import ShardTrainer
from ..models import build_model
from ..parts import Aggregate, ClientTrainer, ClientUpdate, Participation, ServerStep, UpdateRule
from ..registry import Registry, Settings, registries
from . import accountant, client_dp
from . import distributed_dp as ddp
from .base import Mechanism, Stack
from .dp_sgd import clipped_gradients, train_local_dp
from .secure_sum import SECURE_AGG, SecAggSettings, resolved_graph

EPSILON_EVERY = 10  # rounds between the epsilons in metrics.jsonl (and the last round's)

PRIVACY = Registry(
    "privacy.level", "none", "\"none\" | \"sample\" (DP-SGD with Opacus in every client: the image is "
    "the unit) | \"sample_once\" (the image is the unit; a round is one noised step over every "
    "participating client's Poisson batch, the noise added once to the round's sum) | \"client\" "
    "(DP-FedAvg: the site); fedrun/privacy/mechanisms.py. With secure_agg.bits > 0 the noise of "
    "\"sample_once\" and \"client\" is added by the clients in shares on an integer grid (distributed DP).",
    applies=ALWAYS)


@dataclass
class DPSettings(Settings):
    """The keys of every DP mechanism."""

    clip: float = 1.0
    """sample: L2 bound of each per-sample gradient; client: L2 bound of each client's update."""
    noise_multiplier: float = 1.0
    """Gaussian noise std divided by the sensitivity (clip). 0 = solve it: the smallest noise
    multiplier that keeps the planned run within privacy.target_epsilon (the worst client at
    sample level), printed before training and written into the run's config (config.toml,
    checkpoints, summary.json); a resume solves the same value."""
    delta: float = 1e-5
    """The delta of (epsilon, delta)-DP; should be well below 1 / (number of units protected)."""
    target_epsilon: float = 0.0
    """0 = no budget; else a run whose planned epsilon exceeds it is refused before training."""
    accountant: str = setting("prv", hashed=HASHED_WHEN_SET, choices=("rdp", "prv"))
    """Opacus accountant: "prv" (privacy random variables, Gopi et al. 2021: the tightest Opacus
    offers) | "rdp" (Renyi DP, Mironov 2017; hashed only when set, so that run dirs written with
    "rdp", once the default, keep their hash)."""

    def validate(self) -> None:
        if not self.clip > 0:
            raise ConfigError(f"privacy.clip: must be > 0 (an L2 norm bound), got {self.clip}")
        if not (self.noise_multiplier > 0 or (self.noise_multiplier == 0 and self.target_epsilon > 0)):
            raise ConfigError(f"privacy.noise_multiplier: must be > 0 (no noise, no privacy), or 0 to solve "
                              f"the smallest one that fits privacy.target_epsilon (then set that > 0); got "
                              f"{self.noise_multiplier}")
        if not 0 < self.delta < 1:
            raise ConfigError(f"privacy.delta: must be in (0, 1), e.g. 1e-5; got {self.delta}")
        if self.target_epsilon < 0:
            raise ConfigError("privacy.target_epsilon: must be >= 0 (0 = no budget)")


@dataclass
class SampleSettings(DPSettings):
    """DP-SGD's keys: every DP key, and noise multiplicity."""

    multiplicity: int = setting(1, hashed=HASHED_WHEN_SET, off=1)
    """DP-SGD: K noise levels and noise draws per image, their losses averaged inside the image's
    per-sample gradient before clipping (Dockhorn et al. 2023, DPDM): less gradient variance at
    the same epsilon (each image is still one sample), K times the rows. 1 = off."""

    def validate(self) -> None:
        super().validate()
        if self.multiplicity < 1:
            raise ConfigError(f"privacy.multiplicity: must be >= 1 (noise draws per image; 1 = off), got "
                              f"{self.multiplicity}")


# --------------------------------------------------------------------------------------------
# Server steps with a ledger


class _LedgerServer:
    """A server step wrapped with a privacy ledger (and its checkpoint entry and metrics).

    The round's record carries the epsilon spent so far every EPSILON_EVERY rounds and in the
    last round, not every round: the PRV accountant takes 0.1-0.2 s of CPU per ledger entry, 1-2 s
    a round for the digits' 10 clients at sample level, as long as the default's round itself
    (summary.json has the final figure in any case). ``per_client``: report each key's epsilon."""

    per_client: ClassVar[bool] = False

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
        return {**self.inner.metrics(), "epsilon": self.ledger.max_epsilon(delta),  # the worst key
                "epsilon_per_client": self.ledger.epsilons(delta) if self.per_client else {}}


class SampleLevelServer(_LedgerServer):
    """Records, each round, every participant's E * ceil(n_k / B) noisy steps at rate B / n_k."""

    per_client = True

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


# --------------------------------------------------------------------------------------------
# The mechanisms


def _refuse(cfg: Config, flag: str, message: str) -> None:
    """Refuse a chosen method whose class carries ``flag`` (a fact about what it sends or needs):
    one line naming its key, the method and the choices of that key that do not carry it."""
    for reg in registries():
        chosen = reg.selected(cfg)
        if getattr(chosen.target, flag, False):
            targets = {name: reg.choice(name).target for name in reg}
            others = [name for name, target in targets.items()
                      if not (getattr(target, "sends_unprotected", False) or getattr(target, flag, False))]
            text = message.format(name=f"{reg.key} = \"{chosen.name}\"",
                                  others=" or ".join(f"{reg.key} = \"{n}\"" for n in others))
            raise ConfigError(f"{reg.key}: {text}")


def _refuse_multiplicity(cfg: Config) -> None:
    if cfg.privacy.multiplicity != 1:
        raise ConfigError(f"privacy.multiplicity: averages noise draws inside DP-SGD's per-sample "
                          f"gradients: it needs privacy.level = \"sample\" (got {cfg.privacy.level!r}); set "
                          f"privacy.multiplicity = 1")


@PRIVACY.register("none")
class NoPrivacy(Mechanism):
    """No differential privacy: every part as given."""

    @classmethod
    def check(cls, cfg: Config) -> None:
        _refuse_multiplicity(cfg)


def _secure(cfg: Config) -> SecAggSettings | None:
    """Secure aggregation's settings when it runs, else None."""
    return SECURE_AGG.settings(cfg) if cfg.secure_agg.protocol != "none" else None


def _grid_bits(cfg: Config) -> int:
    """Bits of distributed DP's integer grid (0: no grid, the exact fixed-point sum)."""
    s = _secure(cfg)
    return s.bits if s is not None else 0


def poisson_most(expected: float, q: float) -> int:
    """A count that a Poisson-binomial draw of mean ``expected`` (rate q) stays under with room to
    spare (4 standard deviations): what the grid's range is sized for."""
    return max(1, math.ceil(expected + 4 * math.sqrt(max(expected * (1 - q), 0.0))))


class _DifferentialPrivacy(Mechanism):
    """What every DP mechanism refuses, keeps and reports. ``noise_on_grid``: with
    secure_agg.bits > 0 its noise is added by the clients in Skellam shares (``grid``), accounted
    by the Skellam mechanism's RDP (skellam_accountant.py)."""

    noise_on_grid: ClassVar[bool] = False

    def __init__(self, cfg: Config, sizes: Sequence[int]):
        super().__init__(cfg, sizes)
        self.solved = False  # privacy.noise_multiplier was 0 and was solved into self.cfg
        self.ledger = self.new_ledger(cfg, sizes)

    @classmethod
    def grid(cls, cfg: Config, sizes: Sequence[int], noise_multiplier: float) -> ddp.DistributedDP | None:
        """The run's distributed-DP encoding at this noise (None: no grid)."""
        return None

    @classmethod
    def new_ledger(cls, cfg: Config, sizes: Sequence[int]) -> accountant.PrivacyLedger:
        """Opacus's accountant for Gaussian noise; the Skellam accountant for noise on the grid."""
        base = cls.grid(cfg, sizes, 1.0)
        if base is None:
            return accountant.PrivacyLedger(cfg.privacy.accountant)
        cache: dict[tuple[float, float], Any] = {}

        def step_of(z: float, q: float) -> Any:  # the scale (hence the sensitivities) depends on z
            if (z, q) not in cache:
                cache[(z, q)] = base.with_noise(z).step(q)
            return cache[(z, q)]
        return accountant.SkellamLedger(step_of)

    @classmethod
    def check(cls, cfg: Config) -> None:
        if cfg.run.mode != "fedavg":
            raise ConfigError("privacy.level: differential privacy is implemented for federated runs; use "
                              "run.mode = \"fedavg\" or privacy.level = \"none\"")
        _refuse(cfg, "sends_unprotected", "{name}'s extra messages (SCAFFOLD's control variates) travel "
                "without noise beside the update and would leak what DP protects; with privacy use {others}")
        if cfg.fed.over_select > 1:  # dropouts thin the sample independently per client (the
            # epsilon stays an upper bound); keeping the fastest makes one client depend on others
            raise ConfigError("fed.over_select: over-selection keeps the fastest reports, so whether one "
                              "client counts depends on the others: the accountant's (Poisson or uniform) "
                              "sampling no longer holds; set fed.over_select = 1 (availability and "
                              "deadlines are allowed with privacy)")
        if cfg.train.clients_at_once != 1:
            raise ConfigError("train.clients_at_once: DP training runs one client at a time; set "
                              "train.clients_at_once = 1")
        if cfg.secure_agg.bits and cfg.secure_agg.protocol == "none":
            raise ConfigError("secure_agg.bits: noise shares on a grid need secure aggregation (without "
                              "it the aggregator sees each client's update with only its own share of the "
                              "noise); set secure_agg.protocol = \"secagg+\", or secure_agg.bits = 0 for the "
                              "server's noise")

    def summary(self) -> dict[str, Any] | None:
        pv = self.cfg.privacy
        assert self.ledger is not None
        bits = _grid_bits(self.cfg) if self.noise_on_grid else 0
        return {"level": pv.level, "accountant": self.ledger.accountant, "delta": pv.delta,
                "noise_multiplier": pv.noise_multiplier, "noise_multiplier_solved": self.solved,
                "noise": f"distributed Skellam shares, {bits} bits" if bits else "Gaussian",
                "target_epsilon": pv.target_epsilon, "clip": pv.clip,
                "epsilon_max": self.ledger.max_epsilon(pv.delta), "epsilon_per_client": {}}


@PRIVACY.register("sample", SampleSettings)
class SampleLevel(_DifferentialPrivacy):
    """DP-SGD in every client (Opacus): one image (a patient) is the unit protected."""

    unit = "the worst client"

    @classmethod
    def check(cls, cfg: Config) -> None:
        super().check(cfg)
        _refuse_fp16_and_compile(cfg)

    @classmethod
    def planned(cls, cfg: Config, sizes: Sequence[int], participation: Sequence[Sequence[int]] | None,
                rounds: int, noise_multiplier: float) -> accountant.PrivacyLedger:
        """Each client's E * ceil(n_k / B) steps at rate B / n_k in every round it takes part in
        (``participation[r]``: round r + 1's clients; None: every client in every round)."""
        ledger = cls.new_ledger(cfg, sizes)
        for k, n, count in _rounds_per_client(sizes, participation, rounds):
            q, steps = accountant.sample_level_step(int(n), cfg.optim.batch_size, cfg.fed.local_epochs)
            ledger.record(k, noise_multiplier, q, steps * count)
        return ledger

    def wrap_trainer(self, trainer: ClientTrainer) -> ClientTrainer:
        assert isinstance(trainer, ShardTrainer)  # the grouped trainer is refused by check()
        return trainer.using(train_local_dp)

    def wrap_server(self, server: ServerStep) -> ServerStep:
        return SampleLevelServer(server, self.cfg, self.ledger, self.sizes)

    def summary(self) -> dict[str, Any] | None:
        out = super().summary()
        assert out is not None
        out["epsilon_per_client"] = self.ledger.epsilons(self.cfg.privacy.delta)
        return out


def _refuse_fp16_and_compile(cfg: Config) -> None:
    if cfg.train.precision == "fp16":
        raise ConfigError("train.precision: DP-SGD clips per-sample gradients that fp16's GradScaler "
                          "would scale; use bf16 (or auto) or fp32")
    if cfg.train.compile:
        raise ConfigError("train.compile: Opacus's per-sample gradient hooks do not go through "
                          "torch.compile; set train.compile = false")


def _rounds_per_client(sizes: Sequence[int], participation: Sequence[Sequence[int]] | None,
                       rounds: int) -> list[tuple[int, int, int]]:
    """(client, its images, the rounds of the first ``rounds`` it takes part in) for every
    client with data that takes part (``participation``: each round's clients; None: all, always)."""
    counts = [rounds] * len(sizes)
    if participation is not None:
        counts = [0] * len(sizes)
        for clients in list(participation)[:rounds]:
            for k in clients:
                counts[k] += 1
    return [(k, int(n), counts[k]) for k, n in enumerate(sizes) if n > 0 and counts[k] > 0]


@PRIVACY.register("sample_once", SampleSettings)
class SampleOnce(_DifferentialPrivacy):
    """The image is the unit; a round is one noised step over every participating client's
    Poisson batch, the noise added once to the round's sum (by the server, or in shares by the
    clients on secure aggregation's grid), the server's optimizer applied to the noised mean."""

    unit = "the worst client"
    noise_on_grid = True
    shows_local_models = False  # clients send gradients, not trained local models

    @classmethod
    def check(cls, cfg: Config) -> None:
        super().check(cfg)
        _refuse_fp16_and_compile(cfg)
        for key, needed, why in (
                ("fed.drift", "none", "a client takes no local step for a drift term to correct"),
                ("fed.compress", "none", "the clipped gradients are encoded on secure aggregation's grid"),
                ("fed.client_optimizer", "reset", "the optimizer is the server's")):
            section, _, name = key.partition(".")
            if getattr(getattr(cfg, section), name) != needed:
                raise ConfigError(f"{key}: privacy.level = \"sample_once\" sends each client's clipped "
                                  f"gradients, not a trained model: {why}; set {key} = \"{needed}\"")
        if cfg.fed.server_opt == "fedavg":
            raise ConfigError("fed.server_opt: privacy.level = \"sample_once\" steps the server's optimizer "
                              "along the round's noised mean gradient; set fed.server_opt = \"fedadam\" (and "
                              "fed.server_lr, e.g. the clients' optim.lr)")

    @classmethod
    def grid(cls, cfg: Config, sizes: Sequence[int], noise_multiplier: float) -> ddp.DistributedDP | None:
        secure = _secure(cfg)
        if secure is None or not secure.bits:
            return None
        clients = cfg.fed.clients_per_round
        _, _, survivors = resolved_graph(secure, clients)
        q = _once_rate(cfg, sizes)
        largest = sum(sorted(sizes)[-clients:])  # the most images one round's clients hold
        records = min(largest, poisson_most(q * largest, q))  # the round's largest total batch
        return ddp.DistributedDP(cfg.privacy.clip, noise_multiplier, secure.bits, _flat_numbers(cfg),
                                 clients, survivors, cfg.run.seed, records=records,
                                 survivor_fraction=secure.survivor_fraction)

    @classmethod
    def planned(cls, cfg: Config, sizes: Sequence[int], participation: Sequence[Sequence[int]] | None,
                rounds: int, noise_multiplier: float) -> accountant.PrivacyLedger:
        """Each client's one step at the federation's rate in every round it takes part in."""
        ledger = cls.new_ledger(cfg, sizes)
        q = _once_rate(cfg, sizes)
        for k, _, count in _rounds_per_client(sizes, participation, rounds):
            ledger.record(k, noise_multiplier, q, count)
        return ledger

    def wrap_trainer(self, trainer: ClientTrainer) -> ClientTrainer:
        assert isinstance(trainer, ShardTrainer)  # the grouped trainer is refused by check()
        return trainer.using(clipped_gradients)

    def encoder(self, num_params: int) -> Encoder:
        grid = self.grid(self.cfg, self.sizes, self.cfg.privacy.noise_multiplier)
        if grid is not None:
            return GridEncoder(grid, rows=True)
        return FixedPointRows(num_params, max(sum(self.sizes), 1) * self.cfg.privacy.clip)

    def wrap_server(self, server: ServerStep) -> ServerStep:
        return SampleOnceServer(server, self.cfg, self.ledger, self.sizes, central=self.grid(
            self.cfg, self.sizes, 1.0) is None)

    def summary(self) -> dict[str, Any] | None:
        out = super().summary()
        assert out is not None
        out["epsilon_per_client"] = self.ledger.epsilons(self.cfg.privacy.delta)
        return out


@PRIVACY.register("client", DPSettings)
class ClientLevel(_DifferentialPrivacy):
    """DP-FedAvg (McMahan et al. 2018): one whole client (a site) is the unit protected."""

    unit = "the federation"
    noise_on_grid = True
    shows_local_models = False  # it protects only the noised global model

    def __init__(self, cfg: Config, sizes: Sequence[int]):
        super().__init__(cfg, sizes)
        self.q = accountant.client_level_rate(cfg)  # DP-FedAvg's Poisson rate of clients
        self.noised: int | None = None  # numbers that get the noise (set by build_mechanism)

    @classmethod
    def check(cls, cfg: Config) -> None:
        super().check(cfg)
        _refuse(cfg, "needs_weighted_sum", "{name}'s server correction assumes the data-weighted sum of "
                "unclipped client updates, which DP-FedAvg (privacy.level = \"client\") replaces by clipped, "
                "uniformly weighted ones; use {others}, or privacy.level = \"sample\"")
        _refuse_multiplicity(cfg)
        if cfg.eval.local_models_at or cfg.eval.client_samples:
            raise ConfigError("eval.local_models_at: client-level DP protects only the noised global model; "
                              "local models and their samples are not private: set eval.local_models_at = "
                              "[] and eval.client_samples = 0")

    @classmethod
    def grid(cls, cfg: Config, sizes: Sequence[int], noise_multiplier: float) -> ddp.DistributedDP | None:
        secure = _secure(cfg)
        if secure is None or not secure.bits:
            return None
        q = accountant.client_level_rate(cfg)
        clients = min(cfg.fed.num_clients, poisson_most(q * cfg.fed.num_clients, q))
        _, _, survivors = resolved_graph(secure, cfg.fed.clients_per_round)
        return ddp.DistributedDP(cfg.privacy.clip, noise_multiplier, secure.bits, _flat_numbers(cfg),
                                 clients, survivors, cfg.run.seed, survivor_fraction=secure.survivor_fraction)

    @classmethod
    def planned(cls, cfg: Config, sizes: Sequence[int], participation: Sequence[Sequence[int]] | None,
                rounds: int, noise_multiplier: float) -> accountant.PrivacyLedger:
        """One step of the Poisson-subsampled mechanism per round, for the federation."""
        ledger = cls.new_ledger(cfg, sizes)
        ledger.record(accountant.FEDERATION, noise_multiplier, accountant.client_level_rate(cfg), rounds)
        return ledger

    def wrap_participation(self, participation: Participation) -> Participation:
        return client_dp.PoissonParticipation(self.cfg.fed.num_clients, self.q, self.cfg.run.seed)

    def update_rules(self) -> list[UpdateRule]:
        return [client_dp.ClipUpdate(self.cfg.privacy.clip)]

    def encoder(self, num_params: int) -> Encoder | None:
        grid = self.grid(self.cfg, self.sizes, self.cfg.privacy.noise_multiplier)
        return None if grid is None else GridEncoder(grid, rows=False)

    def wrap_server(self, server: ServerStep) -> ServerStep:
        if self.grid(self.cfg, self.sizes, 1.0) is not None:
            return DistributedClientLevelServer(server, self.cfg, self.ledger, self.q)
        return ClientLevelServer(server, self.cfg, self.ledger, self.q)

    def summary(self) -> dict[str, Any] | None:
        out = super().summary()
        assert out is not None
        pv, f = self.cfg.privacy, self.cfg.fed
        out["expected_clients_per_round"] = self.q * f.num_clients
        out["noise_std"] = client_dp.noise_std(pv.noise_multiplier, pv.clip, f.num_clients, self.q)
        if self.noised is not None:
            out["noised_numbers"] = self.noised
            out["noise_to_signal"] = client_dp.noise_to_signal(pv.noise_multiplier, self.noised,
                                                               f.num_clients, self.q)
        return out

    def warn_noise_to_signal(self, num_classes: int) -> None:
        """Warn when one round's noise outweighs the most the clients' average can move."""
        pv, f = self.cfg.privacy, self.cfg.fed
        self.noised = noised_numbers(self.cfg, num_classes)
        ratio = client_dp.noise_to_signal(pv.noise_multiplier, self.noised, f.num_clients, self.q)
        if ratio > 1:
            needed = pv.noise_multiplier * self.noised ** 0.5
            warnings.warn(
                f"privacy.level: client-level DP expects q N = {self.q * f.num_clients:g} clients per round; "
                f"its noise (std z * clip / (q N) on each of the {self.noised:,} noised numbers) has "
                f"{ratio:.3g}x the norm of the largest step their average can take (noise-to-signal "
                f"z sqrt(P) / (q N), z = {pv.noise_multiplier:g}): expect the model to degrade; it takes "
                f"about {needed:,.0f} clients per round (fed.num_clients, fed.clients_per_round) or fewer "
                f"noised numbers (model.trainable) to reach 1", stacklevel=3)


# --------------------------------------------------------------------------------------------
# What a client's update becomes in the round's sum, and the servers that read it


class GridEncoder:
    """Distributed DP's encoding as the buffer's encoder (fedrun.flat.Encoder): a client's update
    (client level: theta_k - theta, one record) or its clipped per-example gradients (sample
    level: the rows of its message) clipped, rotated, rounded, with its Skellam share, on the
    2^bits grid; the sum decoded back to the sum of the records plus the noise."""

    def __init__(self, grid: ddp.DistributedDP, rows: bool):
        self.grid, self.rows, self.size = grid, rows, grid.padded_dim
        self.round_clients = 0  # the clients of the round: its shares' size (grid.noise_survivors)

    def begin_round(self, round_: int, selected: Sequence[int]) -> None:
        self.round_clients = len(selected)

    def encode(self, update: ClientUpdate) -> torch.Tensor:
        if self.rows:
            assert update.message is not None
            records = update.message
        else:
            records = flatten(update.model) - update.global_flat
        return self.grid.encode(records, update.round, update.client,
                                self.round_clients).to(update.global_flat.device)

    def decode(self, summed: torch.Tensor, round_: int) -> torch.Tensor:
        return self.grid.decode(summed, round_).float().to(summed.device)


class FixedPointRows:
    """A client's rows of records summed and sent as int64 fixed point (no grid: the noise is the
    server's, once, on the sum); ``largest`` bounds any coordinate of the round's sum."""

    def __init__(self, num_params: int, largest: float):
        self.size = num_params
        self.scale = 2.0 ** (61 - max(0, math.ceil(math.log2(largest + 1))))

    def begin_round(self, round_: int, selected: Sequence[int]) -> None:
        """Nothing to size: the server adds the noise, once, to the unmasked sum."""

    def encode(self, update: ClientUpdate) -> torch.Tensor:
        assert update.message is not None
        return (update.message.sum(dim=0).double() * self.scale).round().to(torch.int64)

    def decode(self, summed: torch.Tensor, round_: int) -> torch.Tensor:
        return (summed.double() / self.scale).float()


class DistributedClientLevelServer(_LedgerServer):
    """DP-FedAvg with distributed noise: the decoded sum already carries the noise (the clients'
    Skellam shares); theta + sum / (q N). A round without enough survivors was abandoned."""

    def __init__(self, inner: ServerStep, cfg: Config, ledger: accountant.PrivacyLedger, q: float):
        super().__init__(inner, cfg, ledger)
        self.q = q

    def step(self, global_flat: torch.Tensor, agg: Aggregate) -> torch.Tensor | None:
        self.round = agg.round
        self.ledger.record(accountant.FEDERATION, self.cfg.privacy.noise_multiplier, self.q, 1)
        if agg.delta_sum is None or agg.abandoned:
            return None
        step = agg.delta_sum / (self.q * self.cfg.fed.num_clients)
        return self.inner.step(global_flat, replace(agg, average=global_flat + step, usable=True))


class SampleOnceServer(_LedgerServer):
    """The round's one noised step: the sum of the participants' clipped per-example gradients
    (with its noise: the clients' shares, or, ``central``, N(0, (z clip)^2) the server adds from
    (seed, round)), divided by the round's expected batch q sum_k n_k (q the federation's rate,
    accountant.sample_once_rate), is the gradient the server rule descends (its pseudo-gradient
    theta - average). Each participant's images are one subsampled step in its ledger."""

    per_client = True

    def __init__(self, inner: ServerStep, cfg: Config, ledger: accountant.PrivacyLedger,
                 sizes: Sequence[int], central: bool):
        super().__init__(inner, cfg, ledger)
        self.sizes, self.central = list(sizes), central

    def step(self, global_flat: torch.Tensor, agg: Aggregate) -> torch.Tensor | None:
        pv = self.cfg.privacy
        self.round = agg.round
        takers = [k for k in agg.clients if self.sizes[k]]
        q = _once_rate(self.cfg, self.sizes)
        for k in takers:
            self.ledger.record(k, pv.noise_multiplier, q, 1)
        if agg.delta_sum is None or agg.abandoned or not takers:
            return None
        total = agg.delta_sum
        if self.central:
            g = seeding.stream_generator("cpu", "sample_once_noise", seed=self.cfg.run.seed, round=agg.round)
            noise = torch.randn(total.numel(), generator=g) * (pv.noise_multiplier * pv.clip)
            total = total + noise.to(total.device)
        expected = q * sum(self.sizes[k] for k in takers)  # the round's expected batch
        return self.inner.step(global_flat, replace(agg, average=global_flat - total / expected, usable=True))


_FLAT_NUMBERS: dict[str, int] = {}  # the flat model's size per model config (set by build_mechanism)


def _model_key(cfg: Config) -> str:
    return json.dumps([cfg.model.values(), cfg.data.channels, cfg.data.name, cfg.run.seed], sort_keys=True)


def _once_rate(cfg: Config, sizes: Sequence[int]) -> float:
    return accountant.sample_once_rate(cfg.optim.batch_size, cfg.fed.clients_per_round, sum(sizes))


def _flat_numbers(cfg: Config) -> int:
    """The flat model's numbers (what trains, and the float buffers): the grid's dimension, which
    the accountant needs before any model exists; ``build_mechanism`` counts them (it knows the
    data set's classes)."""
    try:
        return _FLAT_NUMBERS[_model_key(cfg)]
    except KeyError:
        raise RuntimeError("distributed DP's grid needs the model's size: build_mechanism(cfg, sizes, "
                           "num_classes=...) counts it") from None


def noised_numbers(cfg: Config, num_classes: int) -> int:
    """How many numbers DP-FedAvg noises: the flat model (fedrun.flat: what trains, and the float
    buffers) of ``cfg``, counted on a model built on the meta device (no memory, no weights)."""
    with torch.device("meta"):
        model = build_model(cfg.model, cfg.data.channels, num_classes)
        make_trainable(model, cfg, cfg.run.seed)
    return num_flat(model)


def build_mechanism(cfg: Config, sizes: Sequence[int], plan: Sequence[Sequence[int]] | None = None,
                    num_classes: int | None = None) -> Stack:
    """The run's mechanisms, before any process group or GPU: the privacy level ``privacy.level``
    names (the noise solved when ``privacy.noise_multiplier = 0``, one line says which; its ``cfg``
    holds it; the planned budget checked; at client level a warning when one round's noise
    outweighs the clients' average, which needs ``num_classes``), then secure aggregation
    (``secure_agg.protocol``). ``plan``: the clients of every round, known in advance (None:
    every client in every round)."""
    cls = PRIVACY.selected(cfg).target
    if num_classes is not None:  # the grid's dimension (distributed DP), known before any model
        _FLAT_NUMBERS[_model_key(cfg)] = noised_numbers(cfg, num_classes)
    if issubclass(cls, _DifferentialPrivacy):
        solved = accountant.solve_noise(cfg, list(sizes), plan)
        if solved is not None:
            cfg = cfg.with_values({"privacy.noise_multiplier": solved})
        eps = accountant.check_budget(cfg, list(sizes), plan)
        privacy: Mechanism = cls(cfg, sizes)
        privacy.solved = solved is not None  # type: ignore[attr-defined]
        pv, f = cfg.privacy, cfg.fed
        if solved is not None and launch_rank() == 0:
            print(f"fedrun: privacy.noise_multiplier = {solved:g}, solved from privacy.target_epsilon = "
                  f"{pv.target_epsilon:g}: the smallest (to 0.01) that keeps the planned {f.rounds} rounds "
                  f"within it (epsilon {eps:.3g} for {cls.unit}, delta {pv.delta:g}, "
                  f"{privacy.ledger.accountant} accountant)", flush=True)  # type: ignore[attr-defined]
        if isinstance(privacy, ClientLevel) and num_classes is not None:
            privacy.warn_noise_to_signal(num_classes)
    else:
        privacy = cls(cfg, sizes)
    return Stack([privacy, SECURE_AGG.selected(cfg).target(cfg, sizes)])
