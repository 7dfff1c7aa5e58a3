"""The denoiser: the authors' residual U-Net, with width, depth, dropout and attention as knobs,
or another architecture registered in ``MODEL_ARCHS`` (``model.arch``).

Shape of the default (base 64, multipliers 1/2/4/8, 32x32): two residual blocks per level on the
way down and up, four at the 4x4 bottleneck, average-pool down, nearest-neighbour up, skips
concatenated, ReLU, Dropout2d, no normalisation, no attention. The noise level enters as Fourier
features of log-SNR and the class as a learned embedding, both tiled as extra input planes.
About 23.2M parameters.

``model.arch`` picks the architecture (fedrun.registry): "unet" is this module's U-Net, whose
keys are the model section's own fields; "diffusers" (a diffusers ``UNet2DModel``,
fedrun/diffusers_model.py) registers itself with keys of its own. Every architecture is a module
``Arch(model_cfg, image_channels, num_classes)`` with ``forward(x, log_snr, labels)``, a
``null_class`` attribute (the label id of "no label", or None) and the ``embeddings`` /
``output_layers`` that ``fedrun.adapters.Adaptable`` describes.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from . import seeding
from .config import HASHED_WHEN_SET, Config, ModelConfig
from .diffusion import Diffusion
from .registry import Registry

MODEL_ARCHS = Registry(
    "model.arch", "unet", "The denoiser (fedrun/models.py): \"unet\" (fedrun's residual U-Net, the authors'; "
    "its keys are model.base_channels ... model.class_embed_dim) | \"diffusers\" (a diffusers UNet2DModel, "
    "fedrun/diffusers_model.py: model.block_out_channels, model.down_block_types, ...; needs "
    "`pip install 'fedrun[diffusers]'`). Both read model.dropout, model.label_dropout, model.class_embed_dim "
    "(0 = unconditional) and model.init_from.", hashed=HASHED_WHEN_SET, off=False)


class ResBlock(nn.Module):
    """conv3x3 -> dropout -> ReLU -> conv3x3 -> dropout -> ReLU, plus a (1x1 if needed) skip."""

    def __init__(self, c_in: int, c_mid: int, c_out: int, dropout: float, last: bool = False):
        super().__init__()
        self.main = nn.Sequential(
            nn.Conv2d(c_in, c_mid, 3, padding=1),
            nn.Dropout2d(dropout),
            nn.ReLU(),
            nn.Conv2d(c_mid, c_out, 3, padding=1),
            # the network's output layer gets no dropout and no ReLU-after-dropout
            nn.Identity() if last else nn.Dropout2d(dropout),
            nn.ReLU(),
        )
        self.skip = nn.Identity() if c_in == c_out else nn.Conv2d(c_in, c_out, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x) + self.skip(x)


class SelfAttention2d(nn.Module):
    """Optional multi-head self-attention over pixels (not in the authors' model)."""

    def __init__(self, channels: int, head_dim: int = 64):
        super().__init__()
        self.heads = max(1, channels // head_dim)
        self.norm = nn.GroupNorm(1, channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).view(b, 3, self.heads, c // self.heads, h * w).unbind(1)
        y = nn.functional.scaled_dot_product_attention(q.transpose(-1, -2), k.transpose(-1, -2),
                                                       v.transpose(-1, -2))
        return x + self.out(y.transpose(-1, -2).reshape(b, c, h, w))


class FourierFeatures(nn.Module):
    """Random Fourier features of a scalar (log-SNR, roughly in [-10, 10]); trainable."""

    def __init__(self, out_features: int, std: float):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_features // 2, 1) * std)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        f = 2 * math.pi * t[:, None] @ self.weight.T
        return torch.cat([f.cos(), f.sin()], dim=-1)


@MODEL_ARCHS.register("unet")
class UNet(nn.Module):
    """fedrun's residual U-Net (the authors'): ReLU, no norms, noise level and class as input planes."""

    def __init__(self, cfg: ModelConfig, image_channels: int, num_classes: int):
        super().__init__()
        widths = [cfg.base_channels * m for m in cfg.channel_mults]
        n, p, att = cfg.blocks_per_level, cfg.dropout, set(cfg.attention_levels)
        self.noise_embed = FourierFeatures(cfg.fourier_features, std=0.2)
        # with label dropout (classifier-free guidance) one more row: the null class, id num_classes
        self.null_class = num_classes if cfg.label_dropout > 0 else None
        rows = num_classes + (self.null_class is not None)
        self.class_embed = nn.Embedding(rows, cfg.class_embed_dim) if cfg.class_embed_dim else None
        c_in = image_channels + cfg.fourier_features + cfg.class_embed_dim

        def stage(channels: list[tuple[int, int, int]], level: int, last: bool = False) -> nn.Sequential:
            layers: list[nn.Module] = []
            for i, (a, b, c) in enumerate(channels):
                layers.append(ResBlock(a, b, c, p, last=last and i == len(channels) - 1))
                if level in att:
                    layers.append(SelfAttention2d(c))
            return nn.Sequential(*layers)

        # Encoder level i: widths[i-1] -> widths[i], then (n - 1) blocks at widths[i].
        self.down = nn.ModuleList()
        prev = c_in
        for i, w in enumerate(widths[:-1]):
            self.down.append(stage([(prev, w, w)] + [(w, w, w)] * (n - 1), i))
            prev = w
        # Bottleneck: widths[-2] -> widths[-1] ... -> widths[-2], cfg.mid_blocks blocks in all.
        w = widths[-1]
        mid = [(prev, w, w)] + [(w, w, w)] * (cfg.mid_blocks - 2) + [(w, w, prev)]
        self.mid = stage(mid, len(widths) - 1)
        # Decoder level i takes [upsampled, skip] = 2 * widths[i] channels and ends at
        # widths[i-1] (or the image channels at level 0).
        self.up = nn.ModuleList()
        for i in reversed(range(len(widths) - 1)):
            w = widths[i]
            c_out = widths[i - 1] if i > 0 else image_channels
            self.up.append(stage([(2 * w, w, w)] + [(w, w, w)] * (n - 2) + [(w, w, c_out)], i, last=i == 0)
                           if n >= 2 else stage([(2 * w, w, c_out)], i, last=i == 0))
        self.pool = nn.AvgPool2d(2)
        self.upsample = nn.Upsample(scale_factor=2, mode="nearest")

    def embeddings(self) -> list[nn.Module]:
        """The conditioning's embeddings (noise level, class): they train under every
        ``model.trainable`` (fedrun.adapters.Adaptable)."""
        return [self.noise_embed] + ([self.class_embed] if self.class_embed is not None else [])

    def output_layers(self) -> list[nn.Module]:
        """The convolutions that produce the image's channels (the last residual block's second
        convolution and its skip): too narrow for a low-rank adapter, they train in full under LoRA."""
        block = [m for m in self.up[-1] if isinstance(m, ResBlock)][-1]
        return [m for m in (block.main[3], block.skip) if isinstance(m, nn.Conv2d)]

    def forward(self, x: torch.Tensor, log_snr: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        planes = [x, self.noise_embed(log_snr.float()).to(x.dtype)[:, :, None, None].expand(b, -1, h, w)]
        if self.class_embed is not None:
            planes.append(self.class_embed(labels).to(x.dtype)[:, :, None, None].expand(b, -1, h, w))
        h_ = torch.cat(planes, dim=1)
        skips = []
        for i, stage in enumerate(self.down):
            h_ = stage(h_ if i == 0 else self.pool(h_))
            skips.append(h_)
        h_ = self.upsample(self.mid(self.pool(h_)))
        for j, stage in enumerate(self.up):
            h_ = stage(torch.cat([h_, skips.pop()], dim=1))
            if j < len(self.up) - 1:
                h_ = self.upsample(h_)
        return h_


def build_model(cfg: ModelConfig, image_channels: int, num_classes: int) -> nn.Module:
    """The denoiser ``model.arch`` names, freshly initialised from the global RNG."""
    return MODEL_ARCHS.selected(cfg).target(cfg, image_channels, num_classes)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def build(cfg: Config, num_classes: int, device: torch.device) -> tuple[nn.Module, Diffusion]:
    """The model and its diffusion as training, evaluation and benchmarks all use them: seeded
    init (the same weights on every rank), on ``device``, in ``train.channels_last`` layout. A
    model that feeds its network something other than log-SNR (the diffusers arch: a timestep)
    learns the schedule here (its ``use_schedule``)."""
    torch.manual_seed(seeding.derive_seed(seeding.INIT, cfg.run.seed))
    model = build_model(cfg.model, cfg.data.channels, num_classes).to(device)
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    diffusion = Diffusion(cfg.diffusion, null_class=model.null_class)
    use_schedule = getattr(model, "use_schedule", None)
    if use_schedule is not None:
        use_schedule(diffusion)
    return model, diffusion
