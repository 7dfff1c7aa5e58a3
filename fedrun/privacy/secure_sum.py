"""Secure aggregation as a mechanism of the round (``secure_agg.protocol``): the aggregator sees
the sum of the clients' contributions and nothing about any one of them.

``"secagg+"`` masks every client's contribution to the round's buffer (its fixed-point model or
its encoded update, its weight, its loss and images, the rules' sums: ``RoundBuffer.summed``)
with SecAgg+'s pairwise and self masks (secure_agg.py), which cancel modulo 2^64 in the one
all_reduce; after it, the survivors' shares rebuild what is needed to remove the masks of the
clients that dropped after masking. Because the round's sum is exact integer arithmetic, the
unmasked sum is the plain sum bit for bit: the trained model is the same as without secure
aggregation, for any placement and world size, unless a round is abandoned.

* **Who drops out.** The clients that start the round (``Participation.selected``: with a
  simulated federation, those offline or late included) take part in the key exchange and the
  secret sharing; those whose contribution never reaches the sum (offline, late, surplus,
  non-finite) are the dropouts, the others the survivors (the buffer's per-client flags).
* **Abandoned rounds.** Fewer survivors than ``secure_agg.min_survivors``, or a client left with
  fewer than ``secure_agg.threshold`` surviving neighbours, and the sum cannot be unmasked: the
  round is abandoned with one warning line and the global model stays as it was (nothing lost;
  the next round starts afresh).
* **Keys.** Every round, rank 0 draws a 32-byte secret from os.urandom and broadcasts it; every
  rank runs the whole protocol for every client under it (``key_source = "shared"``), so any rank
  may train (and mask for) any client and all ranks unmask identically. No key outlives its round
  or can be derived from run.seed; masks cancel exactly, so a resumed run needs none of them.
  ``secure_agg.keys = "seed"`` derives them from run.seed (reproducible masked vectors, tests only).
* **Costs** of the round (this rank's seconds of key agreement, masking and recovery) go into
  metrics.jsonl; the bytes a real client sends (its masked vector, 8 bytes a number, or
  ``secure_agg.bits`` with distributed DP, plus its keys and shares) into the traffic figures.

What the simulation shows and what a deployment would still need: docs/privacy.md "Threat model".
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .. import dist
from ..config import FEDERATED, HASHED_WHEN_SET, NOT_HASHED, Config, ConfigError, setting
from ..flat import RoundBuffer
from ..parts import WireFormat
from ..registry import Registry, Settings, registry_of
from . import secure_agg as sa
from .base import Mechanism

SECURE_AGG = Registry(
    "secure_agg.protocol", "none", "Secure aggregation of the round's sum (fedrun/privacy/secure_sum.py): "
    "\"none\" | \"secagg+\" (SecAgg+ masks on every client's contribution, removed after the sum; the "
    "model is the plain sum's, bit for bit, unless a round is abandoned for too few survivors).",
    hashed=HASHED_WHEN_SET, applies=FEDERATED, federated=True)


@dataclass
class SecAggSettings(Settings):
    """SecAgg+'s keys (Bell et al. CCS 2020)."""

    neighbours: int = setting(0, hashed=HASHED_WHEN_SET)
    """k: each client masks with k neighbours of a ring graph over the round's clients; 0 = the
    SecAgg+ paper's k for the round's size (8 for 10 clients; k >= clients - 1: every pair, as
    SecAgg)."""
    threshold: int = setting(0, hashed=HASHED_WHEN_SET)
    """t: shares of a client's secrets any t of its neighbours can rebuild (and fewer cannot); 0 =
    the paper's t for the round's size (5 for 10 clients). A round where a client keeps fewer than
    t surviving neighbours is abandoned."""
    min_survivors: int = setting(0, hashed=HASHED_WHEN_SET)
    """Fewer surviving clients abandon the round; with distributed DP each client's noise share is
    sized so that this many survivors carry the whole noise, and every round keeps that many, also
    one that draws fewer clients than fed.clients_per_round. 0 = the threshold (with distributed
    DP: a clients_per_round round's)."""
    survivor_fraction: float = setting(0.0, hashed=HASHED_WHEN_SET, off=0.0)
    """With distributed DP: each round's noise shares are sized for at least ceil(survivor_fraction
    x its clients) survivors (and secure_agg.min_survivors), so a round where all survive carries
    at most 1 / survivor_fraction times the noise, whatever its size (Poisson cohorts vary), and
    a round with fewer survivors is abandoned; e.g. 0.9 (a 10 % dropout margin). 0 = sized for
    min_survivors in every round."""
    bits: int = setting(0, hashed=HASHED_WHEN_SET)
    """Bits per coordinate of the secure sum with distributed DP (privacy.level "client" or
    "sample_once": each client adds Skellam noise shares on a 2^bits integer grid after a random
    rotation, scaling and randomized rounding); 0 = the exact int64 fixed-point sum, and a DP
    level's noise is added once, by the server, on the unmasked sum (12 to 20 is usual)."""
    keys: str = setting("urandom", hashed=NOT_HASHED, label=False, choices=("urandom", "seed"))
    """"urandom": each round's keys under a secret rank 0 draws from os.urandom | "seed": keys
    derived from run.seed (reproducible masked vectors for tests; never for a deployment)."""

    def validate(self) -> None:
        for key, value in (("neighbours", self.neighbours), ("threshold", self.threshold),
                           ("min_survivors", self.min_survivors), ("bits", self.bits)):
            if value < 0:
                raise ConfigError(f"secure_agg.{key}: must be >= 0 (0 = the default), got {value}")
        if not 0 <= self.survivor_fraction <= 1:
            raise ConfigError(f"secure_agg.survivor_fraction: must be in [0, 1] (0 = shares sized for "
                              f"secure_agg.min_survivors), got {self.survivor_fraction}")
        if self.survivor_fraction and not self.bits:
            raise ConfigError("secure_agg.survivor_fraction sizes distributed DP's noise shares, and with "
                              "secure_agg.bits = 0 the server adds the noise once; set secure_agg.bits (e.g. "
                              "16) or secure_agg.survivor_fraction = 0")
        if self.bits and not 2 <= self.bits <= 62:
            raise ConfigError(f"secure_agg.bits: {self.bits} is outside 2..62; set 12 to 20 (or 0 for the "
                              f"exact int64 sum)")


@SECURE_AGG.register("none")
class NoSecureAggregation(Mechanism):
    """The aggregator sums the clients' contributions in the clear."""

    summary_key = "secure_aggregation"


def resolved_graph(settings: SecAggSettings, clients: int) -> tuple[int, int, int]:
    """(k, t, min_survivors) for a round of ``clients``: the settings, or the paper's for 0."""
    k, t = sa.recommended_graph(max(clients, 2))
    k = settings.neighbours or k
    t = settings.threshold or min(t, k)
    return k, t, settings.min_survivors or t


@SECURE_AGG.register("secagg+", SecAggSettings)
class SecAggPlus(Mechanism):
    """SecAgg+ (Bell et al. 2020): pairwise masks with k neighbours, Shamir-shared with threshold t."""

    summary_key = "secure_aggregation"
    tracks_clients = True
    shows_local_models = False  # a local model is a client's update in the clear

    def __init__(self, cfg: Config, sizes: Sequence[int]):
        super().__init__(cfg, sizes)
        self.settings: SecAggSettings = SECURE_AGG.settings(cfg)
        self.masking: SecureMasking | None = None

    @classmethod
    def check(cls, cfg: Config) -> None:
        s: SecAggSettings = SECURE_AGG.settings(cfg)
        per_round = cfg.fed.clients_per_round
        k, t, m = resolved_graph(s, per_round)
        sa.check_settings(per_round, k, t, m, None)
        if cfg.fed.compress == "topk":
            raise ConfigError("fed.compress: a top-k message is sparse, while a masked vector covers every "
                              "coordinate; with secure_agg.protocol = \"secagg+\" use \"none\", \"bf16\", "
                              "\"int8\" or \"sign\"")
        if cfg.eval.local_models_at or cfg.eval.client_samples:
            raise ConfigError("eval.local_models_at: secure aggregation hides each client's update from the "
                              "aggregator, and a local model's grids and scores show it: set "
                              "eval.local_models_at = [] and eval.client_samples = 0")
        privacy = registry_of("privacy.level")
        assert privacy is not None
        if s.bits and not getattr(privacy.selected(cfg).target, "noise_on_grid", False):
            raise ConfigError(f"secure_agg.bits: {s.bits} bits carry distributed DP noise, which "
                              f"privacy.level = {cfg.privacy.level!r} does not add; set privacy.level = "
                              f"\"client\" or \"sample_once\", or secure_agg.bits = 0")

    def attach(self, buffer: RoundBuffer) -> None:
        # distributed DP sizes each round's noise shares for grid.noise_survivors(its clients); a round
        # that draws fewer clients (Poisson cohorts) has a smaller t, yet must keep that many survivors
        grid = getattr(buffer.encoder, "grid", None)
        self.masking = SecureMasking(self.settings, self.cfg.run.seed, buffer.summed,
                                     64 if buffer.encoder is None else self.settings.bits,
                                     noise_survivors=grid.noise_survivors if grid is not None else None)
        buffer.masking = self.masking

    def wire_formats(self) -> list[WireFormat]:
        assert self.masking is not None, "attach the buffer first"
        return [self.masking]

    def summary(self) -> dict[str, Any] | None:
        k, t, m = resolved_graph(self.settings, self.cfg.fed.clients_per_round)
        fraction = self.settings.survivor_fraction
        return {"protocol": "secagg+", "neighbours": k, "threshold": t, "min_survivors": m,
                **({"survivor_fraction": fraction} if fraction else {}),
                "bits": self.settings.bits or 64, "keys": self.settings.keys}


class SecureMasking(WireFormat):
    """The buffer's masking (fedrun.flat.Masking) for SecAgg+, one ``SecureRound`` a round."""

    def __init__(self, settings: SecAggSettings, seed: int, numbers: int, bits: int,
                 noise_survivors: Callable[[int], int] | None = None):
        """``noise_survivors(n)``: the survivors distributed DP sizes a round of n clients' noise
        shares for (None: no noise on the grid); every round keeps at least that many, whatever
        its own t."""
        self.settings, self.seed, self.numbers, self.bits = settings, seed, numbers, bits
        self.noise_survivors = noise_survivors
        self.round: sa.SecureRound | None = None

    def begin_round(self, round_: int, selected: Sequence[int]) -> None:
        k, t, m = resolved_graph(self.settings, len(selected))
        if self.noise_survivors is not None:  # fewer survivors would carry less noise than accounted
            m = max(m, self.noise_survivors(len(selected)))
        if self.settings.keys == "seed":
            key_source, secret = "seed", b""
        else:  # a fresh secret every round, the same on every rank
            key_source, secret = "shared", dist.broadcast_object(os.urandom(32))
        self.round = sa.SecureRound(round_, selected, k, t, self.seed, min_survivors=m, key_source=key_source,
                                    secret=secret)  # type: ignore[arg-type]

    def mask_(self, client: int, vec: torch.Tensor) -> None:
        assert self.round is not None
        self.round.mask_(client, vec)

    def unmask_(self, summed: torch.Tensor, survivors: list[int]) -> str:
        assert self.round is not None
        return "" if self.round.unmask_(summed, survivors) else self.round.last_failure

    def record(self) -> dict[str, Any]:
        if self.round is None:
            return {}
        c = self.round.costs
        k = max((len(v) for v in self.round.graph.values()), default=0)
        return {"secagg_neighbours": k, "secagg_key_agreement_s": round(c.key_agreement_s, 4),
                "secagg_mask_s": round(c.mask_s, 4), "secagg_recovery_s": round(c.recovery_s, 4)}

    def wire_bytes(self, num_params: int, up: int, down: int) -> tuple[int, int]:
        """A client sends its masked vector (``bits`` a number) and the protocol's messages (its
        two public keys, an encrypted pair of shares per neighbour, the shares it reveals) and
        receives its neighbours' keys and shares."""
        k, _, _ = resolved_graph(self.settings, 10)
        sent = 2 * sa.KEY_BYTES + k * (sa.SHARE_MESSAGE + sa.REVEAL_MESSAGE)
        received = k * (2 * sa.KEY_BYTES + sa.SHARE_MESSAGE)
        return math.ceil(self.bits * self.numbers / 8) + sent, down + received
