import numpy as np
import pytest

from fedrun.partition import PartitionError, class_counts, partition

LABELS = np.repeat(np.arange(10), 100)  # 1,000 images, 100 per class


def test_shards_cover_every_image_exactly_once():
    for scheme in ("dirichlet", "iid"):
        shards = partition(LABELS, 10, scheme, 0.5, seed=0)
        allidx = np.concatenate(shards)
        assert len(shards) == 10 and len(allidx) == len(LABELS)
        assert np.array_equal(np.sort(allidx), np.arange(len(LABELS)))


def test_same_seed_same_partition_other_seed_other_partition():
    a = partition(LABELS, 10, "dirichlet", 0.5, seed=3)
    b = partition(LABELS, 10, "dirichlet", 0.5, seed=3)
    c = partition(LABELS, 10, "dirichlet", 0.5, seed=4)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c, strict=True))


def skew(alpha: float) -> float:
    """Mean over clients and seeds of the largest class share of a client (1.0 = one class)."""
    shares = []
    for seed in range(5):
        counts = class_counts(LABELS, partition(LABELS, 10, "dirichlet", alpha, seed), 10)
        counts = counts[counts.sum(1) > 0]
        shares.append((counts.max(1) / counts.sum(1)).mean())
    return float(np.mean(shares))


def test_smaller_alpha_means_more_skew():
    assert skew(0.1) > skew(0.5) > skew(5.0) > skew(1000.0)
    assert skew(1000.0) < 0.2  # near IID: about 1/10 per class


def test_min_client_size_resamples_or_fails_clearly():
    shards = partition(LABELS, 10, "dirichlet", 0.5, seed=0, min_client_size=40, max_resample=500)
    assert min(len(s) for s in shards) >= 40
    with pytest.raises(PartitionError, match="fed.min_client_size"):
        partition(LABELS, 10, "dirichlet", 0.05, seed=0, min_client_size=99, max_resample=3)
