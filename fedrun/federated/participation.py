"""Participation: who takes part in round r.

``UniformParticipation`` is the authors' (and FedAvg's) rule: ``fed.clients_per_round`` of the
``fed.num_clients`` clients, uniformly without replacement, drawn from (seed, round), so every
rank draws the same list without talking to the others and a resumed round draws it again.
DP-FedAvg samples clients by Poisson instead (``fedrun.privacy.client_dp.PoissonParticipation``),
the sampling its accountant assumes.
"""

from __future__ import annotations

import numpy as np

from .. import seeding


def sample_clients(num_clients: int, per_round: int, seed: int, round_: int) -> list[int]:
    """Uniform without replacement, from (seed, round): identical on every rank."""
    if per_round >= num_clients:
        return list(range(num_clients))
    rng = np.random.default_rng(seeding.derive_seed(seeding.SELECT, seed, round_))
    return sorted(int(c) for c in rng.choice(num_clients, per_round, replace=False))


class UniformParticipation:
    """``per_round`` of ``num_clients`` clients, uniformly without replacement, from (seed, round)."""

    def __init__(self, num_clients: int, per_round: int, seed: int):
        self.num_clients, self.per_round, self.seed = num_clients, per_round, seed

    def clients(self, round_: int) -> list[int]:
        return sample_clients(self.num_clients, self.per_round, self.seed, round_)
