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
check, its way into the sum; 0.17 steps measured on the digits default). README "Placement and
waiting" has the measurements.

* ``ByCost`` (``"cost"``): each round, the round's clients split over ranks by cost (greedy LPT:
  largest first, each to the least-loaded rank); every rank computes the same split.
* ``BySize`` (``"size"``): the same by image count (fedrun before this placement existed).
* ``OnDemand`` (``"on_demand"``; ``"auto"`` without per-client state): clients handed out while
  the round runs, largest cost first:
  each rank takes the next one from a job-wide counter in the rendezvous store
  (``dist.counter_add``) when it is free. For ranks whose speed differs (or a rank 0 that also
  writes checkpoints): the faster rank simply takes more clients.
* ``HomeRanks``: with per-client state (kept Adam, SCAFFOLD, FedDyn, error feedback) every
  client has a fixed home rank for the whole run (LPT by cost over all clients), where its
  state lives; it always trains there. Used for "auto", "cost" and "size" when the run keeps
  state; "on_demand" is refused with state (config validation).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from .. import dist
from ..config import Config
from ..local_training import local_steps


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


class _Static:
    """A placement fixed before the round starts: every rank trains its own list."""

    def assign(self, clients: list[int]) -> list[list[int]]:
        raise NotImplementedError

    def take(self, round_: int, clients: list[int], rank: int) -> Iterable[int]:
        return self.assign(clients)[rank]


class ByCost(_Static):
    """Each round, the round's clients split over ranks by cost (``lpt``)."""

    def __init__(self, cost: dict[int, float], world_size: int):
        self.cost, self.world_size = cost, world_size

    def assign(self, clients: list[int]) -> list[list[int]]:
        return lpt(clients, self.cost, self.world_size)


class BySize(_Static):
    """Each round, the round's clients split over ranks by data size (``assign_clients``)."""

    def __init__(self, sizes: dict[int, int], world_size: int):
        self.sizes, self.world_size = sizes, world_size

    def assign(self, clients: list[int]) -> list[list[int]]:
        return assign_clients(clients, self.sizes, self.world_size)


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


class OnDemand:
    """Clients handed out while the round runs: the round's clients in order of cost (largest
    first, ties by id) are tickets 0, 1, ...; a free rank takes the next ticket from a job-wide
    counter (one ``dist.counter_add`` per client it takes, and one that finds none left).
    ``assign`` is the LPT split it would make if every step cost the same (for the progress bar
    and the idle-rank warning); who trains what in fact depends on the ranks' speed."""

    def __init__(self, cost: dict[int, float], world_size: int):
        self.cost, self.world_size = cost, world_size

    def assign(self, clients: list[int]) -> list[list[int]]:
        return lpt(clients, self.cost, self.world_size)

    def take(self, round_: int, clients: list[int], rank: int) -> Iterator[int]:
        order = sorted(clients, key=lambda k: (-self.cost[k], k))
        while (ticket := dist.counter_add(f"handout/{round_}") - 1) < len(order):
            yield order[ticket]


def build_placement(cfg: Config, sizes: dict[int, int], world_size: int,
                    stateful: bool) -> ByCost | BySize | HomeRanks | OnDemand:
    """The placement of ``fed.placement``; home ranks (by the same cost) when clients keep state."""
    f = cfg.fed
    if f.placement == "size":
        return HomeRanks({k: float(max(n, 1)) for k, n in sizes.items()}, world_size) if stateful \
            else BySize(sizes, world_size)
    cost = client_costs(sizes, cfg.optim.batch_size, f.local_epochs, f.client_overhead_steps,
                        f.cost_step_share)
    if stateful:
        return HomeRanks(cost, world_size)
    return ByCost(cost, world_size) if f.placement == "cost" else OnDemand(cost, world_size)


def home_clients(cfg: Config, sizes: dict[int, int], world_size: int, rank: int) -> set[int]:
    """The clients whose kept state lives on ``rank`` (resume hands each rank its own)."""
    home = build_placement(cfg, sizes, world_size, stateful=True)
    assert isinstance(home, HomeRanks)
    return home.ranks_of(rank)
