"""Every random stream is derived from (tag, seed, round, client, ...), never from history.

That is what makes a run independent of the number of ranks (any rank can train any client
and draw the same numbers) and of crashes (a resumed round replays exactly).

A stream's seed is ``derive_seed(tag, *parts)``: numpy's SeedSequence hash of the int words.
Two draws share a stream exactly when their words are equal, with one twist of SeedSequence:
words are padded with zeros up to its pool of 4, so ``(a, b, c)`` and ``(a, b, c, 0)`` are the
same stream (5 words and more are hashed with their length). ``STREAMS`` therefore names every
stream fedrun draws, with its tag, the names of the parts that follow it (an int among them is a
sub-tag, fixed at its position), and the config under which it is drawn;
tests/unit_tests/test_seeding.py checks that no two streams that can meet in one run can
produce the same words, and that every call in the package passes a registered tag or stream.

New code draws a named stream: ``stream_generator(device, "client_grid", seed=..., round=...,
client=...)``; the training code's calls with a tag first (``generator(device, CLIENT, seed,
round, client)``) are the same streams, written the older way.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

import numpy as np
import torch

from .errors import ConfigError

# Tags: the first part of every stream. The values are part of every stream's numbers: never
# renumber one (a run would no longer reproduce its checkpoints), only append.
INIT, CLIENT, SOBOL, SHUFFLE, SAMPLE, SELECT, DP_NOISE, DP_SAMPLING, AUDIT = range(9)
COMPRESS = 9
AVAILABILITY, SPEED = 10, 11  # simulated federations (fed.availability, fed.speed_sigma)
SECAGG, DDP = 12, 13  # secure aggregation (privacy/secure_agg.py); distributed DP (privacy/distributed_dp.py)
BOOTSTRAP = 14  # the scores' confidence intervals (eval.bootstrap)
ASYNC = 15  # FedBuff's schedule (fedrun/federated/fedbuff.py)
TAGS: Mapping[str, int] = MappingProxyType({
    "INIT": INIT, "CLIENT": CLIENT, "SOBOL": SOBOL, "SHUFFLE": SHUFFLE, "SAMPLE": SAMPLE,
    "SELECT": SELECT, "DP_NOISE": DP_NOISE, "DP_SAMPLING": DP_SAMPLING, "AUDIT": AUDIT,
    "COMPRESS": COMPRESS, "AVAILABILITY": AVAILABILITY, "SPEED": SPEED, "SECAGG": SECAGG, "DDP": DDP,
    "BOOTSTRAP": BOOTSTRAP, "ASYNC": ASYNC})

# Sub-tags of SAMPLE (the part after seed and round), of AUDIT and INIT (the part after seed).
SAMPLE_GRID, SAMPLE_EVAL, SAMPLE_CLIENT_GRID, SAMPLE_CLIENT_EVAL = range(4)
AUDIT_MEMBERS, AUDIT_NON_MEMBERS, AUDIT_SAMPLES = range(3)
INIT_ADAPTERS = 1  # the part after seed of INIT (0, absent, is the model's own init)
COMPRESS_UP = 0  # the part after seed and round of COMPRESS (room for a downlink stream)
SECAGG_GRAPH, SECAGG_KEYS = range(2)  # the part after seed and round of SECAGG
DDP_ROTATION, DDP_ROUNDING, DDP_NOISE = range(3)  # the part after seed and round of DDP
SUB_TAGS: Mapping[str, tuple[int, int]] = MappingProxyType({  # name -> (its tag, its value)
    "SAMPLE_GRID": (SAMPLE, SAMPLE_GRID), "SAMPLE_EVAL": (SAMPLE, SAMPLE_EVAL),
    "SAMPLE_CLIENT_GRID": (SAMPLE, SAMPLE_CLIENT_GRID), "SAMPLE_CLIENT_EVAL": (SAMPLE, SAMPLE_CLIENT_EVAL),
    "AUDIT_MEMBERS": (AUDIT, AUDIT_MEMBERS), "AUDIT_NON_MEMBERS": (AUDIT, AUDIT_NON_MEMBERS),
    "AUDIT_SAMPLES": (AUDIT, AUDIT_SAMPLES), "INIT_ADAPTERS": (INIT, INIT_ADAPTERS),
    "COMPRESS_UP": (COMPRESS, COMPRESS_UP),
    "SECAGG_GRAPH": (SECAGG, SECAGG_GRAPH), "SECAGG_KEYS": (SECAGG, SECAGG_KEYS),
    "DDP_ROTATION": (DDP, DDP_ROTATION), "DDP_ROUNDING": (DDP, DDP_ROUNDING), "DDP_NOISE": (DDP, DDP_NOISE)})


@dataclass(frozen=True)
class Stream:
    """One random stream: ``derive_seed(tag, *parts)``, a name per variable part, an int per
    sub-tag. ``only`` lists the config values under which it is drawn: two streams that differ
    on one key (run.mode fedavg / centralized) never meet in one run."""

    tag: int
    parts: tuple[str | int, ...]
    what: str
    only: Mapping[str, str] = field(default_factory=dict)

    def words(self, values: Mapping[str, int]) -> tuple[int, ...]:
        """(tag, parts...) with the named parts taken from ``values`` (exactly those names)."""
        names = [p for p in self.parts if isinstance(p, str)]
        if sorted(values) != sorted(names):
            raise TypeError(f"stream parts {sorted(values)} given, {names} expected")
        return (self.tag, *(p if isinstance(p, int) else int(values[p]) for p in self.parts))


FEDAVG, CENTRALIZED = {"run.mode": "fedavg"}, {"run.mode": "centralized"}
DP_SGD, DP_FEDAVG = {"privacy.level": "sample"}, {"privacy.level": "client"}
SAMPLE_ONCE = {"privacy.level": "sample_once"}
SECURE_AGG = {"run.mode": "fedavg", "secure_agg.protocol": "secagg+"}
SKELLAM = SECURE_AGG  # and secure_agg.bits > 0 (distributed DP)

STREAMS: Mapping[str, Stream] = MappingProxyType({
    "init": Stream(INIT, ("seed",), "the model's initial weights (models.build)"),
    "adapter_init": Stream(INIT, ("seed", INIT_ADAPTERS), "the LoRA adapters' initial weights "
                           "(adapters.make_trainable)", {"model.trainable": "lora"}),
    "select": Stream(SELECT, ("seed", "round"), "the clients of a round", FEDAVG),
    "client": Stream(CLIENT, ("seed", "round", "client"),
                     "a client's local training: dropout, noise, label dropout (global torch RNG)", FEDAVG),
    "sobol": Stream(SOBOL, ("seed", "round", "client"), "a client's noise levels t", FEDAVG),
    "shuffle": Stream(SHUFFLE, ("seed", "round", "client"), "a client's batch order", FEDAVG),
    "dp_sgd_sampling": Stream(DP_SAMPLING, ("seed", "round", "client"), "DP-SGD's Poisson batches",
                              {**FEDAVG, **DP_SGD}),
    "dp_sgd_noise": Stream(DP_NOISE, ("seed", "round", "client"), "DP-SGD's gradient noise",
                           {**FEDAVG, **DP_SGD}),
    "sample_once_sampling": Stream(DP_SAMPLING, ("seed", "round", "client"), "noise once: a client's "
                                   "Poisson batch of the round's one step", {**FEDAVG, **SAMPLE_ONCE}),
    "sample_once_noise": Stream(DP_NOISE, ("seed", "round"), "noise once, central: the server's Gaussian "
                                "on the round's sum (secure_agg.bits = 0)", {**FEDAVG, **SAMPLE_ONCE}),
    "dp_fedavg_sampling": Stream(DP_SAMPLING, ("seed", "round"), "DP-FedAvg's Poisson clients",
                                 {**FEDAVG, **DP_FEDAVG}),
    "dp_fedavg_noise": Stream(DP_NOISE, ("seed", "round"), "DP-FedAvg's server noise",
                              {**FEDAVG, **DP_FEDAVG}),
    "central_step": Stream(CLIENT, ("seed", "epoch", "rank"), "a centralized epoch on one rank", CENTRALIZED),
    "central_sobol": Stream(SOBOL, ("seed", "epoch", "rank"), "a centralized epoch's noise levels",
                            CENTRALIZED),
    "central_shuffle": Stream(SHUFFLE, ("seed", "epoch"), "a centralized epoch's order", CENTRALIZED),
    "eval_samples": Stream(SAMPLE, ("seed", "round", SAMPLE_EVAL, "chunk"),
                           "the global model's scored samples"),
    "final_grid": Stream(SAMPLE, ("seed", "round", SAMPLE_GRID, "chunk"), "samples/final.png"),
    "client_grid": Stream(SAMPLE, ("seed", "round", SAMPLE_CLIENT_GRID, "client"),
                          "clients/round_R/client_K.png (a local model's grid)", FEDAVG),
    "client_eval": Stream(SAMPLE, ("seed", "round", SAMPLE_CLIENT_EVAL, "client", "chunk"),
                          "a local model's scored samples", FEDAVG),
    "audit_members": Stream(AUDIT, ("seed", AUDIT_MEMBERS), "fedrun audit: the subset of members"),
    "audit_member_noise": Stream(AUDIT, ("seed", AUDIT_MEMBERS, "level", "draw", "chunk"),
                                 "fedrun audit: noise of the members' losses"),
    "audit_non_member_noise": Stream(AUDIT, ("seed", AUDIT_NON_MEMBERS, "level", "draw", "chunk"),
                                     "fedrun audit: noise of the non-members' losses"),
    "audit_samples": Stream(AUDIT, ("seed", AUDIT_SAMPLES, "chunk"), "fedrun audit: generated images"),
    "compress_up": Stream(COMPRESS, ("seed", "round", COMPRESS_UP, "client"),
                          "a client's stochastic rounding of its compressed update (fed.compress)", FEDAVG),
    "availability": Stream(AVAILABILITY, ("seed", "round", "client"),
                           "does a selected client report in this round (fed.availability, a trace's "
                           "probabilities)", FEDAVG),
    "speed": Stream(SPEED, ("seed", "client"), "a client's simulated speed factor (fed.speed_sigma)", FEDAVG),
    "fedbuff_schedule": Stream(ASYNC, ("seed",), "FedBuff's schedule: which idle client starts next, and "
                               "whether it is online (fed.availability)",
                               {**FEDAVG, "fed.participation": "fedbuff"}),
    "eval_bootstrap": Stream(BOOTSTRAP, ("seed", "draw"), "the scores' bootstrap resamples (fedrun."
                             "evaluation.intervals.DRAWS: one per set resampled, and FID at infinite N's "
                             "halves)"),
    "secagg_graph": Stream(SECAGG, ("seed", "round", SECAGG_GRAPH),
                           "secure aggregation: the ring order of a round's neighbour graph", SECURE_AGG),
    "secagg_keys": Stream(SECAGG, ("seed", "round", SECAGG_KEYS, "client"),
                          "secure aggregation: a client's keys and self-mask seed, only with seeded keys "
                          "(reproducible tests; the default draws them from os.urandom)", SECURE_AGG),
    "ddp_rotation": Stream(DDP, ("seed", "round", DDP_ROTATION),
                           "distributed DP: the random signs of a round's Hadamard rotation", SKELLAM),
    "ddp_rounding": Stream(DDP, ("seed", "round", DDP_ROUNDING, "client"),
                           "distributed DP: a client's randomized rounding to the integer grid", SKELLAM),
    "ddp_noise": Stream(DDP, ("seed", "round", DDP_NOISE, "client"),
                        "distributed DP: a client's Skellam noise share", SKELLAM),
})

# Seeded from run.seed directly, by other generator families (numpy's PCG64 / MT19937 and
# torch's, from the raw seed, not the SeedSequence hash): (module, function) -> what it draws.
# Kept as they are because changing them would change the partition, hence every trained model.
RAW_SEED_USES: Mapping[tuple[str, str], str] = MappingProxyType({
    ("fedrun.partition", "partition"): "the clients' shards (numpy default_rng(seed))",
    ("fedrun.evaluation.grids", "colour_clusters"): "pixels picked for a grid's colour strip",
    ("fedrun.evaluation.scores", "inception_score"): "the order of IS's splits",
    ("fedrun.evaluation.scores", "kernel_distance"): "KID's subsets (clean-fid's RandomState)",
    ("fedrun.evaluation.classifier", "train_classifier"): "the proxy classifier's init and batches",
    ("fedrun.data", "_synthetic"): "the synthetic benchmark set (fixed seeds, not run.seed)",
    ("fedrun.printed_digits", "render"): "the printed digits' glyph parameters (a fixed seed per split)",
})

_WORD = 2**32  # SeedSequence splits an int into 32-bit words: a larger part would be two words


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from a tuple of ints in [0, 2**32) (numpy's SeedSequence hashing)."""
    words = [int(p) for p in parts]
    for p in words:
        if not 0 <= p < _WORD:  # 2**32 + 1 would hash as the two words (1, 1): another stream's
            raise ConfigError(f"run.seed: seeds and their parts must lie in [0, 2**32), got {p}; "
                              f"use a smaller --run.seed")
    state = np.random.SeedSequence(words).generate_state(2, np.uint64)
    return int(state[0] >> np.uint64(1))


def generator(device: torch.device | str, *parts: int) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(derive_seed(*parts))


def sobol_engine(*parts: int) -> torch.quasirandom.SobolEngine:
    """Scrambled 1-D Sobol sequence for noise levels: low-discrepancy t lowers loss variance."""
    return torch.quasirandom.SobolEngine(1, scramble=True, seed=derive_seed(SOBOL, *parts) % (2**31))


def stream_seed(name: str, **parts: int) -> int:
    """The seed of the registered stream ``name`` (see STREAMS) at the given parts."""
    return derive_seed(*STREAMS[name].words(parts))


def stream_generator(device: torch.device | str, name: str, **parts: int) -> torch.Generator:
    """A torch generator on ``device`` drawing the registered stream ``name``."""
    return torch.Generator(device=device).manual_seed(stream_seed(name, **parts))
