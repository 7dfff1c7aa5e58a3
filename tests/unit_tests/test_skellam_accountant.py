"""The Skellam accountant (fedrun/privacy/skellam_accountant.py) against independent computations:
the exact Renyi divergence of shifted 1-D Skellam laws from scipy's pmfs, Opacus's Gaussian RDP
and PRV accountants in the large-variance limit, and Opacus's exact subsampled-Gaussian RDP for
the generic Poisson subsampling bound."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.analysis import rdp as opacus_rdp
from scipy.special import logsumexp
from scipy.stats import skellam

from fedrun.errors import ConfigError
from fedrun.privacy import distributed_dp as ddp
from fedrun.privacy import skellam_accountant as acc


def exact_renyi(alpha: int, shift: int, variance: float) -> float:
    """D_alpha(Sk + shift || Sk) for Sk = Skellam(V/2, V/2), summed over the support where scipy's
    log-pmfs are finite; the sum's end terms must be negligible (checked)."""
    mu, sd = variance / 2, math.sqrt(variance)
    k = np.arange(int(-40 * sd - 40), int(40 * sd + 40 * shift * alpha + 40))
    lp, lq = skellam.logpmf(k - shift, mu, mu), skellam.logpmf(k, mu, mu)
    ok = np.isfinite(lp) & np.isfinite(lq)
    terms = alpha * lp[ok] + (1 - alpha) * lq[ok]
    assert max(terms[0], terms[-1]) < terms.max() - 200  # the truncated tails weigh nothing
    return float(logsumexp(terms)) / (alpha - 1)


@pytest.mark.parametrize("variance", [10.0, 100.0, 1000.0])
@pytest.mark.parametrize("shift", [1, 3])
def test_the_rdp_bound_holds_and_is_tight_for_shifted_skellam(variance, shift):
    for alpha in (2, 4, 16):
        exact = exact_renyi(alpha, shift, variance)
        bound = acc.skellam_rdp([alpha], shift, shift, variance)[0]  # 1-D: L1 = L2 = |shift|
        assert exact <= bound
        # the bound is the Gaussian's alpha D^2 / 2V plus a term of order 1/V^2: tight for large V
        if variance >= 1000:
            assert bound <= 1.01 * exact
        elif variance >= 100:
            assert bound <= 1.06 * exact


def test_without_sampling_large_variance_approaches_the_gaussian():
    """At q = 1 and variance V, Skellam's epsilon tends to the Gaussian mechanism's with
    noise multiplier sqrt(V) / D2 (Opacus: RDP with fractional orders too, and PRV)."""
    l2, steps, delta = 100.0, 20, 1e-5
    for variance in (1e4, 1e6):
        step = acc.SkellamStep(l2, acc.rounded_l1_bound(l2, 2 ** 17), variance, 1.0)
        ours = acc.epsilon([(step, steps)], delta)
        sigma = math.sqrt(variance) / l2
        rdp, prv = RDPAccountant(), PRVAccountant()
        rdp.history = prv.history = [(sigma, 1.0, steps)]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            gaussian_rdp, gaussian_prv = rdp.get_epsilon(delta), prv.get_epsilon(delta)
        assert gaussian_prv <= gaussian_rdp <= ours
        if variance >= 1e6:
            assert ours <= 1.01 * gaussian_rdp
    # and at small variance the Skellam term is visible: more epsilon than the Gaussian's (3.6 % here)
    small = acc.SkellamStep(3.0, acc.rounded_l1_bound(3.0, 2 ** 17), 20.0, 1.0)
    gaussian = acc.rdp_to_epsilon(acc.ORDERS, acc.gaussian_rdp(acc.ORDERS, 3.0, 20.0), delta)[0]
    assert acc.epsilon([(small, 1)], delta) > 1.02 * gaussian


@pytest.mark.parametrize("q, sigma", [(0.01, 1.0), (0.05, 2.0), (0.1, 0.8), (0.3, 1.5), (0.22, 14.0)])
def test_the_subsampling_bound_is_opacus_exact_gaussian(q, sigma):
    """The general bound applied to the Gaussian is the exact subsampled Gaussian RDP (Mironov
    et al. 2019, Opacus's independent implementation) at every integer order, log(1 + q^2
    (e^(1/sigma^2) - 1)) at order 2, and never above the unsampled RDP; over 500 steps the same
    epsilon (up to summation order)."""
    orders = list(acc.ORDERS)
    ours = acc.poisson_subsampled_rdp(orders, q, lambda a: acc.gaussian_rdp(a, 1.0, sigma ** 2))
    exact = opacus_rdp.compute_rdp(q=q, noise_multiplier=sigma, steps=1, orders=orders)
    assert np.allclose(ours, exact, rtol=1e-9, atol=0)
    assert math.isclose(ours[0], math.log1p(q * q * math.expm1(1 / sigma ** 2)), rel_tol=1e-10)
    assert (ours <= acc.gaussian_rdp(orders, 1.0, sigma ** 2) + 1e-15).all()
    e_ours = acc.rdp_to_epsilon(orders, 500 * ours, 1e-5)[0]
    e_exact = acc.rdp_to_epsilon(orders, 500 * exact, 1e-5)[0]
    assert math.isclose(e_ours, e_exact, rel_tol=1e-9)


def test_the_subsampling_bound_is_steinkes_theorem_written_out():
    q, variance, l2, l1 = 0.05, 40.0, 3.0, 9.0

    def eps(a: int) -> float:
        return float(acc.skellam_rdp([a], l2, l1, variance)[0])

    orders = [2, 3, 5, 10, 24]
    ours = acc.poisson_subsampled_rdp(orders, q, lambda a: acc.skellam_rdp(a, l2, l1, variance))
    for a, value in zip(orders, ours, strict=True):
        total = (1 - q) ** (a - 1) * (1 + (a - 1) * q)
        total += sum(math.comb(a, l) * (1 - q) ** (a - l) * q ** l * math.exp((l - 1) * eps(l))
                     for l in range(2, a + 1))
        assert math.isclose(value, min(math.log(total) / (a - 1), eps(a)), rel_tol=1e-10)


def test_the_conversion_is_opacus_conversion():
    orders = list(acc.ORDERS)
    rdp = acc.SkellamStep(50.0, 900.0, 4000.0, 0.02).rdp(orders) * 300
    eps, order = acc.rdp_to_epsilon(orders, rdp, 1e-6)
    theirs, their_order = opacus_rdp.get_privacy_spent(orders=orders, rdp=rdp, delta=1e-6)
    assert math.isclose(eps, theirs, rel_tol=1e-12) and order == their_order


def test_composition_adds_and_more_noise_spends_less():
    step = acc.SkellamStep(30.0, 500.0, 2000.0, 0.05)
    one = acc.epsilon([(step, 200)], 1e-5)
    assert math.isclose(one, acc.epsilon([(step, 120), (step, 80)], 1e-5), rel_tol=1e-12)
    assert acc.epsilon([(step, 400)], 1e-5) > one
    assert acc.epsilon([(acc.SkellamStep(30.0, 500.0, 4000.0, 0.05), 200)], 1e-5) < one
    assert acc.epsilon([], 1e-5) == 0.0


def test_the_solver_meets_the_target():
    enc = ddp.DistributedDP(clip=1.0, noise_multiplier=1.0, bits=18, dim=5000, clients=10, min_survivors=7,
                            seed=0, records=320)

    def step_of(z: float) -> acc.SkellamStep:
        return enc.with_noise(z).step(q=0.05)

    z = acc.noise_for_epsilon(8.0, 1e-5, 500, step_of)
    assert acc.epsilon([(step_of(z), 500)], 1e-5) <= 8.0
    assert acc.epsilon([(step_of(z * 0.995), 500)], 1e-5) > 8.0
    with pytest.raises(ConfigError, match=r"^privacy\.target_epsilon:"):
        acc.noise_for_epsilon(1e-9, 1e-5, 500, step_of)


def test_rounded_sensitivities():
    c, d = 30.0, 4096
    assert acc.rounded_l2_bound(c, d, beta=0) == c + 64
    likely = math.sqrt(c * c + d / 4 + math.sqrt(2 * 0.5) * (c + 32))
    assert math.isclose(acc.rounded_l2_bound(c, d), likely)
    assert acc.rounded_l1_bound(10.0, d) == 100.0 and acc.rounded_l1_bound(100.0, d) == 6400.0
