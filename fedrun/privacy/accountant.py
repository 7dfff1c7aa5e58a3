"""Privacy accounting: who has spent how much (epsilon, delta), and whether a planned run fits.

All the mathematics is Opacus's (``opacus.accountants``): the PRV accountant (Gopi, Lee and
Wutschitz, NeurIPS 2021; the default: the tightest Opacus offers, an upper bound on epsilon from
the numerically composed privacy loss distribution, within eps_error = 0.01 and delta_error =
delta / 1000) or the RDP accountant (Mironov 2017; Mironov, Talwar and Zhang 2019 for the
subsampled Gaussian, converted to (epsilon, delta) with Balle et al. 2020), chosen by
``privacy.accountant``. Opacus's third, "gdp" (the Gaussian-DP CLT approximation), is not
offered: Opacus itself warns that it can underestimate epsilon, and it accepts no history of
mixed (noise, rate) entries. fedrun only decides *what* is composed:

* sample level (DP-SGD in every client, the image is the unit): client k with n_k images and
  batch B draws each batch by Poisson sampling with rate q_k = min(1, B / n_k) and takes
  E * ceil(n_k / B) noisy steps in every round it takes part in. Each client has its own
  accountant, fed only by the rounds it trained in (its images are touched by nothing else).
* client level (DP-FedAvg, McMahan et al. ICLR 2018, the client is the unit): one accountant for
  the federation; each round is one step of the subsampled Gaussian mechanism with Poisson
  client sampling at rate q = clients_per_round / num_clients.

PRV discretises the privacy loss on a grid whose size grows with epsilon and the steps; past
``PRV_MAX_POINTS`` points (epsilon in the hundreds: no privacy worth the name, but gigabytes
and minutes of PRV) fedrun uses RDP's bound for that entry, with a warning: both are upper
bounds, so the reported epsilon stays a guarantee.

``privacy.noise_multiplier = 0`` asks for the smallest noise multiplier that fits
``privacy.target_epsilon`` (``solve_noise``: Opacus's ``get_noise_multiplier`` per distinct
(rate, steps), the worst client deciding at sample level), as Opacus's
``make_private_with_epsilon`` does.

An Opacus accountant is a list of (noise_multiplier, sample_rate, steps) entries; the ledger
keeps one such list per key and its ``state_dict`` is that list as plain numbers, so a
checkpoint loads with ``torch.load(weights_only=True)`` and a restored ledger reports the very
same epsilon (the same entries feed the same computation).
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import ConfigError
from ..registry import registry_of

if TYPE_CHECKING:
    from opacus.accountants.accountant import IAccountant

    from ..config import Config

FEDERATION = "federation"  # the one ledger key at client level
ACCOUNTANTS = ("rdp", "prv")
DEFAULT_ACCOUNTANT = "prv"  # privacy.accountant's default
PRV_MAX_POINTS = 10_000_000  # PRV's grid: ~80 MB an array, ~10 s; beyond, RDP's bound is used
MAX_SIGMA = 1e6  # Opacus's get_noise_multiplier gives up above this noise multiplier


def require_opacus() -> None:
    """Raise a one-line ConfigError if Opacus cannot be imported."""
    try:
        import opacus  # noqa: F401
    except ImportError:
        raise ConfigError("privacy.level: needs Opacus; pip install 'fedrun[privacy]' "
                          "(or set privacy.level = \"none\")") from None


class _OversizedPRV(Exception):
    """PRV's grid for these entries would exceed PRV_MAX_POINTS points."""


@functools.cache
def _guarded_prv() -> type:
    """Opacus's PRVAccountant, refusing (``_OversizedPRV``) a grid past PRV_MAX_POINTS before it
    allocates it: the check reuses the domain get_epsilon computes anyway (its costly part)."""
    from opacus.accountants import PRVAccountant

    class GuardedPRVAccountant(PRVAccountant):
        def _get_domain(self, *args: Any, **kwargs: Any) -> Any:
            domain = super()._get_domain(*args, **kwargs)
            if domain.size > PRV_MAX_POINTS:
                raise _OversizedPRV(int(domain.size))
            return domain

    return GuardedPRVAccountant


def _accountant(kind: str, history: Iterable[tuple[float, float, int]]) -> IAccountant:
    require_opacus()
    from opacus.accountants import RDPAccountant
    if kind not in ACCOUNTANTS:
        raise ConfigError(f"privacy.accountant: must be one of {ACCOUNTANTS}, got {kind!r}")
    acc = RDPAccountant() if kind == "rdp" else _guarded_prv()()
    acc.history = [(float(s), float(q), int(n)) for s, q, n in history]
    return acc


def epsilon_of(history: Sequence[tuple[float, float, int]], delta: float,
               kind: str = DEFAULT_ACCOUNTANT) -> float:
    """Epsilon at ``delta`` of composing the (noise_multiplier, sample_rate, steps) entries."""
    entries = tuple((float(s), float(q), int(n)) for s, q, n in history if n > 0)
    return _epsilon(entries, float(delta), kind) if entries else 0.0


def prv_grid_points(entries: Sequence[tuple[float, float, int]], delta: float) -> int | None:
    """How many points PRV's discretisation of these entries takes (Opacus's own domain, with
    ``get_epsilon``'s default errors); None if this Opacus computes it differently."""
    require_opacus()
    from opacus.accountants import PRVAccountant
    from opacus.accountants.analysis.prv import PoissonSubsampledGaussianPRV
    try:  # PRVAccountant._get_domain is what get_epsilon calls first
        domain = PRVAccountant()._get_domain(
            prvs=[PoissonSubsampledGaussianPRV(q, s) for s, q, _ in entries],
            num_self_compositions=[n for _, _, n in entries], eps_error=0.01, delta_error=delta / 1000)
        return int(domain.size)
    except (AttributeError, TypeError):  # pragma: no cover - another Opacus version
        return None


_WARNED_PRV = False


@functools.lru_cache(maxsize=4096)
def _epsilon(entries: tuple[tuple[float, float, int], ...], delta: float, kind: str) -> float:
    """Memoised: clients of equal size share one computation (a pure function of its inputs)."""
    global _WARNED_PRV
    try:
        with np.errstate(divide="ignore", invalid="ignore"):  # PRV at q = 1 takes log(1 - q) in a where()
            return float(_accountant(kind, entries).get_epsilon(delta=delta))
    except _OversizedPRV as exc:
        if not _WARNED_PRV:
            warnings.warn(f"privacy.accountant: PRV would need {exc.args[0]:.2g} grid points (more than "
                          f"{PRV_MAX_POINTS:.0e}) for {list(entries)}, epsilon in the hundreds; RDP's bound "
                          f"is reported instead (also an upper bound)", stacklevel=2)
            _WARNED_PRV = True
        return float(_accountant("rdp", entries).get_epsilon(delta=delta))


class PrivacyLedger:
    """Per-key privacy histories (a client id at sample level, ``FEDERATION`` at client level).

    ``record`` adds ``steps`` steps of the subsampled Gaussian mechanism with the given noise
    multiplier and sample rate; consecutive records with the same (noise, rate) merge into one
    entry (composition is additive in the steps, so the epsilon is the same either way).
    """

    def __init__(self, accountant: str = DEFAULT_ACCOUNTANT):
        if accountant not in ACCOUNTANTS:
            raise ConfigError(f"privacy.accountant: must be one of {ACCOUNTANTS}, got {accountant!r}")
        self.accountant = accountant
        self.history: dict[str, list[tuple[float, float, int]]] = {}

    @staticmethod
    def _key(key: int | str) -> str:
        return str(key)

    def record(self, key: int | str, noise_multiplier: float, sample_rate: float, steps: int) -> None:
        if steps <= 0:
            return
        if not (noise_multiplier > 0 and 0 < sample_rate <= 1):
            raise ValueError(f"need noise_multiplier > 0 and 0 < sample_rate <= 1, got "
                             f"{noise_multiplier}, {sample_rate}")
        h = self.history.setdefault(self._key(key), [])
        entry = (float(noise_multiplier), float(sample_rate))
        if h and h[-1][:2] == entry:
            h[-1] = (*entry, h[-1][2] + int(steps))
        else:
            h.append((*entry, int(steps)))

    def keys(self) -> list[str]:
        return list(self.history)

    def epsilon(self, key: int | str, delta: float) -> float:
        """Epsilon spent by ``key`` at ``delta`` (0.0 if it never trained)."""
        return epsilon_of(self.history.get(self._key(key), []), delta, self.accountant)

    def epsilons(self, delta: float) -> dict[str, float]:
        return {k: self.epsilon(k, delta) for k in self.history}

    def max_epsilon(self, delta: float) -> float:
        """The largest epsilon over all keys (0.0 for an empty ledger)."""
        return max(self.epsilons(delta).values(), default=0.0)

    def state_dict(self) -> dict[str, Any]:
        """Plain str/float/int/list/dict only: safe for ``torch.load(weights_only=True)``."""
        return {"accountant": self.accountant,
                "history": {k: [[s, q, n] for s, q, n in h] for k, h in self.history.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("accountant") != self.accountant:
            raise ConfigError(f"privacy.accountant: the checkpoint was accounted with "
                              f"{state.get('accountant')!r}, the config asks for {self.accountant!r}; "
                              f"resume with privacy.accountant = {state.get('accountant')!r}")
        self.history = {str(k): [(float(s), float(q), int(n)) for s, q, n in h]
                        for k, h in state["history"].items()}


class SkellamLedger(PrivacyLedger):
    """The same entries, (noise multiplier, rate, steps) per key, accounted as the Skellam
    mechanism of distributed DP (skellam_accountant.py; Opacus has no accountant for it):
    ``step_of(z, q)`` is the entry's release, its integer-grid sensitivities and variance at
    noise multiplier z (distributed_dp.DistributedDP.with_noise(z).step(q))."""

    def __init__(self, step_of: Any):
        self.accountant = "skellam"
        self.history = {}
        self.step_of = step_of

    def epsilon(self, key: int | str, delta: float) -> float:
        from . import skellam_accountant as sk
        entries = [(self.step_of(s, q), n) for s, q, n in self.history.get(self._key(key), []) if n > 0]
        return sk.epsilon(entries, delta) if entries else 0.0

    def smallest_noise(self, target_epsilon: float, delta: float) -> float:
        """The smallest noise multiplier with which every key's entries (as planned at any noise)
        stay within ``target_epsilon``: the worst (rate, steps) decides."""
        from . import skellam_accountant as sk
        plans = {(h[0][1], sum(n for _, _, n in h)) for h in self.history.values() if h}
        return max((sk.noise_for_epsilon(target_epsilon, delta, steps, lambda z, q=q: self.step_of(z, q))
                    for q, steps in plans), default=0.0)


# --------------------------------------------------------------------------------------------
# The planned run


def sample_level_step(num_images: int, batch_size: int, local_epochs: int) -> tuple[float, int]:
    """(Poisson sample rate, noisy steps) of one client's DP-SGD round."""
    q = min(1.0, batch_size / num_images)
    return q, local_epochs * math.ceil(num_images / batch_size)


def sample_once_rate(batch_size: int, clients_per_round: int, total_images: int) -> float:
    """"sample_once"'s Poisson rate, the same for every image of the federation: the round's step
    expects batch_size images per participating client, batch_size x clients_per_round in all
    (DP-SGD on the union at that batch: every image is one sample at rate q)."""
    return min(1.0, batch_size * clients_per_round / max(total_images, 1))


def client_level_rate(cfg: Config) -> float:
    """Poisson client sampling rate of DP-FedAvg: clients_per_round / num_clients."""
    return cfg.fed.clients_per_round / cfg.fed.num_clients


def _mechanism(cfg: Config) -> Any:
    """The class of the chosen privacy mechanism (fedrun.privacy.mechanisms): what it composes."""
    registry = registry_of("privacy.level")
    assert registry is not None
    return registry.selected(cfg).target


def planned_ledger(cfg: Config, shard_sizes: Sequence[int],
                   participation: Sequence[Sequence[int]] | None = None,
                   rounds: int | None = None, noise_multiplier: float | None = None) -> PrivacyLedger:
    """The ledger the planned run will have after ``rounds`` (default fed.rounds) rounds: what
    the chosen mechanism composes (``Mechanism.planned``).

    ``participation[r]``: the clients of round r + 1 (known in advance, since clients are drawn
    from (seed, round)); None = every client with data in every round (an upper bound when not
    all take part). A mechanism that samples clients itself (DP-FedAvg's Poisson) ignores it.
    """
    rounds = cfg.fed.rounds if rounds is None else rounds
    sigma = cfg.privacy.noise_multiplier if noise_multiplier is None else noise_multiplier
    return _mechanism(cfg).planned(cfg, shard_sizes, participation, rounds, sigma)


def planned_epsilon(cfg: Config, shard_sizes: Sequence[int],
                    participation: Sequence[Sequence[int]] | None = None,
                    rounds: int | None = None, noise_multiplier: float | None = None) -> float:
    """The epsilon (at privacy.delta) the whole planned run spends: the worst key of the planned
    ledger (the worst client at sample level, the federation at client level); 0.0 without privacy."""
    return planned_ledger(cfg, shard_sizes, participation, rounds,
                          noise_multiplier).max_epsilon(cfg.privacy.delta)


def largest_rounds(cfg: Config, shard_sizes: Sequence[int],
                   participation: Sequence[Sequence[int]] | None = None) -> int:
    """The most rounds (<= fed.rounds) whose planned epsilon stays within privacy.target_epsilon."""
    target = cfg.privacy.target_epsilon
    lo, hi = 0, cfg.fed.rounds  # epsilon(lo) <= target; epsilon grows with the rounds
    if planned_epsilon(cfg, shard_sizes, participation, rounds=hi) <= target:
        return hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if planned_epsilon(cfg, shard_sizes, participation, rounds=mid) <= target:
            lo = mid
        else:
            hi = mid
    return lo


def _unreachable(cfg: Config) -> ConfigError:
    pv = cfg.privacy
    unit = _mechanism(cfg).unit
    tighter = "; privacy.accountant = \"prv\" is tighter" if pv.accountant == "rdp" else ""
    return ConfigError(
        f"privacy.target_epsilon: no noise multiplier up to {MAX_SIGMA:g} keeps the planned "
        f"{cfg.fed.rounds} rounds within epsilon = {pv.target_epsilon:g} ({unit}, delta {pv.delta:g}, "
        f"{pv.accountant} accountant); raise privacy.target_epsilon or privacy.delta, or lower "
        f"fed.rounds{tighter}")


def smallest_noise(cfg: Config, shard_sizes: Sequence[int],
                   participation: Sequence[Sequence[int]] | None = None) -> float:
    """The smallest noise multiplier (rounded up to 0.01) whose planned epsilon fits the target
    with the planned fed.rounds (Opacus's ``get_noise_multiplier`` per distinct (q, steps)).
    A target that no noise multiplier reaches is a one-line ConfigError."""
    from opacus.accountants.utils import get_noise_multiplier
    pv = cfg.privacy
    # the noise does not change what is composed, only how loudly: any value lists the entries
    ledger = planned_ledger(cfg, shard_sizes, participation, noise_multiplier=1.0)
    if isinstance(ledger, SkellamLedger):  # distributed DP: its own accountant and solver
        return math.ceil(ledger.smallest_noise(pv.target_epsilon, pv.delta) * 100) / 100
    sigma = 0.0
    for q, steps in {(h[0][1], sum(n for _, _, n in h)) for h in ledger.history.values()}:
        # the search's extreme probes: RDP's alpha range, PRV's log(1 - q) at q = 1
        with warnings.catch_warnings(), np.errstate(divide="ignore", invalid="ignore"):
            warnings.filterwarnings("ignore", message="Optimal order is the (largest|smallest) alpha")
            kind = pv.accountant
            if kind == "prv" and not _prv_affordable(cfg, q, steps):
                kind = "rdp"  # epsilon in the hundreds: RDP's (larger, still valid) noise
            try:
                sigma = max(sigma, get_noise_multiplier(target_epsilon=pv.target_epsilon,
                                                        target_delta=pv.delta, sample_rate=q, steps=steps,
                                                        accountant=kind))
            except ValueError as exc:  # Opacus: "The privacy budget is too low." (sigma > MAX_SIGMA)
                if "budget is too low" not in str(exc):
                    raise
                raise _unreachable(cfg) from None
    return math.ceil(sigma * 100) / 100


def _prv_affordable(cfg: Config, q: float, steps: int) -> bool:
    """Can PRV's search for the target's noise run in memory? get_noise_multiplier probes noise
    down to half its answer; RDP's answer bounds PRV's from above (PRV is tighter), so PRV's grid
    at a quarter of RDP's answer bounds every probe's grid."""
    from opacus.accountants.utils import get_noise_multiplier
    pv = cfg.privacy
    try:
        rdp = get_noise_multiplier(target_epsilon=pv.target_epsilon, target_delta=pv.delta,
                                   sample_rate=q, steps=steps, accountant="rdp")
    except ValueError:  # beyond RDP's reach: a huge noise, where PRV's grid is small
        return True
    return (prv_grid_points([(rdp / 4, q, steps)], pv.delta) or 0) <= PRV_MAX_POINTS


def solve_noise(cfg: Config, shard_sizes: Sequence[int],
                participation: Sequence[Sequence[int]] | None = None) -> float | None:
    """``privacy.noise_multiplier = 0`` (with a privacy level and privacy.target_epsilon > 0):
    the smallest noise multiplier that fits the target for the planned run (``smallest_noise``:
    the worst client decides at sample level); None when the config gives the noise itself."""
    if not _mechanism(cfg).unit or cfg.privacy.noise_multiplier != 0:
        return None
    require_opacus()
    return smallest_noise(cfg, shard_sizes, participation)


def check_budget(cfg: Config, shard_sizes: Sequence[int],
                 participation: Sequence[Sequence[int]] | None = None) -> float:
    """Before training: the planned epsilon, or a ConfigError naming privacy.target_epsilon and
    the fix (the largest fed.rounds and the smallest privacy.noise_multiplier that fit) when it
    exceeds the target. No target (0) or privacy.level = "none": just the planned epsilon."""
    pv = cfg.privacy
    if not _mechanism(cfg).unit:  # no privacy mechanism: nothing is spent
        return 0.0
    require_opacus()
    eps = planned_epsilon(cfg, shard_sizes, participation)
    if pv.target_epsilon <= 0 or eps <= pv.target_epsilon:
        return eps
    rounds = largest_rounds(cfg, shard_sizes, participation)
    sigma = smallest_noise(cfg, shard_sizes, participation)
    unit = _mechanism(cfg).unit
    fix = (f"set fed.rounds <= {rounds} or privacy.noise_multiplier >= {sigma:.2f}" if rounds > 0 else
           f"even 1 round exceeds it: set privacy.noise_multiplier >= {sigma:.2f}")
    raise ConfigError(
        f"privacy.target_epsilon: the planned {cfg.fed.rounds} rounds spend epsilon = {eps:.3g} "
        f"({unit}, delta {pv.delta:g}, {pv.accountant} accountant) > {pv.target_epsilon:g}; "
        f"{fix}, or raise privacy.target_epsilon")
