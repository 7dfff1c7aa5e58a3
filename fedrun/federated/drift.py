"""Client drift corrections as update rules: FedProx, SCAFFOLD, FedDyn (``fed.drift``).

Each is an ``UpdateRule`` (fedrun.parts): a gradient term for the client's local steps and,
where the method needs them, per-client state, extra sums in the round's all_reduce and a
server-side correction. Each registers itself in ``DRIFT_RULES`` (``fed.drift``) with its keys
and its checks (fedrun.registry).

FedProx (Li et al., MLSys 2020) adds (mu / 2) ||theta - theta_global||^2 to each client's loss,
i.e. mu * (theta - theta_global) to its gradient, pulling local models back toward the round's
global model. With mu = 0 nothing is added at all, so it is FedAvg bit for bit.

SCAFFOLD (Karimireddy et al., ICML 2020) corrects each gradient by (c - c_k), the server's
control variate minus the client's. Its option II sets the new control variate to

    c_k+ = c_k - c + (theta_global - theta_k) / (K * lr)

which, for SGD clients, is exactly the mean of the K raw minibatch gradients the client saw
(theta_k = theta_global - lr * sum(g_i - c_k + c)). Adam clients do not move by lr * gradient,
so fedrun keeps that *meaning* rather than the formula: c_k+ is the mean raw gradient of the
client's local steps (before the correction), and the correction is applied to the gradient Adam
receives. This needs no learning rate, works with any client optimizer, and is option II for SGD.
The server keeps c as the data-weighted mean of every client's c_k (c = sum_k n_k c_k / n):
the round's sum_k n_k (c_k+ - c_k) travels in the same all_reduce as the models (its own region
of the buffer), so c moves by that sum / n. In round 1 every control variate is zero and the
correction adds zeros: SCAFFOLD's first round is FedAvg's, bit for bit.

FedDyn (Acar et al., "Federated Learning Based on Dynamic Regularization", ICLR 2021): client k
minimises L_k(theta) - <g_k, theta> + (alpha / 2) ||theta - theta_global||^2, where g_k (its
state, zero at first) is the gradient of L_k at its previous local optimum; after training,
g_k <- g_k - alpha (theta_k - theta_global). The server keeps h (zero at first):

    h     <- h - alpha * sum_{k in round} (n_k / n) (theta_k - theta_global)
    theta <- average_k(theta_k) - h / alpha

with n the images of all clients. The paper weighs clients equally (1/m for m clients, and a
plain mean over the participants); fedrun uses its data-size weights, which are the paper's
when clients are equal in size. sum_k n_k (theta_k - theta_global) is (sum_k n_k theta_k) -
(sum_k n_k) theta_global, both already in the buffer: FedDyn adds nothing to the all_reduce.

Control variates and FedDyn's state cover every float tensor of the flat layout (buffers get
zero gradients, so their entries stay zero).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..config import FEDERATED, HASHED_WHEN_SET, Config, ConfigError, setting
from ..flat import flatten, float_tensors
from ..parts import Aggregate, ClientUpdate, GradTerm, ServerHalf, SumsExtra, UpdateRule, WireFormat
from ..registry import Registry, Settings

DRIFT_RULES = Registry(
    "fed.drift", "none", "Client drift correction: \"none\" | \"fedprox\" (Li et al. 2020) | "
    "\"scaffold\" (Karimireddy et al. 2020) | \"feddyn\" (Acar et al. 2021); "
    "fedrun/federated/drift.py.", hashed=HASHED_WHEN_SET, applies=FEDERATED, federated=True)


def refuse_fp16(cfg: Config, method: str) -> None:
    """Drift terms add to raw gradients; fp16's GradScaler has scaled them."""
    if cfg.train.precision == "fp16":
        raise ConfigError(f"train.precision: {method} adds its terms to unscaled gradients; fp16's "
                          f"GradScaler scales them: use bf16 (or auto), or another fed.drift")


def _views(model: nn.Module, flat: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(parameter, the slice of ``flat`` that holds it, shaped like it) for every parameter."""
    out, offset = [], 0
    params = set(map(id, model.parameters()))
    for t in float_tensors(model):
        if id(t) in params:
            out.append((t, flat[offset:offset + t.numel()].view(t.shape)))
        offset += t.numel()
    return out


# --------------------------------------------------------------------------------------------
# Gradient terms (one client's local training)


class FedProx:
    """grad += mu * (theta - theta_global), for every parameter."""

    def __init__(self, mu: float, model: nn.Module, global_flat: torch.Tensor):
        self.mu = mu
        self.pairs = _views(model, global_flat)

    @torch.no_grad()
    def __call__(self) -> None:
        for p, g in self.pairs:
            if p.grad is not None:
                p.grad.add_(p - g, alpha=self.mu)


class ScaffoldClient:
    """One client's SCAFFOLD run: corrects each gradient by (c - c_k), records the mean raw one."""

    def __init__(self, model: nn.Module, server_control: torch.Tensor, client_control: torch.Tensor | None):
        self.old = client_control if client_control is not None else torch.zeros_like(server_control)
        self.correction = server_control - self.old
        self.grad_sum = torch.zeros_like(server_control)
        self.steps = 0
        self.pairs = [(p, c, s) for (p, c), (_, s) in zip(_views(model, self.correction),
                                                             _views(model, self.grad_sum), strict=True)]

    @torch.no_grad()
    def __call__(self) -> None:
        self.steps += 1
        for p, c, s in self.pairs:
            if p.grad is None:  # an unused parameter: its raw gradient is zero
                p.grad = c.clone().contiguous(memory_format=torch.preserve_format)
                continue
            s.add_(p.grad)
            p.grad.add_(c)

    def new_control(self) -> torch.Tensor:
        """c_k+ : the mean raw gradient over this round's local steps."""
        return self.grad_sum / max(self.steps, 1)


class FedDynClient:
    """grad += alpha * (theta - theta_global) - g_k, for every parameter."""

    def __init__(self, alpha: float, model: nn.Module, global_flat: torch.Tensor, g: torch.Tensor):
        self.alpha = alpha
        self.triples = [(p, w, gk) for (p, w), (_, gk) in zip(_views(model, global_flat), _views(model, g),
                                                              strict=True)]

    @torch.no_grad()
    def __call__(self) -> None:
        for p, w, gk in self.triples:
            if p.grad is None:  # unused: the loss part of its gradient is zero
                p.grad = torch.zeros_like(p)
            p.grad.add_(p - w, alpha=self.alpha).sub_(gk)


# --------------------------------------------------------------------------------------------
# The rules


@DRIFT_RULES.register("none")
class NoDrift:
    """No drift correction (the authors' FedAvg): nothing joins the update chain."""

    @classmethod
    def build(cls, settings: Any, num_params: int, total_images: int,
              device: torch.device) -> list[UpdateRule]:
        return []


@dataclass
class FedProxSettings(Settings):
    prox_mu: float = setting(0.01, hashed=HASHED_WHEN_SET)
    """FedProx: weight of (mu / 2) ||theta - theta_global||^2."""

    def validate(self) -> None:
        if not self.prox_mu >= 0:
            raise ConfigError(f"fed.prox_mu: must be >= 0 (the proximal weight), got {self.prox_mu}")


@DRIFT_RULES.register("fedprox", FedProxSettings)
class FedProxRule(UpdateRule):
    """FedProx's proximal term; no state, nothing extra travels."""

    name = "fedprox"

    @classmethod
    def build(cls, settings: FedProxSettings, num_params: int, total_images: int,
              device: torch.device) -> list[UpdateRule]:
        return [cls(settings.prox_mu)]

    def __init__(self, mu: float):
        self.mu = mu

    def begin_client(self, model: nn.Module, global_flat: torch.Tensor,
                     state: dict[str, Any]) -> GradTerm | None:
        return FedProx(self.mu, model, global_flat) if self.mu > 0 else None  # mu = 0: FedAvg's bits


@DRIFT_RULES.register("scaffold")
class ScaffoldRule(UpdateRule, SumsExtra, ServerHalf, WireFormat):
    """SCAFFOLD for Adam clients: per-client c_k, the server's c, sum_k n_k (c_k+ - c_k) in the buffer."""

    name = "scaffold"
    state_kinds = ("control",)
    sends_unprotected = True  # c_k+ - c_k travels beside the update (privacy mechanisms refuse it)

    @classmethod
    def build(cls, settings: Any, num_params: int, total_images: int,
              device: torch.device) -> list[UpdateRule]:
        return [cls(num_params, total_images, device)]

    @classmethod
    def check(cls, cfg: Config) -> None:
        refuse_fp16(cfg, "SCAFFOLD")
        if cfg.fed.compress != "none":
            raise ConfigError("fed.compress: SCAFFOLD's control variates (one more model-sized vector per "
                              "client and round) would travel uncompressed next to the compressed update; "
                              "use fed.drift = \"none\", \"fedprox\" or \"feddyn\" with compression, or "
                              "fed.compress = \"none\"")

    def __init__(self, num_params: int, total_images: int, device: torch.device):
        self.server_control = torch.zeros(num_params, device=device)
        self.total_images = float(total_images)

    def extra_floats(self, num_params: int) -> int:
        return num_params

    def wire_bytes(self, num_params: int, up: int, down: int) -> tuple[int, int]:
        # a client receives c with the model and sends c_k+ - c_k with its update (fp32)
        return up + 4 * num_params, down + 4 * num_params

    def begin_client(self, model: nn.Module, global_flat: torch.Tensor,
                     state: dict[str, Any]) -> GradTerm | None:
        return ScaffoldClient(model, self.server_control, state.get("control"))

    def end_client(self, update: ClientUpdate, term: GradTerm | None, extra: torch.Tensor) -> None:
        assert isinstance(term, ScaffoldClient)  # the term begin_client made for this client
        new_control = term.new_control()
        extra.add_(new_control - term.old, alpha=float(update.size))
        update.new_state["control"] = new_control

    def on_server(self, global_flat: torch.Tensor, average: torch.Tensor, agg: Aggregate) -> torch.Tensor:
        # c stays the data-weighted mean of all clients' c_k
        self.server_control.add_(agg.extra[self.name], alpha=1.0 / self.total_images)
        return average

    def shared_state(self) -> dict[str, torch.Tensor]:
        return {"server_control": self.server_control}

    def load_shared_state(self, state: dict[str, torch.Tensor], device: torch.device) -> None:
        if state.get("server_control") is not None:
            self.server_control = state["server_control"].to(device)


@dataclass
class FedDynSettings(Settings):
    feddyn_alpha: float = setting(0.01, hashed=HASHED_WHEN_SET)
    """FedDyn: weight alpha of the quadratic term (alpha / 2) ||theta - theta_global||^2 of each
    client's dynamic regulariser; must be > 0."""

    def validate(self) -> None:
        if not self.feddyn_alpha > 0:
            raise ConfigError(f"fed.feddyn_alpha: must be > 0 (FedDyn's regulariser weight), got "
                              f"{self.feddyn_alpha}")


@DRIFT_RULES.register("feddyn", FedDynSettings)
class FedDynRule(UpdateRule, ServerHalf):
    """FedDyn: the linear + quadratic client term with state g_k, and the server's h."""

    name = "feddyn"
    state_kinds = ("feddyn_grad",)
    # its server correction assumes the data-weighted sum of unclipped updates (DP-FedAvg refuses it)
    needs_weighted_sum = True

    @classmethod
    def build(cls, settings: FedDynSettings, num_params: int, total_images: int,
              device: torch.device) -> list[UpdateRule]:
        return [cls(settings.feddyn_alpha, num_params, total_images, device)]

    @classmethod
    def check(cls, cfg: Config) -> None:
        refuse_fp16(cfg, "FedDyn")

    def __init__(self, alpha: float, num_params: int, total_images: int, device: torch.device):
        self.alpha = alpha
        self.h = torch.zeros(num_params, device=device)
        self.total_images = float(total_images)

    def begin_client(self, model: nn.Module, global_flat: torch.Tensor,
                     state: dict[str, Any]) -> GradTerm | None:
        g = state.get("feddyn_grad")
        return FedDynClient(self.alpha, model, global_flat, torch.zeros_like(global_flat) if g is None else g)

    def end_client(self, update: ClientUpdate, term: GradTerm | None, extra: torch.Tensor) -> None:
        g = update.state.get("feddyn_grad")
        g = torch.zeros_like(update.global_flat) if g is None else g
        update.new_state["feddyn_grad"] = g - self.alpha * (flatten(update.model) - update.global_flat)

    def on_server(self, global_flat: torch.Tensor, average: torch.Tensor, agg: Aggregate) -> torch.Tensor:
        moved = agg.total - agg.weight * global_flat  # sum_k n_k (theta_k - theta_global)
        self.h.sub_(moved, alpha=self.alpha / self.total_images)
        return average - self.h / self.alpha

    def shared_state(self) -> dict[str, torch.Tensor]:
        return {"feddyn_h": self.h}

    def load_shared_state(self, state: dict[str, torch.Tensor], device: torch.device) -> None:
        if state.get("feddyn_h") is not None:
            self.h = state["feddyn_h"].to(device)


def drift_rules(cfg: Config, num_params: int, total_images: int, device: torch.device) -> list[UpdateRule]:
    """The links of ``fed.drift`` ([] for "none")."""
    return DRIFT_RULES.selected(cfg).target.build(DRIFT_RULES.settings(cfg), num_params, total_images, device)
