"""Job configuration: dataclass defaults, TOML files, dotted CLI overrides, validation.

The defaults are the paper authors' settings (CIFAR-10, 32x32, R=300 rounds of E=5 local epochs,
10 clients, Dirichlet alpha 0.5, Adam 2e-4 re-created per client per round, batch 512). A TOML file
only lists what differs; CLI overrides use one convention, ``--section.key value`` (or
``--section.key=value``), and are applied last. Every check runs here, before any process group or
GPU is touched, and every error names the key that is wrong and how to fix it.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
import typing
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

__all__ = ["Config", "ConfigError", "load_config", "parse_overrides", "config_from_dict"]


@dataclass
class RunConfig:
    name: str = "cifar10_fedavg"
    out_dir: str = "runs"  # outputs go to <out_dir>/<name>/
    seed: int = 0
    mode: str = "fedavg"  # "fedavg" | "centralized"
    device: str = "auto"  # "auto" (cuda if available) | "cpu" | "cuda"
    threads: int = 0  # CPU threads per rank; 0 = cores / local ranks


@dataclass
class DataConfig:
    name: str = "cifar10"  # cifar10 | fashion_mnist | svhn | image_folder | digits | synthetic
    root: str = "data"
    download: bool = False
    image_size: int = 32
    channels: int = 3  # grayscale sets: 1, or 3 (repeated) as the authors fed Fashion-MNIST
    hflip: bool = True  # random horizontal flip (authors: CIFAR-10, Fashion-MNIST, CT; not SVHN)
    num_classes: int = 10  # used by "synthetic" only; the others know their classes
    synthetic_size: int = 5000  # images of the "synthetic" set


@dataclass
class ModelConfig:
    base_channels: int = 64
    channel_mults: list[int] = field(default_factory=lambda: [1, 2, 4, 8])
    blocks_per_level: int = 2  # residual blocks per resolution, encoder and decoder each
    mid_blocks: int = 4  # residual blocks at the lowest resolution
    dropout: float = 0.1
    attention_levels: list[int] = field(default_factory=list)  # e.g. [2, 3]; authors: none
    fourier_features: int = 16
    class_embed_dim: int = 4
    label_dropout: float = 0.0  # classifier-free guidance: share of labels replaced by a null class (0 = off)


@dataclass
class DiffusionConfig:
    objective: str = "v"  # "v": continuous DDPM log-SNR (authors) | "eps": discrete betas (paper eqs. 2-3)
    timesteps: int = 1000  # T for objective "eps"
    beta_start: float = 1e-4
    beta_end: float = 0.02
    sample_steps: int = 300
    eta: float = 1.0  # 1 = ancestral (authors), 0 = DDIM
    guidance: float = 0.0  # classifier-free guidance w: (1 + w) cond - w uncond; needs label_dropout


@dataclass
class FedConfig:
    rounds: int = 300
    local_epochs: int = 5
    num_clients: int = 10
    clients_per_round: int = 10
    partition: str = "dirichlet"  # "dirichlet" | "iid"
    alpha: float = 0.5
    min_client_size: int = 0  # resample the Dirichlet draw until every client has this many
    max_resample: int = 100
    server_opt: str = "fedavg"  # "fedavg" | "fedavgm" | "fedadam" | "fedyogi" | "fedadagrad"
    server_lr: float = 1.0  # all but fedavg
    server_momentum: float = 0.9  # fedavgm's momentum; beta1 of fedadam / fedyogi / fedadagrad
    server_beta2: float = 0.99  # second-moment decay of fedadam / fedyogi
    server_tau: float = 1e-3  # adaptivity of fedadam / fedyogi / fedadagrad (added to sqrt(v))
    max_bad_rounds: int = 3  # stop after this many rounds in a row where every client failed
    drift: str = "none"  # client drift correction: "none" | "fedprox" | "scaffold"
    prox_mu: float = 0.01  # FedProx: weight of (mu / 2) ||theta - theta_global||^2
    client_optimizer: str = "reset"  # "reset": fresh Adam per client per round (authors) | "keep"


@dataclass
class OptimConfig:
    lr: float = 2e-4
    batch_size: int = 512
    beta1: float = 0.9
    beta2: float = 0.999
    weight_decay: float = 0.0
    grad_clip: float = 0.0  # 0 = off
    lr_schedule: str = "constant"  # "constant" | "cosine" (over rounds, down to lr * min_lr_ratio)
    min_lr_ratio: float = 0.1  # cosine: the last round's lr / optim.lr


@dataclass
class EMAConfig:
    """Exponential moving average of the global model, updated once per round on the server."""

    sigma_rel: float = 0.0
    """0 = off. Else the power-function EMA of Karras et al. (2024): beta_t = (1 - 1/t)^(gamma + 1)
    at round t, gamma set by this relative width of the averaging profile, in (0, 0.288)."""


@dataclass
class PrivacyConfig:
    """Differential privacy: per image (DP-SGD in every client) or per client (DP-FedAvg)."""

    level: str = "none"
    """"none" | "sample" (DP-SGD with Opacus: the image is the unit) | "client" (DP-FedAvg: the site)"""
    clip: float = 1.0
    """sample: L2 bound of each per-sample gradient; client: L2 bound of each client's update"""
    noise_multiplier: float = 1.0
    """Gaussian noise std divided by the sensitivity (clip)"""
    delta: float = 1e-5
    """the delta of (epsilon, delta)-DP; should be well below 1 / (number of units protected)"""
    target_epsilon: float = 0.0
    """0 = no budget; else a run whose planned epsilon exceeds it is refused before training"""
    accountant: str = "rdp"
    """Opacus accountant: "rdp" (Renyi DP, Mironov 2017) | "prv" (Gopi et al. 2021)"""


@dataclass
class TrainConfig:
    precision: str = "auto"  # "auto" (bf16 on GPU, fp32 on CPU) | "bf16" | "fp16" | "fp32"
    channels_last: bool = True
    compile: bool = False
    clients_at_once: int = 1  # experimental: K clients of a rank at once (fedrun/experimental/multiclient.py)


@dataclass
class CheckpointConfig:
    every: int = 1  # rounds between checkpoints
    keep: int = 3  # newest checkpoints kept on disk
    resume: str = "auto"  # "auto" | "never" | "force" (resume even if the config changed)


@dataclass
class SampleConfig:
    per_class: int = 10  # images per class in samples/final.png
    steps: int = 0  # sampler steps for the grid; 0 = diffusion.sample_steps


@dataclass
class EvalConfig:
    every: int = 0  # rounds between FID/IS evaluations; 0 = only at the end
    enabled: bool = False  # score FID/IS at all (needs Inception weights or the classifier)
    num_samples: int = 0  # 0 = size of the test split (authors)
    steps: int = 300
    eta: float = 1.0
    feature_extractor: str = "inception"  # "inception" | "classifier"
    inception_weights: str = ""  # "" = $FEDRUN_INCEPTION_WEIGHTS, then clean-fid's location
    batch_size: int = 500
    cache_dir: str = ""  # "" = $FEDRUN_CACHE_DIR or ~/.cache/fedrun
    local_models_at: list[int] = field(default_factory=list)  # rounds with per-client grids and scores
    kid: bool = True  # KID against the test split (and per class)
    kid_subsets: int = 100  # KID: random subsets averaged (clean-fid's default)
    kid_subset_size: int = 1000  # KID: vectors per subset, capped by both set sizes (clean-fid's default)
    prdc_k: int = 5  # k of precision/recall/density/coverage against the test split; 0 = off
    per_class: bool = True  # FID/KID of the samples of class c against the test images of class c
    client_samples: int = 0  # per-client scores: samples of each local model at local_models_at; 0 = off


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    fed: FedConfig = field(default_factory=FedConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.run.out_dir) / self.run.name

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_toml(self) -> str:
        return dump_toml(self.to_dict())

    def hash(self) -> str:
        """Hash of everything that changes the trained model.

        Rounds, checkpointing, sampling and evaluation settings are left out: raising
        ``fed.rounds`` to continue a finished run, or changing how often it checkpoints or
        scores, must still resume from its checkpoint.
        """
        d = self.to_dict()
        d["fed"].pop("rounds")
        for section in ("checkpoint", "sample", "eval"):
            d.pop(section)
        for key in ("name", "out_dir", "device", "threads"):
            d["run"].pop(key)
        d["train"].pop("clients_at_once")  # same maths either way (multiclient.py); keeps old hashes valid
        d["diffusion"].pop("guidance")  # a sampling setting: the trained model is the same
        # keys added after runs existed count only when set, so that older run dirs still resume
        defaults = Config().to_dict()
        for key in _HASHED_WHEN_SET:
            section, _, name = key.partition(".")
            if name and d[section][name] == defaults[section][name]:
                d[section].pop(name)
            elif not name and d[section] == defaults[section]:
                d.pop(section)
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


_HINTS = typing.get_type_hints(Config)
_HASHED_WHEN_SET = ("model.label_dropout", "fed.drift", "fed.prox_mu", "fed.client_optimizer",
                    "optim.lr_schedule", "optim.min_lr_ratio", "ema", "privacy")
EMA_SIGMA_REL_MAX = 0.5 / math.sqrt(3)  # the power-function EMA's widest profile (gamma -> 0)

DATASETS = ("cifar10", "fashion_mnist", "svhn", "image_folder", "digits", "synthetic")
CHOICES: dict[str, tuple[str, ...]] = {
    "run.mode": ("fedavg", "centralized"),
    "run.device": ("auto", "cpu", "cuda"),
    "data.name": DATASETS,
    "diffusion.objective": ("v", "eps"),
    "fed.partition": ("dirichlet", "iid"),
    "fed.server_opt": ("fedavg", "fedavgm", "fedadam", "fedyogi", "fedadagrad"),
    "fed.drift": ("none", "fedprox", "scaffold"),
    "fed.client_optimizer": ("reset", "keep"),
    "optim.lr_schedule": ("constant", "cosine"),
    "privacy.level": ("none", "sample", "client"),
    "privacy.accountant": ("rdp", "prv"),
    "train.precision": ("auto", "bf16", "fp16", "fp32"),
    "checkpoint.resume": ("auto", "never", "force"),
    "eval.feature_extractor": ("inception", "classifier"),
}


# --------------------------------------------------------------------------------------------
# Building a Config from TOML text and overrides


def _coerce(key: str, value: Any, hint: Any, from_cli: bool) -> Any:
    """Check/convert one value against its dataclass type; the error names the key.

    CLI values arrive as text and are parsed; TOML values must already have the right type.
    """
    if not from_cli and isinstance(value, str) and hint is not str:
        raise ConfigError(f"{key}: expected {_type_name(hint)}, got the string {value!r}; drop the quotes")
    origin = typing.get_origin(hint)
    if origin in (list, list):
        if isinstance(value, str):  # CLI: "1,2,4" or "[1, 2, 4]"
            text = value.strip().strip("[]")
            value = [v.strip() for v in text.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}; write e.g. {key} = [1, 2]")
        (item,) = typing.get_args(hint)
        return [_coerce(f"{key}[{i}]", v, item, from_cli) for i, v in enumerate(value)]
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "false", "0", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if hint is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if hint is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if hint is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string, got {value!r}; quote it in TOML")
    raise TypeError(f"unsupported config type {hint} for {key}")  # a bug in this file


def _type_name(hint: Any) -> str:
    return {int: "an integer", float: "a number", bool: "true or false"}.get(hint, "a list")


def _section_hints(section: str) -> dict[str, Any]:
    return typing.get_type_hints(_HINTS[section])


def _set(cfg: Config, key: str, value: Any, from_cli: bool = False) -> None:
    parts = key.split(".")
    if len(parts) != 2:
        raise ConfigError(f"{key}: keys have the form section.name, e.g. fed.rounds")
    section, name = parts
    if section not in _HINTS:
        raise ConfigError(f"{key}: unknown section '{section}'; known: {', '.join(_HINTS)}")
    hints = _section_hints(section)
    if name not in hints:
        raise ConfigError(f"{key}: unknown key '{name}' in [{section}]; known: {', '.join(hints)}")
    setattr(getattr(cfg, section), name, _coerce(key, value, hints[name], from_cli))


def _flatten(table: dict[str, Any], where: str) -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for section, body in table.items():
        if not isinstance(body, dict):
            raise ConfigError(f"{where}: '{section}' must be a [section] table, e.g. [fed] rounds = 3")
        for name, value in body.items():
            flat[f"{section}.{name}"] = value
    return flat


def parse_overrides(args: list[str]) -> dict[str, str]:
    """``["--fed.rounds", "3", "--data.name=digits"]`` -> ``{"fed.rounds": "3", ...}``."""
    out: dict[str, str] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or len(arg) == 2:
            raise ConfigError(f"{arg}: overrides look like --section.key value, e.g. --fed.rounds 3")
        key = arg[2:]
        if "=" in key:
            key, value = key.split("=", 1)
        else:
            if i + 1 >= len(args):
                raise ConfigError(f"{key}: missing value; write --{key} VALUE")
            i += 1
            value = args[i]
        out[key] = value
        i += 1
    return out


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> Config:
    """Defaults <- TOML file <- overrides, then validate."""
    cfg = Config()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"--config: no file at {path}; pass an existing TOML file, "
                              f"e.g. configs/digits.toml")
        try:
            table = tomllib.loads(path.read_text(encoding="utf-8"))  # TOML files are UTF-8
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"--config {path}: not valid TOML ({exc})") from None
        for key, value in _flatten(table, str(path)).items():
            _set(cfg, key, value)
    for key, value in (overrides or {}).items():
        _set(cfg, key, value, from_cli=isinstance(value, str))
    validate(cfg)
    return cfg


def config_from_dict(table: dict[str, Any]) -> Config:
    """Rebuild a Config from ``Config.to_dict()`` output (e.g. a checkpoint's copy)."""
    cfg = Config()
    for key, value in _flatten(table, "saved config").items():
        _set(cfg, key, value)
    validate(cfg)
    return cfg


# --------------------------------------------------------------------------------------------
# Validation: every impossible value is caught here, with the key and the fix


def _require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {message}")


def validate(cfg: Config) -> None:
    for key, allowed in CHOICES.items():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        _require(value in allowed, key, f"got {value!r}; choose one of {', '.join(allowed)}")
    for section in _HINTS:  # no NaN/inf anywhere
        for name, value in asdict(getattr(cfg, section)).items():
            if isinstance(value, float):
                _require(math.isfinite(value), f"{section}.{name}", f"must be a finite number, got {value}")

    r, d, m, f, o = cfg.run, cfg.data, cfg.model, cfg.fed, cfg.optim
    _require(bool(r.name) and "/" not in r.name, "run.name", "must be a non-empty name without '/'")
    _require(r.threads >= 0, "run.threads", "must be >= 0 (0 = automatic)")
    _require(r.seed >= 0, "run.seed", f"must be >= 0 (numpy seeds are non-negative), got {r.seed}")
    _require(d.image_size >= 4, "data.image_size", f"must be >= 4, got {d.image_size}")
    _require(d.channels in (1, 3), "data.channels", f"must be 1 or 3, got {d.channels}")
    _require(d.num_classes >= 1, "data.num_classes", "must be >= 1")
    _require(d.synthetic_size >= 1, "data.synthetic_size", "must be >= 1")
    if d.name in ("cifar10", "svhn"):
        _require(d.channels == 3, "data.channels", f"{d.name} is an RGB set; set data.channels = 3")

    _require(m.base_channels >= 1, "model.base_channels", "must be >= 1")
    _require(len(m.channel_mults) >= 2 and all(x >= 1 for x in m.channel_mults), "model.channel_mults",
             "needs at least two multipliers (levels), each >= 1, e.g. [1, 2, 4, 8]")
    _require(m.blocks_per_level >= 1, "model.blocks_per_level", "must be >= 1")
    _require(m.mid_blocks >= 2, "model.mid_blocks", "must be >= 2 (one in, one out)")
    _require(0.0 <= m.dropout < 1.0, "model.dropout", "must be in [0, 1)")
    _require(m.fourier_features >= 2 and m.fourier_features % 2 == 0, "model.fourier_features",
             "must be an even number >= 2")
    _require(m.class_embed_dim >= 0, "model.class_embed_dim", "must be >= 0 (0 = unconditional)")
    levels = len(m.channel_mults)
    _require(all(0 <= a < levels for a in m.attention_levels), "model.attention_levels",
             f"levels are 0..{levels - 1} (one per entry of model.channel_mults)")
    factor = 2 ** (levels - 1)
    _require(d.image_size % factor == 0, "data.image_size",
             f"{d.image_size} cannot be halved {levels - 1} times by the U-Net (model.channel_mults has "
             f"{levels} levels); use a multiple of {factor} or fewer levels")

    df = cfg.diffusion
    _require(df.timesteps >= 2, "diffusion.timesteps", "must be >= 2")
    _require(0 < df.beta_start < df.beta_end < 1, "diffusion.beta_start",
             "need 0 < beta_start < beta_end < 1")
    _require(df.sample_steps >= 1, "diffusion.sample_steps", "must be >= 1")
    _require(0.0 <= df.eta <= 1.0, "diffusion.eta", "must be in [0, 1] (1 = ancestral, 0 = DDIM)")

    _require(f.rounds >= 1, "fed.rounds", f"must be >= 1, got {f.rounds}")
    _require(f.local_epochs >= 1, "fed.local_epochs", f"must be >= 1, got {f.local_epochs}")
    _require(f.num_clients >= 1, "fed.num_clients", f"must be >= 1, got {f.num_clients}")
    _require(1 <= f.clients_per_round <= f.num_clients, "fed.clients_per_round",
             f"must be between 1 and fed.num_clients ({f.num_clients}), got {f.clients_per_round}")
    _require(f.alpha > 0, "fed.alpha", f"the Dirichlet concentration must be > 0, got {f.alpha}")
    _require(f.min_client_size >= 0, "fed.min_client_size", "must be >= 0")
    _require(f.max_resample >= 1, "fed.max_resample", "must be >= 1")
    _require(f.server_lr > 0, "fed.server_lr", "must be > 0")
    _require(0 <= f.server_momentum < 1, "fed.server_momentum", "must be in [0, 1)")
    _require(0 <= f.server_beta2 < 1, "fed.server_beta2", "must be in [0, 1)")
    _require(f.server_tau > 0, "fed.server_tau", "must be > 0 (it keeps 1 / (sqrt(v) + tau) finite)")
    _require(f.max_bad_rounds >= 1, "fed.max_bad_rounds", "must be >= 1")

    _require(o.lr > 0, "optim.lr", f"must be > 0, got {o.lr}")
    _require(o.batch_size >= 1, "optim.batch_size", f"must be >= 1, got {o.batch_size}")
    _require(0 <= o.beta1 < 1 and 0 <= o.beta2 < 1, "optim.beta1", "Adam betas must be in [0, 1)")
    _require(o.weight_decay >= 0, "optim.weight_decay", "must be >= 0")
    _require(o.grad_clip >= 0, "optim.grad_clip", "must be >= 0 (0 = off)")

    t, e = cfg.train, cfg.eval
    _require(t.clients_at_once >= 1, "train.clients_at_once", f"must be >= 1 (1 = one client after "
             f"another), got {t.clients_at_once}")
    if t.clients_at_once > 1:
        _require(m.label_dropout == 0 and f.drift == "none" and o.lr_schedule == "constant",
                 "train.clients_at_once", "the experimental grouped trainer has no label dropout, drift "
                 "term or learning-rate schedule; set train.clients_at_once = 1")
        _require(t.precision != "fp16", "train.precision", "fp16 needs a GradScaler per client, which "
                 "train.clients_at_once > 1 does not have; use bf16 (or auto), or clients_at_once = 1")
        _require(not t.compile, "train.compile", "torch.compile is used for one client at a time only; "
                 "set train.compile = false or train.clients_at_once = 1")

    _require(0.0 <= m.label_dropout < 1.0, "model.label_dropout",
             f"must be in [0, 1) (0 = no classifier-free guidance training), got {m.label_dropout}")
    _require(df.guidance >= 0, "diffusion.guidance", f"must be >= 0 (0 = off), got {df.guidance}")
    if df.guidance > 0:
        _require(m.label_dropout > 0 and m.class_embed_dim > 0, "diffusion.guidance",
                 "classifier-free guidance needs a model trained with a null class: set "
                 "model.label_dropout (e.g. 0.1) and model.class_embed_dim > 0, or guidance = 0")
    _require(f.prox_mu >= 0, "fed.prox_mu", f"must be >= 0 (the proximal weight), got {f.prox_mu}")
    if f.drift == "scaffold" or f.client_optimizer == "keep":
        key = "fed.drift" if f.drift == "scaffold" else "fed.client_optimizer"
        _require(t.clients_at_once == 1, "train.clients_at_once",
                 f"{key} = {getattr(f, key.split('.')[1])!r} keeps per-client state, which the experimental "
                 f"grouped trainer does not; set train.clients_at_once = 1")
    if f.drift == "scaffold":
        _require(t.precision != "fp16", "train.precision", "SCAFFOLD corrects unscaled gradients; fp16's "
                 "GradScaler scales them: use bf16 (or auto), or another fed.drift")
    if cfg.run.mode == "centralized":
        _require(f.drift == "none", "fed.drift", "client drift correction is a federated setting; "
                 "set fed.drift = \"none\" for the centralized run")
        _require(f.client_optimizer == "reset", "fed.client_optimizer", "the centralized run keeps its "
                 "one Adam for the whole run already; set fed.client_optimizer = \"reset\"")
    _require(0.0 <= o.min_lr_ratio <= 1.0, "optim.min_lr_ratio", f"must be in [0, 1], got {o.min_lr_ratio}")
    s_rel = cfg.ema.sigma_rel
    _require(s_rel == 0 or 0 < s_rel < EMA_SIGMA_REL_MAX, "ema.sigma_rel",
             f"must be 0 (off) or in (0, {EMA_SIGMA_REL_MAX:.4f}), e.g. 0.05 to 0.15; got {s_rel}")

    pv = cfg.privacy
    _require(pv.clip > 0, "privacy.clip", f"must be > 0 (an L2 norm bound), got {pv.clip}")
    _require(pv.noise_multiplier > 0, "privacy.noise_multiplier",
             f"must be > 0 (no noise, no privacy); got {pv.noise_multiplier}")
    _require(0 < pv.delta < 1, "privacy.delta", f"must be in (0, 1), e.g. 1e-5; got {pv.delta}")
    _require(pv.target_epsilon >= 0, "privacy.target_epsilon", "must be >= 0 (0 = no budget)")
    if pv.level != "none":
        _require(cfg.run.mode == "fedavg", "privacy.level", "differential privacy is implemented for "
                 "federated runs; use run.mode = \"fedavg\" or privacy.level = \"none\"")
        _require(f.drift != "scaffold", "fed.drift", "SCAFFOLD's control variates travel without noise and "
                 "would leak what DP protects; use fed.drift = \"none\" or \"fedprox\" with privacy")
        _require(t.clients_at_once == 1, "train.clients_at_once", "DP training runs one client at a time; "
                 "set train.clients_at_once = 1")
    if pv.level == "sample":
        _require(t.precision != "fp16", "train.precision", "DP-SGD clips per-sample gradients that fp16's "
                 "GradScaler would scale; use bf16 (or auto) or fp32")
        _require(not t.compile, "train.compile", "Opacus's per-sample gradient hooks do not go through "
                 "torch.compile; set train.compile = false")
    if pv.level == "client":
        _require(not e.local_models_at and e.client_samples == 0, "eval.local_models_at",
                 "client-level DP protects only the noised global model; local models and their samples "
                 "are not private: set eval.local_models_at = [] and eval.client_samples = 0")

    c = cfg.checkpoint
    _require(c.every >= 1, "checkpoint.every", "must be >= 1")
    _require(c.keep >= 1, "checkpoint.keep", "must be >= 1")
    _require(cfg.sample.per_class >= 0, "sample.per_class", "must be >= 0 (0 = no final grid)")
    _require(cfg.sample.steps >= 0, "sample.steps", "must be >= 0 (0 = diffusion.sample_steps)")
    _require(e.every >= 0, "eval.every", "must be >= 0 (0 = only at the end)")
    _require(e.num_samples >= 0, "eval.num_samples", "must be >= 0 (0 = size of the test split)")
    _require(e.steps >= 1, "eval.steps", "must be >= 1")
    _require(0.0 <= e.eta <= 1.0, "eval.eta", "must be in [0, 1]")
    _require(e.batch_size >= 1, "eval.batch_size", "must be >= 1")
    _require(e.kid_subsets >= 1, "eval.kid_subsets", f"must be >= 1, got {e.kid_subsets}")
    _require(e.kid_subset_size >= 2, "eval.kid_subset_size",
             f"KID's unbiased estimate needs subsets of >= 2 vectors, got {e.kid_subset_size}")
    _require(e.prdc_k >= 0, "eval.prdc_k", f"must be >= 0 (0 = no precision/recall), got {e.prdc_k}")
    _require(e.client_samples >= 0, "eval.client_samples",
             f"must be >= 0 (0 = no per-client scores), got {e.client_samples}")


# --------------------------------------------------------------------------------------------
# Writing the resolved config back out (tomllib reads only; this covers our flat value types)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string literal is a valid TOML basic string
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} as TOML")


def dump_toml(table: dict[str, dict[str, Any]]) -> str:
    lines: list[str] = []
    for section, body in table.items():
        lines.append(f"[{section}]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in body.items()]
        lines.append("")
    return "\n".join(lines)
