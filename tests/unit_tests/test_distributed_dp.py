"""Distributed DP's encoding (fedrun/privacy/distributed_dp.py): the rotation round-trips, the
rounding is unbiased and bounded, the modular wrap is exact in range, the Skellam shares have
their variance, and a secure sum of encodings decodes to the sum of clipped vectors within the
error the rounding and the noise give; bad settings are one line."""

from __future__ import annotations

import math

import pytest
import torch
from scipy.linalg import hadamard as dense_hadamard
from scipy.stats import norm

from fedrun.errors import ConfigError
from fedrun.privacy import distributed_dp as ddp
from fedrun.privacy import skellam_accountant as acc

Z = norm.isf(1e-6 / 2)  # two-sided threshold at a false-alarm probability of 1e-6 per check


def test_hadamard_is_the_dense_matrix_and_its_own_inverse():
    x = torch.randn(3, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    dense = torch.from_numpy(dense_hadamard(64).astype("float64")) / 8
    assert torch.allclose(ddp.hadamard(x), x @ dense.T, rtol=0, atol=1e-12)
    assert torch.allclose(ddp.hadamard(ddp.hadamard(x)), x, rtol=0, atol=1e-12)
    with pytest.raises(ValueError):
        ddp.hadamard(torch.zeros(48))


def test_rotation_round_trips_and_keeps_the_norm():
    x = torch.randn(1000, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    signs = ddp.rotation_signs(1000, seed=3, round_=2)
    assert signs.numel() == 1024 and set(signs.tolist()) == {-1.0, 1.0}
    y = ddp.rotate(x, signs)
    assert math.isclose(y.norm().item(), x.norm().item(), rel_tol=1e-12)
    assert torch.allclose(ddp.unrotate(y, signs, 1000), x, rtol=0, atol=1e-12)
    assert torch.equal(signs, ddp.rotation_signs(1000, seed=3, round_=2))
    assert not torch.equal(signs, ddp.rotation_signs(1000, seed=3, round_=3))
    # flattening: a spike spreads to +-|x| / sqrt(d') on every coordinate
    spike = torch.zeros(1000, dtype=torch.float64)
    spike[7] = 32.0
    assert torch.allclose(ddp.rotate(spike, signs).abs(), torch.full((1024,), 1.0, dtype=torch.float64))


def test_randomized_rounding_is_unbiased_within_its_variance():
    g = torch.Generator().manual_seed(5)
    x = torch.linspace(-3, 3, 257, dtype=torch.float64)
    reps = 4000
    draws = torch.stack([ddp.randomized_round(x, g) for _ in range(reps)]).to(torch.float64)
    frac = x - torch.floor(x)
    assert ((draws - x).abs() < 1).all()
    sd = torch.sqrt(frac * (1 - frac) / reps)
    z = norm.isf(1e-6 / (2 * x.numel()))  # Bonferroni over the coordinates
    assert ((draws.mean(0) - x).abs() <= z * sd + 1e-12).all()
    assert (draws.var(0) <= 0.25 * (1 + z * math.sqrt(2 / reps))).all()


def test_conditional_rounding_respects_its_bound():
    g = torch.Generator().manual_seed(6)
    d, c = 1024, 40.0
    rows = torch.randn(50, d, dtype=torch.float64, generator=g)
    rows = rows / rows.norm(dim=1, keepdim=True) * c
    bound = acc.rounded_l2_bound(c, d)
    out = ddp.conditional_round(rows, bound, g)
    assert out.dtype == torch.int64 and ((out - rows).abs() < 1).all()
    assert (out.to(torch.float64).norm(dim=1) <= bound).all()
    # Kairouz et al.'s Thm. 1: an unconditional draw lands within the bound with probability >= 1 - beta
    hits = sum(float(ddp.randomized_round(rows[0], g).to(torch.float64).norm()) <= bound for _ in range(400))
    assert hits / 400 >= (1 - acc.BETA) - Z * math.sqrt(0.25 / 400)


def test_wrap_and_centre_are_exact_in_range():
    bits, n = 12, 7
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    g = torch.Generator().manual_seed(7)
    parts = torch.randint(-300, 300, (n, 500), generator=g)
    true = parts.sum(0)
    assert true.min() >= lo and true.max() <= hi
    wrapped = ddp.wrap(parts, bits)
    assert wrapped.min() >= 0 and wrapped.max() < 1 << bits
    assert torch.equal(ddp.centre(wrapped.sum(0), bits), true)
    edge = torch.tensor([lo, hi, hi + 1])  # one past the range comes back on the other side
    assert ddp.centre(ddp.wrap(edge, bits), bits).tolist() == [lo, hi, lo]
    assert torch.equal(ddp.centre(torch.tensor([-5, 2**62]), 64), torch.tensor([-5, 2**62]))


def test_skellam_shares_have_their_variance_and_sum_to_at_least_the_target():
    g = torch.Generator().manual_seed(8)
    lam, n = 3.5, 200_000
    s = ddp.skellam_share(n, lam, g).to(torch.float64)
    var = 2 * lam
    assert abs(s.mean().item()) <= Z * math.sqrt(var / n)
    # sample variance: sd sqrt((kappa4 + 2 var^2) / n), kappa4 = 2 lam for Sk(lam, lam)
    assert abs(s.var().item() - var) <= Z * math.sqrt((2 * lam + 2 * var ** 2) / n)
    enc = ddp.DistributedDP(clip=1.0, noise_multiplier=1.3, bits=20, dim=100, clients=10, min_survivors=6,
                            seed=0)
    for m in (6, 8, 10):  # m survivors carry Sk(m lam, m lam): variance >= the target when m >= min_survivors
        assert 2 * m * enc.share_lambda() >= enc.variance * (1 - 1e-12)
    assert 2 * 5 * enc.share_lambda() < enc.variance


def _round(enc: ddp.DistributedDP, xs, survivors, round_=4):
    total = torch.zeros(enc.padded_dim, dtype=torch.int64)
    for c in survivors:
        total += enc.encode(xs[c], round_, c)  # int64: the secure sum's arithmetic
    return enc.decode(total, round_)


@pytest.mark.parametrize("noise", [0.0, 0.8])
def test_encode_then_decode_gives_the_clipped_sum(noise):
    d, n = 1000, 10
    g = torch.Generator().manual_seed(9)
    xs = [torch.randn(d, generator=g, dtype=torch.float64) * (0.02 if c % 2 else 0.2) for c in range(n)]
    enc = ddp.DistributedDP(clip=1.0, noise_multiplier=noise, bits=16, dim=d, clients=n, min_survivors=7,
                            seed=1)
    survivors = [0, 1, 2, 4, 5, 6, 8, 9]
    err = _round(enc, xs, survivors) - sum(ddp.clip_l2(xs[c], 1.0) for c in survivors)
    m, dp = len(survivors), enc.padded_dim
    s = enc.scale
    # every coordinate of the rotated-back error has variance <= m / 4 (rounding) + 2 m lam (noise), / s^2;
    # E e^4 <= m / 4 + 3 (m / 4)^2 bounds the rounding's share of the spread of ||e||^2
    v_round, v_noise = m / 4, 2 * m * enc.share_lambda()
    mean = d * (v_round + v_noise) / s ** 2
    spread = math.sqrt(d * (m / 4 + 3 * (m / 4) ** 2 + 2 * v_noise ** 2 + 6 * v_noise * v_round)) / s ** 2
    assert err.square().sum().item() <= mean + Z * spread
    # no coordinate errs by more than the whole error's norm: m sqrt(d') from the rounding, and the
    # noise's largest coordinate (Bonferroni over d') times sqrt(d')
    z_max = norm.isf(1e-6 / (2 * dp))
    assert err.abs().max().item() <= (m + z_max * math.sqrt(v_noise)) * math.sqrt(dp) / s
    if noise:  # the noise is there, with its variance
        assert err.square().sum().item() >= d * v_noise / s ** 2 - Z * spread


def test_encodings_are_reproducible_and_sample_level_records_are_rows():
    d = 100
    enc = ddp.DistributedDP(clip=1.0, noise_multiplier=1.0, bits=20, dim=d, clients=4, min_survivors=3,
                            seed=2, records=64)
    g = torch.Generator().manual_seed(10)
    rows = torch.randn(16, d, generator=g, dtype=torch.float64)
    a, b = enc.encode(rows, 3, 1), enc.encode(rows, 3, 1)
    assert torch.equal(a, b) and not torch.equal(a, enc.encode(rows, 3, 2))
    quiet = ddp.DistributedDP(1.0, 0.0, 20, d, 4, 3, seed=2, records=64, scale=enc.scale)
    out = quiet.decode(quiet.encode(rows, 3, 1), 3)
    expected = ddp.clip_l2(rows, 1.0).sum(0)  # each row clipped on its own, then summed
    assert (out - expected).abs().max().item() <= 16 * math.sqrt(quiet.padded_dim) / quiet.scale


def test_the_scale_fits_k_standard_deviations_in_the_bits():
    bits, clip, d, n, var = 16, 1.0, 5000, 10, 4.0
    s = ddp.choose_scale(bits, clip, d, n, var)
    k = ddp.stddevs_for(ddp.CLIP_PROB)
    sd = math.sqrt((n * clip) ** 2 / ddp.padded_dim(d) * s ** 2 + n / 4 + var * s ** 2)
    assert math.isclose(2 * k * sd, 2.0 ** bits, rel_tol=1e-9)
    assert 4.8 < k < 5.0


@pytest.mark.parametrize("kwargs, key", [
    (dict(bits=4), "secure_agg.bits"),  # 16 values cannot hold 10 clients' rounding at 4.9 sigma
    (dict(bits=70), "secure_agg.bits"),
    (dict(min_survivors=11), "secure_agg.min_survivors"),
    (dict(min_survivors=1), "secure_agg.min_survivors"),
])
def test_bad_settings_are_one_line(kwargs, key):
    settings = dict(clip=1.0, noise_multiplier=1.0, bits=16, dim=100, clients=10, min_survivors=7, seed=0)
    with pytest.raises(ConfigError) as err:
        ddp.DistributedDP(**{**settings, **kwargs})
    assert str(err.value).startswith(key + ":") and "\n" not in str(err.value) and "set" in str(err.value)


def test_shares_sized_for_a_fraction_of_each_rounds_clients():
    """secure_agg.survivor_fraction f: a round of n clients sizes its shares for
    t(n) = max(min_survivors, ceil(f n)) survivors, so all n surviving carry n / t(n) <= 1 / f times
    the accounted variance whatever n, and t(n) surviving carry exactly it."""
    assert [ddp.noise_survivors(n, 11, 0.9) for n in (30, 18, 12, 5)] == [27, 17, 11, 11]
    assert [ddp.noise_survivors(n, 11) for n in (30, 18, 5)] == [11, 11, 11]  # f = 0: min_survivors
    assert ddp.noise_survivors(40, 2, 1.0) == 40
    enc = ddp.DistributedDP(clip=1.0, noise_multiplier=1.3, bits=20, dim=100, clients=40, min_survivors=11,
                            seed=0, survivor_fraction=0.9)
    for n in (12, 18, 30, 40):  # Poisson cohorts of the cross-device config
        t = enc.noise_survivors(n)
        assert 2 * t * enc.share_lambda(n) == pytest.approx(enc.variance, rel=1e-12)
        assert enc.variance <= 2 * n * enc.share_lambda(n) <= enc.variance / 0.9 * (1 + 1e-12)
    # the range is sized for the most noise a round can carry: 1 / f, not clients / min_survivors times V
    fixed = ddp.DistributedDP(clip=1.0, noise_multiplier=1.3, bits=20, dim=100, clients=40, min_survivors=11,
                              seed=0)
    assert enc.scale > fixed.scale
    assert enc.with_noise(2.0).survivor_fraction == 0.9
    with pytest.raises(ConfigError, match=r"^secure_agg\.survivor_fraction:"):
        ddp.DistributedDP(clip=1.0, noise_multiplier=1.3, bits=20, dim=100, clients=40, min_survivors=11,
                          seed=0, survivor_fraction=1.5)


def test_a_round_with_all_its_shares_decodes_with_the_accounted_noise():
    """f = 1 and every client of a 24-client round surviving: the decoded noise has the accounted
    variance (z clip)^2 per coordinate, not 24 / min_survivors times it."""
    d, n = 4096, 24
    enc = ddp.DistributedDP(clip=1.0, noise_multiplier=0.5, bits=20, dim=d, clients=40, min_survivors=8,
                            seed=3, survivor_fraction=1.0)
    total = torch.zeros(enc.padded_dim, dtype=torch.int64)
    for c in range(n):
        total += enc.encode(torch.zeros(d, dtype=torch.float64), 2, c, round_clients=n)
    err = enc.decode(total, 2)
    var = (0.5 * 1.0) ** 2 + n / 4 / enc.scale ** 2  # the noise, and at most the rounding's share
    # sample variance of d coordinates (Gaussian-like): sd var sqrt(2 / d)
    assert abs(err.var().item() - var) <= Z * var * math.sqrt(2 / d) + n / 4 / enc.scale ** 2
