"""A diffusers ``UNet2DModel`` as fedrun's denoiser (``model.arch = "diffusers"``), and starting
from a diffusers model folder (``model.init_from``).

The arch registers itself in ``fedrun.models.MODEL_ARCHS`` with its keys, which are the
``UNet2DModel`` config's own names in the model section (``model.block_out_channels``,
``model.down_block_types``, ...); their defaults are Ho et al.'s CIFAR-10 DDPM (35.7M
parameters, the architecture of the public ``google/ddpm-cifar10-32``), so that starting from
that checkpoint needs only ``model.arch`` and ``model.init_from``. It also reads fedrun's
``model.dropout`` (in every resnet block), ``model.label_dropout`` (one more class row, the null
class, for classifier-free guidance) and ``model.class_embed_dim`` (0 = unconditional; any
other value: class-conditional through the UNet's class embedding, whose width is the time
embedding's). The native U-Net's other keys are not read. ``data.channels`` sets the UNet's in
and out channels; everything else of the UNet2DModel config is diffusers' default (SiLU,
positional timestep embedding, conv down/upsampling, ``resnet_time_scale_shift = "default"``).

**The noise level.** fedrun's diffusion feeds every denoiser log-SNR; a UNet2DModel takes a
diffusers timestep, which this wrapper computes from it (``timestep_of``):

* objective "v" (the continuous schedule alpha^2 = exp(-1e-4 - 10 t^2), t in [0, 1]):
  timestep = T t - 1 with t = sqrt((softplus(-log_snr) - 1e-4) / 10) and T =
  ``diffusion.timesteps`` (1000), so that the discrete step k of a diffusers scheduler whose
  ``alphas_cumprod[k]`` is alpha^2((k + 1) / T) (fedrun export writes that scheduler) is the
  noise level the network learned as k; t = 0 (clean) is -1, t = 1 is T - 1. Continuous in
  training, an integer on every level of a sampler whose step count divides T.
* objective "eps" (discrete linear betas, fedrun's and DDPM's): timestep = k, the index of
  log_snr in the discrete table (``alphas_cumprod[k]`` after k + 1 forward steps, diffusers'
  ``DDPMScheduler`` convention, so a public DDPM's weights see the timesteps they were trained
  on); exact on the table, interpolated linearly between its entries.

The output is what fedrun's objective asks (v or eps): the UNet is trained on fedrun's loss.

**Per-sample gradients (DP-SGD).** Every trainable layer of a UNet2DModel is a Conv2d, Linear,
GroupNorm or Embedding, each used once per forward pass, so Opacus' own grad samplers cover it
(Conv2d through fedrun's layout-safe one, fedrun/privacy/dp_sgd.py); the checks against autograd
on single images are in tests/unit_tests/test_diffusers_model.py.

diffusers itself is imported only when a diffusers model is built or loaded: the default install
has no diffusers (``pip install 'fedrun[diffusers]'``).
"""

from __future__ import annotations

import importlib.util
import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .config import HASHED_WHEN_SET, Config, ModelConfig, setting
from .errors import CheckpointError, ConfigError
from .models import MODEL_ARCHS
from .registry import Settings

INSTALL = "pip install 'fedrun[diffusers]'"
DOWN_BLOCKS = ("DownBlock2D", "AttnDownBlock2D", "ResnetDownsampleBlock2D")
UP_BLOCKS = ("UpBlock2D", "AttnUpBlock2D", "ResnetUpsampleBlock2D")
ATTENTION_BLOCKS = ("AttnDownBlock2D", "AttnUpBlock2D")


def require_diffusers() -> None:
    """ConfigError (one line) when the diffusers package is missing."""
    if importlib.util.find_spec("diffusers") is None:
        raise ConfigError(f"model.arch: \"diffusers\" needs the diffusers package, which is not installed; "
                          f"{INSTALL}, or set model.arch = \"unet\"")


@dataclass
class DiffusersSettings(Settings):
    block_out_channels: list[int] = setting(factory=lambda: [128, 256, 256, 256], hashed=HASHED_WHEN_SET)
    """diffusers arch: the UNet2DModel's width per level (one level per entry; the image is halved
    between levels)."""
    layers_per_block: int = setting(2, hashed=HASHED_WHEN_SET)
    """diffusers arch: resnet blocks per level on the way down (the way up has one more)."""
    down_block_types: list[str] = setting(
        factory=lambda: ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"],
        hashed=HASHED_WHEN_SET)
    """diffusers arch: one per level, DownBlock2D | AttnDownBlock2D (with self-attention) |
    ResnetDownsampleBlock2D."""
    up_block_types: list[str] = setting(
        factory=lambda: ["UpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D"], hashed=HASHED_WHEN_SET)
    """diffusers arch: one per level, lowest resolution first, UpBlock2D | AttnUpBlock2D |
    ResnetUpsampleBlock2D."""
    mid_attention: bool = setting(True, hashed=HASHED_WHEN_SET)
    """diffusers arch: self-attention in the middle block (UNet2DModel's add_attention)."""
    norm_num_groups: int = setting(32, hashed=HASHED_WHEN_SET)
    """diffusers arch: GroupNorm groups (must divide every width)."""
    norm_eps: float = setting(1e-6, hashed=HASHED_WHEN_SET)
    """diffusers arch: GroupNorm epsilon (diffusers' default is 1e-5; Ho et al.'s DDPM 1e-6)."""
    attention_head_dim: int = setting(0, hashed=HASHED_WHEN_SET)
    """diffusers arch: channels per attention head; 0 = one head over all channels (Ho et al.)."""
    flip_sin_to_cos: bool = setting(False, hashed=HASHED_WHEN_SET)
    """diffusers arch: timestep embedding as [cos, sin] (true, diffusers' default) or [sin, cos]
    (false, Ho et al.'s DDPM)."""
    freq_shift: int = setting(1, hashed=HASHED_WHEN_SET)
    """diffusers arch: the timestep embedding's frequency shift (diffusers' default 0, Ho et al. 1)."""
    downsample_padding: int = setting(0, hashed=HASHED_WHEN_SET)
    """diffusers arch: padding of the stride-2 downsampling convolutions (diffusers' default 1, Ho
    et al. 0)."""

    def validate(self) -> None:
        if not self.block_out_channels or min(self.block_out_channels) < 1:
            raise ConfigError(f"model.block_out_channels: needs one width >= 1 per level, e.g. [32, 64, 64], "
                              f"got {self.block_out_channels}")
        if self.layers_per_block < 1:
            raise ConfigError(f"model.layers_per_block: must be >= 1, got {self.layers_per_block}")
        if self.norm_num_groups < 1:
            raise ConfigError(f"model.norm_num_groups: must be >= 1, got {self.norm_num_groups}")
        if not self.norm_eps > 0:
            raise ConfigError(f"model.norm_eps: must be > 0, got {self.norm_eps}")
        if self.attention_head_dim < 0:
            raise ConfigError(f"model.attention_head_dim: must be >= 0 (0 = one head), got "
                              f"{self.attention_head_dim}")
        if self.freq_shift < 0:
            raise ConfigError(f"model.freq_shift: must be >= 0, got {self.freq_shift}")
        if self.downsample_padding not in (0, 1):
            raise ConfigError(f"model.downsample_padding: must be 0 or 1, got {self.downsample_padding}")


def unet_config(s: DiffusersSettings, model: ModelConfig, image_channels: int, class_rows: int | None,
                sample_size: int | None = None) -> dict[str, Any]:
    """The UNet2DModel config of these settings (``class_rows``: rows of the class embedding, or
    None for an unconditional model)."""
    return dict(
        sample_size=sample_size, in_channels=image_channels, out_channels=image_channels,
        block_out_channels=tuple(s.block_out_channels), layers_per_block=s.layers_per_block,
        down_block_types=tuple(s.down_block_types), up_block_types=tuple(s.up_block_types),
        add_attention=s.mid_attention, norm_num_groups=s.norm_num_groups, norm_eps=s.norm_eps,
        attention_head_dim=s.attention_head_dim or None, flip_sin_to_cos=s.flip_sin_to_cos,
        freq_shift=s.freq_shift, downsample_padding=s.downsample_padding, dropout=model.dropout,
        num_class_embeds=class_rows)


def continuous_timestep(log_snr: torch.Tensor, timesteps: int) -> torch.Tensor:
    """Objective "v": T t - 1 where t in [0, 1] has log_snr under fedrun's continuous schedule
    (computed in float64 from ``log_snr``; float32 out)."""
    lam = log_snr.detach().double()
    t = ((nn.functional.softplus(-lam) - 1e-4).clamp(min=0) / 10).sqrt()
    return (timesteps * t - 1).float()


def discrete_timestep(log_snr: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Objective "eps": the index k of ``log_snr`` in the decreasing ``table`` (exact on its
    entries, linear in between, clamped to [0, T - 1])."""
    asc = table.to(log_snr.device, torch.float32).flip(0)
    lam = log_snr.detach().float().reshape(-1).contiguous()
    j = torch.searchsorted(asc, lam).clamp(1, len(asc) - 1)  # asc[j - 1] < lam <= asc[j]
    lo, hi = asc[j - 1], asc[j]
    frac = ((lam - lo) / (hi - lo)).clamp(0, 1)
    return ((len(asc) - 1) - (j - 1 + frac)).reshape(log_snr.shape)


@MODEL_ARCHS.register("diffusers", DiffusersSettings)
class DiffusersUNet(nn.Module):
    """A diffusers UNet2DModel (fedrun/diffusers_model.py): GroupNorm, SiLU, attention, class embedding."""

    def __init__(self, cfg: ModelConfig, image_channels: int, num_classes: int):
        super().__init__()
        require_diffusers()
        from diffusers import UNet2DModel
        settings = MODEL_ARCHS.settings(cfg, "diffusers")
        # with label dropout (classifier-free guidance) one more row: the null class, id num_classes
        self.null_class = num_classes if cfg.label_dropout > 0 else None
        rows = num_classes + (self.null_class is not None) if cfg.class_embed_dim else None
        self.unet = UNet2DModel(**unet_config(settings, cfg, image_channels, rows))
        self.objective, self.timesteps = "v", 1000  # the config's defaults until use_schedule
        # objective "eps": the discrete log-SNRs, one copy per device they were needed on (not a
        # buffer: not a weight, and not in the state dict or the flat vector)
        self.tables: dict[torch.device, torch.Tensor] = {}

    def use_schedule(self, diffusion: Any) -> None:
        """Take the noise schedule of ``diffusion`` (a fedrun.diffusion.Diffusion) for ``timestep_of``."""
        self.objective, self.timesteps = diffusion.objective, diffusion.cfg.timesteps
        table = diffusion.discrete_log_snr if diffusion.objective == "eps" else None
        self.tables = {table.device: table} if table is not None else {}

    def timestep_of(self, log_snr: torch.Tensor) -> torch.Tensor:
        """The diffusers timestep of each log-SNR (module docstring)."""
        if self.objective == "v":
            return continuous_timestep(log_snr, self.timesteps)
        assert self.tables, "objective eps: build the model with fedrun.models.build"
        table = self.tables.get(log_snr.device)
        if table is None:  # moved once per device, not once per forward pass
            table = self.tables[log_snr.device] = next(iter(self.tables.values())).to(log_snr.device)
        return discrete_timestep(log_snr, table)

    def embeddings(self) -> list[nn.Module]:
        """The class embedding (it trains under every ``model.trainable``; the time embedding is an
        MLP of Linear layers, adapted like the rest under LoRA)."""
        return [self.unet.class_embedding] if self.unet.class_embedding is not None else []

    def output_layers(self) -> list[nn.Module]:
        """conv_out, which produces the image's channels (trained in full under LoRA)."""
        return [self.unet.conv_out]

    def forward(self, x: torch.Tensor, log_snr: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        t = self.timestep_of(log_snr.expand(len(x)))
        y = labels if self.unet.class_embedding is not None else None
        return self.unet(x, t, class_labels=y, return_dict=False)[0]

    @classmethod
    def check(cls, cfg: Config) -> None:
        """The UNet2DModel these keys describe can be built for this data (one line naming the key)."""
        require_diffusers()
        if cfg.train.clients_at_once > 1:
            raise ConfigError("train.clients_at_once: the experimental grouped trainer draws Dropout2d masks "
                              "and vmaps fedrun's U-Net only; set train.clients_at_once = 1 with model.arch "
                              "= \"diffusers\"")
        s: DiffusersSettings = MODEL_ARCHS.settings(cfg, "diffusers")
        levels = len(s.block_out_channels)
        for key, types, known in (("down_block_types", s.down_block_types, DOWN_BLOCKS),
                                  ("up_block_types", s.up_block_types, UP_BLOCKS)):
            if len(types) != levels:
                raise ConfigError(f"model.{key}: {len(types)} block(s) for the {levels} levels of "
                                  f"model.block_out_channels; give one per level, e.g. "
                                  f"{list(known[:1]) * levels}")
            for i, name in enumerate(types):
                if name not in known:
                    raise ConfigError(f"model.{key}[{i}]: {name!r} is no block fedrun's diffusers arch "
                                      f"builds; choose one of {', '.join(known)}")
        for c in s.block_out_channels:
            if c % s.norm_num_groups:
                raise ConfigError(f"model.norm_num_groups: {s.norm_num_groups} groups do not divide the "
                                  f"width {c} of model.block_out_channels; use a divisor of every width")
        widths = [c for c, name in zip(s.block_out_channels, s.down_block_types, strict=True)
                  if name in ATTENTION_BLOCKS]
        widths += [c for c, name in zip(reversed(s.block_out_channels), s.up_block_types, strict=True)
                   if name in ATTENTION_BLOCKS]
        widths += [s.block_out_channels[-1]] if s.mid_attention else []
        bad = [c for c in widths if s.attention_head_dim and c % s.attention_head_dim]
        if bad:
            raise ConfigError(f"model.attention_head_dim: {s.attention_head_dim} does not divide the width "
                              f"{bad[0]} of an attention block; use a divisor, or 0 for one head")
        halvings = 2 ** (levels - 1)
        if cfg.data.image_size % halvings:
            raise ConfigError(f"data.image_size: {cfg.data.image_size} cannot be halved {levels - 1} times "
                              f"by the UNet2DModel (model.block_out_channels has {levels} levels); use a "
                              f"multiple of {halvings} or fewer levels")


# --------------------------------------------------------------------------------------------
# model.init_from: a diffusers model folder

# UNet2DModel config keys -> the fedrun key that sets them ("" = fixed in fedrun's diffusers arch)
CONFIG_KEYS = {
    "in_channels": "data.channels", "out_channels": "data.channels",
    "block_out_channels": "model.block_out_channels", "layers_per_block": "model.layers_per_block",
    "down_block_types": "model.down_block_types", "up_block_types": "model.up_block_types",
    "add_attention": "model.mid_attention", "norm_num_groups": "model.norm_num_groups",
    "norm_eps": "model.norm_eps", "attention_head_dim": "model.attention_head_dim",
    "flip_sin_to_cos": "model.flip_sin_to_cos", "freq_shift": "model.freq_shift",
    "downsample_padding": "model.downsample_padding",
    "center_input_sample": "", "time_embedding_type": "", "time_embedding_dim": "", "mid_block_type": "",
    "mid_block_scale_factor": "", "downsample_type": "", "upsample_type": "", "act_fn": "",
    "attn_norm_num_groups": "", "resnet_time_scale_shift": "", "class_embed_type": "",
}


def model_folder(path: Path) -> Path | None:
    """The folder of a diffusers UNet2DModel at ``path``: ``path`` itself (a ``save_pretrained``
    folder: config.json and its weights) or its ``unet/`` (a pipeline folder); None if neither."""
    for folder in (path, path / "unet"):
        config = folder / "config.json"
        if config.is_file():
            try:
                name = json.loads(config.read_text()).get("_class_name")
            except (OSError, ValueError):
                continue
            if name == "UNet2DModel":
                return folder
    return None


def _toml(value: Any) -> str:
    """A config.json value as fedrun's TOML writes it (None, a head width of "all channels": 0)."""
    if value is None:
        return "0"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return json.dumps(value) if isinstance(value, str) else repr(value)


def _load_unet(source: str) -> tuple[Any, str]:
    """UNet2DModel.from_pretrained of a local folder (or, where a network exists, a Hub name)."""
    require_diffusers()
    from diffusers import UNet2DModel
    path = Path(source)
    folder = model_folder(path) if path.is_dir() else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if folder is not None:
            try:
                return UNet2DModel.from_pretrained(folder, local_files_only=True), str(folder)
            except (OSError, ValueError, RuntimeError) as exc:
                raise CheckpointError(f"model.init_from: {folder} holds no loadable UNet2DModel ("
                                      f"{str(exc).splitlines()[0]}); pass a folder written by "
                                      f"save_pretrained (config.json and diffusion_pytorch_model.safetensors)"
                                      ) from None
        if path.exists():
            raise CheckpointError(f"model.init_from: {path} is neither a fedrun run or checkpoint nor a "
                                  f"diffusers model folder (config.json of a UNet2DModel, here or in unet/); "
                                  f"pass one")
        errors = []
        for sub in (None, "unet"):  # a Hub name: the model's repository, or a pipeline's unet/
            try:
                return UNet2DModel.from_pretrained(source, subfolder=sub), source
            except Exception as exc:  # noqa: BLE001  (hub, network and format errors alike)
                errors.append(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        raise CheckpointError(f"model.init_from: {source} is no local path, and loading it from the Hugging "
                              f"Face Hub failed ({errors[0]}); pass a save_pretrained folder on disk")


def pretrained_state(model: nn.Module, source: str) -> tuple[dict[str, torch.Tensor], str, str]:
    """The state dict of ``model`` (a DiffusersUNet) with the weights of the diffusers model at
    ``source``, its folder, and a note for the start line. Refused (CheckpointError, one line):
    a layer of another shape (named), a config key that changes the function without changing a
    shape (``flip_sin_to_cos``, ...: named, with the fedrun key to set), a conditional model for
    an unconditional config. A class embedding the pretrained model lacks (an unconditional
    DDPM fine-tuned on labels) starts at zero: the model starts as the pretrained one."""
    from .saved_run import mismatch
    if not isinstance(model, DiffusersUNet):
        folder = model_folder(Path(source))
        raise CheckpointError(f"model.init_from: {folder or source} is a diffusers model folder; set "
                              f"model.arch = \"diffusers\" and its keys as its config.json says "
                              f"(docs/diffusers.md)")
    unet, where = _load_unet(source)
    theirs, ours = dict(unet.config), dict(model.unet.config)
    state = {f"unet.{k}": v for k, v in unet.state_dict().items()}
    note = ""
    mine = model.state_dict()
    if "unet.class_embedding.weight" in mine and "unet.class_embedding.weight" not in state \
            and theirs.get("num_class_embeds") is None:
        state["unet.class_embedding.weight"] = torch.zeros_like(mine["unet.class_embedding.weight"])
        note = "; its class embedding is new here and starts at zero"
    elif "unet.class_embedding.weight" in state and "unet.class_embedding.weight" not in mine:
        rows = theirs.get("num_class_embeds")
        raise CheckpointError(f"model.init_from: {where} is class-conditional ({rows} class rows) and this "
                              f"config builds an unconditional model; set model.class_embed_dim > 0")

    def differs(key: str) -> bool:
        a, b = theirs.get(key), ours.get(key)
        return (list(a) if isinstance(a, (list, tuple)) else a) != \
            (list(b) if isinstance(b, (list, tuple)) else b)

    changed = [k for k in CONFIG_KEYS if differs(k)]
    why = mismatch(model, state)
    if why is not None:
        hint = "; ".join(f"{k} = {_toml(theirs.get(k))} there, {_toml(ours.get(k))} here"
                         for k in changed[:3])
        raise CheckpointError(f"model.init_from: {where} does not fit this model: {why}"
                              f"{f' (its config.json differs in {hint})' if hint else ''}; set the model.* "
                              f"keys as its config.json says (docs/diffusers.md)")
    for key in changed:
        fix = (f"set {CONFIG_KEYS[key]} = {_toml(theirs.get(key))}" if CONFIG_KEYS[key] else
               "fedrun's diffusers arch builds only the value here; fine-tune it with diffusers' own scripts")
        raise CheckpointError(f"model.init_from: {where}/config.json has {key} = {_toml(theirs.get(key))}, "
                              f"this config builds {_toml(ours.get(key))} (same shapes, another function); "
                              f"{fix}")
    return state, where, note
