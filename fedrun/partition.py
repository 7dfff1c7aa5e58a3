"""Splitting one training set over N clients: per-class Dirichlet (non-IID) or IID.

Seeded by numpy's PCG64 from ``seed`` alone, so every rank computes the same partition without
talking to the others. ``client_shards(cfg, labels)`` is the one call of ``partition`` from a
config: training, ``fedrun eval``, ``fedrun audit``, the benchmarks and the tests all draw the
run's shards through it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from .errors import PartitionError

if TYPE_CHECKING:
    from .config import Config


def dirichlet_partition(labels: np.ndarray, num_clients: int, alpha: float,
                        rng: np.random.Generator) -> list[np.ndarray]:
    """The authors' scheme: for each class, proportions p ~ Dir(alpha * 1_N); the class's
    shuffled indices are cut at round(cumsum(p) * n_c), so the last client takes the remainder.
    Small alpha gives each client few classes; large alpha tends to IID. Clients may be empty.
    """
    shards: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        p = rng.dirichlet(np.full(num_clients, alpha))
        cuts = np.round(np.cumsum(p)[:-1] * len(idx)).astype(int)
        for k, part in enumerate(np.split(idx, cuts)):
            shards[k].append(part)
    return [np.sort(np.concatenate(s)) for s in shards]


def iid_partition(n: int, num_clients: int, rng: np.random.Generator) -> list[np.ndarray]:
    return [np.sort(part) for part in np.array_split(rng.permutation(n), num_clients)]


def partition(labels: np.ndarray, num_clients: int, scheme: str, alpha: float, seed: int,
              min_client_size: int = 0, max_resample: int = 100) -> list[np.ndarray]:
    """Indices of each client's shard. Dirichlet draws are repeated (up to ``max_resample``
    times) until every client holds at least ``min_client_size`` images."""
    labels = np.asarray(labels)
    if min_client_size * num_clients > len(labels):
        raise PartitionError(
            f"fed.min_client_size: {num_clients} clients x {min_client_size} images exceeds the "
            f"{len(labels)} training images; lower fed.min_client_size or fed.num_clients")
    rng = np.random.default_rng(seed)
    if scheme == "iid":
        return iid_partition(len(labels), num_clients, rng)
    for _ in range(max_resample):
        shards = dirichlet_partition(labels, num_clients, alpha, rng)
        if min(len(s) for s in shards) >= min_client_size:
            return shards
    raise PartitionError(
        f"fed.min_client_size: no Dirichlet(alpha={alpha}) draw in {max_resample} tries gave every "
        f"client >= {min_client_size} images; lower fed.min_client_size, raise fed.alpha, or raise "
        f"fed.max_resample")


def client_shards(cfg: Config, train_labels: np.ndarray) -> list[np.ndarray]:
    """Each client's indices into the train split, as the run trains them: the partition of
    fed.num_clients / fed.partition / fed.alpha / fed.min_client_size / fed.max_resample drawn
    from run.seed; a centralized run trains one shard of every image."""
    labels = np.asarray(train_labels)
    if cfg.run.mode != "fedavg":
        return [np.arange(len(labels))]
    f = cfg.fed
    return partition(labels, f.num_clients, f.partition, f.alpha, cfg.run.seed, f.min_client_size,
                     f.max_resample)


def class_counts(labels: np.ndarray, shards: list[np.ndarray], num_classes: int) -> np.ndarray:
    """[clients, classes] table of how many images of each class each client holds."""
    labels = np.asarray(labels)
    return np.stack([np.bincount(labels[s], minlength=num_classes) for s in shards])
