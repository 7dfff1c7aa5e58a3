"""The interface of a privacy mechanism: the parts of the round it wraps (pfl-research's shape).

A mechanism is built once, before any process group, from the config (its registry's choice:
``privacy.level`` in mechanisms.py, ``secure_agg.protocol`` in secure_sum.py); ``fedrun.train``
hands it every part it may change, and each hook returns the part as given by default:

=================  ==========================================================================
participation      who takes part (DP-FedAvg's Poisson draw)
trainer            how a client trains (DP-SGD's local training; one noised gradient)
update rules       links appended to the update chain (DP-FedAvg's clip)
encoder            what a client's update becomes in the round's sum (distributed DP's grid)
buffer             what the round's buffer does to each contribution (secure aggregation's masks)
server step        what the server does with the sum (central noise, the ledger)
wire formats       what a real client's messages cost on top of its update
=================  ==========================================================================

``Stack`` composes several (the privacy level, then secure aggregation) into one; nothing outside
``fedrun/privacy/`` asks which mechanisms run.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

from ..config import Config
from ..flat import Encoder, RoundBuffer
from ..parts import ClientTrainer, Participation, ServerStep, UpdateRule, WireFormat


class Mechanism:
    """A mechanism that changes nothing (module docstring); subclasses override what they wrap.

    ``cfg``: the run's config with whatever the mechanism resolved (a solved noise multiplier)."""

    unit: ClassVar[str] = ""
    """what one epsilon protects, for messages ("the worst client", "the federation"); "" = no DP"""
    summary_key: ClassVar[str] = "privacy"
    """summary.json's entry for ``summary()``"""
    tracks_clients: ClassVar[bool] = False
    """does the round's buffer need the flags of who reported (secure aggregation's survivors)"""
    shows_local_models: ClassVar[bool] = True
    """may the evaluation show a client's local model (grids, scores)"""

    def __init__(self, cfg: Config, sizes: Sequence[int]):
        self.cfg, self.sizes = cfg, list(sizes)

    def wrap_participation(self, participation: Participation) -> Participation:
        return participation

    def wrap_trainer(self, trainer: ClientTrainer) -> ClientTrainer:
        return trainer

    def update_rules(self) -> list[UpdateRule]:
        """Links this mechanism appends to the update chain (after every other link)."""
        return []

    def encoder(self, num_params: int) -> Encoder | None:
        """What each client's update becomes in the round's sum (None: its fixed-point model)."""
        return None

    def attach(self, buffer: RoundBuffer) -> None:
        """Wrap the round's buffer (its masking)."""

    def wrap_server(self, server: ServerStep) -> ServerStep:
        return server

    def wire_formats(self) -> list[WireFormat]:
        """What this mechanism changes in a real client's messages (after the update chain's)."""
        return []

    def summary(self) -> dict[str, Any] | None:
        """summary.json's ``summary_key`` block (None: nothing to say)."""
        return None


class Stack(Mechanism):
    """Several mechanisms as one, in order: each wraps what the ones before it returned."""

    def __init__(self, mechanisms: Sequence[Mechanism]):
        self.mechanisms = list(mechanisms)
        super().__init__(self.mechanisms[0].cfg, self.mechanisms[0].sizes)

    @property
    def privacy(self) -> Mechanism:
        """The privacy level's mechanism (the first)."""
        return self.mechanisms[0]

    @property
    def tracks(self) -> bool:
        return any(m.tracks_clients for m in self.mechanisms)

    @property
    def local_models_visible(self) -> bool:
        return all(m.shows_local_models for m in self.mechanisms)

    def wrap_participation(self, participation: Participation) -> Participation:
        for m in self.mechanisms:
            participation = m.wrap_participation(participation)
        return participation

    def wrap_trainer(self, trainer: ClientTrainer) -> ClientTrainer:
        for m in self.mechanisms:
            trainer = m.wrap_trainer(trainer)
        return trainer

    def update_rules(self) -> list[UpdateRule]:
        return [rule for m in self.mechanisms for rule in m.update_rules()]

    def encoder(self, num_params: int) -> Encoder | None:
        found = [e for m in self.mechanisms if (e := m.encoder(num_params)) is not None]
        assert len(found) <= 1, "two mechanisms encode the update"
        return found[0] if found else None

    def attach(self, buffer: RoundBuffer) -> None:
        for m in self.mechanisms:
            m.attach(buffer)

    def wrap_server(self, server: ServerStep) -> ServerStep:
        for m in self.mechanisms:
            server = m.wrap_server(server)
        return server

    def wire_formats(self) -> list[WireFormat]:
        return [w for m in self.mechanisms for w in m.wire_formats()]

    def summaries(self) -> dict[str, Any]:
        """summary.json's blocks, by each mechanism's ``summary_key``."""
        return {m.summary_key: s for m in self.mechanisms if (s := m.summary()) is not None}
