"""Experimental. Several clients of one rank trained at the same time: K models as one vmapped model.

Why: a small U-Net at a client's batch size does not fill a GPU; stacking K clients' weights
(torch.func.stack_module_state) and running one vmapped forward/backward (functional_call + vmap,
which turns each convolution into one grouped convolution over the K models) gives each kernel
K times the work. Off by default (``train.clients_at_once = 1``); benchmarks/ measures when it
pays (see benchmarks/README.md).

Same maths as ``federated.client.train_local``, client by client:
* each client starts from the global weights with a fresh Adam (implemented here on the stacked
  tensors, op for op as torch.optim.Adam's foreach path, with a step count per client);
* every random number comes from the client's own streams, drawn outside vmap, in the order
  train_local draws them from the global RNG after ``torch.manual_seed(seed, round, client)``:
  per step the flip coins, the Gaussian noise, then one Dropout2d mask per dropout call in
  forward order; shuffling and Sobol noise levels use the same seeded generators as train_local.
  Dropout modules are therefore replaced by ones that multiply by the pre-drawn masks, and nothing
  random runs inside vmap (``randomness="different"`` only matters for a model with random ops
  this module does not know; such a model is refused, see ``_dropout_calls``);
* clients of different sizes: a group is K clients of similar step counts (sorted); at each step
  a client's short last batch is padded to the longest one in the group and the padding rows
  are masked out of its loss; a client that has finished sits out (no Adam step).
Per client the result equals train_local's up to float rounding: the vmapped convolutions
(grouped) and padded batches sum in a different order. tests/unit_tests/test_multiclient.py checks it.
Not supported: fp16 with GradScaler, torch.compile (the train section refuses both), and every
method that ``supports_grouped`` refuses (one config check, registered here).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.func import functional_call, grad, stack_module_state, vmap

from .. import seeding
from ..config import Config
from ..data import ImageSet
from ..diffusion import Diffusion, alpha_sigma
from ..errors import ConfigError
from ..local_training import LocalResult, local_steps
from ..precision import autocast_dtype
from ..registry import config_check

# What the grouped trainer does not do, as (key, the value it needs, why): the authors' method only.
UNSUPPORTED = (
    ("model.label_dropout", 0.0, "has no label dropout"),
    ("fed.drift", "none", "adds no drift term and keeps no per-client state"),
    ("optim.lr_schedule", "constant", "has no learning-rate schedule"),
    ("fed.client_optimizer", "reset", "keeps no per-client state"),
    ("fed.compress", "none", "does not compress client updates or keep their error feedback"),
    ("model.trainable", "all", "stacks and trains every parameter, and this choice freezes some"),
)


@config_check
def supports_grouped(cfg: Config) -> None:
    """train.clients_at_once > 1: refuse what the grouped trainer cannot do (one line each)."""
    if cfg.train.clients_at_once == 1:
        return
    for key, needed, why in UNSUPPORTED:
        section, _, name = key.partition(".")
        value = getattr(getattr(cfg, section), name)
        if value != needed:
            raise ConfigError(f"train.clients_at_once: the experimental grouped trainer {why}; {key} = "
                              f"{value!r} needs train.clients_at_once = 1 (or {key} = {needed!r})")
    if cfg.fed.placement == "on_demand":
        raise ConfigError("fed.placement: the experimental grouped trainer plans its groups before the "
                          "round; "
                          "'on_demand' hands clients out during it: set fed.placement = \"cost\" or "
                          "train.clients_at_once = 1")

ADAM_EPS = 1e-8  # torch.optim.Adam's default, which train_local uses

# --------------------------------------------------------------------------------------------
# Dropout with masks fed from outside


class _MaskFeed:
    """The masks of the current forward pass, consumed in call order by _FedDropout2d."""

    def __init__(self) -> None:
        self.masks: list[torch.Tensor] = []
        self.next = 0

    def set(self, masks: list[torch.Tensor]) -> None:
        self.masks, self.next = masks, 0


class _FedDropout2d(nn.Module):
    def __init__(self, feed: _MaskFeed):
        super().__init__()
        self.feed = feed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mask = self.feed.masks[self.feed.next]
        self.feed.next += 1
        return x * mask  # as ATen's feature dropout: input * (bernoulli(1 - p) / (1 - p))


@dataclass(frozen=True)
class _DropoutCall:
    channels: int
    dtype: torch.dtype
    p: float


def _dropout_calls(model: nn.Module, example: tuple[torch.Tensor, ...],
                   amp: torch.dtype | None) -> list[_DropoutCall]:
    """The Dropout2d calls of one training forward pass, in call order (one probe forward)."""
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.dropout._DropoutNd) and not isinstance(m, nn.Dropout2d) and m.p > 0:
            raise NotImplementedError(f"train.clients_at_once > 1: {name} is a {type(m).__name__}; only "
                                      f"Dropout2d masks can be drawn per client (set it to p = 0)")
    calls: list[_DropoutCall] = []

    def hook(m: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        if m.p > 0:
            calls.append(_DropoutCall(args[0].shape[1], args[0].dtype, m.p))

    handles = [m.register_forward_pre_hook(hook) for m in model.modules() if isinstance(m, nn.Dropout2d)]
    device = example[0].device
    was_training = model.training
    try:
        # the probe's dropout draws must not move anybody's RNG
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.no_grad(), \
                torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            model.train()
            model(*example)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return calls


def _skeleton(model: nn.Module, feed: _MaskFeed) -> nn.Module:
    """A weightless copy of ``model`` for functional_call, its Dropout2d fed from ``feed``."""
    skel = copy.deepcopy(model).to("meta")
    for name, m in list(skel.named_modules()):
        if isinstance(m, nn.Dropout2d) and m.p > 0:
            parent_name, _, child = name.rpartition(".")
            setattr(skel.get_submodule(parent_name) if parent_name else skel, child, _FedDropout2d(feed))
    return skel.train()


# --------------------------------------------------------------------------------------------
# One client's batches and random numbers, drawn exactly as train_local draws them


@dataclass
class _Client:
    client: int
    indices: torch.Tensor
    total_steps: int
    shuffle: torch.Generator
    sobol: torch.quasirandom.SobolEngine
    noise: torch.Generator  # stands in for the global RNG that train_local seeds
    order: torch.Tensor | None = None
    pos: int = 0
    steps: int = 0
    loss_sum: torch.Tensor | None = None

    @property
    def done(self) -> bool:
        return self.steps >= self.total_steps


@dataclass
class _Batch:
    x: torch.Tensor
    y: torch.Tensor
    u: torch.Tensor
    eps: torch.Tensor
    masks: list[torch.Tensor] = field(default_factory=list)


def _next_batch(c: _Client, data: ImageSet, cfg: Config, calls: list[_DropoutCall],
                memory_format: torch.memory_format) -> _Batch:
    device, bs, n = data.images.device, cfg.optim.batch_size, len(c.indices)
    if c.order is None or c.pos >= n:  # a new epoch
        c.order = c.indices[torch.randperm(n, generator=c.shuffle).to(device, non_blocking=True)]
        c.pos = 0
    idx = c.order[c.pos:c.pos + bs]
    c.pos += bs
    b = len(idx)
    x, y = data.images[idx], data.labels[idx]
    if cfg.data.hflip:  # data.random_hflip, from this client's stream
        flip = torch.rand(b, 1, 1, 1, device=device, generator=c.noise) < 0.5
        x = torch.where(flip, x.flip(3), x)
    x = x.contiguous(memory_format=memory_format)
    u = c.sobol.draw(b)[:, 0].to(device, non_blocking=True)
    eps = torch.empty_like(x).normal_(generator=c.noise)  # = randn_like(x) in Diffusion.loss
    masks = [torch.empty(b, d.channels, 1, 1, dtype=d.dtype, device=device)
             .bernoulli_(1 - d.p, generator=c.noise).div_(1 - d.p) for d in calls]
    return _Batch(x, y, u, eps, masks)


def _pad(t: torch.Tensor, rows: int) -> torch.Tensor:
    if len(t) == rows:
        return t
    return torch.cat([t, t.new_zeros(rows - len(t), *t.shape[1:])])


# --------------------------------------------------------------------------------------------
# K clients at once


def group_clients(clients: list[int], steps: dict[int, int], k: int) -> list[list[int]]:
    """Groups of at most k clients with similar step counts (most steps first; ties by id)."""
    ordered = sorted(clients, key=lambda c: (-steps[c], c))
    return [ordered[i:i + k] for i in range(0, len(ordered), k)]


def _adam_step(params: dict[str, torch.Tensor], grads: list[torch.Tensor], exp_avg: dict[str, torch.Tensor],
               exp_avg_sq: dict[str, torch.Tensor], steps: list[int], active: list[bool],
               cfg: Config) -> None:
    """torch.optim.Adam's foreach step on stacked tensors [K, ...], one step count per client.

    The same elementwise ops in the same order as torch.optim.Adam(foreach=True), so a client's
    update equals train_local's for equal gradients. Clients with ``active[i] = False`` (done)
    keep their weights and moments.
    """
    o = cfg.optim
    names = list(params)
    ps, ms, vs = [params[n] for n in names], [exp_avg[n] for n in names], [exp_avg_sq[n] for n in names]
    device = ps[0].device
    idle = [i for i, a in enumerate(active) if not a]
    kept = [(t[idle].clone(), t) for t in ps + ms + vs] if idle else []

    def per_client(values: list[float], like: torch.Tensor) -> torch.Tensor:
        # built on the host and copied without a sync; shaped to broadcast over [K, ...]
        t = torch.tensor(values, dtype=like.dtype).to(device, non_blocking=True)
        return t.view(-1, *[1] * (like.dim() - 1))

    if o.grad_clip:  # nn.utils.clip_grad_norm_, per client
        norms = torch.stack([g.flatten(1).norm(dim=1) for g in grads], dim=1).norm(dim=1)
        coef = (o.grad_clip / (norms + 1e-6)).clamp(max=1.0)
        grads = [g * coef.view(-1, *[1] * (g.dim() - 1)) for g in grads]
    if o.weight_decay:
        grads = torch._foreach_add(grads, ps, alpha=o.weight_decay)
    torch._foreach_lerp_(ms, grads, 1 - o.beta1)
    torch._foreach_mul_(vs, o.beta2)
    torch._foreach_addcmul_(vs, grads, grads, 1 - o.beta2)
    steps = [max(s, 1) for s in steps]  # a client that has not started yet is idle anyway
    step_size = [-(o.lr / (1 - o.beta1 ** s)) for s in steps]
    bc2_sqrt = [(1 - o.beta2 ** s) ** 0.5 for s in steps]
    denom = torch._foreach_sqrt(vs)
    if len(set(steps)) == 1:  # the usual case: every client at the same step, Python scalars
        torch._foreach_div_(denom, bc2_sqrt[0])
        torch._foreach_add_(denom, ADAM_EPS)
        torch._foreach_addcdiv_(ps, ms, denom, step_size[0])
    else:
        torch._foreach_div_(denom, [per_client(bc2_sqrt, d) for d in denom])
        torch._foreach_add_(denom, ADAM_EPS)
        # addcdiv takes one scalar only; (m * step) / denom is the same arithmetic
        steps_scaled = torch._foreach_mul(ms, [per_client(step_size, m) for m in ms])
        torch._foreach_add_(ps, torch._foreach_div(steps_scaled,
                                                   denom))
    for old, t in kept:  # clients that sat this step out
        t[idle] = old


def train_group(model: nn.Module, diffusion: Diffusion, data: ImageSet,
                shards: dict[int, torch.Tensor], cfg: Config, round_: int,
                on_step: Callable[[], None] | None = None
                ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[int, LocalResult]]:
    """Train the clients of ``shards`` (at most K) from ``model``'s weights, all at once.

    Returns the stacked parameters and buffers (row i = i-th client of ``shards``) and each
    client's LocalResult. ``model`` is not changed.
    """
    device, o, seed, E = data.images.device, cfg.optim, cfg.run.seed, cfg.fed.local_epochs
    order = list(shards)
    K = len(order)
    amp = autocast_dtype(cfg.train.precision, device)
    memory_format = torch.channels_last if cfg.train.channels_last else torch.contiguous_format

    # the dropout calls of one forward pass, probed on a one-image batch
    probe = (data.images[:1].contiguous(memory_format=memory_format), torch.zeros(1, device=device),
             data.labels[:1])
    calls = _dropout_calls(model, probe, amp)
    feed = _MaskFeed()
    skel = _skeleton(model, feed)

    params, buffers = stack_module_state([model] * K)
    params = {name: p.detach().clone() for name, p in params.items()}
    buffers = {name: b.detach().clone() for name, b in buffers.items()}
    exp_avg = {name: torch.zeros_like(p) for name, p in params.items()}
    exp_avg_sq = {name: torch.zeros_like(p) for name, p in params.items()}

    clients = []
    for k in order:
        n = len(shards[k])
        clients.append(_Client(
            client=k, indices=shards[k], total_steps=local_steps(n, o.batch_size, E),
            shuffle=seeding.generator("cpu", seeding.SHUFFLE, seed, round_, k),
            sobol=seeding.sobol_engine(seed, round_, k),
            noise=seeding.generator(device, seeding.CLIENT, seed, round_, k),
            loss_sum=torch.zeros((), device=device)))

    objective = diffusion.objective

    def loss_fn(p: dict[str, torch.Tensor], b: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor,
                log_snr: torch.Tensor, eps: torch.Tensor, masks: list[torch.Tensor],
                valid: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        # Diffusion.loss with the noise passed in; unpadded batches reduce exactly as it does
        feed.set(masks)
        alpha, sigma = (s.view(-1, 1, 1, 1) for s in alpha_sigma(log_snr))
        z = alpha * x + sigma * eps
        out = functional_call(skel, (p, b), (z, log_snr, y)).float()
        if objective == "v":
            per_image = (out - (alpha * eps - sigma * x)).pow(2).mean((1, 2, 3)) * alpha.view(-1) ** 2
            loss = per_image.mean() if valid is None else (per_image * valid).sum() / valid.sum().clamp(min=1)
        elif valid is None:
            loss = (out - eps).pow(2).mean()
        else:
            loss = ((out - eps).pow(2).mean((1, 2, 3)) * valid).sum() / valid.sum().clamp(min=1)
        return loss, loss.detach()

    # in_dims: everything has the client dimension first; "valid" may be None (no padding)
    grad_full = vmap(grad(loss_fn, has_aux=True), in_dims=(0, 0, 0, 0, 0, 0, 0, None), randomness="different")
    grad_padded = vmap(grad(loss_fn, has_aux=True), in_dims=(0, 0, 0, 0, 0, 0, 0, 0), randomness="different")

    names = list(params)
    while not all(c.done for c in clients):
        active = [not c.done for c in clients]
        batches = [_next_batch(c, data, cfg, calls, memory_format) if a else None
                   for c, a in zip(clients, active, strict=True)]
        sizes = [len(bt.y) if bt is not None else 0 for bt in batches]
        rows = max(sizes)
        template = next(bt for bt in batches if bt is not None)

        def stacked(get: Callable[[_Batch], torch.Tensor], batches: list[_Batch | None] = batches,
                    rows: int = rows, template: _Batch = template) -> torch.Tensor:
            # bound as defaults: this step's batches, not the loop's later ones
            return torch.stack([_pad(get(bt), rows) if bt is not None else _pad(get(template)[:0], rows)
                                for bt in batches])

        x, y, u, eps = (stacked(lambda bt, a=a: getattr(bt, a)) for a in ("x", "y", "u", "eps"))
        masks = [stacked(lambda bt, j=j: bt.masks[j]) for j in range(len(calls))]
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            log_snr = diffusion.log_snr(u)  # elementwise on [K, rows]: no need to vmap it
            if all(s == rows for s in sizes):
                grads, losses = grad_full(params, buffers, x, y, log_snr, eps, masks, None)
            else:
                valid = torch.stack([(torch.arange(rows, device=device) < s).float() for s in sizes])
                grads, losses = grad_padded(params, buffers, x, y, log_snr, eps, masks, valid)

        for c, a in zip(clients, active, strict=True):
            c.steps += a
        _adam_step(params, [grads[name] for name in names], exp_avg, exp_avg_sq,
                   [c.steps for c in clients], active, cfg)

        for i, (c, a) in enumerate(zip(clients, active, strict=True)):
            if a:
                c.loss_sum += losses[i]
                if on_step is not None:
                    on_step()

    results = {c.client: LocalResult(c.loss_sum, c.steps, len(c.indices) * E) for c in clients}
    return params, buffers, results


class GroupedClientTrainer:
    """The round loop's client trainer (fedrun.parts.ClientTrainer) for K-at-once training:
    ``train(round, k, ...)`` returns what train_local would have, with client k's weights loaded.

    ``begin_round`` groups the rank's clients up front (group_clients); a group is trained when
    its first client is asked for, and client k's weights are then loaded into ``model``. A
    group's stacked weights are freed once all of its clients were read. No per-client state and
    no gradient terms (config validation refuses them with ``train.clients_at_once > 1``).
    """

    state_kinds: tuple[str, ...] = ()

    def __init__(self, model: nn.Module, diffusion: Diffusion, data: ImageSet,
                 shards: dict[int, torch.Tensor], cfg: Config, on_step: Callable[[], None] | None = None):
        self.model, self.diffusion, self.data, self.cfg = model, diffusion, data, cfg
        self.all_shards, self.on_step = shards, on_step
        Trained = tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], int, LocalResult]
        self._trained: dict[int, Trained] = {}

    def begin_round(self, round_: int, clients: Iterable[int]) -> list[int]:
        """Groups the clients this rank takes (a fixed placement: all known now); returns them."""
        taken = list(clients)
        self.round = round_
        self.shards = {k: self.all_shards[k] for k in taken if len(self.all_shards[k])}
        # the start of every client: the weights the model holds now (the global model)
        self.start = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        steps = {k: local_steps(len(s), self.cfg.optim.batch_size, self.cfg.fed.local_epochs)
                 for k, s in self.shards.items()}
        self.groups = group_clients(list(self.shards), steps, self.cfg.train.clients_at_once)
        self._trained.clear()
        return taken

    @torch.no_grad()
    def train(self, round_: int, client: int, state: dict[str, Any],
              grad_term: Callable[[], None] | None) -> LocalResult:
        assert round_ == self.round and grad_term is None and not state
        if client not in self._trained:
            group = next(g for g in self.groups if client in g)
            self.model.load_state_dict(self.start)
            with torch.enable_grad():
                params, buffers, results = train_group(self.model, self.diffusion, self.data,
                                                       {k: self.shards[k] for k in group}, self.cfg,
                                                       self.round, self.on_step)
            for i, k in enumerate(group):
                self._trained[k] = (params, buffers, i, results[k])
        params, buffers, i, res = self._trained.pop(client)
        for name, t in list(self.model.named_parameters()) + list(self.model.named_buffers()):
            src = params.get(name, buffers.get(name))
            if src is not None:
                t.copy_(src[i])
        return res
