"""Compressed client updates with error feedback (``fed.compress``), and the bytes a round moves.

``CompressUpdate`` is a link of the update chain (fedrun.parts.UpdateRule), the first one after
local training, so that every later link sees the update as the server receives it (FedDyn's
client state; DP-FedAvg's clipping, which must come last to bound what is summed). On the
client's rank it replaces the local model theta_k in place by

    theta + decompress(compress(delta_k + e_k)),    delta_k = theta_k - theta,
    e_k <- (delta_k + e_k) - decompress(compress(delta_k + e_k))

where e_k, the client's error-feedback residual (state kind ``"ef_residual"``, P fp32 floats,
zero at first), is what compression dropped so far: it lives on the client's home rank and in
checkpoints like any per-client state, and comes back in the client's next update, so that
nothing is lost for good, only delayed (Seide et al. 2014; Stich et al. 2018; Karimireddy et
al. 2019). With ``fed.error_feedback = false`` the dropped part is lost and nothing is kept.

The compressors (what a real client would send, decoded as the server would):

* ``bf16``: every entry rounded to bfloat16 (nearest even): 2 bytes an entry.
* ``int8``: per tensor (or per ``fed.compress_block`` entries) an fp32 scale s = max|x| / 127 and
  q = floor(x / s + u), u ~ U[0, 1) (stochastic rounding: E[q s] = x), in [-127, 127]: 1 byte an
  entry and 4 a scale. A block of zeros (s = 0) sends zeros.
* ``topk``: the k = ceil(density P) entries of largest magnitude over the whole update, each as
  an fp32 value and an int32 index (8 bytes); the rest are zero.
* ``sign``: 1 bit an entry and per tensor the fp32 scale mean|x| (scaled sign, as in EF-SignSGD,
  Karimireddy et al. 2019); an entry of 0 sends +scale.

The random numbers of stochastic rounding come from the stream (seed, round, client)
(``seeding.STREAMS["compress_up"]``), drawn on the model's device: a client's message depends
on its own history only, not on the rank that trains it or on how many ranks there are.

An update that is not finite after adding the residual, or whose encoding is not (an overflow:
|x| near the fp32 limit in bf16 or in a sign scale), is sent as zeros and leaves the residual as
it was, so that one bad round cannot poison a client's state (a warning says so).

A compressor registers itself in ``COMPRESSORS`` (``fed.compress``) with its keys
(fedrun.registry); ``fed.error_feedback`` is every compressor's key.

The simulation sums the decoded updates in its one all_reduce (exact int64 sums, fedrun.flat);
``Traffic`` says what a real
deployment moves: every participant with data downloads the global model (fp32) and uploads its
message, whose size the chain's links declare (``UpdateRule.wire_bytes``). Bytes therefore follow
from the config and the round's participants alone: no counting in the buffer.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from .. import seeding
from ..config import FEDERATED, HASHED_WHEN_SET, Config, ConfigError, setting
from ..flat import flatten, float_tensors, load_flat_
from ..parts import ClientUpdate, GradTerm, Participation, Stage, UpdateRule, WireFormat
from ..registry import Registry, Settings

FP32 = 4  # bytes of a float32 (a value, a scale, an uncompressed entry)

@dataclass
class CompressSettings(Settings):
    """Every compressor's key."""

    error_feedback: bool = setting(True, hashed=HASHED_WHEN_SET)
    """Error feedback (Seide et al. 2014; Karimireddy et al. 2019): what compression dropped from
    a client's update is kept in its state (on its home rank, in checkpoints) and added to its
    next update. false: the dropped part is lost."""


COMPRESSORS = Registry(
    "fed.compress", "none", "Compression of each client's update theta_k - theta before the sum "
    "(fedrun/federated/compression.py): \"none\" | \"bf16\" | \"int8\" (stochastic rounding, an fp32 "
    "scale per tensor or per block) | \"topk\" (the largest fed.compress_density share of entries) | "
    "\"sign\" (1 bit per entry and an fp32 scale per tensor). The simulation sums the decompressed "
    "values; metrics report the bytes a real client would send.",
    hashed=HASHED_WHEN_SET, applies=FEDERATED, federated=True, requires=CompressSettings)


@dataclass
class Int8Settings(CompressSettings):
    compress_block: int = setting(0, hashed=HASHED_WHEN_SET)
    """int8: entries per fp32 scale; 0 = one scale per tensor."""

    def validate(self) -> None:
        if self.compress_block < 0:
            raise ConfigError(f"fed.compress_block: must be >= 0 (entries per int8 scale; 0 = one per "
                              f"tensor), got {self.compress_block}")


@dataclass
class TopKSettings(CompressSettings):
    compress_density: float = setting(0.01, hashed=HASHED_WHEN_SET)
    """topk: share of the update's entries sent, in (0, 1] (each as an fp32 value and an int32
    index: 8 bytes)."""

    def validate(self) -> None:
        if not 0 < self.compress_density <= 1:
            raise ConfigError(f"fed.compress_density: must be in (0, 1] (the share of entries top-k sends), "
                              f"got {self.compress_density}")


@COMPRESSORS.register("none")
class NoCompression:
    """Updates travel as fp32: nothing joins the update chain (FedAvg's bits)."""

    @classmethod
    def from_settings(cls, settings: Any) -> None:
        return None


# --------------------------------------------------------------------------------------------
# Compressors: decompress(compress(x)) of one flat update, and the size of its message


class Compressor:
    """What a client sends for its flat update ``x`` (the tensors' sizes in flat order given)."""

    name: ClassVar[str] = ""
    random: ClassVar[bool] = False  # draws random numbers (stochastic rounding)

    @classmethod
    def from_settings(cls, settings: Any) -> Compressor:
        return cls()

    @classmethod
    def kept_state(cls, settings: CompressSettings) -> tuple[str, ...]:
        """With error feedback a client keeps what compression dropped (per-client state)."""
        return ("ef_residual",) if settings.error_feedback else ()

    def apply(self, x: torch.Tensor, sizes: Sequence[int], gen: torch.Generator | None) -> torch.Tensor:
        """decompress(compress(x)): the values the server receives (fp32, x's shape)."""
        raise NotImplementedError

    def message_bytes(self, sizes: Sequence[int]) -> int:
        """Bytes of the message for a model whose float tensors have ``sizes`` entries."""
        raise NotImplementedError


@COMPRESSORS.register("bf16", CompressSettings)
class BF16(Compressor):
    """Every entry rounded to bfloat16 (nearest even): 2 bytes an entry."""

    name = "bf16"

    def apply(self, x: torch.Tensor, sizes: Sequence[int], gen: torch.Generator | None) -> torch.Tensor:
        return x.to(torch.bfloat16).float()

    def message_bytes(self, sizes: Sequence[int]) -> int:
        return 2 * sum(sizes)


@COMPRESSORS.register("int8", Int8Settings)
class Int8(Compressor):
    """Stochastic rounding to 127 levels either side of zero, one fp32 scale per tensor or block."""

    name = "int8"
    random = True
    LEVELS = 127

    def __init__(self, block: int = 0):
        self.block = block  # 0: one scale per tensor

    @classmethod
    def from_settings(cls, settings: Int8Settings) -> Int8:
        return cls(settings.compress_block)

    def apply(self, x: torch.Tensor, sizes: Sequence[int], gen: torch.Generator | None) -> torch.Tensor:
        u = torch.rand(x.numel(), generator=gen, device=x.device, dtype=x.dtype)
        out = torch.empty_like(x)
        for seg, noise, dst in zip(x.split(list(sizes)), u.split(list(sizes)), out.split(list(sizes)),
                                   strict=True):
            n = seg.numel()
            if n == 0:
                continue
            block = self.block or n
            pad = (-n) % block  # the last block of a tensor is padded with zeros (which stay zero)
            rows = F.pad(seg, (0, pad)).view(-1, block)
            scale = rows.abs().amax(dim=1, keepdim=True) / self.LEVELS
            usable = scale > 0  # an all-zero block (or a scale below the smallest float) sends zeros
            q = torch.floor(rows / torch.where(usable, scale, 1.0) + F.pad(noise, (0, pad)).view(-1, block))
            q = torch.where(usable, q.clamp_(-self.LEVELS, self.LEVELS), 0.0)
            dst.copy_((q * scale).view(-1)[:n])
        return out

    def scales(self, sizes: Sequence[int]) -> int:
        return sum(math.ceil(n / self.block) if self.block else 1 for n in sizes)

    def message_bytes(self, sizes: Sequence[int]) -> int:
        return sum(sizes) + FP32 * self.scales(sizes)


@COMPRESSORS.register("topk", TopKSettings)
class TopK(Compressor):
    """The k entries of largest magnitude of the whole update (an fp32 value and an int32 index each)."""

    name = "topk"

    def __init__(self, density: float):
        self.density = density

    @classmethod
    def from_settings(cls, settings: TopKSettings) -> TopK:
        return cls(settings.compress_density)

    def k(self, numel: int) -> int:
        return max(1, min(numel, math.ceil(self.density * numel)))

    def apply(self, x: torch.Tensor, sizes: Sequence[int], gen: torch.Generator | None) -> torch.Tensor:
        idx = x.abs().topk(self.k(x.numel()), sorted=False).indices
        out = torch.zeros_like(x)
        out[idx] = x[idx]
        return out

    def message_bytes(self, sizes: Sequence[int]) -> int:
        return 2 * FP32 * self.k(sum(sizes))  # int32 indices: models below 2**31 entries


@COMPRESSORS.register("sign", CompressSettings)
class Sign(Compressor):
    """1 bit an entry, and per tensor the scale mean|x| that keeps the l1 norm."""

    name = "sign"

    def apply(self, x: torch.Tensor, sizes: Sequence[int], gen: torch.Generator | None) -> torch.Tensor:
        out = torch.empty_like(x)
        for seg, dst in zip(x.split(list(sizes)), out.split(list(sizes)), strict=True):
            scale = seg.abs().mean()
            torch.where(seg >= 0, scale, -scale, out=dst)
        return out

    def message_bytes(self, sizes: Sequence[int]) -> int:
        return math.ceil(sum(sizes) / 8) + FP32 * len(sizes)


def build_compressor(cfg: Config) -> Compressor | None:
    """The compressor ``fed.compress`` names (None for "none")."""
    return COMPRESSORS.selected(cfg).target.from_settings(COMPRESSORS.settings(cfg))


# --------------------------------------------------------------------------------------------
# The link of the update chain


class CompressUpdate(UpdateRule, WireFormat):
    """theta_k <- theta + decompress(compress(delta_k + e_k)) on the client's rank, e_k kept."""

    name = "compress"
    stage = Stage.ENCODE

    def __init__(self, compressor: Compressor, error_feedback: bool, seed: int, sizes: Sequence[int]):
        self.compressor, self.error_feedback, self.seed = compressor, error_feedback, seed
        self.sizes = list(sizes)  # entries of each float tensor, in flat order
        # per instance: without error feedback a client keeps nothing (and trains on any rank)
        self.state_kinds = ("ef_residual",) if error_feedback else ()  # type: ignore[misc]

    @torch.no_grad()
    def end_client(self, update: ClientUpdate, term: GradTerm | None, extra: torch.Tensor) -> None:
        theta = update.global_flat
        residual = update.state.get("ef_residual") if self.error_feedback else None
        x = flatten(update.model) - theta
        if residual is not None:
            x += residual
        gen = seeding.stream_generator(x.device, "compress_up", seed=self.seed, round=update.round,
                                       client=update.client) if self.compressor.random else None
        sent = self.compressor.apply(x, self.sizes, gen)
        kept = x - sent  # not finite when x or sent is not (inf - inf is nan)
        if not bool(torch.isfinite(kept).all()):  # one host sync per client; an overflow: send
            # nothing this round and keep the residual as it was
            warnings.warn(f"round {update.round}: client {update.client}'s update (with its error "
                          f"feedback) is not finite after {self.compressor.name} compression; it sends "
                          f"zeros and keeps its residual", stacklevel=2)
            sent, kept = torch.zeros_like(x), residual
        load_flat_(update.model, theta + sent)
        if self.error_feedback:
            update.new_state["ef_residual"] = kept if kept is not None else torch.zeros_like(x)

    def wire_bytes(self, num_params: int, up: int, down: int) -> tuple[int, int]:
        return self.compressor.message_bytes(self.sizes), down


def compression_rules(cfg: Config, model: nn.Module) -> list[UpdateRule]:
    """The link of ``fed.compress`` ([] for "none": nothing in the chain, FedAvg's bits)."""
    compressor = build_compressor(cfg)
    if compressor is None:
        return []
    sizes = [t.numel() for t in float_tensors(model)]
    return [CompressUpdate(compressor, COMPRESSORS.settings(cfg).error_feedback, cfg.run.seed, sizes)]


# --------------------------------------------------------------------------------------------
# What a real deployment moves


class Traffic:
    """Bytes a real deployment would move, per round and in total: every participant with data
    downloads the global model and uploads its message (sizes from the update chain's
    ``wire_bytes``, starting from 4 bytes a float each way). A participant whose update turns out
    non-finite has sent it all the same (the server drops it). Deterministic from the config and
    the participation, so a resumed run recomputes the totals of the rounds before it."""

    def __init__(self, rules: Sequence[UpdateRule], num_params: int, sizes: dict[int, int],
                 participation: Participation):
        up = down = FP32 * num_params
        for rule in rules:
            if isinstance(rule, WireFormat):
                up, down = rule.wire_bytes(num_params, up, down)
        self.up, self.down = up, down  # per participating client
        self.sizes, self.participation = sizes, participation
        self.last_round, self.total_up, self.total_down = -1, 0, 0

    def senders(self, clients: Sequence[int]) -> int:
        return sum(1 for k in clients if self.sizes[k])

    def record(self, round_: int, clients: Sequence[int]) -> dict[str, Any]:
        """The round's bytes for metrics.jsonl (``fedrun report`` draws bytes_up, bytes_down,
        bytes_up_total)."""
        if self.last_round != round_ - 1:  # the first round of this process: count those before it
            before = sum(self.senders(self.participation.clients(r)) for r in range(1, round_))
            self.total_up, self.total_down = before * self.up, before * self.down
        n = self.senders(clients)
        self.total_up += n * self.up
        self.total_down += n * self.down
        self.last_round = round_
        return {"bytes_up": n * self.up, "bytes_down": n * self.down, "bytes_up_per_client": self.up,
                "bytes_down_per_client": self.down, "bytes_up_total": self.total_up,
                "bytes_down_total": self.total_down}
