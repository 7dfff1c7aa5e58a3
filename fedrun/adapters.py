"""Which weights train (``model.trainable``), and the low-rank adapters that make a fine-tune small.

Applied once, right after ``fedrun.models.build`` (and after ``model.init_from`` has loaded the
base weights), by ``make_trainable``; each choice registers itself in ``TRAINABLES``
(``model.trainable``) with its keys (fedrun.registry):

* ``"all"``: nothing happens at all; every parameter trains (fedrun's behaviour before the key).
* ``"lora"`` (Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", ICLR 2022): every
  convolution and linear layer W keeps its weights frozen and gains a rank-r update,
  y = W x + b + (alpha / r) * up(down(x)). For a Conv2d, ``down`` is Conv2d(in, r, k) with the
  base's stride, padding and dilation and ``up`` is Conv2d(r, out, 1), both without bias: plain
  modules, so Opacus computes their per-sample gradients with its own (and fedrun's) Conv2d grad
  sampler, and skips the frozen base. ``down`` starts as PyTorch's default init (Kaiming uniform,
  a = sqrt(5), as loralib and peft do), ``up`` at zero, so step 0 is the base model exactly.
  Besides the adapters, these train in full: the model's embeddings (the Fourier features of
  the noise level and the class embedding: a few dozen numbers that a new data set's classes
  most need to move) and its output layers (the convolutions that produce the image's 1 or 3
  channels: a rank-r adapter of a layer with 1 output is no low-rank update, and the whole layer
  is a few hundred numbers). Biases and norms of adapted layers stay frozen, as in Hu et al.
* ``"peft_lora"``: the same LoRA through the ``peft`` library (``peft.inject_adapter_in_model``;
  ``pip install 'fedrun[diffusers]'``), for fedrun's U-Net and the diffusers one alike, with the
  adapted layers as a setting (``model.lora_target_modules``, peft's ``target_modules``; empty =
  the layers ``"lora"`` adapts). Its adapters start from the same draws of the same stream, in the
  same layer order, and peft's layers compute ``base(x) + up(down(x)) * (alpha / r)``, which is
  ``"lora"``'s sum in IEEE arithmetic, so on fedrun's U-Net ``"peft_lora"`` trains the same bits
  as ``"lora"`` (tested); only the state_dict names differ (peft's ``base_layer.weight``,
  ``lora_A.default.weight``, ``lora_B.default.weight``).
* ``"norms_biases"``: only biases, normalisation layers and embeddings train (BitFit, Ben Zaken
  et al. 2022, plus embeddings). fedrun's U-Net has no normalisation layer unless attention is
  on (its GroupNorm): biases and embeddings then.

Frozen parameters have ``requires_grad = False``: the optimizer, Opacus's clipping and noise, the
flat layout that the round all-reduces (``fedrun.flat``), the EMA and the clients' kept state
cover only what trains. ``LoRAConv2d`` and ``LoRALinear`` keep the base layer's parameter names
(``weight``, ``bias``) and add ``lora_down.weight`` and ``lora_up.weight``, so a checkpoint's
model is the base's state_dict plus the adapters.

``merged`` folds every adapter into its layer (W + (alpha / r) * up @ down, a weight of the
base's shape) in a copy: the sampler (``Diffusion.sample``) uses it, so sampling costs what the
base model costs (two extra convolutions per adapted layer and step saved). It is the same
function up to float rounding: a convolution is linear in its weight.

Why ``"lora"`` keeps fedrun's own two classes: peft needs transformers, accelerate and the Hub
client, which the default install does not carry, and its layers wrap the base module (other
state_dict names, so older LoRA checkpoints would not load); ``"peft_lora"`` is for the diffusers
extra. peft is imported only when ``"peft_lora"`` is chosen or a peft-adapted model is merged. A
core module: it imports no sub-package, and not ``fedrun.models`` either (which imports
``fedrun.diffusion``, which imports this): the model names its embeddings and output layers
through ``Adaptable``.
"""

from __future__ import annotations

import copy
import importlib.util
import math
import sys
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from . import seeding
from .config import HASHED_WHEN_SET, Config, ModelConfig, setting
from .errors import ConfigError
from .registry import Registry, Settings

NORMS = (nn.GroupNorm, nn.LayerNorm, nn.modules.batchnorm._NormBase)

TRAINABLES = Registry(
    "model.trainable", "all", "Which weights train (fedrun/adapters.py): \"all\" | \"lora\" (low-rank "
    "adapters on the convolutions and linear layers; the embeddings and output layers train in full, the "
    "rest is frozen) | \"peft_lora\" (the same through the peft library, its layers chosen by "
    "model.lora_target_modules) | \"norms_biases\" (biases, norms and embeddings). Only what trains "
    "travels, is clipped and gets noise. A model setting, not a federated one: the centralized run honours "
    "it too.",
    hashed=HASHED_WHEN_SET)


@dataclass
class LoRASettings(Settings):
    lora_rank: int = setting(4, hashed=HASHED_WHEN_SET)
    """LoRA: rank r of every adapter (at most the smallest adapted layer's out / fan-in). 4 keeps
    the digits default's trained part under 1/10 of its weights (8.2 %; r = 8: 16 %)."""
    lora_alpha: float = setting(4.0, hashed=HASHED_WHEN_SET)
    """LoRA: the update is scaled by lora_alpha / lora_rank (Hu et al.: alpha = the first r tried,
    then fixed while r varies)."""

    def validate(self) -> None:
        if self.lora_rank < 1:
            raise ConfigError(f"model.lora_rank: must be >= 1 (the rank of every adapter), got "
                              f"{self.lora_rank}")
        if not self.lora_alpha > 0:
            raise ConfigError(f"model.lora_alpha: must be > 0 (the adapters' update is scaled by alpha / "
                              f"rank), got {self.lora_alpha}")


@runtime_checkable
class Adaptable(Protocol):
    """What a model tells ``make_trainable`` (fedrun's UNet implements it)."""

    def embeddings(self) -> list[nn.Module]:
        """Modules that embed the conditioning (noise level, class): they train in every mode."""

    def output_layers(self) -> list[nn.Module]:
        """The layers that produce the output's channels: trained in full under LoRA."""


class LoRAConv2d(nn.Conv2d):
    """A frozen Conv2d (the same weight and bias objects as ``base``) plus (alpha / r) * up(down(x))."""

    def __init__(self, base: nn.Conv2d, rank: int, alpha: float, generator: torch.Generator):
        super().__init__(base.in_channels, base.out_channels, base.kernel_size, base.stride, base.padding,
                         base.dilation, base.groups, base.bias is not None, base.padding_mode, device="meta")
        self.weight, self.bias = base.weight, base.bias  # the base's own parameters, frozen
        self.rank, self.scale = rank, alpha / rank
        self.lora_down = nn.Conv2d(base.in_channels, rank, base.kernel_size, base.stride, base.padding,
                                   base.dilation, bias=False, padding_mode=base.padding_mode)
        self.lora_up = nn.Conv2d(rank, base.out_channels, 1, bias=False)
        _init_adapter(self.lora_down.weight, self.lora_up.weight, generator)
        like = base.weight
        # the base's layout (train.channels_last converts the whole model): the strides autograd
        # gives the gradients, which DDP's buckets expect (a 1x1 weight's strides tell them apart)
        o, i, kh, kw = like.shape
        fmt = torch.channels_last if like.stride() == (i * kh * kw, 1, kw * i, i) else torch.contiguous_format
        self.lora_down.to(like.device, like.dtype, memory_format=fmt)
        self.lora_up.to(like.device, like.dtype, memory_format=fmt)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.weight, self.bias) + self.scale * self.lora_up(self.lora_down(x))

    def delta(self) -> torch.Tensor:
        """(alpha / r) * up @ down as a weight of the base's shape [out, in, kh, kw]."""
        up = self.lora_up.weight.reshape(self.out_channels, self.rank)
        down = self.lora_down.weight.reshape(self.rank, -1)
        return (self.scale * (up @ down)).reshape(self.weight.shape)


class LoRALinear(nn.Linear):
    """A frozen Linear (the same weight and bias objects as ``base``) plus (alpha / r) * up(down(x))."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, generator: torch.Generator):
        super().__init__(base.in_features, base.out_features, base.bias is not None, device="meta")
        self.weight, self.bias = base.weight, base.bias
        self.rank, self.scale = rank, alpha / rank
        self.lora_down = nn.Linear(base.in_features, rank, bias=False)
        self.lora_up = nn.Linear(rank, base.out_features, bias=False)
        _init_adapter(self.lora_down.weight, self.lora_up.weight, generator)
        self.lora_down.to(base.weight.device, base.weight.dtype)
        self.lora_up.to(base.weight.device, base.weight.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.weight, self.bias) + self.scale * self.lora_up(self.lora_down(x))

    def delta(self) -> torch.Tensor:
        return self.scale * (self.lora_up.weight @ self.lora_down.weight)


LORA_LAYERS = (LoRAConv2d, LoRALinear)


@torch.no_grad()
def _init_adapter(down: torch.Tensor, up: torch.Tensor, generator: torch.Generator) -> None:
    """down: PyTorch's default layer init from ``generator`` (on the CPU, so every device and rank
    draws the same numbers); up: zero, so the adapted layer starts as the base layer."""
    cpu = torch.empty(down.shape, device="cpu")
    nn.init.kaiming_uniform_(cpu, a=math.sqrt(5), generator=generator)
    down.copy_(cpu)
    up.zero_()


def max_rank(layer: nn.Module) -> int:
    """The largest useful rank of an update of ``layer``'s weight (seen as a matrix out x fan-in)."""
    if isinstance(layer, nn.Conv2d):
        return min(layer.out_channels, layer.in_channels // layer.groups * math.prod(layer.kernel_size))
    assert isinstance(layer, nn.Linear)
    return min(layer.out_features, layer.in_features)


def lora_targets(model: nn.Module, rank: int) -> list[str]:
    """Names of the layers LoRA adapts: every (ungrouped) Conv2d and Linear but the model's output
    layers. ConfigError, naming the layer, if ``rank`` exceeds what one of them can hold."""
    keep = {id(m) for m in model.output_layers()} if isinstance(model, Adaptable) else set()
    names = []
    for name, m in model.named_modules():
        if type(m) not in (nn.Conv2d, nn.Linear) or id(m) in keep:
            continue
        if isinstance(m, nn.Conv2d) and m.groups != 1:
            continue  # no grouped convolution in fedrun's models; it would train in full
        if rank > max_rank(m):
            raise ConfigError(f"model.lora_rank: {rank} is larger than the layer {name} can use ({m}: "
                              f"rank at most {max_rank(m)}); set model.lora_rank <= {max_rank(m)}")
        names.append(name)
    return names


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


@TRAINABLES.register("all")
class AllWeights:
    """Every parameter trains (the model untouched)."""

    @classmethod
    def apply(cls, model: nn.Module, settings: Any, seed: int) -> list[nn.Module]:
        return []


@TRAINABLES.register("lora", LoRASettings)
class LoRA:
    """Low-rank adapters on every convolution and linear layer; embeddings and output layers in full."""

    @classmethod
    def apply(cls, model: nn.Module, settings: LoRASettings, seed: int) -> list[nn.Module]:
        model.requires_grad_(False)
        generator = seeding.stream_generator("cpu", "adapter_init", seed=seed)
        for name in lora_targets(model, settings.lora_rank):
            base = model.get_submodule(name)
            lora = LoRAConv2d if isinstance(base, nn.Conv2d) else LoRALinear
            _replace(model, name, lora(base, settings.lora_rank, settings.lora_alpha, generator))
        return model.embeddings() + model.output_layers() if isinstance(model, Adaptable) else []


@dataclass
class PeftLoRASettings(LoRASettings):
    lora_target_modules: list[str] = setting(factory=list, hashed=HASHED_WHEN_SET)
    """peft_lora: the layers that get adapters, as peft's target_modules: a name matches every
    layer whose full name is it or ends in "." + it (diffusers: ["to_q", "to_k", "to_v",
    "to_out.0", "conv1", "conv2"]); [] = every Conv2d and Linear but the output layers, as "lora"."""


def peft_targets(model: nn.Module, settings: PeftLoRASettings) -> list[str]:
    """Full names of the layers ``peft_lora`` adapts (``model.lora_target_modules``, or the layers
    ``lora`` adapts). ConfigError naming the key for a name that matches no layer, a layer that is
    no Conv2d or Linear, an output layer (it trains in full), or a rank the layer cannot hold."""
    wanted = settings.lora_target_modules
    if not wanted:
        return lora_targets(model, settings.lora_rank)
    keep = {id(m) for m in model.output_layers()} if isinstance(model, Adaptable) else set()
    names, used = [], set()
    for name, m in model.named_modules():
        hits = [t for t in wanted if name == t or name.endswith("." + t)]
        if not hits:
            continue
        used.update(hits)
        if type(m) not in (nn.Conv2d, nn.Linear) or (isinstance(m, nn.Conv2d) and m.groups != 1):
            raise ConfigError(f"model.lora_target_modules: {hits[0]!r} matches {name}, a {type(m).__name__}; "
                              f"name ungrouped Conv2d or Linear layers")
        if id(m) in keep:
            raise ConfigError(f"model.lora_target_modules: {hits[0]!r} matches {name}, an output layer, "
                              f"which trains in full; leave it out")
        if settings.lora_rank > max_rank(m):
            raise ConfigError(f"model.lora_rank: {settings.lora_rank} is larger than the layer {name} can "
                              f"use ({m}: rank at most {max_rank(m)}); set model.lora_rank <= {max_rank(m)}")
        names.append(name)
    missing = [t for t in wanted if t not in used]
    if missing:
        some = [n for n, m in model.named_modules() if type(m) in (nn.Conv2d, nn.Linear)][:4]
        raise ConfigError(f"model.lora_target_modules: {missing[0]!r} names no layer of this model (its "
                          f"layers are named like {', '.join(some)}); name layers the model has, or [] for "
                          f"all")
    return names


def _peft_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, layer) of every peft LoRA layer of ``model`` (none unless peft is imported)."""
    if "peft" not in sys.modules:
        return []
    from peft.tuners.lora import LoraLayer
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLayer)]


@TRAINABLES.register("peft_lora", PeftLoRASettings)
class PeftLoRA:
    """LoRA through peft (target modules as a setting); the embeddings and output layers in full."""

    @classmethod
    def check(cls, cfg: Config) -> None:
        if importlib.util.find_spec("peft") is None:
            raise ConfigError("model.trainable: \"peft_lora\" needs the peft package, which is not "
                              "installed; pip install 'fedrun[diffusers]', or use model.trainable = \"lora\" "
                              "(fedrun's own layers, the same function)")

    @classmethod
    def apply(cls, model: nn.Module, settings: PeftLoRASettings, seed: int) -> list[nn.Module]:
        from peft import LoraConfig, inject_adapter_in_model
        model.requires_grad_(False)
        names = peft_targets(model, settings)
        config = LoraConfig(r=settings.lora_rank, lora_alpha=settings.lora_alpha, target_modules=names,
                            lora_dropout=0.0, bias="none")
        with torch.random.fork_rng(devices=[]):  # peft's own init draws from the global RNG: undone below
            inject_adapter_in_model(config, model)
        generator = seeding.stream_generator("cpu", "adapter_init", seed=seed)
        for name in names:  # the order and draws of "lora": the same adapters
            layer = model.get_submodule(name)
            down, up = layer.lora_A["default"], layer.lora_B["default"]
            _init_adapter(down.weight, up.weight, generator)
            like = layer.base_layer.weight
            if like.dim() == 4:  # the base's layout (train.channels_last), as LoRAConv2d keeps it
                o, i, kh, kw = like.shape
                fmt = torch.channels_last if like.stride() == (i * kh * kw, 1, kw * i, i) \
                    else torch.contiguous_format
                down.to(memory_format=fmt)
                up.to(memory_format=fmt)
        return model.embeddings() + model.output_layers() if isinstance(model, Adaptable) else []


@TRAINABLES.register("norms_biases")
class NormsBiases:
    """Biases, normalisation layers and embeddings train (BitFit plus embeddings); the rest is frozen."""

    @classmethod
    def apply(cls, model: nn.Module, settings: Any, seed: int) -> list[nn.Module]:
        model.requires_grad_(False)
        for name, p in model.named_parameters():
            if name.rpartition(".")[2] == "bias":
                p.requires_grad_(True)
        also = [m for m in model.modules() if isinstance(m, NORMS)]
        return also + (model.embeddings() if isinstance(model, Adaptable) else [])


def make_trainable(model: nn.Module, cfg: Config | ModelConfig, seed: int) -> nn.Module:
    """Apply ``model.trainable`` (``cfg``: the config or its model section) to ``model`` in place
    and return it: adapters added, frozen parameters' ``requires_grad`` off. ConfigError if the
    rank does not fit a layer or nothing is left to train. The adapters' init is drawn from the
    "adapter_init" stream of ``seed``."""
    choice = TRAINABLES.selected(cfg)
    also = choice.target.apply(model, TRAINABLES.settings(cfg), seed)
    for m in also:  # what trains in full besides (embeddings, output layers, norms)
        m.requires_grad_(True)
    if not any(p.requires_grad for p in model.parameters()):
        raise ConfigError(f"model.trainable: {choice.name!r} leaves no parameter of this model to "
                          f"train; use model.trainable = \"all\" or \"lora\"")
    return model


def count_trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@torch.no_grad()
def merged(model: nn.Module) -> nn.Module:
    """``model`` itself if it has no adapter; else a copy in which every adapted layer (fedrun's or
    peft's) is a plain Conv2d / Linear with weight W + (alpha / r) * up @ down (the base's shape
    and memory format) and the base's bias: the same function, at the base model's cost."""
    if not any(isinstance(m, LORA_LAYERS) for m in model.modules()) and not _peft_layers(model):
        return model
    out = copy.deepcopy(model)
    for name, m in _peft_layers(out):
        base = m.get_base_layer()
        down, up = m.lora_A["default"].weight, m.lora_B["default"].weight
        rank = down.shape[0]
        delta = m.scaling["default"] * (up.reshape(up.shape[0], rank) @ down.reshape(rank, -1))
        weight = base.weight.detach().clone()  # keeps the base's memory format (channels_last)
        weight.add_(delta.reshape(weight.shape).to(weight.dtype))
        base.weight = nn.Parameter(weight, requires_grad=False)
        base.train(m.training)
        _replace(out, name, base)
    for name, m in list(out.named_modules()):
        if isinstance(m, LoRAConv2d):
            plain: nn.Module = nn.Conv2d(m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding,
                                         m.dilation, m.groups, m.bias is not None, m.padding_mode,
                                         device="meta")
        elif isinstance(m, LoRALinear):
            plain = nn.Linear(m.in_features, m.out_features, m.bias is not None, device="meta")
        else:
            continue
        weight = m.weight.detach().clone()  # keeps the base's memory format (channels_last)
        weight.add_(m.delta().to(weight.dtype))
        plain.weight = nn.Parameter(weight, requires_grad=False)
        plain.bias = None if m.bias is None else nn.Parameter(m.bias.detach().clone(), requires_grad=False)
        plain.train(m.training)
        _replace(out, name, plain)
    return out
