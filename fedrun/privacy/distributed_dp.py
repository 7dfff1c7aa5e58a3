"""Distributed DP on the integer grid: each client adds a share of the noise, so only the secure
sum (secure_agg.py) carries the whole noise and no one ever holds a clean update.

The encoding of TensorFlow Federated's ``DistributedDpSumFactory`` with the Skellam mechanism
(Kairouz, Liu, Steinke, ICML 2021; Agarwal, Kairouz, Liu, NeurIPS 2021). A client, per record
(its update at client level; each clipped per-example gradient at sample level):

1. clips it to L2 norm ``clip``;
2. rotates it: pads to d' = the next power of two, flips signs D (the registered stream
   ``ddp_rotation`` (seed, round): the same for every client of the round) and applies the
   orthonormal Walsh-Hadamard transform H / sqrt(d'). Norms are kept; every coordinate becomes
   about N(0, ||x||^2 / d'), which is what bounds the sum's range;
3. scales by s = 1 / gamma and rounds to integers at random, conditionally: unbiased stochastic
   rounding (stream ``ddp_rounding`` (seed, round, client)), redrawn until the rounded vector's
   norm is within ``skellam_accountant.rounded_l2_bound`` (at beta = exp(-0.5) a draw is kept
   with probability >= 0.39): that bound is a sensitivity, not a probable one;
4. sums its rounded records, adds one Skellam share Sk(lam, lam) = Poisson(lam) - Poisson(lam)
   per coordinate (stream ``ddp_noise`` (seed, round, client)), and wraps modulo 2^bits.

The server reduces the secure sum modulo 2^bits into [-2^(bits-1), 2^(bits-1)), divides by s and
rotates back: the sum of the clipped records plus noise of standard deviation noise_multiplier *
clip (or more), plus the rounding's error.

**Skellam rather than the distributed discrete Gaussian**: a sum of independent Skellam shares is
exactly Skellam (Poisson is closed under sums), so the survivors' shares form one Skellam
mechanism whatever their number, with a closed-form RDP (skellam_accountant.py); the sum of
discrete Gaussians is not a discrete Gaussian, and its guarantee carries a slack term that grows
with the number of shares. Skellam samples are two Poisson draws.

**Shares sized for the round's survivors**: with central variance V (integer units), each client
of a round sized for t survivors adds lam = V / (2 t), variance 2 lam; m survivors give
Sk(m lam, m lam) of variance m V / t >= V whenever m >= t (RDP only shrinks with more noise).
Rounds with fewer survivors must be abandoned (SecureRound.unmask_ returns False for them: the
round's min_survivors is at least t). t is ``noise_survivors``: secure_agg.min_survivors in every
round, or, with secure_agg.survivor_fraction f, at least ceil(f n) of the round's n clients, so a
round where every client survives carries at most 1 / f times V whatever its size (Poisson
cohorts vary). The round's n is the same for neighbouring data sets under the zero-out relation
(below): t depends on the sampling, never on a client's data.

**Randomness**: the rotation, the rounding and the noise come from registered seed streams
(seed, round, client), so a resumed round reproduces them exactly. A deployment draws each
client's rounding and noise from the client's own private randomness: with seeded streams,
anyone who knows run.seed can subtract the noise. The rotation's signs are public either way.

**Range** (``choose_scale``): s is TFF's heuristic: k standard deviations of a coordinate of the
sum (signal rho (records * clip)^2 / d', rounding records / 4, noise V records' share) fit in
2^bits, k from the modular clipping probability; too few bits is a one-line ConfigError.

**What the accountant's sensitivity covers** (skellam_accountant.py): one record, rounded on its
own. At sample level a record is one clipped per-example gradient, so each is rotated and rounded
separately (rows of ``encode``'s input; B d' log d' work per client step) and the client sends
their integer sum: adding or removing one example changes the secure sum by one rounded record,
while every participating client adds its share regardless. Rounding the client's sum of clipped
gradients instead would leave the per-example sensitivity unbounded by this analysis. At client
level a record is a client's update and the relation is zero-out (the client's update replaced
by zero, its noise share still there), as in the papers; a client that Poisson sampling leaves
out also takes its share away, which this accounting does not model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .. import seeding
from ..errors import ConfigError
from . import skellam_accountant as acc

CLIP_PROB = 1e-6  # TFF's default modular clipping probability: k = sqrt(2) erfcinv(1e-6) ~ 4.9
MAX_TRIES = 1000  # conditional rounding's draws before rounding toward zero (never reached in practice)


def padded_dim(dim: int) -> int:
    """d' = the smallest power of two >= dim."""
    return 1 << max(int(dim) - 1, 0).bit_length()


def clip_l2(x: torch.Tensor, clip: float) -> torch.Tensor:
    """Each row (a 1-D x is one row) scaled down to L2 norm <= clip, in float64."""
    x = x.to(torch.float64)
    rows = x.reshape(-1, x.shape[-1]) if x.dim() > 1 else x.reshape(1, -1)
    norms = torch.linalg.vector_norm(rows, dim=1, keepdim=True)
    factor = torch.clamp(clip / torch.clamp(norms, min=1e-300), max=1.0)
    return (rows * factor).reshape(x.shape)


def hadamard(x: torch.Tensor) -> torch.Tensor:
    """The orthonormal Walsh-Hadamard transform H / sqrt(n) along the last dimension (n a power
    of two). It is its own inverse."""
    n = x.shape[-1]
    if n & (n - 1):
        raise ValueError(f"the Hadamard transform needs a power-of-two length, got {n}")
    y = x.reshape(-1, n)
    h = 1
    while h < n:
        y = y.view(y.shape[0], n // (2 * h), 2, h)
        y = torch.stack((y[:, :, 0] + y[:, :, 1], y[:, :, 0] - y[:, :, 1]), dim=2)
        h *= 2
    return (y.reshape(x.shape) / math.sqrt(n)) if n > 1 else y.reshape(x.shape).clone()


def rotation_signs(dim: int, seed: int, round_: int) -> torch.Tensor:
    """The round's random signs (float64, +-1) over d' = padded_dim(dim) coordinates."""
    g = seeding.stream_generator("cpu", "ddp_rotation", seed=seed, round=round_)
    bits = torch.randint(0, 2, (padded_dim(dim),), generator=g, dtype=torch.int64)
    return (2 * bits - 1).to(torch.float64)


def rotate(x: torch.Tensor, signs: torch.Tensor) -> torch.Tensor:
    """H D pad(x) / sqrt(d') per row (float64); signs from ``rotation_signs``."""
    x = x.to(torch.float64)
    pad = signs.numel() - x.shape[-1]
    if pad < 0:
        raise ValueError("the signs are shorter than the vector")
    return hadamard(torch.nn.functional.pad(x, (0, pad)) * signs)


def unrotate(y: torch.Tensor, signs: torch.Tensor, dim: int) -> torch.Tensor:
    """The inverse of ``rotate``: D H y / sqrt(d'), cut back to ``dim`` coordinates."""
    return (hadamard(y.to(torch.float64)) * signs)[..., :dim]


def randomized_round(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """floor(x) + Bernoulli(x - floor(x)) per coordinate (int64): unbiased, error in (-1, 1)."""
    low = torch.floor(x)
    up = torch.rand(x.shape, generator=generator, dtype=torch.float64) < (x - low)
    return low.to(torch.int64) + up.to(torch.int64)


def conditional_round(x: torch.Tensor, bound: float, generator: torch.Generator) -> torch.Tensor:
    """Randomized rounding of each row, redrawn until the row's L2 norm is <= ``bound``
    (Kairouz et al. 2021). A row still above it after MAX_TRIES draws is rounded toward zero,
    whose norm is at most the row's own (so ``bound`` >= the row's norm keeps it a sensitivity)."""
    rows = x.reshape(-1, x.shape[-1]) if x.dim() > 1 else x.reshape(1, -1)
    out = torch.empty(rows.shape, dtype=torch.int64)
    limit = bound * bound * (1 - 1e-12)  # float64 sums of squares err by far less than this margin
    todo = torch.arange(rows.shape[0])
    for _ in range(MAX_TRIES):
        if todo.numel() == 0:
            break
        r = randomized_round(rows[todo], generator)
        ok = r.to(torch.float64).square().sum(dim=1) <= limit
        out[todo[ok]] = r[ok]
        todo = todo[~ok]
    if todo.numel():
        out[todo] = torch.trunc(rows[todo]).to(torch.int64)
    return out.reshape(x.shape)


def skellam_share(n: int, lam: float, generator: torch.Generator) -> torch.Tensor:
    """n draws of Sk(lam, lam) = Poisson(lam) - Poisson(lam) (int64; variance 2 lam)."""
    if lam <= 0:
        return torch.zeros(n, dtype=torch.int64)
    rate = torch.full((n,), float(lam), dtype=torch.float64)
    a = torch.poisson(rate, generator=generator)
    return (a - torch.poisson(rate, generator=generator)).to(torch.int64)


def wrap(x: torch.Tensor, bits: int) -> torch.Tensor:
    """x modulo 2^bits, in [0, 2^bits) (int64; two's complement: exact for negative x)."""
    return x if bits >= 64 else torch.bitwise_and(x, (1 << bits) - 1)


def centre(x: torch.Tensor, bits: int) -> torch.Tensor:
    """x modulo 2^bits, in [-2^(bits-1), 2^(bits-1)) (int64)."""
    if bits >= 64:
        return x.clone()
    y = wrap(x, bits)
    return torch.where(y >= (1 << (bits - 1)), y - (1 << bits), y)


def noise_survivors(clients: int, min_survivors: int, fraction: float = 0.0) -> int:
    """The survivors a round of ``clients`` sizes its noise shares for: ``min_survivors``, or with
    ``fraction`` f > 0 at least ceil(f clients) (at most the round's clients, at least
    ``min_survivors``: a round that cannot reach that many is abandoned anyway)."""
    if fraction <= 0:
        return min_survivors
    return max(min_survivors, min(clients, math.ceil(fraction * clients - 1e-9)))


def stddevs_for(clip_prob: float) -> float:
    """k with P(|N(0,1)| > k) = clip_prob: sqrt(2) erfcinv(clip_prob)."""
    from scipy.special import erfcinv
    return math.sqrt(2) * float(erfcinv(clip_prob))


def choose_scale(bits: int, clip: float, dim: int, records: int, noise_variance: float,
                 clip_prob: float = CLIP_PROB, rho: float = 1.0) -> float:
    """s = 1 / gamma (TFF's heuristic, Kairouz et al. 2021 Sec. 4): k sigma of a coordinate of the
    sum fit in 2^bits, 2^bits = 2k sqrt(rho (records clip)^2 / d' + records gamma^2 / 4 +
    noise_variance) / gamma, with ``noise_variance`` the sum's largest noise variance (unscaled,
    all clients surviving) and d' = padded_dim(dim).

    Too few bits is a ConfigError naming secure_agg.bits: when the rounding's variance (records / 4
    per coordinate) would exceed that of the signal and noise it rounds, i.e. take more than half
    of the range (4^bits < 2 k^2 records); the decoded sum's error would then be mostly rounding."""
    k = stddevs_for(clip_prob)
    if 4.0 ** bits < 2 * k * k * records:
        need = math.ceil(math.log2(k * math.sqrt(2 * records)))
        raise ConfigError(f"secure_agg.bits: {bits} bits are too few for the sum of {records} rounded "
                          f"records at {k:.1f} standard deviations (the rounding would outweigh the sum); "
                          f"set secure_agg.bits >= {need} (16 to 20 is usual)")
    room = 4.0 ** bits - k * k * records
    spread = rho * (records * clip) ** 2 / padded_dim(dim) + noise_variance
    if spread <= 0:
        raise ValueError("clip or noise must be positive")
    return math.sqrt(room) / (2 * k * math.sqrt(spread))


@dataclass(frozen=True)
class DistributedDP:
    """One run's distributed Skellam encoding (module docstring).

    ``clip``: L2 clip of a record; ``noise_multiplier`` z: the secure sum's noise std is z * clip
    (unscaled) when the survivors a round's shares are sized for survive (``noise_survivors``:
    ``min_survivors``, or a ``survivor_fraction`` of the round's clients), more when more do;
    ``bits``: the secure sum's modulus 2^bits; ``dim``: numbers per record; ``clients``: the most
    clients summed in a round; ``records``: the most records summed in a round (default
    ``clients``: client level; at sample level a bound on the round's total batch); ``seed``:
    run.seed; ``scale``: s, by default ``choose_scale``'s."""

    clip: float
    noise_multiplier: float
    bits: int
    dim: int
    clients: int
    min_survivors: int
    seed: int
    records: int = 0
    beta: float = acc.BETA
    clip_prob: float = CLIP_PROB
    scale: float = 0.0
    survivor_fraction: float = 0.0

    def __post_init__(self) -> None:
        if not 2 <= self.min_survivors <= self.clients:
            raise ConfigError(f"secure_agg.min_survivors: {self.min_survivors} must lie in 2.."
                              f"{self.clients} (the clients per round); set it in that range")
        if not 2 <= self.bits <= 64:
            raise ConfigError(f"secure_agg.bits: {self.bits} is outside 2..64; set secure_agg.bits "
                              f"between 2 and 64 (16 to 20 is usual)")
        if self.clip <= 0 or self.noise_multiplier < 0:
            raise ValueError("need clip > 0 and noise_multiplier >= 0")
        if self.records <= 0:
            object.__setattr__(self, "records", self.clients)
        if not 0 <= self.survivor_fraction <= 1:
            raise ConfigError(f"secure_agg.survivor_fraction: {self.survivor_fraction} is outside [0, 1]; "
                              f"set 0 (shares sized for secure_agg.min_survivors) or e.g. 0.9")
        if self.scale <= 0:
            # the most noise a round can carry: all n of its clients survive, shares sized for t(n)
            excess = self.clients / self.min_survivors
            if self.survivor_fraction > 0:
                excess = min(excess, 1 / self.survivor_fraction)
            worst = (self.noise_multiplier * self.clip) ** 2 * excess
            object.__setattr__(self, "scale", choose_scale(self.bits, self.clip, self.dim, self.records,
                                                           worst, self.clip_prob))

    @property
    def padded_dim(self) -> int:
        return padded_dim(self.dim)

    @property
    def variance(self) -> float:
        """The secure sum's noise variance per coordinate in integer units at min_survivors."""
        return (self.scale * self.noise_multiplier * self.clip) ** 2

    def noise_survivors(self, clients: int) -> int:
        """The survivors a round of ``clients`` sizes its shares for (module function)."""
        return noise_survivors(clients, self.min_survivors, self.survivor_fraction)

    def share_lambda(self, clients: int = 0) -> float:
        """Each client's Poisson parameter in a round of ``clients`` (0: shares sized for
        min_survivors): Sk(lam, lam) has variance 2 lam = variance / the round's noise survivors."""
        return self.variance / (2 * self.noise_survivors(clients))

    @property
    def l2_sensitivity(self) -> float:
        """A record's largest L2 norm on the integer grid (after conditional rounding)."""
        return acc.rounded_l2_bound(self.scale * self.clip, self.padded_dim, self.beta)

    @property
    def l1_sensitivity(self) -> float:
        return acc.rounded_l1_bound(self.l2_sensitivity, self.padded_dim)

    def step(self, q: float = 1.0) -> acc.SkellamStep:
        """This encoding as one accountant step, records sampled at Poisson rate q."""
        return acc.SkellamStep(self.l2_sensitivity, self.l1_sensitivity, self.variance, q)

    def with_noise(self, noise_multiplier: float) -> DistributedDP:
        """The same settings at another noise, with the scale ``choose_scale`` gives for it."""
        return DistributedDP(self.clip, noise_multiplier, self.bits, self.dim, self.clients,
                             self.min_survivors, self.seed, self.records, self.beta, self.clip_prob,
                             survivor_fraction=self.survivor_fraction)

    def encode(self, x: torch.Tensor, round_: int, client: int, round_clients: int = 0) -> torch.Tensor:
        """A client's contribution: clip, rotate, scale and round each record (a 1-D x is one
        record, the rows of a 2-D x are records), sum them, add the client's Skellam share for a
        round of ``round_clients`` (0: sized for min_survivors) and wrap modulo 2^bits. Returns
        d' int64 numbers in [0, 2^bits)."""
        if x.shape[-1] != self.dim:
            raise ValueError(f"records have {x.shape[-1]} numbers, the encoding {self.dim}")
        signs = rotation_signs(self.dim, self.seed, round_)
        z = rotate(clip_l2(x.detach().cpu(), self.clip), signs) * self.scale
        g = seeding.stream_generator("cpu", "ddp_rounding", seed=self.seed, round=round_, client=client)
        q = conditional_round(z, self.l2_sensitivity, g)
        total = q.reshape(-1, self.padded_dim).sum(dim=0)
        if self.noise_multiplier > 0:
            g = seeding.stream_generator("cpu", "ddp_noise", seed=self.seed, round=round_, client=client)
            total += skellam_share(self.padded_dim, self.share_lambda(round_clients), g)
        return wrap(total, self.bits)

    def decode(self, total: torch.Tensor, round_: int) -> torch.Tensor:
        """The server's side: the secure sum of encodings (any int64 sum of them, modulo 2^64)
        back to the sum of the clipped records plus noise, ``dim`` float64 numbers."""
        signs = rotation_signs(self.dim, self.seed, round_)
        y = centre(total.detach().cpu().to(torch.int64), self.bits).to(torch.float64) / self.scale
        return unrotate(y, signs, self.dim)
