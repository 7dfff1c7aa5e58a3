"""Privacy accounting of the Skellam mechanism (distributed DP under secure aggregation).

Everything is in integer-grid units: the sensitivities and the variance after scaling by s =
1 / gamma (distributed_dp.py), where the secure sum carries Skellam noise Sk(V/2, V/2) of
variance V per coordinate (the survivors' shares sum to exactly that law, or a wider one).

* **RDP of the Skellam mechanism** (Agarwal, Kairouz, Liu, NeurIPS 2021, Thm. 3.5 / Cor. 3.6,
  stated with V the variance of the noise): for integer orders alpha > 1 and integer vectors of
  L2 sensitivity D2 and L1 sensitivity D1,
  ``eps(alpha) <= alpha D2^2 / (2V) + min(((2 alpha - 1) D2^2 + 6 D1) / (4 V^2), 3 D1 / (2V))``.
  Its first term is the Gaussian mechanism's RDP at variance V; the second vanishes as V grows.
* **Sensitivities after conditional randomized rounding** (Kairouz, Liu, Steinke, ICML 2021,
  Thm. 1, as TFF's DistributedDpSumFactory uses them): a vector of L2 norm <= c in d' dimensions
  rounds to an integer vector of norm <= min(c + sqrt(d'), sqrt(c^2 + d'/4 + sqrt(2 ln(1/beta))
  (c + sqrt(d')/2))) with probability >= 1 - beta; conditional rounding retries until that bound
  holds, so it is a sensitivity, not a probable one. L1: an integer vector v has ||v||_1 <=
  ||v||_2^2 and ||v||_1 <= sqrt(d') ||v||_2.
* **Poisson subsampling**: Steinke (2022, "Composition of Differential Privacy & Privacy
  Amplification by Subsampling", the theorem on Poisson subsampling for RDP), for any mechanism
  with RDP eps(.) at integer orders under add/remove neighbours, both directions, sampling rate q:
  ``(1/(alpha-1)) log[(1-q)^(alpha-1) (1 + (alpha-1) q) + sum_{l=2..alpha} C(alpha,l) q^l
  (1-q)^(alpha-l) e^((l-1) eps(l))]``, and never more than the unsampled eps(alpha) (a mixture is
  no less private than its worst component). For the Gaussian it is Mironov et al.'s exact
  subsampled-Gaussian RDP (tested equal to Opacus's); Zhu and Wang's earlier general bound (ICML
  2019) carries a factor 3 on the terms l >= 3, which does not vanish as the noise grows and
  cost 5x in epsilon here at 500 steps of rate 0.22.
* **Composition** adds RDP over steps; **conversion** to (epsilon, delta) with Balle et al. 2020
  (Thm. 21; also Canonne, Kamath, Steinke 2020): ``eps = rdp + log((alpha-1)/alpha) - (log delta
  + log alpha) / (alpha - 1)``, minimised over the orders (as Opacus's RDP accountant does).

The neighbouring relation is add/remove one record whose removal leaves the noise as it is:
one example at sample level (every participating client adds its noise share whatever its
batch); at client level the zero-out relation (distributed_dp.py says what that leaves out).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from scipy.special import gammaln, logsumexp

from ..errors import ConfigError

BETA = math.exp(-0.5)  # conditional rounding's beta (TFF's default): >= 39 % of draws are kept
ORDERS: tuple[int, ...] = tuple(range(2, 65)) + (72, 80, 96, 112, 128, 160, 192, 256)
MAX_NOISE = 1e4  # the solver's largest noise multiplier


def rounded_l2_bound(l2: float, dim: int, beta: float = BETA) -> float:
    """Largest L2 norm after conditional randomized rounding of a vector of norm <= ``l2`` in
    ``dim`` dimensions (scaled units; Kairouz et al. 2021, Thm. 1); beta = 0: the deterministic
    bound l2 + sqrt(dim)."""
    if not (l2 >= 0 and dim >= 1 and 0 <= beta < 1):
        raise ValueError(f"need l2 >= 0, dim >= 1, 0 <= beta < 1; got {l2}, {dim}, {beta}")
    sure = l2 + math.sqrt(dim)
    if beta == 0:
        return sure
    likely = l2 * l2 + dim / 4 + math.sqrt(2 * math.log(1 / beta)) * (l2 + math.sqrt(dim) / 2)
    return min(sure, math.sqrt(likely))


def rounded_l1_bound(rounded_l2: float, dim: int) -> float:
    """L1 bound of an integer vector with L2 norm <= ``rounded_l2`` in ``dim`` dimensions."""
    return rounded_l2 * min(math.sqrt(dim), rounded_l2)


def skellam_rdp(orders: Sequence[float] | np.ndarray, l2: float, l1: float, variance: float) -> np.ndarray:
    """RDP of the Skellam mechanism at ``orders`` (Agarwal et al. 2021): noise of ``variance``
    per coordinate, sensitivities ``l2`` and ``l1`` (integer-grid units)."""
    a = np.asarray(orders, dtype=np.float64)
    if variance <= 0:
        return np.full(a.shape, np.inf)
    extra = np.minimum(((2 * a - 1) * l2 ** 2 + 6 * l1) / (4 * variance ** 2), 3 * l1 / (2 * variance))
    return a * l2 ** 2 / (2 * variance) + extra


def gaussian_rdp(orders: Sequence[float] | np.ndarray, l2: float, variance: float) -> np.ndarray:
    """RDP of the Gaussian mechanism: alpha l2^2 / (2 variance)."""
    return np.asarray(orders, dtype=np.float64) * l2 ** 2 / (2 * variance)


def poisson_subsampled_rdp(orders: Sequence[int], q: float,
                           rdp_of: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """RDP at integer ``orders`` of a mechanism (RDP ``rdp_of(orders)``) run on a Poisson sample
    of rate q: Steinke 2022's bound (module docstring), capped by the unsampled RDP."""
    ints = [int(a) for a in orders]
    if any(a != o or a < 2 for a, o in zip(ints, orders, strict=True)):
        raise ValueError("the subsampling bound holds at integer orders >= 2")
    if not 0 <= q <= 1:
        raise ValueError(f"sampling rate {q} outside [0, 1]")
    top = max(ints)
    eps = np.concatenate([[0.0, 0.0], rdp_of(np.arange(2, top + 1, dtype=np.float64))])  # eps[l]
    plain = eps[ints]
    if q == 0:
        return np.zeros(len(ints))
    if q == 1:
        return plain
    lq, l1q = math.log(q), math.log1p(-q)
    out = np.empty(len(ints))
    for i, a in enumerate(ints):
        l = np.arange(2, a + 1, dtype=np.float64)
        log_comb = gammaln(a + 1) - gammaln(l + 1) - gammaln(a - l + 1)
        terms = log_comb + l * lq + (a - l) * l1q + (l - 1) * eps[2:a + 1]
        first = (a - 1) * l1q + math.log(a * q - q + 1)
        out[i] = logsumexp(np.concatenate([[first], terms])) / (a - 1)
    return np.minimum(out, plain)


def rdp_to_epsilon(orders: Sequence[float], rdp: Sequence[float] | np.ndarray,
                   delta: float) -> tuple[float, float]:
    """(epsilon, the order that gives it) at ``delta`` from RDP values (Balle et al. 2020)."""
    a = np.asarray(orders, dtype=np.float64)
    r = np.asarray(rdp, dtype=np.float64)
    if not 0 < delta < 1:
        raise ValueError(f"delta {delta} outside (0, 1)")
    eps = r + np.log1p(-1 / a) - (math.log(delta) + np.log(a)) / (a - 1)
    eps = np.where(np.isnan(eps), np.inf, eps)
    i = int(np.argmin(eps))
    return max(float(eps[i]), 0.0), float(a[i])


@dataclass(frozen=True)
class SkellamStep:
    """One noisy release: integer-grid sensitivities ``l2``, ``l1``, the secure sum's noise
    ``variance`` per coordinate, and the Poisson rate ``q`` of the protected records."""

    l2: float
    l1: float
    variance: float
    q: float = 1.0

    def rdp(self, orders: Sequence[int] = ORDERS) -> np.ndarray:
        def plain(a: np.ndarray) -> np.ndarray:
            return skellam_rdp(a, self.l2, self.l1, self.variance)
        return poisson_subsampled_rdp(orders, self.q, plain)


def epsilon(entries: Sequence[tuple[SkellamStep, int]], delta: float,
            orders: Sequence[int] = ORDERS) -> float:
    """Epsilon at ``delta`` of composing ``steps`` repetitions of each (step, steps) entry."""
    total = np.zeros(len(orders))
    for step, count in entries:
        if count > 0:
            total += count * step.rdp(orders)
    if not total.any():
        return 0.0
    return rdp_to_epsilon(orders, total, delta)[0]


def noise_for_epsilon(target_epsilon: float, delta: float, steps: int,
                      step_of: Callable[[float], SkellamStep], orders: Sequence[int] = ORDERS,
                      tolerance: float = 1e-3) -> float:
    """The smallest noise multiplier z (to ``tolerance``, rounded up) whose ``steps`` releases
    ``step_of(z)`` spend at most ``target_epsilon`` at ``delta``. ``step_of`` maps z to the step
    (DistributedDP.step_for: the scale, hence the rounding's sensitivities, may depend on z)."""
    def eps(z: float) -> float:
        return epsilon([(step_of(z), steps)], delta, orders)

    if target_epsilon <= 0:
        raise ConfigError(f"privacy.target_epsilon: {target_epsilon} must be > 0")
    hi = 1.0
    while eps(hi) > target_epsilon:
        hi *= 2
        if hi > MAX_NOISE:
            raise ConfigError(f"privacy.target_epsilon: no noise multiplier up to {MAX_NOISE:g} keeps "
                              f"{steps} Skellam steps within epsilon = {target_epsilon:g} (delta "
                              f"{delta:g}); raise privacy.target_epsilon or secure_agg.bits, or lower "
                              f"fed.rounds")
    lo = hi / 2 if hi > 1 else 0.0
    while hi - lo > tolerance * hi:
        mid = (lo + hi) / 2
        if mid > 0 and eps(mid) <= target_epsilon:
            hi = mid
        else:
            lo = mid
    return hi
