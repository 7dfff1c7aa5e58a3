"""Start from a pretrained model: ``model.init_from`` = a fedrun checkpoint file, a run directory, or
a diffusers model folder.

``read_init(cfg, num_classes)`` runs before any process group: it finds the checkpoint (a run
directory's newest valid one, by ``fedrun.saved_run.read_checkpoint``'s rules: a checkpoint cut
short is skipped with a warning), checks that its weights fit the model the config builds (a
CPU copy built by ``fedrun.models.build``: the first differing layer with both shapes, or the
missing keys, in one line), loads them by ``saved_run.load_weights``'s rules (its EMA where it
has one of the model's size, as ``fedrun eval`` scores it) and computes the SHA-256 of what was
loaded. ``apply_init(model, init)`` copies those weights into the freshly built training model,
right after ``fedrun.models.build``, in both run modes.

A diffusers model folder (``save_pretrained``'s config.json and safetensors weights, or a pipeline
folder with them in ``unet/``, such as ``fedrun export`` writes) is loaded by
``UNet2DModel.from_pretrained`` into ``model.arch = "diffusers"`` (fedrun.diffusers_model.
pretrained_state: the same checks, plus the config keys that change the function without changing
a shape); where a network exists a Hub name (``google/ddpm-cifar10-32``) takes the same path.

The checksum is part of the run's identity (``init_identity``): the checkpointer stores it in every
checkpoint and refuses to resume from a checkpoint of a run that started from another init
(``--checkpoint.resume force`` overrides). The path is not: moving the file changes nothing.
A core module: it imports no sub-package.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .config import Config
from .dist import launch_rank
from .errors import CheckpointError
from .models import build
from .saved_run import load_weights, mismatch, read_checkpoint

KEY = "model.init_from"


@dataclass(frozen=True)
class Init:
    """The weights a run starts from (CPU), where they came from and their checksum."""

    path: Path  # the checkpoint file read
    round: int  # the round it was written after
    weights: str  # "ema" or "model": which of its weights these are; "diffusers": a diffusers model
    state: dict[str, torch.Tensor]  # the model's state dict holding them
    sha256: str  # of ``state`` (see ``state_sha256``)


def state_sha256(state: dict[str, torch.Tensor]) -> str:
    """SHA-256 over every entry of a state dict, in order: name, dtype, shape and the bytes of its
    contiguous values (the memory layout, e.g. channels_last, does not count)."""
    h = hashlib.sha256()
    for name, t in state.items():
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _config_differences(cfg: Config, saved: object) -> str:
    """The model-shaping settings in which the checkpoint's config differs from ``cfg``."""
    if not isinstance(saved, dict):
        return ""
    ours = cfg.to_dict()
    # how a run fine-tunes, not what it is
    how = ("init_from", "trainable", "lora_rank", "lora_alpha", "lora_target_modules")
    keys = [("model", k) for k in ours["model"] if k not in how] + [("data", "channels")]
    diff = [f"{s}.{k} = {saved[s][k]!r} there, {ours[s][k]!r} here" for s, k in keys
            if isinstance(saved.get(s), dict) and k in saved[s] and saved[s][k] != ours[s][k]]
    return f" (its config differs in {'; '.join(diff)})" if diff else ""


def read_init(cfg: Config, num_classes: int) -> Init | None:
    """The weights of ``model.init_from`` for the model ``cfg`` builds, checked; None when unset.
    Raises CheckpointError (one line naming the key and the fix) for a missing path, a corrupt
    file, a run without a usable checkpoint, a checkpoint of another architecture, or one trained
    at another data.image_size."""
    source = cfg.model.init_from
    if not source:
        return None
    path = Path(source)
    if _diffusers_source(cfg, path):
        return _read_diffusers(cfg, num_classes, source)
    if path.is_dir():
        state, file = read_checkpoint(path, key=KEY)
    elif path.is_file():
        state, file = read_checkpoint(path.parent, path, key=KEY)
    else:
        raise CheckpointError(f"{KEY}: no checkpoint file or run directory at {path}; pass a run "
                              f"directory (runs/<name>, its newest valid checkpoint) or one of its "
                              f"checkpoints/round_XXXX.pt, or train the public model first "
                              f"(docs/privacy.md \"Privacy in practice\")")
    # a CPU model of this config, built as training builds it, without touching the global RNG
    with torch.random.fork_rng(devices=[]):
        model, _ = build(cfg, num_classes, torch.device("cpu"))
    why = mismatch(model, state.get("model"))
    if why is not None:
        raise CheckpointError(f"{KEY}: {file} does not fit this model: {why}"
                              f"{_config_differences(cfg, state.get('config'))}; use the same model.* "
                              f"settings (and data.channels) as the run that wrote it (its config.toml)")
    saved = state.get("config") if isinstance(state.get("config"), dict) else {}
    size, ours = (saved.get("data") or {}).get("image_size"), cfg.data.image_size
    if size is not None and size != ours:  # the U-Net's weights fit any size: they would load silently
        raise CheckpointError(f"{KEY}: {file} was trained on {size}x{size} images (its data.image_size), "
                              f"this run trains on {ours}x{ours}: its weights would load but know "
                              f"another scale; pretrain with data.image_size = {ours} (an image folder is "
                              f"resized to it), or train this run at {size}")
    weights = load_weights(model, state, file)
    loaded = {k: v.detach().clone() for k, v in model.state_dict().items()}
    init = Init(file, int(state.get("round", 0)), weights, loaded, state_sha256(loaded))
    if launch_rank() == 0:
        print(f"fedrun: {KEY}: starting from {file} (round {init.round}, {weights} weights, "
              f"SHA-256 {init.sha256[:16]})", flush=True)
    return init


def _diffusers_source(cfg: Config, path: Path) -> bool:
    """Is ``model.init_from`` a diffusers model: a folder with a UNet2DModel's config.json (here or
    in unet/), or, for the diffusers arch, a name that is no local path (a Hub name)?"""
    if path.is_dir() and not (path / "config.toml").is_file() and not (path / "checkpoints").is_dir():
        return (path / "config.json").is_file() or (path / "unet" / "config.json").is_file()
    return cfg.model.arch == "diffusers" and not path.exists() and str(path).count("/") == 1 \
        and not str(path).startswith((".", "/", "~"))


def _read_diffusers(cfg: Config, num_classes: int, source: str) -> Init:
    from .diffusers_model import pretrained_state
    with torch.random.fork_rng(devices=[]):
        model, _ = build(cfg, num_classes, torch.device("cpu"))
    state, where, note = pretrained_state(model, source)
    model.load_state_dict(state)
    loaded = {k: v.detach().clone() for k, v in model.state_dict().items()}
    init = Init(Path(where), 0, "diffusers", loaded, state_sha256(loaded))
    if launch_rank() == 0:
        print(f"fedrun: {KEY}: starting from the diffusers model {where} (SHA-256 {init.sha256[:16]}){note}",
              flush=True)
    return init


@torch.no_grad()
def apply_init(model: nn.Module, init: Init | None) -> None:
    """Copy the init's weights into ``model`` (any device, any memory layout); no-op for None."""
    if init is not None:
        model.load_state_dict(init.state)


def init_identity(init: Init | None) -> dict[str, str]:
    """The run-identity entry of the init, for the checkpointer: empty without an init, so that
    runs without model.init_from write and compare exactly what they did before."""
    return {} if init is None else {KEY: f"an init of SHA-256 {init.sha256[:16]}"}
