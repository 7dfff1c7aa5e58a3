"""FedBuff: buffered asynchronous aggregation on the simulated clock (``fed.participation = "fedbuff"``).

Nguyen et al., "Federated Learning with Buffered Asynchronous Aggregation" (AISTATS 2022); Meta's
FLSim implements it. Up to ``fed.concurrency`` (C) clients train at once, each from the global
model *version* current when it starts; the server steps as soon as ``fed.buffer_size`` (K)
updates have arrived, whatever versions they were trained from. A version is the number of
server steps taken: version 0 is the initial model, a "round" of the loop is one server step,
and step r turns version r - 1 into version r.

**The simulated clock orders everything** (``FedBuffSchedule``, computed once from the config):

* at time 0, C clients start; whenever a client's slot frees (it reported, dropped out, or ran
  past ``fed.deadline_s``), the next client starts at once, drawn uniformly from the idle
  clients with data (a client is busy from its start until the server step that uses its
  update; a slot with no idle client waits for the next server step, which frees K: with
  C = K = N and equal speeds every step is a synchronous FedAvg round);
* a client's simulated duration is the synchronous simulation's, speed x (local steps x
  ``fed.sim_step_s`` + ``fed.sim_client_s``) (fedrun.federated.participation.Simulation); its
  speed and availability are read at the step in progress when it starts (column (v mod T) of a
  trace for a client starting from version v, as round v + 1 reads it synchronously);
* a client is offline with probability 1 - availability: it sends nothing and its slot frees
  when its report was due (the server notices an absence only then); with a deadline, a client
  slower than ``fed.deadline_s`` is given up at the deadline;
* an arrival's **staleness** is tau = (server steps taken when it arrives) - (its start version),
  the number of steps the model moved while it trained. An update with tau > ``fed.max_staleness``
  is discarded (too stale) and does not count towards K. Offline, late and too stale clients are
  the run's wasted work (metrics.jsonl counts them per step and in total).

The schedule, drawn from (seed) alone (the ``fedbuff_schedule`` stream: which idle client starts
next, and whether it is online), is the same on every rank and after a resume: step r's clients
(``clients(r)``) and the version each started from are known before any training. Only the
training itself waits for the loop: client k of step r trains at step r, from its start version,
with the seeds of (seed, r, k) (a client is in a step at most once), at step r's learning rate.

**The sum holds changes, not models.** Each update enters the step's one all_reduce as
w_k s(tau_k) (theta_k - theta_{v_k}), w_k = n_k its data size, theta_{v_k} its start version
(``RoundBuffer(changes=...)``, fedrun.flat: each client adds its fixed-point model and its
factor's integer to its start version's slot; after the exact int64 sum every rank subtracts each
version used once, weighted by that slot), so one server step is one all_reduce of K updates
trained from different versions, bit-identical for any placement and world size, at a
synchronous round's cost per client. The step's mean change is

    Delta = sum_k n_k s(tau_k) (theta_k - theta_{v_k}) / sum_k n_k

(the paper's (1/K) sum_k s(tau_k) Delta_k with data-size weights: a buffer of stale updates moves
the model less), and the server rule steps toward theta + Delta (fedrun.federated.server:
``fed.server_opt = "fedavg"`` applies Delta as is; "fedavgm" with ``fed.server_momentum = 0`` is
server SGD at ``fed.server_lr``, FLSim's FedAvgWithLR; FedAdam and the others see Delta as their
pseudo-gradient). Staleness weights s(tau) (``fed.staleness``): "constant" 1; "polynomial"
(1 + tau)^-a (the paper's default, a = 0.5); "hinge" 1 for tau <= b, else 1 / (slope (tau - b) + 1)
(Xie et al. 2019, FedAsync).

**Past versions** (``ModelVersions``): a client that started from version v < r - 1 needs
theta_v when it trains at step r. The schedule says when each version is last needed; a version
is kept in host memory (a CPU copy of the flat model) from its step until then, and dropped after
it: at most ``fed.max_staleness`` + 1 versions, usually far fewer. The kept versions are
checkpointed (the "fedbuff" extra entry), so a run resumes exactly mid-stream.

What combines with it (``FedBuff.check``): every server rule; FedProx (pulled toward the start
version); compression with or without error feedback (the update compressed is the change from
the start version); kept client Adam. Refused, one line each: client-level DP (its accountant
amplifies by Poisson subsampling, and a buffer of the first K arrivals on the clock is not a
Poisson sample), sample-level DP (its ledger's plan reads the synchronous draw), secure
aggregation (its keys are set up per synchronous round), SCAFFOLD and FedDyn (their server
state is updated from changes against the current global model), over-selection (concurrency
replaces it) and grouped client training.
"""

from __future__ import annotations

import heapq
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch

from .. import seeding
from ..config import HASHED_WHEN_SET, Config, ConfigError, setting, when
from ..parts import ClientUpdate, GradTerm, Stage, UpdateRule
from .participation import PARTICIPATION, Simulation, SimulationSettings

ASYNC = when("fed.participation", "fedbuff")
STALENESS = ("constant", "polynomial", "hinge")


@dataclass
class FedBuffSettings(SimulationSettings):
    """FedBuff's keys, besides the simulated federation's (speeds, availability, deadline)."""

    concurrency: int = setting(100, hashed=HASHED_WHEN_SET, applies=ASYNC)
    """FedBuff: clients training at once (C); a new one starts whenever one reports or drops out."""
    buffer_size: int = setting(10, hashed=HASHED_WHEN_SET, applies=ASYNC)
    """FedBuff: updates per server step (K); fed.rounds counts server steps."""
    max_staleness: int = setting(100, hashed=HASHED_WHEN_SET, applies=ASYNC)
    """FedBuff: updates more than this many server steps stale are discarded (wasted work); also
    bounds the past model versions kept in host memory (at most max_staleness + 1)."""
    staleness: str = setting("polynomial", hashed=HASHED_WHEN_SET, applies=ASYNC, choices=STALENESS)
    """FedBuff's staleness weight s(tau) on an update tau steps stale: "constant" (1) | "polynomial"
    ((1 + tau)^-fed.staleness_exponent) | "hinge" (1 up to fed.staleness_hinge steps, then
    1 / (fed.staleness_slope (tau - hinge) + 1))."""
    staleness_exponent: float = setting(0.5, hashed=HASHED_WHEN_SET,
                                        applies=ASYNC & when("fed.staleness", "polynomial"))
    """FedBuff: the exponent a of the polynomial staleness weight (1 + tau)^-a."""
    staleness_hinge: int = setting(4, hashed=HASHED_WHEN_SET, applies=ASYNC & when("fed.staleness", "hinge"))
    """FedBuff: the hinge weight's b: updates at most b steps stale keep weight 1."""
    staleness_slope: float = setting(10.0, hashed=HASHED_WHEN_SET,
                                     applies=ASYNC & when("fed.staleness", "hinge"))
    """FedBuff: the hinge weight's slope past b."""

    def validate(self) -> None:
        super().validate()

        def require(ok: bool, key: str, message: str) -> None:
            if not ok:
                raise ConfigError(f"{key}: {message}")
        require(self.concurrency >= 1, "fed.concurrency", f"must be >= 1 (clients training at once), got "
                f"{self.concurrency}")
        require(self.buffer_size >= 1, "fed.buffer_size", f"must be >= 1 (updates per server step), got "
                f"{self.buffer_size}")
        require(self.max_staleness >= 0, "fed.max_staleness", f"must be >= 0 (0 = only updates from the "
                f"current model), got {self.max_staleness}")
        require(self.staleness_exponent >= 0, "fed.staleness_exponent",
                f"must be >= 0 (0 = constant weights), got {self.staleness_exponent}")
        require(self.staleness_hinge >= 0, "fed.staleness_hinge", f"must be >= 0, got {self.staleness_hinge}")
        require(self.staleness_slope >= 0, "fed.staleness_slope", f"must be >= 0, got {self.staleness_slope}")


def staleness_weight(settings: FedBuffSettings, tau: int) -> float:
    """s(tau) of ``fed.staleness`` (module docstring): 1 for a fresh update, never above 1."""
    if settings.staleness == "polynomial":
        return float((1.0 + tau) ** -settings.staleness_exponent)
    if settings.staleness == "hinge" and tau > settings.staleness_hinge:
        return 1.0 / (settings.staleness_slope * (tau - settings.staleness_hinge) + 1.0)
    return 1.0


# --------------------------------------------------------------------------------------------
# The schedule: who trains from which version, and when each update arrives


@dataclass(order=True)
class _Job:
    end_s: float
    seq: int  # start order: ties on the clock are broken by it
    client: int = field(compare=False)
    version: int = field(compare=False)
    outcome: str = field(compare=False)  # "report" | "offline" | "late"


@dataclass
class FedBuffSchedule:
    """Every server step of the run, simulated before any training (module docstring).

    ``steps[r - 1]``: step r's updates as (client, start version, staleness), by client;
    ``figures[r - 1]``: its line of metrics.jsonl; ``last_use[v]``: the last step that trains a
    client from version v (versions no step needs are absent)."""

    steps: list[list[tuple[int, int, int]]]
    figures: list[dict[str, Any]]
    last_use: dict[int, int]

    @classmethod
    def simulate(cls, sim: Simulation, settings: FedBuffSettings, seed: int,
                 num_steps: int) -> FedBuffSchedule:
        """``num_steps`` server steps; one ConfigError line when the federation cannot fill a buffer."""
        C, K, limit = settings.concurrency, settings.buffer_size, settings.max_staleness
        rng = np.random.default_rng(seeding.stream_seed("fedbuff_schedule", seed=seed))
        idle = sorted(k for k, n in sim.steps.items() if n > 0)  # no data: never trains
        if len(idle) < K:
            raise ConfigError(f"fed.buffer_size: a server step needs {K} different clients, only {len(idle)} "
                              f"have data; lower fed.buffer_size")
        where = {k: i for i, k in enumerate(idle)}
        heap: list[_Job] = []
        buffer: list[tuple[int, int, int]] = []
        steps: list[list[tuple[int, int, int]]] = []
        figures: list[dict[str, Any]] = []
        last_use: dict[int, int] = {}
        since = Counter[str]()  # what happened since the last step
        total = Counter[str]()
        version, now, last_step_s, seq, quiet, empty = 0, 0.0, 0.0, 0, 0, C  # empty: slots to fill

        def start() -> None:
            nonlocal seq, empty
            empty -= 1
            i = int(rng.integers(len(idle)))
            k = idle[i]
            idle[i] = idle[-1]  # swap-remove: O(1), deterministic
            where[idle[i]] = i
            idle.pop()
            del where[k]
            p = float(sim.availability[k][version % sim.availability.shape[1]])
            online = p >= 1 or (p > 0 and rng.random() < p)
            d = sim.duration(k, version + 1)
            late = sim.deadline > 0 and d > sim.deadline
            outcome = "offline" if not online else "late" if late else "report"
            end = now + (sim.deadline if late and online else d)
            heapq.heappush(heap, _Job(end, seq, k, version, outcome))
            seq += 1
            since["started"] += 1

        def free(k: int) -> None:
            where[k] = len(idle)
            idle.append(k)

        while len(steps) < num_steps:
            while empty and idle:  # every free slot takes an idle client, now
                start()
            job = heapq.heappop(heap)  # never empty: fewer than K busy clients leave one idle
            now = job.end_s
            quiet += 1
            empty += 1
            if job.outcome != "report":
                since[job.outcome] += 1
                free(job.client)
            elif version - job.version > limit:
                since["too_stale"] += 1
                free(job.client)
            else:
                buffer.append((job.client, job.version, version - job.version))
            if len(buffer) == K:
                version += 1
                quiet = 0
                step = sorted(buffer)
                for k, v, _ in step:
                    last_use[v] = version
                    free(k)
                buffer = []
                total.update(since)
                wasted = total["offline"] + total["late"] + total["too_stale"]
                used = version * K
                figures.append({
                    "model_version": version, "staleness": [tau for _, _, tau in step],
                    "started": since["started"], "offline": since["offline"], "late": since["late"],
                    "too_stale": since["too_stale"], "in_flight": len(heap),
                    "updates_total": used, "wasted_total": wasted,
                    "updates_per_sim_hour": round(used * 3600 / now, 3) if now > 0 else 0.0,
                    "sim_round_s": round(now - last_step_s, 6), "sim_clock_s": round(now, 6)})
                steps.append(step)
                since = Counter()
                last_step_s = now
            elif quiet > 1000 * (C + K) + len(sim.steps):
                raise ConfigError(f"fed.availability: the simulated federation fills no buffer of {K} "
                                  f"reports in {quiet} client starts after server step {version} (clients "
                                  f"offline or past fed.deadline_s, or updates older than "
                                  f"fed.max_staleness); raise fed.availability, fed.deadline_s or "
                                  f"fed.max_staleness")
        return cls(steps, figures, last_use)


# --------------------------------------------------------------------------------------------
# The parts: participation, the versions a client starts from, the staleness weight


@PARTICIPATION.register("fedbuff", FedBuffSettings)
class FedBuff:
    """FedBuff (Nguyen et al. 2022): C clients train at once from the version current at their
    start; the server steps after every K arrivals (module docstring). A round is a server step."""

    clock: ClassVar[bool] = True  # keeps its own simulated clock (not wrapped by SimulatedParticipation)

    def __init__(self, schedule: FedBuffSchedule, settings: FedBuffSettings):
        self.schedule, self.settings = schedule, settings
        self._start = {(r + 1, k): (v, tau) for r, step in enumerate(schedule.steps) for k, v, tau in step}

    @classmethod
    def build(cls, settings: FedBuffSettings, cfg: Config, sizes: dict[int, int]) -> FedBuff:
        sim = Simulation.from_config(cfg, sizes, always=True)
        assert sim is not None
        # past fed.rounds by as many steps as an update may be stale: a version kept at the last
        # checkpoint stays there for the steps of a run continued with a higher fed.rounds
        return cls(FedBuffSchedule.simulate(sim, settings, cfg.run.seed,
                                            cfg.fed.rounds + settings.max_staleness + 1), settings)

    @classmethod
    def check(cls, cfg: Config) -> None:
        f = cfg.fed
        if f.buffer_size > f.num_clients:
            raise ConfigError(f"fed.buffer_size: a server step needs {f.buffer_size} different clients, more "
                              f"than fed.num_clients ({f.num_clients}); lower fed.buffer_size")
        level = cfg.privacy.level
        if level == "client":
            raise ConfigError("privacy.level: client-level DP's accountant amplifies by Poisson subsampling "
                              "of each round's clients; FedBuff's buffer holds the first fed.buffer_size "
                              "arrivals on the simulated clock, which is no Poisson sample; set "
                              "fed.participation = \"uniform\" for DP-FedAvg, or privacy.level = \"none\"")
        if level != "none":
            raise ConfigError(f"privacy.level: \"{level}\"'s ledger is planned from the synchronous draw of "
                              f"each round's clients; set fed.participation = \"uniform\" for DP, or "
                              f"privacy.level = \"none\" with FedBuff")
        if cfg.secure_agg.protocol != "none":
            raise ConfigError("secure_agg.protocol: secure aggregation sets up its keys per synchronous "
                              "round; set fed.participation = \"uniform\", or secure_agg.protocol = "
                              "\"none\" with FedBuff")
        if f.drift in ("scaffold", "feddyn"):
            raise ConfigError(f"fed.drift: {f.drift}'s server state is updated from changes against the "
                              f"current global model, FedBuff's updates are trained from older versions; "
                              f"set fed.drift = \"none\" or \"fedprox\" with FedBuff")
        if f.over_select > 1:
            raise ConfigError("fed.over_select: FedBuff keeps fed.concurrency clients busy and uses every "
                              "arrival; set fed.over_select = 1 (raise fed.concurrency instead)")
        if cfg.train.clients_at_once != 1:
            raise ConfigError("train.clients_at_once: grouped clients start from one model, FedBuff's "
                              "clients from their own versions; set train.clients_at_once = 1")

    def clients(self, round_: int) -> list[int]:
        return [k for k, _, _ in self.schedule.steps[round_ - 1]]

    def selected(self, round_: int) -> list[int]:
        return self.clients(round_)

    def start(self, round_: int, client: int) -> tuple[int, int]:
        """(the version client trains from at step ``round_``, its staleness)."""
        return self._start[(round_, client)]

    def record(self, round_: int) -> dict[str, Any]:
        return dict(self.schedule.figures[round_ - 1])


class LatestModel:
    """Synchronous rounds: every client starts from the current global model; nothing is kept."""

    changes: ClassVar[int] = 0  # the round's buffer sums models

    def attach(self, buffer: Any) -> None:
        pass

    def start(self, round_: int, client: int, global_flat: torch.Tensor) -> torch.Tensor:
        return global_flat

    def after_step(self, round_: int, global_flat: torch.Tensor) -> None:
        pass

    def update_rules(self) -> list[UpdateRule]:
        return []

    def extra_state(self) -> dict[str, Any]:
        return {}

    def load_extra_state(self, extra: dict[str, Any]) -> None:
        pass


class ModelVersions:
    """FedBuff's past global models, each kept in host memory while a client still needs it
    (module docstring); the "fedbuff" entry of a checkpoint's extras."""

    KEY: ClassVar[str] = "fedbuff"

    def __init__(self, fedbuff: FedBuff, device: torch.device):
        self.fedbuff, self.device = fedbuff, device
        self.kept: dict[int, torch.Tensor] = {}
        self._latest: tuple[int, torch.Tensor] | None = None  # (its version, the current global model)
        # the step's buffer sums changes from each client's start version: a slot per version a
        # step can mix (fedrun.flat.RoundBuffer)
        self.changes = fedbuff.settings.max_staleness + 1

    def attach(self, buffer: Any) -> None:
        buffer.bases = self.flat

    def flat(self, version: int) -> torch.Tensor:
        """theta_v on the device: the current global model, or a kept version."""
        if self._latest is not None and self._latest[0] == version:
            return self._latest[1]
        return self.kept[version].to(self.device)

    def start(self, round_: int, client: int, global_flat: torch.Tensor) -> torch.Tensor:
        """theta_v, the version ``client`` trains from at step ``round_``."""
        v, _ = self.fedbuff.start(round_, client)
        if v == round_ - 1:
            return global_flat
        return self.kept[v].to(self.device)

    def after_step(self, round_: int, global_flat: torch.Tensor) -> None:
        """Version ``round_`` is ``global_flat``: keep it if a later step needs it; forget the
        versions no later step needs."""
        last_use = self.fedbuff.schedule.last_use
        self._latest = (round_, global_flat)
        if last_use.get(round_, 0) > round_:
            self.kept[round_] = global_flat.detach().to("cpu", copy=True)
        for v in [v for v in self.kept if last_use.get(v, 0) <= round_]:
            del self.kept[v]
        assert len(self.kept) <= self.fedbuff.settings.max_staleness + 1, sorted(self.kept)

    def update_rules(self) -> list[UpdateRule]:
        return [StalenessWeight(self.fedbuff)]

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {str(v): t for v, t in self.kept.items()}

    def extra_state(self) -> dict[str, Any]:
        return {self.KEY: self}

    def load_extra_state(self, extra: dict[str, Any]) -> None:
        self.kept = {int(v): t.to("cpu") for v, t in extra.get(self.KEY, {}).items()}
        self._latest = None  # the resumed round's model: kept if a later step needs it


class StalenessWeight(UpdateRule):
    """FedBuff's staleness weight as a link of the update chain: the client's change is multiplied
    by s(tau) in the sum (``ClientUpdate.scale``), its weight n_k stays (module docstring)."""

    name = "staleness"
    stage = Stage.CORRECT

    def __init__(self, fedbuff: FedBuff):
        self.fedbuff = fedbuff

    def end_client(self, update: ClientUpdate, term: GradTerm | None, extra: torch.Tensor) -> None:
        v, tau = self.fedbuff.start(update.round, update.client)
        update.scale, update.version = staleness_weight(self.fedbuff.settings, tau), v


def model_source(participation: Any, device: torch.device) -> LatestModel | ModelVersions:
    """Where a round's clients start from: FedBuff's versions, or the current global model."""
    return ModelVersions(participation, device) if isinstance(participation, FedBuff) else LatestModel()


__all__ = ["FedBuff", "FedBuffSchedule", "FedBuffSettings", "LatestModel", "ModelVersions", "StalenessWeight",
           "model_source", "staleness_weight"]
