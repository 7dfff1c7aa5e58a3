"""Diffusion math in one place: noise schedules, the training loss, the sampler.

Notation: a noisy image is z = alpha * x0 + sigma * eps with alpha^2 + sigma^2 = 1, and the
noise level is log_snr = log(alpha^2 / sigma^2). Two parameterisations:

* ``v`` (the authors' code): continuous t ~ U[0, 1] through the DDPM log-SNR schedule
  alpha^2 = exp(-1e-4 - 10 t^2); the network predicts v = alpha * eps - sigma * x0; the
  per-image MSE is weighted by alpha^2.
* ``eps`` (the paper's equations 2-3): discrete t in {0..T-1} with linear betas, alpha^2 =
  prod(1 - beta); the network predicts eps with the plain MSE.

Both feed the network log_snr, so one U-Net and one sampler serve both. The sampler is the
DDIM-form loop with eta: eta = 1 gives ancestral (DDPM-like) sampling, eta = 0 deterministic DDIM.
It samples LoRA-adapted models with their adapters merged (fedrun.adapters.merged).

Classifier-free guidance (Ho & Salimans 2022): a model trained with label dropout also knows
the null class; with ``guidance`` w > 0 the sampler evaluates it with and without the label in
one batch and uses (1 + w) * out(label) - w * out(null). The output (v or eps) is linear in the
noise estimate at fixed z, so guiding v is guiding eps.
"""

from __future__ import annotations

import torch
from torch import nn

from .adapters import merged
from .config import DiffusionConfig


def ddpm_log_snr(t: torch.Tensor) -> torch.Tensor:
    """Continuous DDPM schedule: alpha^2 = exp(-1e-4 - 10 t^2)  =>  log_snr = -log(expm1(...))."""
    return -torch.special.expm1(1e-4 + 10 * t**2).log()


def alpha_sigma(log_snr: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """alpha^2 = sigmoid(log_snr), sigma^2 = sigmoid(-log_snr)."""
    return log_snr.sigmoid().sqrt(), (-log_snr).sigmoid().sqrt()


class Diffusion:
    def __init__(self, cfg: DiffusionConfig, null_class: int | None = None):
        """``null_class``: the label id of "no label" (models trained with label dropout)."""
        self.cfg = cfg
        self.null_class = null_class
        self.guidance = cfg.guidance if null_class is not None else 0.0
        self.objective = cfg.objective
        if cfg.objective == "eps":
            betas = torch.linspace(cfg.beta_start, cfg.beta_end, cfg.timesteps, dtype=torch.float64)
            alpha_bar = torch.cumprod(1 - betas, 0)
            self.discrete_log_snr = (alpha_bar.log() - (-alpha_bar).log1p()).float()

    def log_snr(self, u: torch.Tensor) -> torch.Tensor:
        """Noise level for u in [0, 1) (0 = clean, 1 = pure noise)."""
        if self.objective == "v":
            return ddpm_log_snr(u)
        t = (u * self.cfg.timesteps).long().clamp_(max=self.cfg.timesteps - 1)
        return self.discrete_log_snr.to(u.device)[t]

    def _predict(self, model: nn.Module, x0: torch.Tensor, labels: torch.Tensor, log_snr: torch.Tensor,
                 eps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(the network's output on z = alpha x0 + sigma eps, its target, the per-image weight of
        the squared error or None for none): the objective, without its reduction."""
        alpha, sigma = (s.view(-1, 1, 1, 1) for s in alpha_sigma(log_snr))
        z = alpha * x0 + sigma * eps
        out = model(z, log_snr.expand(len(x0)), labels).float()
        if self.objective == "v":
            return out, alpha * eps - sigma * x0, alpha.view(-1) ** 2
        return out, eps, None

    def loss(self, model: nn.Module, x0: torch.Tensor, labels: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """Mean training loss of a batch; ``u`` in [0, 1) are the (Sobol) noise-level draws."""
        log_snr = self.log_snr(u)
        eps = torch.randn_like(x0)
        out, target, weight = self._predict(model, x0, labels, log_snr, eps)
        # the reductions are the training objective's, operation for operation: eps takes the
        # plain mean over every element, which sums in another order than a mean of image means
        if weight is None:
            return (out - target).pow(2).mean()
        return ((out - target).pow(2).mean((1, 2, 3)) * weight).mean()

    def per_image_loss(self, model: nn.Module, x0: torch.Tensor, labels: torch.Tensor, log_snr: torch.Tensor,
                       eps: torch.Tensor) -> torch.Tensor:
        """[B] training objective of each image at noise level ``log_snr`` ([B], or [1] for one
        level for all) with the noise ``eps`` (no randomness drawn): v, the alpha^2-weighted MSE of
        v; eps, the MSE of eps. Its mean is ``loss`` given the same draws (for eps up to the order
        of the sum)."""
        out, target, weight = self._predict(model, x0, labels, log_snr, eps)
        per_image = (out - target).pow(2).mean((1, 2, 3))
        return per_image if weight is None else per_image * weight

    def sample_levels(self, steps: int, device: torch.device) -> torch.Tensor:
        """Decreasing log-SNRs visited by the sampler (noisiest first)."""
        if self.objective == "v":
            return ddpm_log_snr(torch.linspace(1, 0, steps + 1, device=device)[:-1])
        t = torch.linspace(self.cfg.timesteps - 1, 0, steps, device=device).round().long()
        return self.discrete_log_snr.to(device)[t]

    @torch.no_grad()
    def sample(self, model: nn.Module, labels: torch.Tensor, shape: tuple[int, int, int],
               steps: int, eta: float, generator: torch.Generator | None = None,
               autocast_dtype: torch.dtype | None = None) -> torch.Tensor:
        """Class-conditional samples in [-1, 1]. All noise comes from ``generator``. A model with
        LoRA adapters is sampled through a copy with the adapters merged into their layers
        (fedrun.adapters.merged): the same function at the base model's cost."""
        model = merged(model)
        device = labels.device
        x = torch.randn(len(labels), *shape, device=device, generator=generator)
        levels = self.sample_levels(steps, device)
        alphas, sigmas = alpha_sigma(levels)
        pred = x
        for i in range(steps):
            with torch.autocast(device.type, dtype=autocast_dtype or torch.float32,
                                enabled=autocast_dtype is not None):
                if self.guidance:  # conditional and unconditional in one batch
                    null = torch.full_like(labels, self.null_class)
                    both = model(torch.cat([x, x]), levels[i].expand(2 * len(x)),
                                 torch.cat([labels, null])).float()
                    cond, uncond = both.chunk(2)
                    out = cond + self.guidance * (cond - uncond)
                else:
                    out = model(x, levels[i].expand(len(x)), labels).float()
            if self.objective == "v":
                pred = alphas[i] * x - sigmas[i] * out
                eps = sigmas[i] * x + alphas[i] * out
            else:  # as DDPM: predict eps, clip the implied x0 to the data range
                pred = ((x - sigmas[i] * out) / alphas[i]).clamp(-1, 1)
                eps = (x - alphas[i] * pred) / sigmas[i]
            if i < steps - 1:
                # eta scales the fresh noise between DDIM (0) and ancestral sampling (1)
                ddim_sigma = eta * (sigmas[i + 1] ** 2 / sigmas[i] ** 2).sqrt() * \
                    (1 - alphas[i] ** 2 / alphas[i + 1] ** 2).sqrt()
                adjusted_sigma = (sigmas[i + 1] ** 2 - ddim_sigma**2).clamp(min=0).sqrt()
                x = pred * alphas[i + 1] + eps * adjusted_sigma
                if eta:
                    x = x + torch.randn(x.shape, device=device, generator=generator) * ddim_sigma
        return pred.clamp(-1, 1)
