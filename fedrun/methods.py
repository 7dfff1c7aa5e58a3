"""The catalogue of built-in methods: importing this module registers every one of them.

Each family keeps its registry where its methods are written (fedrun.registry); the config
imports this module (lazily, by name) before it reads a registered key, so that every choice, its
keys and its checks are known. A composition root, like ``fedrun.train``: it may import every
layer. A method written elsewhere (a user's module, a test) registers itself when it is imported.
"""

from __future__ import annotations

from . import diffusers_model
from .adapters import TRAINABLES
from .experimental import multiclient
from .federated.compression import COMPRESSORS
from .federated.drift import DRIFT_RULES
from .federated.fedbuff import FedBuff
from .federated.participation import PARTICIPATION
from .federated.placement import PLACEMENTS
from .federated.server import SERVER_RULES
from .local_training import CLIENT_OPTIMIZERS
from .models import MODEL_ARCHS
from .privacy.mechanisms import PRIVACY
from .privacy.secure_sum import SECURE_AGG

BUILT_IN = (MODEL_ARCHS, SERVER_RULES, DRIFT_RULES, CLIENT_OPTIMIZERS, COMPRESSORS, PLACEMENTS, PARTICIPATION,
            TRAINABLES, PRIVACY, SECURE_AGG)
"""The registries, in the order ``--help`` and the config reference list them."""

__all__ = ["BUILT_IN", "FedBuff", "diffusers_model", "multiclient"]
