"""Placement: which rank trains which of the round's clients.

Every rank computes the same placement from the same inputs, so no communication is needed.

* ``BySize``: each round, the round's clients are split over ranks by data size (greedy LPT);
* ``HomeRanks``: every client has a fixed home rank for the whole run (LPT over all clients),
  where its kept state lives (Adam moments, control variates, ...); a client always trains there.

The trained model does not depend on the placement beyond the order of the fp32 sum
(tests/integration_tests/test_world_size.py bounds it).
"""

from __future__ import annotations


def home_ranks(sizes: dict[int, int], world_size: int) -> dict[int, int]:
    """A fixed rank for every client (LPT over all clients): where a client's kept state lives.

    With every client in every round this is the same split as ``assign_clients``."""
    return {k: r for r, ks in enumerate(assign_clients(list(sizes), sizes, world_size)) for k in ks}


def assign_clients(clients: list[int], sizes: dict[int, int], world_size: int) -> list[list[int]]:
    """Split the round's clients over ranks, balanced by data size (greedy LPT).

    Deterministic: largest client first (ties by id), each to the least-loaded rank (ties by
    rank). Every rank computes the same assignment from the same inputs, so no communication is
    needed.
    """
    per_rank: list[list[int]] = [[] for _ in range(world_size)]
    load = [0] * world_size
    for c in sorted(clients, key=lambda c: (-sizes[c], c)):
        r = min(range(world_size), key=lambda r: (load[r], r))
        per_rank[r].append(c)
        load[r] += max(sizes[c], 1)  # count empty clients too, so they spread out
    return per_rank


class BySize:
    """Each round, the round's clients split over ranks by data size (``assign_clients``)."""

    def __init__(self, sizes: dict[int, int], world_size: int):
        self.sizes, self.world_size = sizes, world_size

    def assign(self, clients: list[int]) -> list[list[int]]:
        return assign_clients(clients, self.sizes, self.world_size)


class HomeRanks:
    """Every client trains on its fixed home rank (``home_ranks``), which holds its kept state.

    Within a rank, clients come in ``assign_clients``' order (largest first, ties by id), so the
    fp32 sum of a rank is formed in the same order as with ``BySize`` when the split agrees."""

    def __init__(self, sizes: dict[int, int], world_size: int):
        self.sizes, self.world_size = sizes, world_size
        self.home = home_ranks(sizes, world_size)

    def assign(self, clients: list[int]) -> list[list[int]]:
        order = sorted(clients, key=lambda k: (-self.sizes[k], k))
        return [[k for k in order if self.home[k] == rank] for rank in range(self.world_size)]

    def ranks_of(self, rank: int) -> set[int]:
        """The clients whose home is ``rank``."""
        return {k for k, r in self.home.items() if r == rank}
