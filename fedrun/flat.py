"""The model as one flat fp32 vector: every parameter that trains and every float buffer, in a
fixed order.

What trains is what has ``requires_grad`` (``model.trainable``, fedrun/adapters.py): with LoRA the
frozen base is left out, so everything built on this layout (the round's all_reduce, the EMA,
SCAFFOLD's and FedDyn's state, DP-FedAvg's clipping, compression, the clients' kept state) covers
the adapters and the few layers that train in full. The frozen base is the same on every rank
(built from the same seed and init) and never moves, so it need not travel. With every
parameter trainable (``"all"``, the default) the layout is every parameter.

One round's whole communication is one all_reduce(SUM) of one int64 buffer laid out as

    [ sum_k w'_k theta_k  (P) | sum_k w'_k | n | loss * n | images | trained | regions of the rules |
      (round start, ready, steps, clients, skipped, images) of rank 0 | ... of rank W-1 | reported (N) ]

The part up to the rules' regions is what the clients contribute (``summed``): each client's
contribution to it may be masked (secure aggregation: ``masker``, masks that cancel modulo 2^64,
removed after the sum by ``unmasker``), and its model part may be an encoding of the client's
update instead of its fixed-point model (``encoder``: distributed DP's integer grid). The rest is
the ranks' own bookkeeping, in the clear, and, when tracked, one flag per client that reported.

**The sum does not depend on who adds what** (``RoundBuffer``): every client's weighted model
w'_k theta_k (w'_k = w_k / max_weight <= 1, so data sizes do not eat into the range) is rounded
once to a fixed-point grid of 2^-F in float64 and added as an int64. Integer addition is exact
and associative, so the sum, hence the trained model, is the same bits whichever rank trained
which client, in which order, on 1 or 8 ranks (an fp32 sum would change with the grouping).
The range is bounded so that no sum can overflow: a client's values must satisfy
|w'_k theta_k| <= 2^VALUE_BITS (65,536: no weight, control variate or loss of a sane diffusion
model comes near it) and at most ``max_clients`` (the run's N) are summed, so
F = 62 - VALUE_BITS - ceil(log2 max_clients) fraction bits remain (42 for N = 10, 33 for
N = 5,000). A client whose update leaves the range is left out of the round, like a
non-finite one (``add`` returns False; the check depends on the client alone, so the decision
does not depend on the placement either). The grid's absolute resolution on the average is at
most 2^-(F+1) (1e-13 at N = 10): finer than fp32's own rounding of any weight above ~1e-6.
A sum of changes (FedBuff: w'_k s_k (theta_k - theta_{v_k}), each from the model version the
client started from, ``RoundBuffer(changes=...)``) sums the clients' models as above and, after the
all_reduce, subtracts each start version once, weighted by the exact sum of its clients' factors:
theta_k and theta_{v_k} both in range, and no pass per client beyond a synchronous round's.
The cost is 8 bytes a number in the all_reduce instead of 4, and a few passes over each
client's model (float64 product, round, int64 add) on its rank.

The tail carries what the server and the telemetry need, so nothing else has to travel: the
statistics, and per rank (each written only by its rank) the wall-clock times (ns) at which it
started the round and reached the all_reduce, its local steps and clients: after the sum every
rank knows how long each rank took to get to the all_reduce and how long each waited there.
Update rules add sums of their own through a float scratch region per rule (SCAFFOLD:
sum_k n_k (c_k+ - c_k)), which ``add`` folds into the buffer with the client's model.
``RoundBuffer`` owns the layout and is what the round loop fills, all-reduces and reads.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch
from torch import nn

from . import dist
from .parts import Aggregate, ClientUpdate

# Tail slots of the aggregation buffer, after the model part; then the rules' regions, then
# PER_RANK slots per rank. W_SLOT: sum of w' on the values' grid (the average's denominator);
# N_SLOT: sum of the weights themselves on a grid of 2^-WEIGHT_BITS (exact for integer weights:
# n_k, or DP-FedAvg's 1).
W_SLOT, N_SLOT, LOSS_SLOT, IMAGES_SLOT, TRAINED_SLOT = range(5)
TAIL = 5
WEIGHT_BITS = 20
START_NS, READY_NS, STEPS, CLIENTS, SKIPPED, IMAGES = range(6)
PER_RANK = 6
VALUE_BITS = 16  # |w' theta| <= 2^16 for every summed number (module docstring)
CHUNK = 1 << 20  # numbers converted back to fp32 at a time (an 8 MB float64 temporary)


def float_tensors(model: nn.Module) -> list[torch.Tensor]:
    """Every trainable parameter and float buffer of ``model``, in the fixed order the buffer uses."""
    return [p for p in model.parameters() if p.requires_grad] + \
        [b for b in model.buffers() if b.is_floating_point()]


def num_flat(model: nn.Module) -> int:
    return sum(t.numel() for t in float_tensors(model))


def flatten(model: nn.Module) -> torch.Tensor:
    return torch.cat([t.detach().float().reshape(-1) for t in float_tensors(model)])


@torch.no_grad()
def load_flat_(model: nn.Module, flat: torch.Tensor) -> None:
    offset = 0
    for t in float_tensors(model):
        t.copy_(flat[offset:offset + t.numel()].view_as(t))
        offset += t.numel()


def extremes(tensors: list[torch.Tensor]) -> torch.Tensor:
    """The largest |x| over ``tensors`` (NaN if any is NaN), one number on their device: a min and
    a max per tensor (nothing model-sized allocated) and one host sync for all of them."""
    pairs = [torch.stack(torch.aminmax(t.detach())).float() for t in tensors if t.numel()]
    if not pairs:
        return torch.zeros(())
    both = torch.stack(pairs)
    return torch.maximum(-both[:, 0].min(), both[:, 1].max())


def all_finite(model: nn.Module) -> bool:
    """No NaN/Inf in any float tensor, checked in place (no flat copy of the model)."""
    return bool(torch.isfinite(extremes(float_tensors(model))))


def buffer_size(num_params: int, world_size: int) -> int:
    """Numbers in a plain round's buffer: parameters, statistics, per-rank slots (no rules' regions,
    no client flags)."""
    return num_params + TAIL + PER_RANK * world_size


def fraction_bits(max_clients: int) -> int:
    """F of the fixed-point grid: what is left of int64's 63 bits after the values' range and the
    count of summed clients (so that no sum of ``max_clients`` in-range values can overflow)."""
    return 62 - VALUE_BITS - max(1, max_clients - 1).bit_length()


@torch.no_grad()
def add_fixed_(out: torch.Tensor, t: torch.Tensor, factor: float, f64: torch.Tensor,
               i64: torch.Tensor) -> None:
    """out (int64) += round(t * factor), computed in float64 (an fp32 value times a float64 factor,
    rounded once: the same integers for the same inputs on any rank), in pieces of the scratch
    tensors' length so that nothing model-sized is allocated."""
    flat, step = t.detach().reshape(-1), f64.numel()
    for i in range(0, flat.numel(), step):
        piece = flat[i:i + step]
        x, q = f64[:piece.numel()], i64[:piece.numel()]
        x.copy_(piece).mul_(factor).round_()
        q.copy_(x)  # integral values: the cast is exact
        out[i:i + piece.numel()].add_(q)


class Encoder(Protocol):
    """How a client's update enters the sum instead of its fixed-point model: ``size`` integers
    per client, summed (modulo 2^64), decoded once into sum_k (theta_k - theta) (a privacy
    mechanism's distributed-DP encoding, fedrun.privacy)."""

    size: int

    def begin_round(self, round_: int, selected: Sequence[int]) -> None:
        """A new round of ``selected`` clients (distributed DP sizes its noise shares for it)."""

    def encode(self, update: ClientUpdate) -> torch.Tensor:
        """The client's ``size`` int64 numbers (its clipped, encoded, noised update)."""

    def decode(self, summed: torch.Tensor, round_: int) -> torch.Tensor:
        """sum_k (theta_k - theta) (with whatever noise the encodings carried) from the summed model part."""


class Masking(Protocol):
    """Secure aggregation as the buffer sees it (fedrun.privacy.secure_sum): keys for the round's
    clients, a mask on each client's contribution, and the masks' removal from the sum."""

    def begin_round(self, round_: int, selected: Sequence[int]) -> None:
        """Set up the round for the clients that start it (every rank, identically)."""

    def mask_(self, client: int, vec: torch.Tensor) -> None:
        """Add the client's masks to its int64 contribution, in place (modulo 2^64)."""

    def unmask_(self, summed: torch.Tensor, survivors: list[int]) -> str:
        """Remove every mask from the sum in place; "" when done, else why the round is abandoned
        (then ``summed`` is untouched)."""

    def record(self) -> dict[str, Any]:
        """The round's figures for metrics.jsonl (seconds, bytes)."""


class RoundBuffer:
    """The one buffer a round all-reduces (module docstring): exact fixed-point sums, the tail,
    the rules' regions, per-rank slots and, when tracked, the clients that reported.

    ``regions``: numbers each update rule adds per client (by rule name; zero-sized ones get none).
    ``max_clients``: the most clients one round can sum (the run's N). ``max_weight``: the largest
    client weight expected (the largest data size); weights are divided by it, so that data sizes
    do not narrow the range (a weight above it only narrows that client's own range).
    ``track_clients``: keep one flag per client (N) of who reported (secure aggregation needs the
    survivors). ``encoder``: the model part is this encoding of each update (distributed DP).
    ``masking``: secure aggregation's masks on every contribution (set by the mechanism).
    ``changes``: the model part sums w'_k s_k (theta_k - theta_{v_k}), each client's change from the
    model it started from (version v_k, ``ClientUpdate.version``) times its ``scale`` s_k (FedBuff),
    instead of w'_k theta_k; the aggregate's total and average are then changes
    (``Aggregate.changes``). Each client adds round(f_k theta_k), its factor f_k = w'_k s_k 2^F
    quantized to 2^-G relative (G = min(30, F)), and its integer q_k = f_k 2^(G-F) into the slot
    of its start version (``changes`` slots, v mod changes: the versions one step can mix); after
    the all_reduce every rank subtracts round(Q_v theta_v), Q_v the slot's sum, once per version
    that the step used, from the versions ``bases`` gives (set by the model source): the
    same integers on every rank, one pass per version instead of one more per client.
    """

    def __init__(self, num_params: int, world_size: int, regions: dict[str, int], device: torch.device,
                 rank: int = 0, max_clients: int = 1, max_weight: float = 1.0, track_clients: int = 0,
                 encoder: Encoder | None = None, changes: int = 0):
        assert not (changes and encoder is not None), "an encoder decides the model part itself"
        self.changes = changes > 0
        self.bases: Callable[[int], torch.Tensor] | None = None  # version -> its flat model (FedBuff)
        self.num_params, self.world_size, self.rank = num_params, world_size, rank
        self.max_weight = float(max(max_weight, 1.0))
        self.bits = fraction_bits(max_clients)
        self.scale = 2.0 ** self.bits
        self.limit = 2.0 ** VALUE_BITS
        self.encoder = encoder
        self.model_size = num_params if encoder is None else encoder.size
        offset = self.model_size + TAIL
        self._regions: dict[str, tuple[int, int]] = {}
        for name, size in regions.items():
            if size:
                self._regions[name] = (offset, size)
                offset += size
        self._versions = (offset, changes)  # q sums per start version (sum of changes)
        offset += changes
        self.factor_bits = min(30, self.bits)  # G: a change's factor on a grid of 2^-G relative
        self.summed = offset  # what the clients contribute (masked, when masking)
        self._ranks = offset  # the first per-rank slot
        self._reported = offset + PER_RANK * world_size
        self.data = torch.zeros(self._reported + track_clients, dtype=torch.int64, device=device)
        self.masking: Masking | None = None
        self.round = 0
        self.abandoned = ""  # why this round's sum could not be read ("" = it can)
        # the rules' per-client sums, in fp32 as they write them; ``add`` folds them in
        self._scratch = {name: torch.zeros(size, device=device) for name, (_, size) in self._regions.items()}
        self._sums: dict[str, torch.Tensor] = {}
        # the round's fp32 results, allocated once (a fresh model-sized tensor per round costs page
        # faults on a CPU; see benchmarks/README.md)
        self._total = torch.zeros(num_params, device=device)
        self._average = torch.zeros(num_params, device=device)
        work = min(CHUNK, max(num_params, *regions.values(), 1))  # scratch of the fixed-point conversion
        self._work = (torch.empty(work, dtype=torch.float64, device=device),
                      torch.empty(work, dtype=torch.int64, device=device))
        self._vec: torch.Tensor | None = None  # one client's contribution, when it is masked

    @property
    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size()

    def begin_round(self, round_: int, selected: Sequence[int]) -> None:
        """A new round whose ``selected`` clients start it (secure aggregation sets up their keys)."""
        self.round, self.abandoned = round_, ""
        self.zero_()
        if self.encoder is not None:
            self.encoder.begin_round(round_, selected)
        if self.masking is not None:
            self.masking.begin_round(round_, selected)

    def zero_(self) -> None:
        self.data.zero_()
        self._clear_scratch()
        self._sums = {}

    def _clear_scratch(self) -> None:
        for t in self._scratch.values():
            t.zero_()

    def _slot(self, rank: int, which: int) -> int:
        return self._ranks + PER_RANK * rank + which

    def _within(self, tensors: list[torch.Tensor], factor: float) -> bool:
        """Every number finite and |x * factor| <= 2^VALUE_BITS (NaN fails the comparison)."""
        return bool(float(extremes(tensors)) * factor <= self.limit)

    def add(self, model: nn.Module, weight: float, loss: float, images: int, steps: int = 0, *,
            client: int = -1, update: ClientUpdate | None = None) -> bool:
        """One usable client: its contribution (w' theta_k, or the encoder's numbers for
        ``update``; the rules' scratch regions; its statistics) into the sum, masked first when
        a masker is set. Returns False, adding nothing, when one of its numbers is not finite or
        out of range (module docstring): the caller leaves the client out."""
        w = weight / self.max_weight
        tensors = float_tensors(model)
        extra = list(self._scratch.values())
        s = 1.0
        if self.changes:  # theta_k and theta_v both in range (the base is subtracted after the sum)
            assert update is not None and update.version >= 0, "a sum of changes needs the start version"
            s = update.scale
            tensors = [*tensors, update.global_flat]
        else:
            assert update is None or update.scale == 1.0, "a scaled change needs a buffer of changes"
        if not (0 <= w <= self.limit and 0 <= s <= 1
                and (self.encoder is not None or self._within(tensors, w))
                and self._within(extra, 1 / self.max_weight)):
            self._clear_scratch()
            return False
        if self.masking is None:
            out = self.data[:self.summed]
        else:
            if self._vec is None:
                self._vec = torch.zeros(self.summed, dtype=torch.int64, device=self.data.device)
            out = self._vec.zero_()
        M, factor = self.model_size, w * self.scale
        f64, i64 = self._work
        model_factor = factor
        if self.changes:  # f_k on the grid whose integers q_k the version's slot sums
            assert update is not None
            q = round(w * s * 2.0 ** self.factor_bits)
            model_factor = q * 2.0 ** (self.bits - self.factor_bits)
            start, size = self._versions
            out[start + update.version % size] += q
        if self.encoder is not None:
            assert update is not None, "an encoded update needs its ClientUpdate"
            out[:M] += self.encoder.encode(update)
        else:
            offset = 0
            for t in float_tensors(model):  # tensor by tensor: no flat copy of the model
                add_fixed_(out[offset:offset + t.numel()], t, model_factor, f64, i64)
                offset += t.numel()
        for name, (start, size) in self._regions.items():
            # each rule weights its own sums (SCAFFOLD: n_k); the buffer only rescales them
            add_fixed_(out[start:start + size], self._scratch[name], self.scale / self.max_weight, f64, i64)
        self._clear_scratch()
        loss = min(max(loss, -self.limit), self.limit)  # only reported: clamped, never a reason to refuse
        tail = [round(factor), round(weight * 2**WEIGHT_BITS), round(loss * factor), images, 1]
        out[M:M + TAIL] += torch.tensor(tail, dtype=torch.int64, device=self.data.device)
        if self.masking is not None:
            self.masking.mask_(client, out)
            self.data[:self.summed] += out  # int64 addition wraps: masks cancel modulo 2^64
        if self.data.numel() > self._reported and client >= 0:
            self.data[self._reported + client] = 1
        self.count(steps, images)
        return True

    def skip(self, steps: int = 0, images: int = 0) -> None:
        """One client left out of the round (non-finite or out-of-range numbers)."""
        self.data[self._slot(self.rank, SKIPPED)] += 1
        self.count(steps, images)
        self._clear_scratch()

    def count(self, steps: int, images: int = 0) -> None:
        """One client trained on this rank, with ``steps`` local steps over ``images`` images (the
        placement's record)."""
        self.data[self._slot(self.rank, STEPS)] += int(steps)
        self.data[self._slot(self.rank, CLIENTS)] += 1
        self.data[self._slot(self.rank, IMAGES)] += int(images)

    def region(self, name: str) -> torch.Tensor:
        """The update rule ``name``'s numbers for the client being added (fp32; an empty tensor
        for a rule that adds none); after ``aggregate``, the round's sums."""
        if name in self._sums:
            return self._sums[name]
        return self._scratch.get(name, torch.zeros(0, device=self.data.device))

    def set_times(self, start_ns: int, ready_ns: int) -> None:
        """This rank's wall-clock times (ns since the epoch) of its round start and of reaching
        the all_reduce: every rank learns every rank's, hence who waited how long."""
        self.data[self._slot(self.rank, START_NS)] = start_ns
        self.data[self._slot(self.rank, READY_NS)] = ready_ns

    def reported(self) -> list[int]:
        """After the all_reduce: the clients whose contribution is in the sum (tracked buffers)."""
        return torch.nonzero(self.data[self._reported:])[:, 0].tolist()

    def all_reduce(self) -> None:
        self._sums = {}
        dist.all_reduce_sum(self.data)  # <- the whole FedAvg communication of the round
        if self.masking is not None:  # the same decision on every rank (it reads the sum only)
            self.abandoned = self.masking.unmask_(self.data[:self.summed], self.reported())

    def _real(self, t: torch.Tensor, out: torch.Tensor | None = None, divisor: float = 0.0) -> torch.Tensor:
        """Fixed-point sums back in fp32: in weight units, or divided by ``divisor`` (the fixed-point
        weight sum: the average), through float64 in chunks, each value rounded once."""
        out = torch.empty(t.numel(), device=t.device) if out is None else out
        for i in range(0, t.numel(), CHUNK):
            x = t[i:i + CHUNK].to(torch.float64)
            out[i:i + CHUNK].copy_(x.div_(divisor) if divisor else x.mul_(self.max_weight / self.scale))
        return out

    def aggregate(self, round_: int, clients: list[int]) -> Aggregate:
        """The round as every rank sees it after the all_reduce: the average is the ratio of the
        two exact sums, rounded once to fp32; the rules' sums are back in their units. With an
        encoder, ``delta_sum`` is the decoded sum of the updates and total/average are empty. An
        abandoned round (``abandoned``) has nothing usable."""
        M = self.model_size
        empty = torch.zeros(0, device=self.data.device)
        if self.abandoned:
            return Aggregate(round_, clients, empty, 0.0, empty, {}, usable=False, abandoned=self.abandoned)
        w_fixed = int(self.data[M + W_SLOT])
        weight = int(self.data[M + N_SLOT]) / 2**WEIGHT_BITS
        self._sums = {name: self._real(self.data[start:start + size])
                      for name, (start, size) in self._regions.items()}
        if self.encoder is not None:
            delta = self.encoder.decode(self.data[:M], round_)
            return Aggregate(round_, clients, empty, weight, empty, dict(self._sums), usable=w_fixed > 0,
                             delta_sum=delta)
        if self.changes:
            self._subtract_bases(round_)
        total = self._real(self.data[:M], self._total)
        average = self._real(self.data[:M], self._average, divisor=float(max(w_fixed, 1)))
        return Aggregate(round_, clients, total, weight, average, dict(self._sums), usable=w_fixed > 0,
                         changes=self.changes)

    def _subtract_bases(self, round_: int) -> None:
        """Sum of changes, after the all_reduce: minus round(Q_v theta_v) for each start version v
        the step's clients used (class docstring), in the same integers on every rank. Slot j holds
        the version v <= round_ - 1 with v = j mod (slots): one step mixes at most that many."""
        start, size = self._versions
        assert self.bases is not None, "a sum of changes needs the versions (RoundBuffer.bases)"
        f64, i64 = self._work
        for j, q in enumerate(self.data[start:start + size].tolist()):
            if q:
                v = round_ - 1 - (round_ - 1 - j) % size
                factor = -q * 2.0 ** (self.bits - self.factor_bits)
                add_fixed_(self.data[:self.model_size], self.bases(v), factor, f64, i64)
        self.data[start:start + size] = 0  # subtracted: a second aggregate() subtracts nothing

    def record(self) -> dict[str, Any]:
        """The round's figures of the masking, if any (metrics.jsonl)."""
        return {} if self.masking is None else self.masking.record()

    def stats(self) -> tuple[dict[str, float], list[dict[str, float]]]:
        """After the all_reduce: (the tail statistics by name, each rank's slots: "start_ns",
        "ready_ns", "steps", "clients", "skipped", "images"). An abandoned round's sums are unreadable: its
        statistics count the reports only."""
        M = self.model_size
        slots = self.data[self._ranks:self._ranks + PER_RANK * self.world_size].view(-1, PER_RANK).tolist()
        names = ("start_ns", "ready_ns", "steps", "clients", "skipped", "images")  # START_NS .. IMAGES
        ranks = [dict(zip(names, row, strict=True)) for row in slots]
        skipped = sum(r["skipped"] for r in ranks)
        if self.abandoned:
            reported = len(self.reported())
            return {"n": 0.0, "loss": 0.0, "images": 0, "skipped": skipped, "trained": reported}, ranks
        tail = self.data[M:M + TAIL].tolist()
        stats = {"n": tail[N_SLOT] / 2**WEIGHT_BITS,
                 "loss": tail[LOSS_SLOT] * self.max_weight / self.scale,
                 "images": tail[IMAGES_SLOT], "skipped": skipped, "trained": tail[TRAINED_SLOT]}
        return stats, ranks
