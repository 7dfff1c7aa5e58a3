"""Secure aggregation (fedrun/privacy/secure_agg.py): the masked sum is the plain sum bit for bit
after dropouts, in one process and across two gloo ranks; a masked vector looks uniform; a round
that cannot be recovered is refused untouched; the graph, Shamir sharing and settings checks."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fedrun.errors import ConfigError
from fedrun.privacy import secure_agg as sa

from helpers import free_port


def vector(client: int, dim: int) -> torch.Tensor:
    """A client's int64 vector over the whole int64 range (sums wrap), from its id alone."""
    g = torch.Generator().manual_seed(1000 + client)
    return torch.randint(-2**63, 2**63 - 1, (dim,), generator=g, dtype=torch.int64)


def plain_sum(clients, dim: int) -> torch.Tensor:
    total = torch.zeros(dim, dtype=torch.int64)
    for c in clients:
        total += vector(c, dim)  # int64 addition wraps modulo 2^64, as the masked sum does
    return total


def dropouts(participants, fraction: float, seed: int) -> list[int]:
    rng = np.random.default_rng(seed)
    return sorted(int(c) for c in rng.choice(participants, size=math.floor(fraction * len(participants)),
                                             replace=False))


def masked_round(rnd: sa.SecureRound, survivors, dim: int) -> torch.Tensor:
    total = torch.zeros(dim, dtype=torch.int64)
    for c in rnd.participants:
        v = vector(c, dim)
        rnd.mask_(c, v)
        assert not torch.equal(v, vector(c, dim))
        if c in survivors:  # a dropped client masked its vector, but it never reached the sum
            total += v
    return total


# --------------------------------------------------------------------------------------------
# The masked sum is the plain sum


@pytest.mark.parametrize("n, k, t, drop_seed", [
    (10, 8, 5, 0),    # the default's size: the paper's (k, t) for 10 clients
    (10, 9, 5, 1),    # the complete graph (SecAgg)
    (20, 14, 8, 2),   # recommended_graph(20)
    (40, 10, 4, 3),   # a sparse graph: 10 of 39 possible neighbours
])
def test_masked_sum_is_the_plain_sum_with_30_percent_dropped(n, k, t, drop_seed):
    participants = list(range(100, 100 + n))
    dropped = dropouts(participants, 0.3, drop_seed)
    survivors = [c for c in participants if c not in dropped]
    rnd = sa.SecureRound(7, participants, k, t, seed=11)
    total = masked_round(rnd, set(survivors), dim=257)
    assert rnd.recoverable(survivors) == ""
    assert not torch.equal(total, plain_sum(survivors, 257))  # the masks are there before unmasking
    assert rnd.unmask_(total, survivors) is True
    assert torch.equal(total, plain_sum(survivors, 257))


def test_no_dropouts_and_numpy_vectors():
    rnd = sa.SecureRound(1, range(6), 4, 3, seed=0)
    total = np.zeros(33, dtype=np.int64)
    for c in range(6):
        v = vector(c, 33).numpy().copy()
        rnd.mask_(c, v)
        total += v
    assert rnd.unmask_(total, range(6))
    assert np.array_equal(total, plain_sum(range(6), 33).numpy())


def _rank(rank: int, world: int, port: int, out: str, n: int, dim: int, survivors: list[int]) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        clients = list(range(n))
        rnd = sa.SecureRound(3, clients, 8, 5, seed=5, local=clients[rank::world],
                             exchange=sa.all_gather_exchange)  # keys from os.urandom, exchanged
        buf = torch.zeros(dim, dtype=torch.int64)
        for c in rnd.local:
            v = vector(c, dim)
            rnd.mask_(c, v)
            if c in survivors:
                buf += v
        dist.all_reduce(buf, op=dist.ReduceOp.SUM)  # int64: wraps modulo 2^64
        ok = rnd.unmask_(buf, survivors)
        torch.save({"ok": ok, "sum": buf, "local": rnd.local}, os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


# spawn: fresh interpreters, as torchrun starts them (6-7 s here, importing torch twice on 2 cores);
# fork: the same processes from this one's imports (0.2 s), so the default suite runs it too
@pytest.mark.parametrize("start", ["fork", pytest.param("spawn", marks=pytest.mark.slow)])
def test_two_gloo_ranks_unmask_the_plain_sum(tmp_path, start):
    n, dim = 10, 1000
    survivors = [c for c in range(n) if c not in dropouts(list(range(n)), 0.3, 4)]
    mp.start_processes(_rank, args=(2, free_port(), str(tmp_path), n, dim, survivors), nprocs=2, join=True,
                       start_method=start)
    expected = plain_sum(survivors, dim)
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert [r["local"] for r in results] == [tuple(range(0, n, 2)), tuple(range(1, n, 2))]
    for r in results:
        assert r["ok"] is True and torch.equal(r["sum"], expected)


# --------------------------------------------------------------------------------------------
# What the server sees of one client


def test_a_masked_contribution_looks_uniform():
    """Chi-square of the byte values and the frequency of each of the 64 bits of a masked,
    highly structured vector (0, 1, 2, ...); thresholds at a false-alarm probability of 1e-6
    (the keys are seeded: the same bytes on every run)."""
    from scipy.stats import chi2, norm  # here: the gloo test's spawned ranks need not import it
    words = 1 << 14
    rnd = sa.SecureRound(2, range(10), 8, 5, seed=3, key_source="seed")
    v = torch.arange(words, dtype=torch.int64)
    rnd.mask_(4, v)

    def looks_uniform(x: torch.Tensor) -> bool:
        raw = x.numpy().view(np.uint8)
        counts = np.bincount(raw, minlength=256)
        expected = raw.size / 256
        byte_ok = ((counts - expected) ** 2 / expected).sum() <= chi2.isf(1e-6, 255)
        bits = (x.numpy().view(np.uint64)[:, None] >> np.arange(64, dtype=np.uint64)) & np.uint64(1)
        z = (bits.sum(axis=0) - words / 2) / math.sqrt(words / 4)
        bit_ok = np.abs(z).max() <= norm.isf(1e-6 / 128)
        return bool(byte_ok and bit_ok)

    assert looks_uniform(v)
    assert not looks_uniform(torch.arange(words, dtype=torch.int64))  # the test sees structure
    again = torch.arange(words, dtype=torch.int64)
    sa.SecureRound(2, range(10), 8, 5, seed=3, key_source="seed").mask_(4, again)
    assert torch.equal(v, again)  # seeded keys: reproducible
    fresh = torch.arange(words, dtype=torch.int64)
    sa.SecureRound(2, range(10), 8, 5, seed=3).mask_(4, fresh)
    assert not torch.equal(v, fresh)  # os.urandom keys: new masks


# --------------------------------------------------------------------------------------------
# Rounds that cannot be recovered


def test_too_few_survivors_leave_the_sum_untouched():
    rnd = sa.SecureRound(4, range(10), 8, 5, seed=1, min_survivors=6)
    survivors = [0, 1, 2, 3, 4]
    total = masked_round(rnd, set(survivors), dim=64)
    before = total.clone()
    assert rnd.unmask_(total, survivors) is False
    assert torch.equal(total, before)
    assert "min_survivors = 6" in rnd.last_failure and "\n" not in rnd.last_failure


def test_a_client_with_too_few_surviving_neighbours_is_refused():
    participants = list(range(20))
    rnd = sa.SecureRound(4, participants, 4, 3, seed=2)
    u = participants[0]
    survivors = [c for c in participants if c not in rnd.graph[u][:2]]  # u keeps 2 of 4 neighbours
    total = masked_round(rnd, set(survivors), dim=16)
    before = total.clone()
    assert rnd.unmask_(total, survivors) is False
    assert torch.equal(total, before)
    assert "surviving neighbours" in rnd.last_failure


def test_a_round_too_small_for_the_threshold_is_refused():
    rnd = sa.SecureRound(1, range(4), 8, 5, seed=0)  # 3 neighbours each, threshold 5
    assert "fewer than secure_agg.threshold" in rnd.recoverable(range(4))


# --------------------------------------------------------------------------------------------
# Parts


def test_the_graph_is_k_regular_symmetric_and_seeded():
    participants = list(range(5, 45))
    g = sa.neighbour_graph(participants, 6, seed=1, round_=3)
    assert sorted(g) == participants
    for u, vs in g.items():
        assert len(vs) == 6 and u not in vs and all(u in g[v] for v in vs)
    assert g == sa.neighbour_graph(participants, 6, seed=1, round_=3)
    assert g != sa.neighbour_graph(participants, 6, seed=1, round_=4)
    assert all(len(vs) == 9 for vs in sa.neighbour_graph(range(10), 12, seed=1, round_=1).values())
    assert all(len(vs) == 6 for vs in sa.neighbour_graph(range(20), 5, seed=1, round_=1).values())


def test_recommended_graph_follows_the_paper():
    assert sa.recommended_graph(10) == (8, 5)  # the digits default's 10 clients per round
    k100, t100 = sa.recommended_graph(100, semi_malicious=False)
    k1000, t1000 = sa.recommended_graph(1000, semi_malicious=False)
    assert k100 < 99 and k1000 / 1000 < k100 / 100  # sparse, and sparser as n grows
    for n, (k, t) in [(10, (8, 5)), (100, (k100, t100)), (1000, (k1000, t1000))]:
        assert 2 <= t <= k <= n - 1
    assert sa.recommended_neighbours(10) == 8


def test_shamir_needs_the_threshold():
    import sympy
    assert sympy.isprime(sa.PRIME) and sa.PRIME > 2**256  # every 32-byte secret is a field element
    secret = b"\xff" * 32
    shares = sa.shamir_split(secret, 4, 7)
    assert len(shares) == 7 and all(len(s) == sa.SHARE_BYTES for s in shares)
    assert sa.shamir_combine([(j + 1, shares[j]) for j in (6, 2, 0, 5)]) == secret
    assert sa.shamir_combine([(j + 1, shares[j]) for j in range(7)]) == secret
    # three shares fit a degree-2 polynomial through them: its constant is not the secret
    three = [(j + 1, shares[j]) for j in (1, 3, 4)]
    assert sa.shamir_combine(three + [(8, bytes(sa.SHARE_BYTES))]) != secret
    assert sa.shamir_split(secret, 4, 7) != shares  # fresh random coefficients


def test_masks_are_chunked_and_signed_consistently():
    seed = bytes(range(32))
    a = np.arange(1000, dtype=np.uint64)
    b = a.copy()
    sa.add_masks_(a, [(seed, 1)])
    sa.add_masks_(b, [(seed, 1)], chunk=7)  # chunk boundaries do not change the stream
    assert np.array_equal(a, b)
    assert np.array_equal(a - np.arange(1000, dtype=np.uint64), sa.prg_words(seed, 1000))
    sa.add_masks_(a, [(seed, -1)])
    assert np.array_equal(a, np.arange(1000, dtype=np.uint64))


def test_costs_and_bytes_are_counted():
    rnd = sa.SecureRound(1, range(10), 8, 5, seed=0)
    for c in range(10):
        rnd.mask_(c, torch.zeros(8, dtype=torch.int64))
    assert rnd.costs.sent[0] == 2 * sa.KEY_BYTES + 8 * sa.SHARE_MESSAGE
    assert rnd.unmask_(torch.zeros(8, dtype=torch.int64), range(7))
    assert rnd.costs.sent[0] == 2 * sa.KEY_BYTES + 8 * sa.SHARE_MESSAGE + 8 * sa.REVEAL_MESSAGE
    assert rnd.costs.sent[9] == 2 * sa.KEY_BYTES + 8 * sa.SHARE_MESSAGE  # dropped: revealed nothing
    s = rnd.costs.summary()
    assert s["key_agreement_s"] > 0 and s["mask_s"] > 0 and s["recovery_s"] > 0 and s["clients"] == 10


@pytest.mark.parametrize("args, key", [
    ((10, 12, 5, 7), "secure_agg.neighbours"),   # more neighbours than other clients
    ((10, 7, 5, 7), "secure_agg.neighbours"),    # odd, below n - 1
    ((10, 8, 9, 7), "secure_agg.threshold"),     # threshold above the neighbour count
    ((10, 8, 1, 7), "secure_agg.threshold"),     # one share would reveal the secret
    ((10, 8, 5, 11), "secure_agg.min_survivors"),  # above the clients per round
    ((10, 8, 5, 1), "secure_agg.min_survivors"),
    ((2, 1, 2, 2), "secure_agg.protocol"),
])
def test_bad_settings_are_one_line_naming_the_key(args, key):
    with pytest.raises(ConfigError) as err:
        sa.check_settings(*args)
    msg = str(err.value)
    assert msg.startswith(key + ":") and "\n" not in msg and "set" in msg


def test_bad_bits_and_good_settings():
    with pytest.raises(ConfigError, match=r"^secure_agg\.bits:"):
        sa.check_settings(10, 8, 5, 7, bits=1)
    sa.check_settings(10, 8, 5, 7, bits=16)
    sa.check_settings(10, 9, 5, 7)  # the complete graph may be odd


def test_a_small_round_keeps_the_survivors_its_noise_shares_were_sized_for():
    """Distributed DP sizes each client's noise share so that min_survivors of a clients_per_round
    round (default t(30) = 11) carry the whole noise. A Poisson-drawn round of 18 clients has t = 7:
    with 9 survivors it would unmask a sum carrying 9 / 11 of the accounted variance."""
    from fedrun.privacy.secure_sum import SecAggSettings, SecureMasking

    settings = SecAggSettings(bits=16, keys="seed")
    masking = SecureMasking(settings, seed=0, numbers=8, bits=16, noise_survivors=lambda n: 11)
    masking.begin_round(1, list(range(18)))
    assert masking.round is not None and masking.round.threshold == 7
    survivors = range(0, 18, 2)  # 9 of 18, every other client of the ring: each keeps 6 neighbours
    assert "9 of 18 clients survived, fewer than secure_agg.min_survivors = 11" in \
        masking.round.recoverable(survivors)
    assert masking.round.recoverable(range(18)) == ""
    plain = SecureMasking(settings, seed=0, numbers=8, bits=64)  # no noise on the grid: the round's own t
    plain.begin_round(1, list(range(18)))
    assert plain.round is not None and plain.round.min_survivors == 7


def test_each_round_keeps_the_survivors_its_own_shares_were_sized_for():
    """secure_agg.survivor_fraction 0.9: a round of 30 clients sizes its shares for 27 survivors and a
    round of 18 for 17 (never fewer than min_survivors = 11), and keeps that many."""
    from fedrun.privacy import distributed_dp as ddp
    from fedrun.privacy.secure_sum import SecAggSettings, SecureMasking

    grid = ddp.DistributedDP(clip=1.0, noise_multiplier=1.0, bits=16, dim=8, clients=40, min_survivors=11,
                             seed=0, survivor_fraction=0.9)
    masking = SecureMasking(SecAggSettings(bits=16, keys="seed", survivor_fraction=0.9), seed=0, numbers=8,
                            bits=16, noise_survivors=grid.noise_survivors)
    for n, kept in ((30, 27), (18, 17), (12, 11)):
        masking.begin_round(1, list(range(n)))
        assert masking.round is not None and masking.round.min_survivors == kept
    masking.begin_round(2, list(range(30)))
    assert masking.round is not None
    assert "26 of 30 clients survived" in masking.round.recoverable(range(26))
    assert masking.round.recoverable(range(27)) == ""


@pytest.mark.parametrize(("over", "message"), [
    ({"secure_agg.survivor_fraction": "1.2"}, r"^secure_agg\.survivor_fraction: must be in \[0, 1\]"),
    ({"secure_agg.survivor_fraction": "0.9", "secure_agg.bits": "0"},
     r"^secure_agg\.survivor_fraction sizes distributed DP's noise shares"),
])
def test_survivor_fraction_refuses_in_one_line(over, message):
    from fedrun.config import load_config
    base = {"secure_agg.protocol": "secagg+", "secure_agg.bits": "16", "privacy.level": "client",
            "privacy.noise_multiplier": "1.0", "eval.local_models_at": "", "sample.client_per_class": "0"}
    with pytest.raises(ConfigError, match=message):
        load_config(None, {**base, **over})
