"""Participation: who takes part in round r.

``UniformParticipation`` is the authors' (and FedAvg's) rule: ``fed.clients_per_round`` of the
``fed.num_clients`` clients, uniformly without replacement, drawn from (seed, round), so every
rank draws the same list without talking to the others and a resumed round draws it again.
DP-FedAvg samples clients by Poisson instead (``fedrun.privacy.client_dp.PoissonParticipation``),
the sampling its accountant assumes.

Participation models register themselves in ``PARTICIPATION`` (``fed.participation``; fedrun.registry)
with their keys: "uniform" is the authors' draw, and its keys are the simulated federation's;
"fedbuff" (fedrun/federated/fedbuff.py) is buffered asynchronous aggregation on the same
simulated clock, a round being one server step.

``SimulatedParticipation`` wraps either with what real federations lose (``fed.availability``,
``fed.speed_sigma``, ``fed.deadline_s``, ``fed.over_select``, traces): it is only built when
one of those keys is set, so a run without them draws exactly what the base draws.

* **Who reports.** Of the selected clients, each reports with its availability probability
  (``fed.availability``, or client k's row of ``fed.availability_trace``), drawn from (seed,
  round, client): a client that is offline or drops out sends nothing (nor does one without data).
* **How long it takes** (simulated seconds, never measured): speed_k x (its local steps x
  ``fed.sim_step_s`` + ``fed.sim_client_s``), speed_k = exp(``fed.speed_sigma`` z_k), z_k ~ N(0, 1)
  from (seed, client) (a slow device stays slow), or client k's row of ``fed.speed_trace``.
* **Deadline and over-selection** (Bonawitz et al. 2019, "Towards federated learning at scale"):
  ceil(``fed.over_select`` x clients_per_round) are selected; those that report by
  ``fed.deadline_s`` (0 = no deadline) count, the fastest first, at most clients_per_round.
* **The simulated clock.** A round lasts until the clients_per_round-th report when that many
  came in, else until the deadline when some selected client did not report, else until the
  last report. ``record`` gives each round's ``sim_round_s``, the run's ``sim_clock_s`` and the
  counts (selected, offline, late, kept) for metrics.jsonl, beside the real ``wall_s``.
* **A round with no report** keeps the global model as it was (the loop warns and records
  ``clients: []``); a deadline that no client can ever meet is refused before training.

Traces are text files (numpy.loadtxt: whitespace or commas, ``#`` comments) with one row per
client (at least ``fed.num_clients`` rows; extra rows are ignored) and T >= 1 columns: round r
uses column (r - 1) mod T, so one column is a fixed value per client and T columns a pattern
that repeats (FedScale-style availability per time slot). Availability values are
probabilities in [0, 1] (0/1 for an on/off trace); speed values are positive factors.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .. import seeding
from ..config import FEDERATED, HASHED_WHEN_SET, Config, setting
from ..errors import ConfigError
from ..local_training import local_steps
from ..parts import Participation
from ..registry import Registry, Settings

PARTICIPATION = Registry(
    "fed.participation", "uniform", "Who takes part in a round (fedrun/federated/participation.py): "
    "\"uniform\" (fed.clients_per_round of fed.num_clients, uniformly from (seed, round); with the "
    "simulated federation's availability, stragglers, deadline and over-selection when set) | \"fedbuff\" "
    "(buffered asynchronous aggregation, Nguyen et al. 2022: fed.concurrency clients train at once from "
    "the model version current at their start, the server steps after every fed.buffer_size arrivals on the "
    "simulated clock; fedrun/federated/fedbuff.py).",
    hashed=HASHED_WHEN_SET, applies=FEDERATED, federated=True)


@dataclass
class SimulationSettings(Settings):
    """The simulated federation: who reports, how fast, and how long a round waits."""

    availability: float = setting(1.0, hashed=HASHED_WHEN_SET, off=1.0)
    """Simulated federation: probability that a selected client reports in a round (drawn from
    (seed, round, client)); 1 = always."""
    availability_trace: str = setting("", hashed=HASHED_WHEN_SET, off="")
    """A text file, one row per client, T columns of probabilities (0/1 for on/off) used in turn
    (round r: column (r - 1) mod T); replaces fed.availability. "" = none."""
    speed_sigma: float = setting(0.0, hashed=HASHED_WHEN_SET, off=0.0)
    """Stragglers: each client's simulated speed factor is exp(sigma z), z ~ N(0, 1) from (seed,
    client); 0 = every client as fast."""
    speed_trace: str = setting("", hashed=HASHED_WHEN_SET, off="")
    """A text file, one row per client, T columns of positive speed factors (round r: column
    (r - 1) mod T); replaces fed.speed_sigma. "" = none."""
    deadline_s: float = setting(0.0, hashed=HASHED_WHEN_SET, off=0.0)
    """Simulated seconds a round waits for reports; later ones are dropped. 0 = no deadline."""
    over_select: float = setting(1.0, hashed=HASHED_WHEN_SET, off=1.0)
    """Select ceil(over_select x clients_per_round) clients and keep the clients_per_round
    fastest reports (Bonawitz et al. 2019); 1 = no over-selection. FedBuff uses every arrival and
    takes only 1 (raise fed.concurrency instead)."""
    sim_step_s: float = setting(1.0, hashed=HASHED_WHEN_SET)
    """Simulated seconds one local step takes on a device of speed 1."""
    sim_client_s: float = setting(0.0, hashed=HASHED_WHEN_SET)
    """Simulated seconds each participant spends besides its steps (download, upload), times its speed."""

    def validate(self) -> None:
        def require(ok: bool, key: str, message: str) -> None:
            if not ok:
                raise ConfigError(f"{key}: {message}")
        require(0 <= self.availability <= 1, "fed.availability",
                f"must be a probability in [0, 1] (1 = every selected client reports), got "
                f"{self.availability}")
        require(self.availability == 1 or not self.availability_trace, "fed.availability",
                "give either fed.availability or fed.availability_trace, not both")
        require(self.speed_sigma >= 0, "fed.speed_sigma",
                f"must be >= 0 (0 = no stragglers), got {self.speed_sigma}")
        require(self.speed_sigma == 0 or not self.speed_trace, "fed.speed_sigma",
                "give either fed.speed_sigma or fed.speed_trace, not both")
        require(self.deadline_s >= 0, "fed.deadline_s",
                f"must be >= 0 (0 = no deadline), got {self.deadline_s}")
        require(self.over_select >= 1, "fed.over_select",
                f"must be >= 1 (the share of clients selected per client needed), got {self.over_select}")
        require(self.sim_step_s > 0, "fed.sim_step_s", f"must be > 0, got {self.sim_step_s}")
        require(self.sim_client_s >= 0, "fed.sim_client_s", f"must be >= 0, got {self.sim_client_s}")


def sample_clients(num_clients: int, per_round: int, seed: int, round_: int) -> list[int]:
    """Uniform without replacement, from (seed, round): identical on every rank."""
    if per_round >= num_clients:
        return list(range(num_clients))
    rng = np.random.default_rng(seeding.derive_seed(seeding.SELECT, seed, round_))
    return sorted(int(c) for c in rng.choice(num_clients, per_round, replace=False))


@PARTICIPATION.register("uniform", SimulationSettings)
class UniformParticipation:
    """fed.clients_per_round of fed.num_clients clients, uniformly without replacement, from (seed,
    round); a simulated round keeps the ``keep`` fastest reports (None: all of them)."""

    def __init__(self, num_clients: int, per_round: int, seed: int, keep: int | None = None):
        self.num_clients, self.per_round, self.seed = num_clients, per_round, seed
        self.keep = keep

    @classmethod
    def build(cls, settings: SimulationSettings, cfg: Config, sizes: dict[int, int]) -> UniformParticipation:
        return cls(cfg.fed.num_clients, selected_per_round(cfg), cfg.run.seed, cfg.fed.clients_per_round)

    def clients(self, round_: int) -> list[int]:
        return sample_clients(self.num_clients, self.per_round, self.seed, round_)

    def selected(self, round_: int) -> list[int]:
        return self.clients(round_)

    def record(self, round_: int) -> dict[str, Any]:
        return {}


def read_trace(path: str, key: str, num_clients: int, positive: bool) -> np.ndarray:
    """A trace file as a [num_clients, T] float array (module docstring), or one ConfigError line
    naming ``key``: a missing or unreadable file, values that are not numbers, rows of unequal
    length, fewer rows than clients, values out of range."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise ConfigError(f"{key}: no file at {file}; give a text file with one row per client "
                          f"(docs/systems.md \"Availability and stragglers\") or set {key} = \"\"")
    try:
        table = np.loadtxt(file, dtype=np.float64, delimiter=None if "," not in file.read_text() else ",",
                           ndmin=2)
    except (ValueError, UnicodeDecodeError, OSError) as exc:
        raise ConfigError(f"{key}: {file} is not a table of numbers ({str(exc).splitlines()[0][:120]}); "
                          f"one row per client, the same number of columns in every row") from None
    if table.shape[0] < num_clients or table.shape[1] == 0:
        raise ConfigError(f"{key}: {file} covers {table.shape[0]} clients, fed.num_clients is "
                          f"{num_clients}; give one row per client or lower fed.num_clients")
    table = table[:num_clients]
    if positive:
        ok, what = np.isfinite(table).all() and (table > 0).all(), "positive speed factors"
    else:
        ok, what = np.isfinite(table).all() and ((table >= 0) & (table <= 1)).all(), "probabilities in [0, 1]"
    if not ok:
        raise ConfigError(f"{key}: {file} holds values that are not {what}")
    return table


@dataclass
class Simulation:
    """Who reports and how long each client takes, in simulated seconds (module docstring)."""

    seed: int
    availability: np.ndarray
    """[N, T] probability that a selected client reports (column (r - 1) mod T in round r)"""
    speed_trace: np.ndarray | None
    """[N, T] speed factors, or None: exp(speed_sigma z_k)"""
    speed_sigma: float
    steps: dict[int, int]
    """each client's local steps"""
    step_s: float
    client_s: float
    deadline: float
    """simulated seconds a round waits (0: no deadline)"""
    availability_key: str = "fed.availability"
    """where the availability came from (for error messages)"""
    _speeds: dict[int, float] = field(default_factory=dict)

    @classmethod
    def from_config(cls, cfg: Config, sizes: dict[int, int], always: bool = False) -> Simulation | None:
        """None when nothing is simulated (every selected client reports at once) unless ``always``
        (FedBuff's clock: every client at speed 1 then); else the simulation, after the checks that
        need the traces and the data (one ConfigError line)."""
        f = cfg.fed
        if not (always or simulated(cfg)):
            return None
        n = f.num_clients
        availability = read_trace(f.availability_trace, "fed.availability_trace", n, positive=False) \
            if f.availability_trace else np.full((n, 1), f.availability)
        speeds = read_trace(f.speed_trace, "fed.speed_trace", n, positive=True) if f.speed_trace else None
        steps = {k: local_steps(sizes[k], cfg.optim.batch_size, f.local_epochs) for k in range(n)}
        sim = cls(cfg.run.seed, availability, speeds, f.speed_sigma, steps, f.sim_step_s, f.sim_client_s,
                  f.deadline_s, "fed.availability_trace" if f.availability_trace else "fed.availability")
        sim.check()
        return sim

    def check(self) -> None:
        """Refuse a federation in which no client can ever report (before any training)."""
        if not (self.availability > 0).any():
            raise ConfigError(f"{self.availability_key}: no client is ever available (every probability "
                              f"is 0); raise fed.availability or fix fed.availability_trace")
        if self.deadline > 0:
            columns = 1 if self.speed_trace is None else self.speed_trace.shape[1]
            fastest = min(self.duration(k, t + 1) for k in self.steps for t in range(columns)
                          if self.availability[k].max() > 0 and self.steps[k] > 0)
            if fastest > self.deadline:
                raise ConfigError(
                    f"fed.deadline_s: no client can report within {self.deadline:g} simulated seconds "
                    f"(the fastest needs {fastest:.3g}: speed x (local steps x fed.sim_step_s + "
                    f"fed.sim_client_s)); raise fed.deadline_s to at least {fastest:.3g} or lower "
                    f"fed.sim_step_s")

    def online(self, client: int, round_: int) -> bool:
        """Does ``client`` report in ``round_`` if selected? From (seed, round, client)."""
        row = self.availability[client]
        p = float(row[(round_ - 1) % len(row)])
        if p >= 1 or p <= 0:
            return p >= 1
        u = np.random.default_rng(seeding.stream_seed("availability", seed=self.seed, round=round_,
                                                      client=client)).random()
        return bool(u < p)

    def speed(self, client: int, round_: int) -> float:
        """The client's speed factor in ``round_`` (1 = a reference device; 2 = twice as slow)."""
        if self.speed_trace is not None:
            row = self.speed_trace[client]
            return float(row[(round_ - 1) % len(row)])
        if self.speed_sigma == 0:
            return 1.0
        if client not in self._speeds:  # drawn once per client: a slow device stays slow
            z = np.random.default_rng(seeding.stream_seed("speed", seed=self.seed, client=client)).normal()
            self._speeds[client] = math.exp(self.speed_sigma * z)
        return self._speeds[client]

    def duration(self, client: int, round_: int) -> float:
        """Simulated seconds from the round's start to the client's report."""
        return self.speed(client, round_) * (self.steps[client] * self.step_s + self.client_s)


def simulated(cfg: Config) -> bool:
    """Is any availability, straggler or deadline key set (else every selected client reports)?"""
    f = cfg.fed
    return bool(f.availability < 1 or f.availability_trace or f.speed_sigma > 0 or f.speed_trace
                or f.deadline_s > 0 or f.over_select > 1)


def selected_per_round(cfg: Config) -> int:
    """Clients selected per round: ceil(fed.over_select x fed.clients_per_round), at most N."""
    f = cfg.fed
    return min(f.num_clients, math.ceil(f.over_select * f.clients_per_round - 1e-9))


def build_participation(cfg: Config, sizes: dict[int, int],
                        wrap: Callable[[Participation], Participation] = lambda p: p) -> Participation:
    """The participation ``fed.participation`` names, ``wrap``ped (a privacy mechanism's Poisson
    draw), inside the simulated federation when one of its keys is set. Built before any process
    group: a trace that cannot be read, or a deadline no client meets, is one ConfigError line. A
    participation with a ``clock`` of its own (FedBuff, fedrun.federated.fedbuff) simulates the
    federation itself."""
    target = PARTICIPATION.selected(cfg).target
    base = wrap(target.build(PARTICIPATION.settings(cfg), cfg, sizes))
    simulation = Simulation.from_config(cfg, sizes)  # None unless availability/stragglers are set
    if simulation is None or getattr(target, "clock", False):
        return base
    return SimulatedParticipation(base, simulation, getattr(base, "keep", None))


class SimulatedParticipation:
    """Availability, stragglers, a deadline and over-selection around a base draw (module
    docstring): ``clients`` are the selected clients that report in time, the fastest ``keep``
    (None: all of them, as DP-FedAvg's Poisson sample needs)."""

    def __init__(self, base: Participation, sim: Simulation, keep: int | None):
        self.base, self.sim, self.keep = base, sim, keep
        self._rounds: dict[int, tuple[list[int], dict[str, Any]]] = {}
        self._clock = [0.0]  # simulated seconds after round 0, 1, ...

    def clients(self, round_: int) -> list[int]:
        return self._round(round_)[0]

    def selected(self, round_: int) -> list[int]:
        """Every client the base drew, those that went offline or were late included."""
        return self.base.clients(round_)

    def record(self, round_: int) -> dict[str, Any]:
        """The round's simulated figures, and the simulated clock so far (recomputed from round 1
        in a resumed process: everything is drawn from (seed, round, client))."""
        while len(self._clock) < round_ + 1:  # the clock after each round so far, once each
            self._clock.append(self._clock[-1] + self._round(len(self._clock))[1]["sim_round_s"])
        return {**self._round(round_)[1], "sim_clock_s": round(self._clock[round_], 6)}

    def _round(self, round_: int) -> tuple[list[int], dict[str, Any]]:
        if round_ not in self._rounds:
            sim = self.sim
            selected = self.base.clients(round_)
            online = [k for k in selected if sim.steps[k] > 0 and sim.online(k, round_)]  # no data: no report
            reports = sorted((sim.duration(k, round_), k) for k in online)
            in_time = [(t, k) for t, k in reports if not sim.deadline or t <= sim.deadline]
            kept = in_time if self.keep is None else in_time[:self.keep]
            if self.keep is not None and len(kept) == self.keep and kept:
                seconds = kept[-1][0]  # the round closes with the last report it needs
            elif sim.deadline and len(kept) < len(selected):
                seconds = sim.deadline  # someone did not report: the server waits until the deadline
            else:
                seconds = max((t for t, _ in kept), default=0.0)
            figures = {"selected": len(selected), "offline": len(selected) - len(online),
                       "late": len(online) - len(in_time), "surplus": len(in_time) - len(kept),
                       "reported": len(kept),
                       "sim_round_s": round(seconds, 6)}
            self._rounds[round_] = (sorted(k for _, k in kept), figures)
        return self._rounds[round_]


def planned_clients(cfg: Config, sizes: dict[int, int]) -> list[list[int]]:
    """The clients the chosen participation draws in each round 1..fed.rounds, before dropouts
    (drawn from (seed, round): known in advance; what a privacy mechanism's plan counts, an upper
    bound when clients drop out)."""
    base = PARTICIPATION.selected(cfg).target.build(PARTICIPATION.settings(cfg), cfg, sizes)
    return [base.clients(r) for r in range(1, cfg.fed.rounds + 1)]
