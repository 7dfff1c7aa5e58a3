"""Placement: which rank trains which of the round's clients (``fed.placement``).

The trained model does not depend on the placement: the round's sum is exact and
order-independent (fedrun/flat.py), so any placement gives the same bits
(tests/integration_tests/test_world_size.py checks two forced placements and 1 vs 2 ranks).
A placement only decides how long the ranks wait for each other at the all_reduce.

What a client costs (``client_costs``), in full steps of batch B:

    E * (s * ceil(n_k / B) + (1 - s) * n_k / B) + o

with s = ``fed.cost_step_share`` (the part of a step that does not shrink with a short batch:
about 1 on a GPU, where a short last batch costs a full step; 0.15 measured for the digits model
on a CPU core, where a step's cost follows its images) and o = ``fed.client_overhead_steps``
(every client's set-up: its generators, a fresh Adam, loading the global weights, the finite
check, its way into the sum; 0.17 steps measured on the digits default). docs/systems.md "Placement and
waiting" has the measurements.

* ``ByCost`` (``"cost"``): each round, the round's clients split over ranks by cost (greedy LPT:
  largest first, each to the least-loaded rank); every rank computes the same split.
* ``BySize`` (``"size"``): the same by image count.
* ``OnDemand`` (``"on_demand"``; ``"auto"`` without per-client state): clients handed out while
  the round runs, largest cost first:
  each rank takes the next one from a job-wide counter in the rendezvous store
  (``dist.counter_add``) when it is free. For ranks whose speed differs (or a rank 0 that also
  writes checkpoints): the faster rank simply takes more clients.
* ``HomeRanks``: with per-client state (kept Adam, SCAFFOLD, FedDyn, error feedback) every
  client has a fixed home rank for the whole run (LPT by cost over all clients), where its
  state lives; it always trains there. Used for "auto", "cost" and "size" when the run keeps
  state (``fedrun.registry.kept_state``); "on_demand" refuses a run with state.

A placement is one thing to the round loop: ``take(round, clients, rank)``, the clients this rank
trains, in order; the loop counts what was taken. Each registers itself in ``PLACEMENTS``
(``fed.placement``) with its keys (fedrun.registry).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from .. import dist
from ..config import FEDERATED, NOT_HASHED, Config, ConfigError, setting
from ..local_training import local_steps
from ..parts import Placement
from ..registry import Registry, Settings, kept_state

PLACEMENTS = Registry(
    "fed.placement", "auto", "Which rank trains which client (fedrun/federated/placement.py): \"auto\" "
    "(\"on_demand\", or home ranks by cost when clients keep state) | \"cost\" (each client's cost from "
    "its steps, images and set-up, balanced per round) | \"size\" (image counts) | \"on_demand\" (each "
    "free rank takes the next client, largest cost first, from a counter in the rendezvous store; not "
    "with per-client state). Not hashed: the round's sum is exact, so the model does not depend on it.",
    hashed=NOT_HASHED, label=False, off=False, applies=FEDERATED)


@dataclass
class CostSettings(Settings):
    """The cost model of the placements that balance cost."""

    cost_step_share: float = setting(0.15, hashed=NOT_HASHED, label=False)
    """Placement's cost model: the share of a full batch's step that any step costs, whatever its
    size (the rest scales with its images). Measured: 0.15 for the digits model on a CPU core; a
    GPU, where a short batch costs a full step, wants 1."""
    client_overhead_steps: float = setting(0.2, hashed=NOT_HASHED, label=False)
    """Placement's cost model: each client's set-up, in full steps (measured: 0.17 on the digits
    default on a CPU core)."""

    def validate(self) -> None:
        if not 0 <= self.cost_step_share <= 1:
            raise ConfigError(f"fed.cost_step_share: must be in [0, 1] (the share of a full step any step "
                              f"costs), got {self.cost_step_share}")
        if self.client_overhead_steps < 0:
            raise ConfigError(f"fed.client_overhead_steps: must be >= 0 (a client's set-up cost in local "
                              f"steps), got {self.client_overhead_steps}")


def client_costs(sizes: dict[int, int], batch_size: int, epochs: int, overhead_steps: float,
                 step_share: float = 1.0) -> dict[int, float]:
    """Each client's cost in full steps (module docstring); 0 if it has no data (the round loop
    skips it)."""
    return {k: step_share * local_steps(n, batch_size, epochs) + (1 - step_share) * epochs * n / batch_size
            + overhead_steps if n else 0.0 for k, n in sizes.items()}


def lpt(clients: list[int], cost: dict[int, float], world_size: int) -> list[list[int]]:
    """Greedy LPT: largest cost first (ties by id), each to the least-loaded rank (ties by rank).
    Deterministic, so every rank computes the same split without talking to the others. Within
    a rank, clients come largest first."""
    per_rank: list[list[int]] = [[] for _ in range(world_size)]
    load = [0.0] * world_size
    for c in sorted(clients, key=lambda c: (-cost[c], c)):
        r = min(range(world_size), key=lambda r: (load[r], r))
        per_rank[r].append(c)
        load[r] += cost[c]
    return per_rank


def assign_clients(clients: list[int], sizes: dict[int, int], world_size: int) -> list[list[int]]:
    """Split the round's clients over ranks by data size (LPT; empty clients count as 1 image)."""
    return lpt(clients, {k: float(max(sizes[k], 1)) for k in clients}, world_size)


def home_ranks(cost: dict[int, float], world_size: int) -> dict[int, int]:
    """A fixed rank for every client (LPT over all clients): where a client's kept state lives.
    With every client in every round this is the same split as ``ByCost`` makes."""
    return {k: r for r, ks in enumerate(lpt(list(cost), cost, world_size)) for k in ks}


def _costs(settings: CostSettings, cfg: Config, sizes: dict[int, int]) -> dict[int, float]:
    return client_costs(sizes, cfg.optim.batch_size, cfg.fed.local_epochs, settings.client_overhead_steps,
                        settings.cost_step_share)


class _Static:
    """A placement fixed before the round starts: every rank trains its own list."""

    def assign(self, clients: list[int]) -> list[list[int]]:
        raise NotImplementedError

    def take(self, round_: int, clients: list[int], rank: int) -> Iterable[int]:
        return self.assign(clients)[rank]


@PLACEMENTS.register("cost", CostSettings)
class ByCost(_Static):
    """Each round, the round's clients split over ranks by cost (``lpt``)."""

    def __init__(self, cost: dict[int, float], world_size: int):
        self.cost, self.world_size = cost, world_size

    def assign(self, clients: list[int]) -> list[list[int]]:
        return lpt(clients, self.cost, self.world_size)

    @classmethod
    def build(cls, settings: CostSettings, cfg: Config, sizes: dict[int, int], world_size: int,
              stateful: bool) -> Placement:
        cost = _costs(settings, cfg, sizes)
        return HomeRanks(cost, world_size) if stateful else cls(cost, world_size)


@PLACEMENTS.register("size")
class BySize(_Static):
    """Each round, the round's clients split over ranks by data size (``assign_clients``)."""

    def __init__(self, sizes: dict[int, int], world_size: int):
        self.sizes, self.world_size = sizes, world_size

    def assign(self, clients: list[int]) -> list[list[int]]:
        return assign_clients(clients, self.sizes, self.world_size)

    @classmethod
    def build(cls, settings: Any, cfg: Config, sizes: dict[int, int], world_size: int,
              stateful: bool) -> Placement:
        if stateful:
            return HomeRanks({k: float(max(n, 1)) for k, n in sizes.items()}, world_size)
        return cls(sizes, world_size)


class HomeRanks(_Static):
    """Every client trains on its fixed home rank (``home_ranks`` by ``cost``), which holds its
    kept state; within a rank, largest cost first (ties by id)."""

    def __init__(self, cost: dict[int, float], world_size: int):
        self.cost, self.world_size = cost, world_size
        self.home = home_ranks(cost, world_size)

    def assign(self, clients: list[int]) -> list[list[int]]:
        order = sorted(clients, key=lambda k: (-self.cost[k], k))
        return [[k for k in order if self.home[k] == rank] for rank in range(self.world_size)]

    def ranks_of(self, rank: int) -> set[int]:
        """The clients whose home is ``rank``."""
        return {k for k, r in self.home.items() if r == rank}


@PLACEMENTS.register("on_demand", CostSettings)
class OnDemand:
    """Clients handed out while the round runs: the round's clients in order of cost (largest
    first, ties by id) are tickets 0, 1, ...; a free rank takes the next ticket from a job-wide
    counter (one ``dist.counter_add`` per client it takes, and one that finds none left). Who
    trains what depends on the ranks' speed."""

    def __init__(self, cost: dict[int, float], world_size: int):
        self.cost, self.world_size = cost, world_size

    def take(self, round_: int, clients: list[int], rank: int) -> Iterator[int]:
        order = sorted(clients, key=lambda k: (-self.cost[k], k))
        if self.world_size == 1:  # nobody to share with: no counter (a process's second run would
            yield from order      # find the first run's counters of the same rounds used up)
            return
        while (ticket := dist.counter_add(f"handout/{round_}") - 1) < len(order):
            yield order[ticket]

    @classmethod
    def build(cls, settings: CostSettings, cfg: Config, sizes: dict[int, int], world_size: int,
              stateful: bool) -> Placement:
        return cls(_costs(settings, cfg, sizes), world_size)

    @classmethod
    def check(cls, cfg: Config) -> None:
        if kept_state(cfg):
            raise ConfigError("fed.placement: 'on_demand' hands a client to whichever rank is free, but this "
                              "run keeps per-client state (kept Adam, SCAFFOLD, FedDyn or error feedback) on "
                              "each client's home rank; set fed.placement = \"cost\"")


@PLACEMENTS.register("auto", CostSettings)
class Auto:
    """On demand, or home ranks by cost when clients keep state."""

    @classmethod
    def build(cls, settings: CostSettings, cfg: Config, sizes: dict[int, int], world_size: int,
              stateful: bool) -> Placement:
        cost = _costs(settings, cfg, sizes)
        return HomeRanks(cost, world_size) if stateful else OnDemand(cost, world_size)


def build_placement(cfg: Config, sizes: dict[int, int], world_size: int, stateful: bool) -> Placement:
    """The placement ``fed.placement`` names; home ranks (by its cost) when clients keep state."""
    return PLACEMENTS.selected(cfg).target.build(PLACEMENTS.settings(cfg), cfg, sizes, world_size, stateful)


def home_clients(cfg: Config, sizes: dict[int, int], world_size: int, rank: int) -> set[int]:
    """The clients whose kept state lives on ``rank`` (resume hands each rank its own)."""
    home = build_placement(cfg, sizes, world_size, stateful=True)
    assert isinstance(home, HomeRanks)
    return home.ranks_of(rank)
