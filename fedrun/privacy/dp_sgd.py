"""Sample-level DP: one client's local training with DP-SGD through Opacus.

Same contract as ``fedrun.federated.client.train_local`` (the model is trained in place, its
parameter tensors stay the same objects, a fresh Adam per call, Sobol noise levels, autocast),
with three differences that make it DP-SGD (Abadi et al., CCS 2016):

* batches are Poisson samples: every image of the shard enters a step independently with
  probability q = min(1, B / n), E * ceil(n / B) steps per round (what the accountant composes);
* Opacus's ``GradSampleModule`` computes per-sample gradients and ``DPOptimizer`` clips each to
  L2 norm ``privacy.clip``, sums, adds N(0, (noise_multiplier * clip)^2) per coordinate and
  divides by the expected batch size q * n before Adam sees the gradient;
* the Poisson draws come from a generator seeded by (DP_SAMPLING, seed, round, client) and the
  optimizer's noise from one seeded by (DP_NOISE, seed, round, client): the result does not
  depend on the rank that trains the client or on what that rank did before.

With noise multiplicity (``privacy.multiplicity`` K > 1; Dockhorn, Cao, Vahdat and Kreis,
"Differentially Private Diffusion Models", TMLR 2023) every image of a Poisson batch enters the
forward pass K times, with K noise levels (consecutive points of the client's Sobol sequence)
and K Gaussian noise draws; ``per_sample_gradients`` averages its K rows' per-sample gradients
(Opacus's mean reduction over B K rows makes each row's gradient that of its own loss) into one
per-sample gradient of the image's mean loss, before the optimizer clips it. The clip still bounds each
image's influence and each image is still one Poisson sample at rate q: sensitivity and
accountant are unchanged, while the variance the K draws add falls as 1 / K.

``optim.grad_clip`` is not applied (per-sample clipping replaces it). A drift term
(``adjust_grads``, FedProx) is applied to the privatised gradient, after the noise: it depends
on no data, so it costs no privacy.

Frozen parameters (``model.trainable``, fedrun/adapters.py) get no per-sample gradient, no clip
and no noise: Opacus hooks only modules with trainable parameters of their own, so a LoRA
adapter's two Conv2d modules use the Conv2d sampler below and the frozen base conv none.

Opacus has no grad sampler for fedrun's ``FourierFeatures`` (a trainable [F/2, 1] weight used
as cos/sin(2 pi t w)); this module registers an exact one (``fourier_grad_sample``). Everything
else in the U-Net (Conv2d, Embedding, GroupNorm, Linear) has Opacus's own samplers; Dropout2d,
ReLU, pooling and upsampling have no parameters.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .. import faults, seeding
from ..config import Config
from ..data import ImageSet
from ..diffusion import Diffusion
from ..errors import ConfigError
from ..flat import float_tensors
from ..local_training import LocalResult, batch_loss, client_adam, keeps_optimizer
from ..models import FourierFeatures
from ..precision import autocast_dtype
from .accountant import require_opacus, sample_level_step, sample_once_rate


@dataclass
class DPLocalResult(LocalResult):
    """LocalResult plus what the accountant composes: ``steps`` noisy steps at Poisson rate
    ``sample_rate`` with ``noise_multiplier``; ``images`` counts the images actually drawn."""

    sample_rate: float = 1.0
    noise_multiplier: float = 0.0


def fourier_grad_sample(layer: FourierFeatures, activations: list[torch.Tensor],
                        backprops: torch.Tensor) -> dict[nn.Parameter, torch.Tensor]:
    """Per-sample gradient of FourierFeatures.weight [F/2, 1]: with f_ij = 2 pi t_i w_j and
    output [cos f, sin f], dl_i/dw_j = 2 pi t_i (cos f_ij * g_sin_ij - sin f_ij * g_cos_ij)."""
    t = activations[0].float()
    f = 2 * math.pi * t[:, None] * layer.weight[:, 0].float()[None, :]
    g_cos, g_sin = backprops.float().chunk(2, dim=-1)
    gs = 2 * math.pi * t[:, None] * (f.cos() * g_sin - f.sin() * g_cos)
    return {layer.weight: gs[:, :, None].to(layer.weight.dtype)}


def conv2d_grad_sample(layer: nn.Conv2d, activations: list[torch.Tensor],
                       backprops: torch.Tensor) -> dict[nn.Parameter, torch.Tensor]:
    """Opacus's Conv2d grad sampler on contiguous (NCHW) tensors. Opacus 1.6 returns wrong
    per-sample gradients for channels_last activations (``train.channels_last``, the default,
    and the attention's output projection, whose input is a channels_last-strided view); the
    test against autograd on single images catches it."""
    from opacus.grad_sample.conv import compute_conv_grad_sample
    return compute_conv_grad_sample(layer, [a.contiguous() for a in activations], backprops.contiguous())


_REGISTERED = False


def register_grad_samplers() -> None:
    """Teach Opacus fedrun's custom layer, and fix its Conv2d one (once per process)."""
    global _REGISTERED
    if not _REGISTERED:
        from opacus.grad_sample import register_grad_sampler
        register_grad_sampler(FourierFeatures)(fourier_grad_sample)
        register_grad_sampler(nn.Conv2d)(conv2d_grad_sample)
        _REGISTERED = True


def attach(model: nn.Module) -> nn.Module:
    """Opacus's GradSampleModule around ``model`` (same parameter objects), strict validation,
    per-sample gradients of a mean-reduced loss. Undo with ``detach``."""
    require_opacus()
    register_grad_samplers()
    from opacus import GradSampleModule
    return GradSampleModule(model, batch_first=True, loss_reduction="mean", strict=True)


def detach(gsm: nn.Module) -> None:
    """Remove Opacus's hooks and every attribute it put on the parameters."""
    gsm._close()  # remove_hooks + delete grad_sample, _forward_counter, ...
    for p in gsm._module.parameters():
        for attr in ("grad_sample", "summed_grad", "_processed"):
            if hasattr(p, attr):
                delattr(p, attr)


def average_draws_(params: list[nn.Parameter], multiplicity: int) -> None:
    """``p.grad_sample`` of B * K rows (each image's K rows consecutive) -> B per-image gradients,
    each the mean of its K rows' (noise multiplicity)."""
    for p in params:
        gs = p.grad_sample
        if not isinstance(gs, torch.Tensor):  # a list: the module ran twice in one forward pass
            raise RuntimeError("noise multiplicity needs one per-sample gradient tensor per parameter")
        p.grad_sample = gs.reshape(-1, multiplicity, *gs.shape[1:]).mean(1)


def per_sample_gradients(gsm: nn.Module, params: list[nn.Parameter], diffusion: Diffusion, data: ImageSet,
                         idx: torch.Tensor, sobol: torch.quasirandom.SobolEngine, cfg: Config,
                         amp: torch.dtype | None, memory_format: torch.memory_format) -> torch.Tensor:
    """The batch data[idx] through Opacus: forward, backward, and ``p.grad_sample`` of every
    trainable parameter left as one per-sample gradient per image of ``idx``; with
    ``privacy.multiplicity`` K > 1 each image runs as K rows (K noise levels, K noise draws) whose
    gradients are averaged. Returns the batch's mean loss (detached)."""
    k = cfg.privacy.multiplicity
    rows = idx.repeat_interleave(k) if k > 1 else idx
    loss = batch_loss(gsm, diffusion, data, rows, sobol, cfg, amp, memory_format)
    loss.backward()
    if k > 1:
        average_draws_(params, k)
    return loss.detach()


def train_local_dp(model: nn.Module, diffusion: Diffusion, data: ImageSet, indices: torch.Tensor,
                   cfg: Config, round_: int, client: int,
                   on_step: Callable[[], None] | None = None, *,
                   optimizer_state: dict[str, Any] | None = None,
                   adjust_grads: Callable[[], None] | None = None) -> DPLocalResult:
    """Train ``model`` in place on ``data[indices]`` with DP-SGD for ``cfg.fed.local_epochs``
    epochs of Poisson-sampled batches. Record ``(result.noise_multiplier, result.sample_rate,
    result.steps)`` in the client's PrivacyLedger entry."""
    require_opacus()
    from opacus.optimizers import DPOptimizer
    device = data.images.device
    o, pv, seed = cfg.optim, cfg.privacy, cfg.run.seed
    amp = autocast_dtype(cfg.train.precision, device)
    if amp is torch.float16:
        raise ConfigError("train.precision: fp16 (GradScaler) is not supported with privacy.level = "
                          "\"sample\"; use bf16 or fp32")
    n = len(indices)
    if n == 0:
        return DPLocalResult(torch.zeros((), device=device), 0, 0, None, sample_rate=1.0,
                             noise_multiplier=pv.noise_multiplier)
    q, total_steps = sample_level_step(n, o.batch_size, cfg.fed.local_epochs)
    expected_batch = min(o.batch_size, n)  # = q * n

    torch.manual_seed(seeding.derive_seed(seeding.CLIENT, seed, round_, client))  # dropout, eps, labels
    sampling = seeding.generator("cpu", seeding.DP_SAMPLING, seed, round_, client)
    noise = seeding.generator(device, seeding.DP_NOISE, seed, round_, client)
    sobol = seeding.sobol_engine(seed, round_, client)
    memory_format = torch.channels_last if cfg.train.channels_last else torch.contiguous_format

    gsm = attach(model)
    quiet = warnings.catch_warnings()  # PyTorch notes that the first conv's input needs no grad
    quiet.__enter__()
    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    try:
        adam = client_adam(model, cfg, round_, optimizer_state)
        opt = DPOptimizer(adam, noise_multiplier=pv.noise_multiplier, max_grad_norm=pv.clip,
                          expected_batch_size=expected_batch, loss_reduction="mean", generator=noise)
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        loss_sum = torch.zeros((), device=device)
        images = 0
        for step in range(1, total_steps + 1):
            take = torch.rand(n, generator=sampling) < q  # Poisson sampling, on the CPU
            idx = indices[take.nonzero()[:, 0].to(indices.device)].to(device, non_blocking=True)
            opt.zero_grad(set_to_none=True)
            if len(idx):
                loss = per_sample_gradients(gsm, params, diffusion, data, idx, sobol, cfg, amp, memory_format)
                loss_sum += loss  # summed batch means, as train_local
                images += len(idx)
            else:  # an empty Poisson batch still takes a (pure-noise) step, as the analysis assumes
                for p in params:
                    p.grad_sample = torch.zeros((0, *p.shape), device=p.device, dtype=p.dtype)
            if opt.pre_step():  # clip per sample, sum, add noise, divide by q * n
                if adjust_grads is not None:
                    adjust_grads()
                adam.step()
            if faults.PLAN is not None:
                faults.at_step(model, round_, client, step)
            if on_step is not None:
                on_step()
        kept = adam.state_dict() if keeps_optimizer(cfg) else None
    finally:
        detach(gsm)
        quiet.__exit__(None, None, None)
    return DPLocalResult(loss_sum, total_steps, images, kept, sample_rate=q,
                         noise_multiplier=pv.noise_multiplier)


def clipped_gradients(model: nn.Module, diffusion: Diffusion, data: ImageSet, indices: torch.Tensor,
                      cfg: Config, round_: int, client: int, on_step: Callable[[], None] | None = None, *,
                      optimizer_state: dict[str, Any] | None = None,
                      adjust_grads: Callable[[], None] | None = None) -> LocalResult:
    """"sample_once": the client's part of the round's one noised step. A Poisson batch of its
    shard (every image at the federation's rate q = min(1, B K / n), K clients a round, n the
    train split's images, which the clients' shards partition; the stream (seed, round, client)),
    each image's gradient of
    the loss at the global model (Opacus's per-sample gradients; noise multiplicity averaged
    inside), clipped to L2 norm ``privacy.clip``: returned as the result's ``message``, one row per
    image in fedrun.flat's order (float buffers get zero rows), the model untouched. No noise here:
    it is added once, to the round's sum (fedrun.privacy.mechanisms.SampleOnce)."""
    require_opacus()
    device = data.images.device
    pv = cfg.privacy
    amp = autocast_dtype(cfg.train.precision, device)
    tensors = float_tensors(model)
    n = len(indices)
    empty = torch.zeros((0, sum(t.numel() for t in tensors)), device=device)
    if n == 0:
        return LocalResult(torch.zeros((), device=device), 0, 0, None, empty)
    q = sample_once_rate(cfg.optim.batch_size, cfg.fed.clients_per_round, len(data.labels))
    # dropout, the diffusion noise, label dropout: the client's stream, as in its local training
    torch.manual_seed(seeding.derive_seed(seeding.CLIENT, cfg.run.seed, round_, client))
    sampling = seeding.generator("cpu", seeding.DP_SAMPLING, cfg.run.seed, round_, client)
    take = torch.rand(n, generator=sampling) < q
    idx = indices[take.nonzero()[:, 0].to(indices.device)].to(device, non_blocking=True)
    if on_step is not None:
        on_step()
    if not len(idx):  # an empty Poisson batch sends nothing but its share of the noise
        return LocalResult(torch.zeros((), device=device), 1, 0, None, empty)
    sobol = seeding.sobol_engine(cfg.run.seed, round_, client)
    memory_format = torch.channels_last if cfg.train.channels_last else torch.contiguous_format
    params = [p for p in model.parameters() if p.requires_grad]
    gsm = attach(model)
    try:
        model.train()
        with warnings.catch_warnings():  # PyTorch notes that the first conv's input needs no grad
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            loss = per_sample_gradients(gsm, params, diffusion, data, idx, sobol, cfg, amp, memory_format)
        grads = {id(p): p.grad_sample for p in params}
        rows = torch.cat([grads[id(t)].reshape(len(idx), -1).float() if id(t) in grads
                          else torch.zeros((len(idx), t.numel()), device=device) for t in tensors], dim=1)
    finally:
        detach(gsm)
        for p in params:
            p.grad = None
    norms = rows.norm(dim=1, keepdim=True)
    rows.mul_(torch.clamp(pv.clip / norms.clamp_min(1e-12), max=1.0))
    return LocalResult(loss, 1, len(idx), None, rows)
