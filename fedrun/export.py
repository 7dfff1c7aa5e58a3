"""``fedrun export RUN_DIR OUT --format diffusers``: a trained run as a folder that diffusers loads.

The run's newest valid checkpoint (or ``--checkpoint``) is opened as ``fedrun eval`` opens it: the
model of its config.toml, its EMA where it has one (what the run sampled and scored), LoRA
adapters (fedrun's or peft's) merged into their layers. What ``OUT`` holds (written into a
temporary folder beside it, then renamed, so a failed export leaves nothing half-written):

* ``unet/``: the ``UNet2DModel`` (``save_pretrained``: config.json and
  diffusion_pytorch_model.safetensors), with ``sample_size`` = the run's ``data.image_size``;
* ``scheduler/``: a ``DDIMScheduler`` of fedrun's schedule. Objective "v": ``v_prediction``,
  ``trained_betas`` such that ``alphas_cumprod[k]`` = alpha^2((k + 1) / T) of the continuous
  schedule (fedrun.diffusers_model: the network learned timestep k as that level), "trailing"
  spacing, no x0 clipping. With a step count S that divides T, its timesteps are fedrun's
  sampler's levels t = 1 - i / S and its DDIM update with ``eta`` is fedrun's, operation for
  operation; other step counts sample the nearest grid. Objective "eps": the linear betas,
  ``epsilon``, x0 clipped to [-1, 1] as fedrun's sampler clips it, "linspace" spacing (fedrun's
  levels; DDIM steps to t - T // S, so it is fedrun's sampler only at S = T);
* ``pipeline.py`` and ``model_index.json``: fedrun.diffusers_pipeline, a class-conditional
  pipeline that imports only torch and diffusers, with the run's sampling defaults (steps, eta,
  guidance) and the null class of classifier-free guidance;
* ``fedrun.json``: where it came from (run, checkpoint, round, "ema" or "model", the config's
  hash, the SHA-256 of the exported weights) and the schedule in words; ``README.md``: how to sample.

The native U-Net (``model.arch = "unet"``) does not export: its noise level and class enter as
tiled input planes (Fourier features, a class embedding), its blocks have no normalisation and
use ReLU, average pooling and nearest-neighbour upsampling, none of which a ``UNet2DModel``'s
layers compute (it adds a time embedding inside every resnet block, with GroupNorm and SiLU). A
run that should end in diffusers trains ``model.arch = "diffusers"``.
"""

from __future__ import annotations

import copy
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

from .argparsing import ArgParser
from .errors import ConfigError

USAGE = "fedrun export RUN_DIR OUT [--format diffusers] [--checkpoint FILE] [--force]"
FORMATS = ("diffusers",)
PIPELINE_CLASS = "FedrunClassConditionalPipeline"


def parse_args(argv: list[str]) -> tuple[Path, Path, str, Path | None, bool]:
    """(run directory, output folder, format, checkpoint or None, --force) of ``fedrun export``."""
    parser = ArgParser("export", USAGE)
    parser.add_argument("run_dir", metavar="RUN_DIR")
    parser.add_argument("out", metavar="OUT")
    parser.add_argument("--format", default="diffusers", metavar="format name")
    parser.add_argument("--checkpoint", metavar="file name")
    parser.add_argument("--force", action="store_true")
    args = parser.parse_args(argv)
    if args.format not in FORMATS:
        raise ConfigError(f"export: --format {args.format!r} is not one fedrun writes; use --format "
                          f"diffusers")
    checkpoint = Path(args.checkpoint) if args.checkpoint is not None else None
    return Path(args.run_dir), Path(args.out), args.format, checkpoint, args.force


def diffusers_scheduler(diffusion: Any) -> Any:
    """The DDIMScheduler of ``diffusion``'s schedule (module docstring)."""
    import torch
    from diffusers import DDIMScheduler

    from .diffusion import ddpm_log_snr
    T = diffusion.cfg.timesteps
    if diffusion.objective == "v":
        alpha_bar = torch.sigmoid(ddpm_log_snr(torch.arange(1, T + 1, dtype=torch.float64) / T))
        betas = 1 - alpha_bar / torch.cat([torch.ones(1, dtype=torch.float64), alpha_bar[:-1]])
        return DDIMScheduler(num_train_timesteps=T, trained_betas=betas.tolist(),
                             prediction_type="v_prediction", clip_sample=False, set_alpha_to_one=True,
                             steps_offset=0, timestep_spacing="trailing")
    c = diffusion.cfg
    return DDIMScheduler(num_train_timesteps=T, beta_start=c.beta_start, beta_end=c.beta_end,
                         beta_schedule="linear", prediction_type="epsilon", clip_sample=True,
                         clip_sample_range=1.0, set_alpha_to_one=True, steps_offset=0,
                         timestep_spacing="linspace")


def _readme(info: dict[str, Any]) -> str:
    labels = f"list(range({info['classes']}))" if info["classes"] else "None, num_images=8"
    return f"""# A fedrun run, exported for diffusers

From `{info['run']}` (round {info['round']}, {info['weights']} weights). Needs only `torch` and `diffusers`:

```python
import torch
from diffusers import DiffusionPipeline

pipe = DiffusionPipeline.from_pretrained("path/to/this/folder", trust_remote_code=True)
images = pipe(class_labels={labels}, generator=torch.Generator().manual_seed(0)).images
```

`trust_remote_code=True` lets diffusers import `pipeline.py` from this folder (class-conditional
sampling with classifier-free guidance; read it first: it imports only torch and diffusers).
Defaults: {info['steps']} steps, eta {info['eta']}, guidance {info['guidance']}. Or use the parts
directly: `UNet2DModel.from_pretrained("<folder>/unet")` and
`DDIMScheduler.from_pretrained("<folder>/scheduler")`.

The UNet takes diffusers timesteps: {info['timestep']}
"""


def export_diffusers(run_dir: Path, out: Path, checkpoint: Path | None = None,
                     force: bool = False) -> dict[str, Any]:
    """Write ``OUT`` for the run at ``run_dir`` (module docstring); returns what fedrun.json holds."""
    from .diffusers_model import require_diffusers
    from .saved_run import load_run_config, read_checkpoint
    cfg = load_run_config(run_dir)
    if cfg.model.arch != "diffusers":
        raise ConfigError(f"export: {run_dir} trains fedrun's native U-Net (model.arch = "
                          f"\"{cfg.model.arch}\"), whose layers have no diffusers counterpart (noise level "
                          f"and class as input planes, no normalisation, ReLU); train with model.arch = "
                          f"\"diffusers\" to export (docs/diffusers.md)")
    require_diffusers()
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
        raise ConfigError(f"export: {out} exists and is not an empty folder; pass a new OUT, or --force to "
                          f"replace it")
    state, path = read_checkpoint(run_dir, checkpoint)

    import torch

    from .adapters import make_trainable, merged
    from .init_from import state_sha256
    from .models import build
    from .saved_run import load_weights
    saved = state.get("model") if isinstance(state.get("model"), dict) else {}
    embed = saved.get("unet.class_embedding.weight")
    null = cfg.model.label_dropout > 0
    classes = int(embed.shape[0]) - int(null) if isinstance(embed, torch.Tensor) else 0
    model, diffusion = build(cfg, classes or cfg.data.num_classes, torch.device("cpu"))
    make_trainable(model, cfg.model, cfg.run.seed)  # LoRA runs: the adapters their checkpoints hold
    weights = load_weights(model, state, path)
    unet = copy.deepcopy(merged(model).unet).to(memory_format=torch.contiguous_format).eval()
    unet.requires_grad_(False)
    unet.register_to_config(sample_size=cfg.data.image_size)

    from .diffusers_pipeline import FedrunClassConditionalPipeline
    guidance = cfg.diffusion.guidance if null and classes else 0.0
    pipe = FedrunClassConditionalPipeline(unet, diffusers_scheduler(diffusion),
                                          null_class=classes if null and classes else None,
                                          guidance_scale=guidance, eta=cfg.diffusion.eta,
                                          num_inference_steps=cfg.diffusion.sample_steps)
    T = cfg.diffusion.timesteps
    timestep = (f"k = {T} t - 1 for fedrun's continuous t in [0, 1] (alpha^2 = exp(-1e-4 - 10 t^2)); "
                f"alphas_cumprod[k] = alpha^2((k + 1) / {T}); v-prediction"
                if diffusion.objective == "v" else
                f"k = the step of the linear betas {cfg.diffusion.beta_start}..{cfg.diffusion.beta_end} "
                f"(DDPM's); eps-prediction")
    info = {"format": "diffusers", "run": str(run_dir), "checkpoint": str(path),
            "round": int(state.get("round", 0)),
            "weights": weights, "config_hash": cfg.hash(), "sha256": state_sha256(unet.state_dict()),
            "arch": "diffusers", "objective": diffusion.objective, "timesteps": T, "timestep": timestep,
            "classes": classes, "null_class": pipe.config.null_class, "guidance": guidance,
            "steps": cfg.diffusion.sample_steps, "eta": cfg.diffusion.eta,
            "exact_steps": [s for s in range(1, T + 1) if T % s == 0] if diffusion.objective == "v" else [T]}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        pipe.save_pretrained(tmp, safe_serialization=True)
        index = json.loads((tmp / "model_index.json").read_text())
        index["_class_name"] = ["pipeline", PIPELINE_CLASS]  # diffusers imports it from pipeline.py
        (tmp / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
        shutil.copyfile(Path(__file__).with_name("diffusers_pipeline.py"), tmp / "pipeline.py")
        (tmp / "fedrun.json").write_text(json.dumps(info, indent=2) + "\n")
        (tmp / "README.md").write_text(_readme(info))
        if out.exists():
            shutil.rmtree(out) if out.is_dir() else out.unlink()
        tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return info


def export_main(argv: list[str]) -> int:
    run_dir, out, _format, checkpoint, force = parse_args(argv)
    info = export_diffusers(run_dir, out, checkpoint, force)
    print(f"fedrun export: {out} ({info['weights']} weights of round {info['round']}, SHA-256 "
          f"{info['sha256'][:16]}); sample it with diffusers: DiffusionPipeline.from_pretrained("
          f"{str(out)!r}, trust_remote_code=True)")
    return 0
