"""Client drift corrections, as gradient terms added after each backward pass of a client.

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
the round's sum_k n_k (c_k+ - c_k) travels in the same all_reduce as the models (fedrun's flat
buffer), so c moves by that sum / n. In round 1 every control variate is zero and the correction
adds zeros: SCAFFOLD's first round is FedAvg's, bit for bit.

Control variates cover every float tensor of the flat layout (buffers stay zero).
"""

from __future__ import annotations

import torch
from torch import nn

from ..flat import float_tensors


def _views(model: nn.Module, flat: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(parameter, the slice of ``flat`` that holds it, shaped like it) for every parameter."""
    out, offset = [], 0
    params = set(map(id, model.parameters()))
    for t in float_tensors(model):
        if id(t) in params:
            out.append((t, flat[offset:offset + t.numel()].view(t.shape)))
        offset += t.numel()
    return out


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
