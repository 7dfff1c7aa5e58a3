"""Client-level DP: the pieces of DP-FedAvg (McMahan, Ramage, Talwar and Zhang, ICLR 2018).

One round, with N clients, sampling rate q = clients_per_round / N and clip S:

1. ``poisson_clients``: every client takes part independently with probability q (the sampling
   the accountant composes), drawn from (DP_SAMPLING, seed, round): the same list on every rank.
2. each participant trains from theta and ``clip_update_`` scales its update
   Delta_k = theta_k - theta to L2 norm <= S, on its own rank, before it enters the flat buffer.
3. the estimator is McMahan et al.'s fixed-denominator f-tilde with *uniform* client weights:

       theta' = theta + ( sum_k Delta_k ) / (q N)  +  N(0, sigma^2 I),
       sigma = noise_multiplier * S / (q N).

   Uniform weights and the fixed denominator q N (the *expected* number of participants, not
   the realised one, nor data-size weights) keep the sensitivity of the sum to adding or
   removing one client at S, so the noise std on the sum is noise_multiplier * S. (Data-size
   weights n_k / n would let a large client move the average by more than S / (q N).)
4. ``gaussian_noise``: that N(0, sigma^2 I) is drawn once per round from a CPU generator seeded
   by (DP_NOISE, seed, round): identical on every rank, so the result does not depend on the
   world size. ``noisy_update`` puts 3 and 4 together.

The server rule after that must be post-processing of the noised average only (FedAvg applies
it as is; momentum or adaptive server optimizers also only see the noised average).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from .. import seeding
from ..flat import float_tensors
from ..parts import ClientUpdate, GradTerm, Stage, UpdateRule, WireFormat


@torch.no_grad()
def update_norm(model: nn.Module, global_flat: torch.Tensor) -> float:
    """L2 norm of theta_k - theta over every float tensor in fedrun.flat order."""
    sq = torch.zeros((), dtype=torch.float64, device=global_flat.device)
    offset = 0
    for t in float_tensors(model):
        g = global_flat[offset:offset + t.numel()].view(t.shape)
        sq += (t.float() - g.to(t.device)).double().pow(2).sum().to(sq.device)
        offset += t.numel()
    return float(sq.sqrt())


@torch.no_grad()
def clip_update_(model: nn.Module, global_flat: torch.Tensor, clip: float) -> float:
    """Scale theta_k - theta in place so that its L2 norm is at most ``clip``:
    theta_k <- theta + (theta_k - theta) * min(1, clip / norm). Returns the norm before."""
    norm = update_norm(model, global_flat)
    if norm > clip:
        scale = clip / norm
        offset = 0
        for t in float_tensors(model):
            g = global_flat[offset:offset + t.numel()].view(t.shape).to(t.device, t.dtype)
            t.sub_(g).mul_(scale).add_(g)
            offset += t.numel()
    return norm


def poisson_clients(num_clients: int, q: float, seed: int, round_: int) -> list[int]:
    """The clients of round ``round_``: each independently with probability q (may be empty)."""
    g = seeding.generator("cpu", seeding.DP_SAMPLING, seed, round_)
    return torch.nonzero(torch.rand(num_clients, generator=g) < q)[:, 0].tolist()


class PoissonParticipation:
    """DP-FedAvg's participation (fedrun.parts.Participation): ``poisson_clients`` every round."""

    def __init__(self, num_clients: int, q: float, seed: int):
        self.num_clients, self.q, self.seed = num_clients, q, seed

    def clients(self, round_: int) -> list[int]:
        return poisson_clients(self.num_clients, self.q, self.seed, round_)

    def selected(self, round_: int) -> list[int]:
        return self.clients(round_)

    def record(self, round_: int) -> dict[str, Any]:
        return {}


class ClipUpdate(UpdateRule, WireFormat):
    """Step 2 of DP-FedAvg as a link of the update chain: theta_k - theta clipped to L2 norm
    ``clip`` on the client's rank, and the client's weight set to 1 (uniform weights), which
    bounds one client's influence on the sum by ``clip`` whatever its data size. It is the
    chain's last link (its stage, ``BOUND``; ``fedrun.parts.check_chain``): whatever an earlier
    link did to the update (compression adds its error-feedback residual, which can raise the
    norm), what is summed has norm <= clip. What clipping removes is not fed back."""

    name = "dp_clip"
    stage = Stage.BOUND

    def __init__(self, clip: float):
        self.clip = clip

    def end_client(self, update: ClientUpdate, term: GradTerm | None, extra: torch.Tensor) -> None:
        clip_update_(update.model, update.global_flat, self.clip)
        update.weight = 1.0

    def wire_bytes(self, num_params: int, up: int, down: int) -> tuple[int, int]:
        # the clip factor travels as one fp32 next to the message, so that a compressed update
        # (fed.compress, an earlier link) is clipped without being encoded again
        return up + 4, down


def noise_std(noise_multiplier: float, clip: float, num_clients: int, q: float) -> float:
    """Std of the Gaussian added to the average: noise_multiplier * clip / (q N)."""
    return noise_multiplier * clip / (q * num_clients)


def noise_to_signal(noise_multiplier: float, num_params: int, num_clients: int, q: float) -> float:
    """How far one round's noise moves the model against the most the clients' average can:
    the noise added to the average, N(0, (z S / (q N))^2) in each of the P noised coordinates,
    has L2 norm ~ z S sqrt(P) / (q N); the average of the clipped updates has norm at most S
    (every participant pushing the same way). Their ratio, z sqrt(P) / (q N), does not depend
    on the clip S. Above 1 the noise outweighs the signal in every round (it averages out over
    rounds only as 1 / sqrt(rounds)); it takes q N >= z sqrt(P) expected clients per round, or
    fewer noised parameters, to bring it to 1."""
    return noise_multiplier * math.sqrt(num_params) / (q * num_clients)


def gaussian_noise(num_params: int, std: float, seed: int, round_: int,
                   device: torch.device | str = "cpu") -> torch.Tensor:
    """N(0, std^2) of length ``num_params`` (fp32), drawn on the CPU from (DP_NOISE, seed, round)
    and moved to ``device``: the same numbers on every rank and every device type."""
    g = seeding.generator("cpu", seeding.DP_NOISE, seed, round_)
    return (torch.randn(num_params, generator=g, dtype=torch.float32) * std).to(device)


def noisy_update(delta_sum: torch.Tensor, noise_multiplier: float, clip: float, num_clients: int,
                 q: float, seed: int, round_: int) -> torch.Tensor:
    """The DP-FedAvg step to add to theta: sum_k Delta_k / (q N) + N(0, sigma^2), where
    ``delta_sum`` is the all-reduced sum of the participants' clipped updates (uniform weights)."""
    std = noise_std(noise_multiplier, clip, num_clients, q)
    noise = gaussian_noise(delta_sum.numel(), std, seed, round_, delta_sum.device)
    return delta_sum.float() / (q * num_clients) + noise
