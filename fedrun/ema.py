"""EMA of the global model, kept across rounds, used for every sample and score when enabled.

The profile is the power-function EMA of Karras et al., "Analyzing and Improving the Training
Dynamics of Diffusion Models" (CVPR 2024), section 3.1: after the t-th update

    ema_t = beta_t * ema_{t-1} + (1 - beta_t) * theta_t,    beta_t = (1 - 1/t) ** (gamma + 1)

which weighs update tau in proportion to tau ** gamma: the average always covers the same
*share* of training, whatever the number of rounds. That is why it is used here rather than a
fixed decay with warm-up: a federated run has 20 rounds on the digits and 300 in the paper, and
a decay tuned in rounds for one is wrong for the other, while sigma_rel (the width of the
profile relative to the run's length) means the same for both. t = 1 gives beta = 0, so the EMA
starts at the first round's model: no warm-up bias to correct.

It is updated once per round (FedAvg: after the server step; centralized: after each round's E
epochs), on every rank from the same global model, so every rank holds the same EMA and no
communication is added. Its state is one flat fp32 vector (fedrun.flat order: only what trains,
e.g. the LoRA adapters, since the frozen rest never moves) that the checkpoint carries; resuming
restores it bit for bit.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
from torch import nn

from .config import EMAConfig
from .flat import load_flat_


def gamma_from_sigma_rel(sigma_rel: float) -> float:
    """Karras et al. (2024), eq. 3 solved for gamma: sigma_rel^-2 = (g+2)^2 (g+3) / (g+1)."""
    t = sigma_rel ** -2
    roots = np.roots([1.0, 7.0, 16.0 - t, 12.0 - t])
    return float(max(r.real for r in roots if abs(r.imag) < 1e-9))


def sigma_rel_of(gamma: float) -> float:
    """The relative standard deviation of the averaging profile tau ** gamma on [0, 1]."""
    return float(np.sqrt(gamma + 1) / ((gamma + 2) * np.sqrt(gamma + 3)))


class PowerEMA:
    """The EMA of one run's global model. ``sigma_rel = 0`` disables it (``module`` = the model)."""

    def __init__(self, cfg: EMAConfig, model: nn.Module):
        self.enabled = cfg.sigma_rel > 0
        self.gamma = gamma_from_sigma_rel(cfg.sigma_rel) if self.enabled else 0.0
        self.flat: torch.Tensor | None = None  # set by the first update or by load_state_dict
        self._model = model
        self._shadow: nn.Module | None = None  # a copy of the model holding the EMA weights

    def beta(self, t: int) -> float:
        return (1.0 - 1.0 / t) ** (self.gamma + 1.0)

    @torch.no_grad()
    def update(self, global_flat: torch.Tensor, t: int) -> None:
        """Fold in the global model after its t-th update (t = the round, from 1)."""
        if not self.enabled:
            return
        if self.flat is None:  # t = 1 (beta = 0), or a checkpoint written before EMA was on
            self.flat = global_flat.detach().clone()
            return
        self.flat.lerp_(global_flat, 1.0 - self.beta(t))  # beta * ema + (1 - beta) * theta

    def module(self) -> nn.Module:
        """The model to sample from: the EMA weights if enabled (and set), else the model itself."""
        if not self.enabled or self.flat is None:
            return self._model
        if self._shadow is None:
            # requires_grad stays as the model's: it defines the flat layout (fedrun.flat), which
            # holds only what trains; sampling runs under no_grad anyway
            self._shadow = copy.deepcopy(self._model).eval()
        load_flat_(self._shadow, self.flat)
        return self._shadow

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {} if self.flat is None else {"flat": self.flat.cpu()}

    def load_state_dict(self, state: dict[str, torch.Tensor], device: torch.device) -> None:
        flat = state.get("flat") if state else None
        self.flat = flat.to(device) if flat is not None and self.enabled else None
