"""The parts a federated round is made of: their interfaces, and the records they pass around.

``fedrun.train`` builds one of each from the config, once; ``fedrun.federated.rounds`` only
calls them. A new method is a new part (a class here-shaped, with a hand-computed test) and one
registry line, never a new branch in the round loop (docs/methods.md "Adding a method").

    Participation   who takes part in round r         federated.participation, privacy.client_dp
    Placement       which rank trains which client    federated.placement
    ClientTrainer   how one client trains             local_training (ShardTrainer: plain, DP-SGD
                                                      swapped in by privacy), experimental
    ModelSource     the model a client starts from    federated.fedbuff (the current global model,
                    (and the versions kept for it)    or FedBuff's past versions)
    UpdateRule      what a method does around local   federated.compression, federated.drift
                    training and to the update, on    (FedProx, SCAFFOLD, FedDyn), privacy.client_dp
                    the client's rank                 (clipping)
    ServerStep      from the round's sum to the next  federated.server (the server rules), wrapped
                    global model                      by privacy (noise, the ledger)

An update rule implements the client side (``UpdateRule``) and, only where its method needs
them, three more pieces: ``SumsExtra`` (numbers of its own in the round's all_reduce),
``ServerHalf`` (what it does with the sum after the all_reduce, and the state every rank keeps
for it) and ``WireFormat`` (what a real client's message costs after it). Its ``stage`` places
it in the chain: what encodes the update first (compression), then what corrects it (drift),
then what bounds it last (DP-FedAvg's clip), so that the bound holds for what is summed;
``check_chain`` enforces that order where the chain is built.

The interfaces live in the core so that ``fedrun.privacy`` and ``fedrun.experimental``
implement them without importing ``fedrun.federated``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any, ClassVar, Protocol

import torch
from torch import nn

from .local_training import LocalResult

GradTerm = Callable[[], None]
"""Edits the model's gradients in place after each backward pass of a client's local training
(a drift term); sees unscaled gradients (fp16's GradScaler has unscaled them)."""


class Participation(Protocol):
    """Who takes part in round ``r``: the same list on every rank (drawn from (seed, r))."""

    def clients(self, round_: int) -> list[int]:
        """The clients whose updates the round sums (those that report, in a simulated federation)."""

    def selected(self, round_: int) -> list[int]:
        """The clients that start the round (before any drops out); ``clients`` is a subset."""

    def record(self, round_: int) -> dict[str, Any]:
        """What the round's line of metrics.jsonl gets from participation ({} for most; the
        simulated federation's clock and dropouts, fedrun.federated.participation)."""


class ModelSource(Protocol):
    """The model each client of round ``r`` starts from: the current global model in synchronous
    rounds, the version current at its start with FedBuff (fedrun.federated.fedbuff)."""

    changes: int
    """0: the round's buffer sums models; else it sums changes from each client's start version,
    with this many version slots (the versions one step can mix; fedrun.flat.RoundBuffer)"""

    def attach(self, buffer: Any) -> None:
        """Give the round's buffer what it needs of this source (FedBuff: the versions by number)."""

    def start(self, round_: int, client: int, global_flat: torch.Tensor) -> torch.Tensor:
        """The flat model ``client`` trains from in ``round_`` (``global_flat``: the current one)."""

    def after_step(self, round_: int, global_flat: torch.Tensor) -> None:
        """``global_flat`` is the model after ``round_`` (0: the initial one): keep what later rounds need."""

    def update_rules(self) -> list[UpdateRule]:
        """Links this source adds to the update chain (FedBuff's staleness weight)."""

    def extra_state(self) -> dict[str, Any]:
        """Entries for the checkpoint's extras (name -> an object with ``state_dict``)."""

    def load_extra_state(self, extra: dict[str, Any]) -> None: ...


class Placement(Protocol):
    """Which rank trains which of the round's clients. The model must not depend on it (the
    round's sum is exact, fedrun.flat), only the ranks' waiting does."""

    def take(self, round_: int, clients: list[int], rank: int) -> Iterable[int]:
        """The clients ``rank`` trains, in order (on demand: handed out while it trains)."""


class ClientTrainer(Protocol):
    """How one client trains. ``train`` trains the model it was built around in place, starting
    from the weights it holds (the round's global model), and returns the client's result;
    ``state`` is the client's kept state by kind (read only: new values go in the result's
    ``state``, which the loop keeps only for clients whose update is used)."""

    state_kinds: tuple[str, ...]
    """kinds of per-client state this trainer keeps (e.g. ``("optimizer",)`` for kept Adam)"""

    def begin_round(self, round_: int, clients: Iterable[int]) -> Iterable[int]:
        """Called once per round with the clients this rank takes (the placement's ``take``);
        returns them in the order to train them (a trainer that groups clients reads them all)."""

    def train(self, round_: int, client: int, state: dict[str, Any],
              grad_term: GradTerm | None) -> LocalResult: ...


@dataclass
class ClientUpdate:
    """One client's update on its way into the round's sum, as the update rules see it."""

    client: int
    model: nn.Module
    """holds theta_k, the client's local model; rules may edit it in place (clipping, compression)"""
    global_flat: torch.Tensor
    """theta, the round's global model the client started from (flat, fedrun.flat order)"""
    size: int
    """n_k, the client's number of training images"""
    weight: float
    """its weight in the sum: n_k for FedAvg; rules may change it (DP-FedAvg: 1)"""
    state: dict[str, Any]
    """the client's kept state as it was before this round (by kind)"""
    new_state: dict[str, Any] = field(default_factory=dict)
    """what the client keeps from this round on (by kind): written by the trainer and the rules"""
    round: int = 0
    """the round it trained in (rules that draw random numbers seed them by (seed, round, client))"""
    message: torch.Tensor | None = None
    """what the client sends instead of its model, when its trainer computes one (one noised step's
    clipped per-example gradients, a row each: fedrun.privacy's "sample_once"); the buffer's
    encoder turns it into the client's contribution"""
    scale: float = 1.0
    """what the client's change theta_k - theta is multiplied by in a sum of changes, its weight
    apart (FedBuff's staleness weight, fedrun.federated.fedbuff); 1 otherwise"""
    version: int = -1
    """the model version the client started from, in a sum of changes (FedBuff); -1 otherwise"""


@dataclass
class Aggregate:
    """The round after its one all_reduce, as every rank sees it."""

    round: int
    clients: list[int]
    """the round's participants, as drawn (some may have been skipped as non-finite)"""
    total: torch.Tensor
    """sum_k w_k theta_k over the usable updates (P floats)"""
    weight: float
    """sum_k w_k"""
    average: torch.Tensor
    """the model the server rule steps toward: total / weight (DP-FedAvg: its noised estimate)"""
    extra: dict[str, torch.Tensor]
    """each update rule's own sums (e.g. SCAFFOLD's sum_k n_k (c_k+ - c_k)), by rule name"""
    usable: bool
    """is there an update to apply (weight > 0; DP-FedAvg: always, noise is an update)"""
    delta_sum: torch.Tensor | None = None
    """sum_k (theta_k - theta) decoded from encoded updates (distributed DP: with its noise);
    ``total`` and ``average`` are then empty"""
    abandoned: str = ""
    """why the round's sum could not be read (secure aggregation without enough survivors): the
    global model stays as it was"""
    changes: bool = False
    """``total`` and ``average`` sum changes theta_k - theta_{v_k} from each client's start model
    (FedBuff), not models: the server steps toward theta + average"""


class Stage(IntEnum):
    """Where a link sits in the update chain (``check_chain``)."""

    ENCODE = 0
    """turns the update into what the client sends (compression); sees the raw update"""
    CORRECT = 1
    """corrects or records the update as the server receives it (drift rules' state)"""
    BOUND = 2
    """bounds what is summed (DP-FedAvg's clip): the last link, so nothing undoes the bound"""


class UpdateRule:
    """One link of the update chain, on the client's rank: what a method does around a client's
    local training and to its update before it is summed. Both hooks do nothing by default.

    A rule that keeps per-client state names its kind in ``state_kinds`` and reads it from
    ``ClientUpdate.state`` / writes it to ``ClientUpdate.new_state``.
    """

    name: ClassVar[str] = ""
    stage: ClassVar[Stage] = Stage.CORRECT
    state_kinds: ClassVar[tuple[str, ...]] = ()

    def begin_client(self, model: nn.Module, global_flat: torch.Tensor,
                     state: dict[str, Any]) -> GradTerm | None:
        """Before client training: a gradient term for its local steps, or None."""
        return None

    def end_client(self, update: ClientUpdate, term: GradTerm | None, extra: torch.Tensor) -> None:
        """After client training, for a usable (finite) update: edit the model or the weight, add
        this rule's sums into ``extra`` (its region of the buffer when it ``SumsExtra``, else
        empty), set ``update.new_state``."""


class SumsExtra:
    """A rule with numbers of its own in the round's all_reduce (SCAFFOLD's control variates)."""

    def extra_floats(self, num_params: int) -> int:
        """Floats this rule adds to the round's buffer (its region of ``Aggregate.extra``)."""
        raise NotImplementedError


class ServerHalf:
    """A rule that acts on every rank after the all_reduce, before the server rule, and keeps
    state that every rank holds identically (SCAFFOLD's c, FedDyn's h: checkpointed through
    ``ClientStates``)."""

    def on_server(self, global_flat: torch.Tensor, average: torch.Tensor, agg: Aggregate) -> torch.Tensor:
        """Only when ``agg.usable``: the average the server rule should step toward, and this
        rule's server-side state updated."""
        raise NotImplementedError

    def shared_state(self) -> dict[str, torch.Tensor]:
        """State every rank holds identically (checkpointed with the clients' state)."""
        return {}

    def load_shared_state(self, state: dict[str, torch.Tensor], device: torch.device) -> None:
        """Restore what ``shared_state`` returned (resume)."""


class WireFormat:
    """A rule that changes what a real client sends or receives (not what the simulation sums)."""

    def wire_bytes(self, num_params: int, up: int, down: int) -> tuple[int, int]:
        """(bytes up, bytes down) of one participating client in a real deployment after this
        link, given those before it (the chain starts from the fp32 update and model, 4 bytes a
        float each way): a link that encodes the update says what its message costs, one that
        sends more (SCAFFOLD's control variates) adds it."""
        raise NotImplementedError


def check_chain(rules: Sequence[UpdateRule]) -> list[UpdateRule]:
    """``rules`` as the update chain, after checking its order: stages never go back, and at most
    one link bounds the update, the last (a link after the clip could undo the bound that the
    privacy guarantee rests on). Returns them as a list; a wrong order is a bug, not a user error."""
    for before, after in zip(rules, rules[1:], strict=False):
        if after.stage < before.stage:
            raise AssertionError(f"update chain: {after.name} ({after.stage.name}) after {before.name} "
                                 f"({before.stage.name})")
        if before.stage is Stage.BOUND:
            raise AssertionError(f"update chain: {after.name} after the bounding link {before.name}")
    return list(rules)


class ServerStep(Protocol):
    """From the round's aggregate to the next global model (None: nothing usable, keep it)."""

    def step(self, global_flat: torch.Tensor, agg: Aggregate) -> torch.Tensor | None: ...

    def state_dict(self) -> dict[str, Any]:
        """The server rule's state (momenta): the checkpoint's "server" entry."""

    def load_state_dict(self, state: dict[str, Any], device: torch.device) -> None: ...

    def extra_state(self) -> dict[str, Any]:
        """Other state of wrappers (the privacy ledger): the checkpoint's "extra" entries."""

    def load_extra_state(self, extra: dict[str, Any]) -> None: ...

    def metrics(self) -> dict[str, Any]:
        """What the round's record reports about the server side (e.g. epsilon so far)."""


def compose_terms(terms: list[GradTerm]) -> GradTerm | None:
    """One gradient term that applies ``terms`` in order (None when there are none)."""
    if not terms:
        return None
    if len(terms) == 1:
        return terms[0]

    def both() -> None:
        for term in terms:
            term()
    return both
