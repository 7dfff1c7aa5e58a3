"""Job configuration: dataclass defaults, TOML files, dotted CLI overrides, validation.

The defaults are the paper authors' settings (CIFAR-10, 32x32, R=300 rounds of E=5 local epochs,
10 clients, Dirichlet alpha 0.5, Adam 2e-4 re-created per client per round, batch 512). A TOML file
only lists what differs; CLI overrides use one convention, ``--section.key value`` (or
``--section.key=value``), and are applied last. Every check runs here, before any process group or
GPU is touched, and every error names the key that is wrong and how to fix it.

A section's own keys are fields of its dataclass here, each with its docstring under it. The
keys of the methods a run chooses between (``fed.server_opt``, ``fed.drift``, ``fed.compress``,
``fed.placement``, ``fed.participation``, ``fed.client_optimizer``, ``model.trainable``,
``privacy.level``) and their settings are registered by the methods themselves
(``fedrun.registry``): a section holds their values too (``cfg.fed.server_lr`` reads the same),
and the choices, their checks, ``--help`` and the config reference (docs/config.md, written by
``python -m fedrun.config_reference``) are read from the registries.

What other code needs to know about a key is kept once, on its field (``setting(...)``'s
metadata, read through ``key_facts``):

* ``hashed``: does the key change the trained model (``Config.hash``, which decides whether a run
  dir may be resumed)? ``"when set"`` marks keys added after runs existed: they count only when
  they differ from their default, so that older run dirs keep their hash.
* ``label``: may the key tell runs apart in ``fedrun report``? (Names, paths, places and schedules
  of a run never do.)
* ``applies``: when the key means anything (``fed.prox_mu`` only when ``fed.drift = "fedprox"``;
  a registered key applies when one of the choices that declare it is chosen).
* ``off``: the value that switches a method off (``fed.drift = "none"``).
* ``choices``: the allowed values of a string key.

Validation, in order: each section checks its own keys (``Section.validate``), each registered
method its own settings (``Settings.validate``), then the chosen methods check the whole config
(their ``check(cfg)``, and a centralized run refuses federated methods), then the few rules left
that span the core sections (``CROSS_SECTION_RULES``). The first refusal is the error.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import sys
import typing
from collections.abc import Callable, Mapping
from dataclasses import MISSING, dataclass, field, fields
from functools import cache
from pathlib import Path
from typing import Any, NamedTuple

from . import registry
from .errors import ConfigError
from .registry import NO_OFF

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

__all__ = ["Config", "ConfigError", "load_config", "parse_overrides", "config_from_dict", "key_facts",
           "validate", "choices_of"]


# --------------------------------------------------------------------------------------------
# Facts about keys, kept on the fields


HASHED, HASHED_WHEN_SET, NOT_HASHED = "always", "when set", "never"


@dataclass(frozen=True)
class When:
    """A condition on keys of one config: every clause ``(key, values, negate)`` holds when the
    key's value is among ``values`` (``negate``: is not). ``&`` joins conditions; ``ALWAYS`` has no
    clause. A key missing from the config (a run older than the key) reads as its default."""

    clauses: tuple[tuple[str, tuple[Any, ...], bool], ...] = ()

    def holds(self, flat: Mapping[str, Any]) -> bool:
        """``flat``: "section.key" -> value, e.g. a summary.json's config flattened."""
        return all((flat.get(key, default_of(key)) in values) != negate
                   for key, values, negate in self.clauses)

    def __and__(self, other: When) -> When:
        return When(self.clauses + other.clauses)

    def __str__(self) -> str:
        return " and ".join(f"{key} {'not in' if negate else 'in'} {list(values)}"
                            for key, values, negate in self.clauses) or "always"


def when(key: str, *values: Any) -> When:
    """Holds when ``key`` is one of ``values``."""
    return When(((key, values, False),))


def unless(key: str, *values: Any) -> When:
    """Holds when ``key`` is none of ``values``."""
    return When(((key, values, True),))


ALWAYS = When()
FEDERATED = unless("run.mode", "centralized")  # a setting of the federation, not of a centralized run


def setting(default: Any = MISSING, *, factory: Callable[[], Any] | None = None, hashed: str = HASHED,
            label: bool = True, applies: When | None = None, off: Any = NO_OFF,
            choices: tuple[str, ...] | None = None) -> Any:
    """A config field with its facts (see the module docstring).

    ``applies`` replaces the condition of the key's section (``Config``'s field of the section);
    without it the key applies whenever its section does. A plain ``name: type = value`` field is
    hashed, may label a report row and applies whenever its section does.
    """
    meta = {"hashed": hashed, "label": label, "applies": applies, "off": off, "choices": choices}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


def section(cls: type, *, hashed: str = HASHED, label: bool = True, applies: When = ALWAYS) -> Any:
    """A section of ``Config``; its facts hold for every key of the section. ``hashed = "when set"``:
    the section counts in the hash, with all its keys, only when one of them differs from its default."""
    return field(default_factory=cls, metadata={"hashed": hashed, "label": label, "applies": applies})


class KeyFacts(NamedTuple):
    """What ``key_facts`` says about one "section.key" (section facts folded in)."""

    hashed: str
    label: bool
    applies: When
    off: Any
    choices: tuple[str, ...] | None


class Section:
    """Base of the config sections: the checks every field gets from its type and metadata, and
    the values of the keys that methods register into the section (``fedrun.registry``), which
    read and write like fields (``cfg.fed.drift``)."""

    def __post_init__(self) -> None:
        # a fresh dict per instance, every registered key present (dataclasses.replace and
        # copies pass theirs in)
        given = self.__dict__.get("_registered") or {}
        name = _SECTION_NAMES[type(self)]
        object.__setattr__(self, "_registered",
                           {key.name: copy.deepcopy(given.get(key.name, key.default))
                            for key in registry.registered_keys(name)})

    def __getattr__(self, name: str) -> Any:  # only reached for names that are not fields
        registered = self.__dict__.get("_registered")
        if registered is not None and name in registered:
            return registered[name]
        raise AttributeError(f"{type(self).__name__} has no key {name!r}")

    def __setattr__(self, name: str, value: Any) -> None:
        registered = self.__dict__.get("_registered")
        if registered is not None and name in registered:
            registered[name] = value
        else:
            object.__setattr__(self, name, value)

    def __eq__(self, other: object) -> bool:
        return type(self) is type(other) and self.values() == other.values()  # type: ignore[attr-defined]

    def __deepcopy__(self, memo: dict[int, Any]) -> Section:
        new = object.__new__(type(self))
        for name, value in self.__dict__.items():
            object.__setattr__(new, name, copy.deepcopy(value, memo))
        return new

    def values(self) -> dict[str, Any]:
        """Every key of the section, its own fields first, then the registered ones."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}  # type: ignore[arg-type]
        out.update(self.__dict__.get("_registered", {}))
        return out

    def validate(self) -> None:
        """Allowed choices and finite numbers of its own fields; each section adds its own rules
        after this (the registered keys are checked by ``validate_registered``)."""
        name = _SECTION_NAMES[type(self)]
        for f in fields(self):  # type: ignore[arg-type]  # every subclass is a dataclass
            _check_value(f"{name}.{f.name}", getattr(self, f.name), f.metadata.get("choices"))


def _check_value(key: str, value: Any, allowed: Any) -> None:
    if allowed is not None:
        _require(value in allowed, key, f"got {value!r}; choose one of {', '.join(allowed)}")
    if isinstance(value, float):
        _require(math.isfinite(value), key, f"must be a finite number, got {value}")


def _require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {message}")


EMA_SIGMA_REL_MAX = 0.5 / math.sqrt(3)  # the power-function EMA's widest profile (gamma -> 0)
DATASETS = ("cifar10", "fashion_mnist", "svhn", "image_folder", "digits", "printed_digits", "synthetic")


# --------------------------------------------------------------------------------------------
# The sections


@dataclass(eq=False)
class RunConfig(Section):
    """Naming, placing and seeding the job."""

    name: str = setting("cifar10_fedavg", hashed=NOT_HASHED, label=False)
    """Run directory name under ``run.out_dir``."""
    out_dir: str = setting("runs", hashed=NOT_HASHED, label=False)
    """Outputs go to ``<out_dir>/<name>/``."""
    seed: int = setting(0, label=False)
    """Every random stream derives from (seed, round, client). Runs that differ only in the seed
    form one report row (mean and std over seeds)."""
    mode: str = setting("fedavg", choices=("fedavg", "centralized"))
    """"fedavg" | "centralized" (the baseline: R x E epochs of data-parallel training)."""
    device: str = setting("auto", hashed=NOT_HASHED, label=False, choices=("auto", "cpu", "cuda"))
    """"auto" (cuda if available) | "cpu" | "cuda"."""
    threads: int = setting(0, hashed=NOT_HASHED, label=False)
    """CPU threads per rank; 0 = cores / local ranks."""
    keep_freed_memory: bool = setting(True, hashed=NOT_HASHED, label=False)
    """Each process keeps the host memory it frees for its next step (glibc's mmap and trim
    thresholds raised: ``fedrun/host_memory.py``), instead of faulting the same pages in again
    every step; false keeps glibc's defaults (the heap shrinks between steps)."""
    tensorboard: bool = setting(False, hashed=NOT_HASHED, label=False)
    """Rank 0 also writes every round's numbers as TensorBoard scalars to ``<run dir>/tensorboard/``
    (metrics.jsonl stays the record); needs ``pip install tensorboard``."""

    def validate(self) -> None:
        super().validate()
        _require(bool(self.name) and "/" not in self.name, "run.name", "must be a non-empty name without '/'")
        _require(self.threads >= 0, "run.threads", "must be >= 0 (0 = automatic)")
        _require(0 <= self.seed < 2**32, "run.seed",
                 f"must be in [0, 2**32) (one 32-bit word of every derived seed), got {self.seed}")


@dataclass(eq=False)
class DataConfig(Section):
    """The data set and how its images are fed."""

    name: str = setting("cifar10", label=False, choices=DATASETS)
    """cifar10 | fashion_mnist | svhn | image_folder | digits | printed_digits (public printed
    digits made like the handwritten ones, fedrun/printed_digits.py) | synthetic. Never a report
    label: the data set is the report's column group."""
    root: str = setting("data", label=False)
    """Data folder (for image_folder: one sub-folder per class, optional train/ and test/)."""
    download: bool = setting(False, label=False)
    """Let fedrun download what the job needs and is missing: the data set (torchvision) and
    clean-fid's Inception file for FID/IS (checksummed; fedrun/evaluation/extractors.py)."""
    image_size: int = 32
    """Images are resized to this; the U-Net must be able to halve it len(channel_mults) - 1 times."""
    channels: int = 3
    """Grayscale sets: 1, or 3 (repeated) as the authors fed Fashion-MNIST."""
    hflip: bool = True
    """Random horizontal flip on the device (authors: CIFAR-10, Fashion-MNIST, CT; not SVHN)."""
    num_classes: int = 10
    """Used by "synthetic" only; the others know their classes."""
    synthetic_size: int = 5000
    """Images of the "synthetic" set."""

    def validate(self) -> None:
        super().validate()
        _require(self.image_size >= 4, "data.image_size", f"must be >= 4, got {self.image_size}")
        _require(self.channels in (1, 3), "data.channels", f"must be 1 or 3, got {self.channels}")
        _require(self.num_classes >= 1, "data.num_classes", "must be >= 1")
        _require(self.synthetic_size >= 1, "data.synthetic_size", "must be >= 1")
        if self.name in ("cifar10", "svhn"):
            _require(self.channels == 3, "data.channels", f"{self.name} is an RGB set; set data.channels = 3")


@dataclass(eq=False)
class ModelConfig(Section):
    """The residual U-Net (the authors': attention-free, class-conditional). Which of its weights
    train is ``model.trainable`` (fedrun/adapters.py registers its choices)."""

    base_channels: int = 64
    """Width of the first level."""
    channel_mults: list[int] = setting(factory=lambda: [1, 2, 4, 8])
    """Width multiplier per level (one level per entry)."""
    blocks_per_level: int = 2
    """Residual blocks per resolution, encoder and decoder each."""
    mid_blocks: int = 4
    """Residual blocks at the lowest resolution."""
    dropout: float = 0.1
    """Dropout2d in every block."""
    attention_levels: list[int] = setting(factory=list)
    """Levels with self-attention, e.g. [2, 3]; authors: none."""
    fourier_features: int = 16
    """Fourier features of log-SNR."""
    class_embed_dim: int = 4
    """Class embedding width (0 = unconditional)."""
    label_dropout: float = setting(0.0, hashed=HASHED_WHEN_SET, off=0.0)
    """Classifier-free guidance training: share of labels replaced by a null class (0 = off)."""
    init_from: str = setting("", hashed=NOT_HASHED, off="")
    """Start from a pretrained model (fedrun/init_from.py): a fedrun checkpoint file, or a run
    directory (its newest valid checkpoint), whose weights (its EMA where it has one) are loaded
    right after the model is built; "" = the seeded random init. The model.* settings must be
    those of the run that wrote it. Not hashed: the init's SHA-256 goes into every checkpoint
    instead, and a resume from another init is refused (moving the file is fine)."""

    def validate(self) -> None:
        super().validate()
        _require(self.base_channels >= 1, "model.base_channels", "must be >= 1")
        _require(len(self.channel_mults) >= 2 and all(x >= 1 for x in self.channel_mults),
                 "model.channel_mults",
                 "needs at least two multipliers (levels), each >= 1, e.g. [1, 2, 4, 8]")
        _require(self.blocks_per_level >= 1, "model.blocks_per_level", "must be >= 1")
        _require(self.mid_blocks >= 2, "model.mid_blocks", "must be >= 2 (one in, one out)")
        _require(0.0 <= self.dropout < 1.0, "model.dropout", "must be in [0, 1)")
        _require(self.fourier_features >= 2 and self.fourier_features % 2 == 0, "model.fourier_features",
                 "must be an even number >= 2")
        _require(self.class_embed_dim >= 0, "model.class_embed_dim", "must be >= 0 (0 = unconditional)")
        levels = len(self.channel_mults)
        _require(all(0 <= a < levels for a in self.attention_levels), "model.attention_levels",
                 f"levels are 0..{levels - 1} (one per entry of model.channel_mults)")
        _require(0.0 <= self.label_dropout < 1.0, "model.label_dropout",
                 f"must be in [0, 1) (0 = no classifier-free guidance training), got {self.label_dropout}")



@dataclass(eq=False)
class DiffusionConfig(Section):
    """Noise schedule, training objective and sampler."""

    objective: str = setting("v", choices=("v", "eps"))
    """"v": continuous DDPM log-SNR schedule, v-prediction (authors' code) | "eps": discrete betas
    and eps-MSE (the paper's eqs. 2-3)."""
    timesteps: int = 1000
    """T for objective "eps"."""
    beta_start: float = 1e-4
    """First linear beta of objective "eps"."""
    beta_end: float = 0.02
    """Last linear beta of objective "eps"."""
    sample_steps: int = 300
    """Sampler steps for grids."""
    eta: float = 1.0
    """1 = ancestral (authors), 0 = DDIM."""
    guidance: float = setting(0.0, hashed=NOT_HASHED, off=0.0)
    """Classifier-free guidance w: (1 + w) cond - w uncond; needs model.label_dropout. A sampling
    setting: not hashed (the trained model is the same), but a report label."""

    def validate(self) -> None:
        super().validate()
        _require(self.timesteps >= 2, "diffusion.timesteps", "must be >= 2")
        _require(0 < self.beta_start < self.beta_end < 1, "diffusion.beta_start",
                 "need 0 < beta_start < beta_end < 1")
        _require(self.sample_steps >= 1, "diffusion.sample_steps", "must be >= 1")
        _require(0.0 <= self.eta <= 1.0, "diffusion.eta", "must be in [0, 1] (1 = ancestral, 0 = DDIM)")
        _require(self.guidance >= 0, "diffusion.guidance", f"must be >= 0 (0 = off), got {self.guidance}")


@dataclass(eq=False)
class FedConfig(Section):
    """The federation: rounds, clients, partition. Its keys apply to federated runs only
    (``Config.fed``), except the two that set a centralized run's epochs. The methods of a round
    bring their own keys into this section: the server rule (``fed.server_opt``,
    fedrun/federated/server.py), client drift (``fed.drift``, drift.py), the client optimizer
    (``fed.client_optimizer``, client.py), compression (``fed.compress``, compression.py),
    placement (``fed.placement``, placement.py) and participation (``fed.participation`` with the
    simulated federation's keys, participation.py)."""

    rounds: int = setting(300, hashed=NOT_HASHED, applies=ALWAYS)
    """Communication rounds R (centralized: R "rounds" of E epochs). Not hashed: raising it
    continues a finished run."""
    local_epochs: int = setting(5, applies=ALWAYS)
    """Local epochs E (centralized: a "round" is E epochs)."""
    num_clients: int = 10
    """Clients N."""
    clients_per_round: int = 10
    """Clients sampled per round (uniform, seeded by round)."""
    partition: str = setting("dirichlet", choices=("dirichlet", "iid"))
    """"dirichlet" (per-class Dirichlet(alpha)) | "iid"."""
    alpha: float = setting(0.5, applies=FEDERATED & unless("fed.partition", "iid"))
    """Dirichlet concentration (smaller = more skewed)."""
    min_client_size: int = setting(0, applies=FEDERATED & unless("fed.partition", "iid"))
    """Resample the Dirichlet draw until every client has this many images."""
    max_resample: int = setting(100, applies=FEDERATED & unless("fed.partition", "iid"))
    """Tries for min_client_size."""
    max_bad_rounds: int = 3
    """Stop after this many rounds in a row where every client failed."""
    client_state_memory_mb: int = setting(4096, hashed=NOT_HASHED, label=False)
    """Host memory for the kept state of clients not in the round, per rank (MiB); past it, states
    go to memory-mapped files in a temporary folder. 0 = no limit."""

    def validate(self) -> None:
        super().validate()
        _require(self.rounds >= 1, "fed.rounds", f"must be >= 1, got {self.rounds}")
        _require(self.local_epochs >= 1, "fed.local_epochs", f"must be >= 1, got {self.local_epochs}")
        _require(self.num_clients >= 1, "fed.num_clients", f"must be >= 1, got {self.num_clients}")
        _require(1 <= self.clients_per_round <= self.num_clients, "fed.clients_per_round",
                 f"must be between 1 and fed.num_clients ({self.num_clients}), got {self.clients_per_round}")
        _require(self.alpha > 0, "fed.alpha", f"the Dirichlet concentration must be > 0, got {self.alpha}")
        _require(self.min_client_size >= 0, "fed.min_client_size", "must be >= 0")
        _require(self.max_resample >= 1, "fed.max_resample", "must be >= 1")
        _require(self.max_bad_rounds >= 1, "fed.max_bad_rounds", "must be >= 1")
        _require(self.client_state_memory_mb >= 0, "fed.client_state_memory_mb",
                 f"must be >= 0 (0 = no limit), got {self.client_state_memory_mb}")


@dataclass(eq=False)
class OptimConfig(Section):
    """Each client's Adam (centralized: the one Adam of the run)."""

    lr: float = 2e-4
    """Adam learning rate."""
    batch_size: int = 512
    """Per client (centralized: global, split over ranks)."""
    beta1: float = 0.9
    """Adam beta1."""
    beta2: float = 0.999
    """Adam beta2."""
    weight_decay: float = 0.0
    """Adam weight decay."""
    grad_clip: float = 0.0
    """Gradient-norm clip (0 = off)."""
    lr_schedule: str = setting("constant", hashed=HASHED_WHEN_SET, off="constant",
                               choices=("constant", "cosine"))
    """"constant" | "cosine" (over rounds, down to lr * min_lr_ratio; centralized: the same
    per-round schedule)."""
    min_lr_ratio: float = setting(0.1, hashed=HASHED_WHEN_SET,
                                  applies=unless("optim.lr_schedule", "constant"))
    """Cosine: the last round's lr / optim.lr."""

    def validate(self) -> None:
        super().validate()
        _require(self.lr > 0, "optim.lr", f"must be > 0, got {self.lr}")
        _require(self.batch_size >= 1, "optim.batch_size", f"must be >= 1, got {self.batch_size}")
        _require(0 <= self.beta1 < 1 and 0 <= self.beta2 < 1, "optim.beta1", "Adam betas must be in [0, 1)")
        _require(self.weight_decay >= 0, "optim.weight_decay", "must be >= 0")
        _require(self.grad_clip >= 0, "optim.grad_clip", "must be >= 0 (0 = off)")
        _require(0.0 <= self.min_lr_ratio <= 1.0, "optim.min_lr_ratio",
                 f"must be in [0, 1], got {self.min_lr_ratio}")


@dataclass(eq=False)
class EMAConfig(Section):
    """Exponential moving average of the global model, updated once per round on the server."""

    sigma_rel: float = setting(0.0, off=0.0)
    """0 = off. Else the power-function EMA of Karras et al. (2024): beta_t = (1 - 1/t)^(gamma + 1)
    at round t, gamma set by this relative width of the averaging profile, in (0, 0.288)."""

    def validate(self) -> None:
        super().validate()
        s = self.sigma_rel
        _require(s == 0 or 0 < s < EMA_SIGMA_REL_MAX, "ema.sigma_rel",
                 f"must be 0 (off) or in (0, {EMA_SIGMA_REL_MAX:.4f}), e.g. 0.05 to 0.15; got {s}")


@dataclass(eq=False)
class PrivacyConfig(Section):
    """Differential privacy. Its keys come with ``privacy.level``'s choices (the mechanisms of
    fedrun/privacy/mechanisms.py) and apply only when a level is set (``Config.privacy``)."""


@dataclass(eq=False)
class SecureAggConfig(Section):
    """Secure aggregation of the round's sum. Its keys come with ``secure_agg.protocol``'s choices
    (fedrun/privacy/secure_sum.py)."""


@dataclass(eq=False)
class TrainConfig(Section):
    """How the local steps run on the hardware."""

    precision: str = setting("auto", choices=("auto", "bf16", "fp16", "fp32"))
    """"auto" (bf16 on GPU, fp32 on CPU) | "bf16" | "fp16" (with a GradScaler) | "fp32"."""
    channels_last: bool = setting(True, label=False)
    """channels_last memory format."""
    compile: bool = setting(False, label=False)
    """torch.compile the model."""
    clients_at_once: int = setting(1, hashed=NOT_HASHED)
    """Experimental: K clients of a rank at once (fedrun/experimental/multiclient.py). Not hashed:
    the same maths either way."""

    def validate(self) -> None:
        super().validate()
        _require(self.clients_at_once >= 1, "train.clients_at_once",
                 f"must be >= 1 (1 = one client after another), got {self.clients_at_once}")
        if self.clients_at_once > 1:
            _require(self.precision != "fp16", "train.precision", "fp16 needs a GradScaler per client, which "
                     "train.clients_at_once > 1 does not have; use bf16 (or auto), or clients_at_once = 1")
            _require(not self.compile, "train.compile", "torch.compile is used for one client at a time "
                     "only; set train.compile = false or train.clients_at_once = 1")


@dataclass(eq=False)
class CheckpointConfig(Section):
    """When checkpoints are written and whether a run resumes (never hashed, never a label)."""

    every: int = 1
    """Rounds between checkpoints."""
    keep: int = 3
    """Newest checkpoints kept on disk."""
    resume: str = setting("auto", choices=("auto", "never", "force"))
    """"auto" | "never" | "force" (resume even if the config changed)."""

    def validate(self) -> None:
        super().validate()
        _require(self.every >= 1, "checkpoint.every", "must be >= 1")
        _require(self.keep >= 1, "checkpoint.keep", "must be >= 1")


@dataclass(eq=False)
class SampleConfig(Section):
    """The sample grids (never hashed, never a label)."""

    per_class: int = 10
    """Images per class in samples/final.png (0 = no final grid)."""
    client_per_class: int = -1
    """Images per class in each client's grid (its local model after its training: the paper's
    personalization figures); -1 = sample.per_class, 0 = no client grids. They cost a sampling
    run per client: the digits default draws 2 per class."""
    steps: int = 0
    """Sampler steps for the grids; 0 = diffusion.sample_steps."""

    def validate(self) -> None:
        super().validate()
        _require(self.per_class >= 0, "sample.per_class", "must be >= 0 (0 = no final grid)")
        _require(self.client_per_class >= -1, "sample.client_per_class",
                 "must be >= 0 (0 = no client grids), or -1 for sample.per_class")
        _require(self.steps >= 0, "sample.steps", "must be >= 0 (0 = diffusion.sample_steps)")


@dataclass(eq=False)
class EvalConfig(Section):
    """Scores: FID/IS, KID, precision/recall, per class and per client (never hashed). The keys
    that change the numbers (sampler, sample count, features, KID/PRDC settings) may label a
    report row; those that only schedule or place the work never do."""

    every: int = setting(0, label=False)
    """Rounds between FID/IS evaluations; 0 = only at the end."""
    enabled: bool = setting(False, label=False)
    """Score FID/IS at all (needs Inception weights or the classifier)."""
    num_samples: int = 0
    """Samples to score; 0 = size of the test split (authors)."""
    steps: int = 300
    """Sampler steps for evaluation (authors: 300)."""
    eta: float = 1.0
    """Sampler eta for evaluation (authors: 1)."""
    feature_extractor: str = setting("inception", choices=("inception", "classifier"))
    """"inception" | "classifier" (a small CNN trained on the data set's own train split)."""
    inception_weights: str = setting("", label=False)
    """"" = $FEDRUN_INCEPTION_WEIGHTS, then clean-fid's location, then the installed package."""
    batch_size: int = setting(500, label=False)
    """Sampling chunk and feature batch."""
    cache_dir: str = setting("", label=False)
    """Reference statistics and classifiers; "" = $FEDRUN_CACHE_DIR or ~/.cache/fedrun."""
    local_models_at: list[int] = setting(factory=list, label=False)
    """Rounds with per-client grids and per-client scores (empty = the final round)."""
    kid: bool = True
    """KID against the test split (and per class)."""
    kid_subsets: int = 100
    """KID: random subsets averaged (clean-fid's default)."""
    kid_subset_size: int = 1000
    """KID: vectors per subset, capped by both set sizes (clean-fid's default)."""
    prdc_k: int = 5
    """k of precision/recall/density/coverage against the test split; 0 = off."""
    per_class: bool = setting(True, label=False)
    """FID/KID of the samples of class c against the test images of class c."""
    client_samples: int = setting(0, label=False)
    """Per-client scores: samples of each local model at local_models_at; 0 = off."""
    bootstrap: int = setting(200, label=False)
    """Resamples of every score's confidence interval (generated and reference features resampled,
    fedrun/evaluation/intervals.py); 0 = no intervals."""
    confidence: float = setting(0.95, label=False)
    """Confidence of the intervals (and of `fedrun compare`'s verdicts)."""

    def validate(self) -> None:
        super().validate()
        _require(self.every >= 0, "eval.every", "must be >= 0 (0 = only at the end)")
        _require(self.num_samples >= 0, "eval.num_samples", "must be >= 0 (0 = size of the test split)")
        _require(self.steps >= 1, "eval.steps", "must be >= 1")
        _require(0.0 <= self.eta <= 1.0, "eval.eta", "must be in [0, 1]")
        _require(self.batch_size >= 1, "eval.batch_size", "must be >= 1")
        _require(self.kid_subsets >= 1, "eval.kid_subsets", f"must be >= 1, got {self.kid_subsets}")
        _require(self.kid_subset_size >= 2, "eval.kid_subset_size",
                 f"KID's unbiased estimate needs subsets of >= 2 vectors, got {self.kid_subset_size}")
        _require(self.prdc_k >= 0, "eval.prdc_k",
                 f"must be >= 0 (0 = no precision/recall), got {self.prdc_k}")
        _require(self.client_samples >= 0, "eval.client_samples",
                 f"must be >= 0 (0 = no per-client scores), got {self.client_samples}")
        _require(0.5 <= self.confidence < 1, "eval.confidence",
                 f"must be in [0.5, 1), e.g. 0.95, got {self.confidence}")
        fewest = math.ceil(2 / (1 - self.confidence))  # >= 1 resample beyond each end of the interval
        _require(self.bootstrap == 0 or self.bootstrap >= fewest, "eval.bootstrap",
                 f"{self.bootstrap} resamples cannot place the ends of a {self.confidence:g} interval; "
                 f"use 0 (no intervals) or >= {fewest}")


@dataclass
class Config:
    """The whole job: one field per section; a section's facts hold for all of its keys."""

    run: RunConfig = section(RunConfig)
    data: DataConfig = section(DataConfig)
    model: ModelConfig = section(ModelConfig)
    diffusion: DiffusionConfig = section(DiffusionConfig)
    fed: FedConfig = section(FedConfig, applies=FEDERATED)
    optim: OptimConfig = section(OptimConfig)
    train: TrainConfig = section(TrainConfig)
    # ema and privacy came after runs existed: counted, as a whole, only when not the default
    ema: EMAConfig = section(EMAConfig, hashed=HASHED_WHEN_SET)
    privacy: PrivacyConfig = section(PrivacyConfig, hashed=HASHED_WHEN_SET,
                                     applies=unless("privacy.level", "none"))
    secure_agg: SecureAggConfig = section(SecureAggConfig, hashed=HASHED_WHEN_SET, applies=FEDERATED)
    # how often a run checkpoints, samples or scores must not stop it from resuming
    checkpoint: CheckpointConfig = section(CheckpointConfig, hashed=NOT_HASHED, label=False)
    sample: SampleConfig = section(SampleConfig, hashed=NOT_HASHED, label=False)
    eval: EvalConfig = section(EvalConfig, hashed=NOT_HASHED)

    @property
    def run_dir(self) -> Path:
        return Path(self.run.out_dir) / self.run.name

    def to_dict(self) -> dict[str, Any]:
        """{section: {key: value}} with every key, registered ones included (copies)."""
        return {name: copy.deepcopy(getattr(self, name).values()) for name in _HINTS}

    def with_values(self, values: Mapping[str, Any]) -> Config:
        """A copy with "section.key" -> value set (typed values, as the code computed them; the
        copy is validated)."""
        new = copy.deepcopy(self)
        for key, value in values.items():
            _set(new, key, value)
        validate(new)
        return new

    def to_toml(self) -> str:
        return dump_toml(self.to_dict())

    def hash(self) -> str:
        """Hash of everything that changes the trained model: the keys and sections whose
        ``hashed`` fact is not "never" (see the module docstring).

        Rounds, checkpointing, sampling and evaluation settings are left out: raising
        ``fed.rounds`` to continue a finished run, or changing how often it checkpoints or
        scores, must still resume from its checkpoint.
        """
        return hashlib.sha256(json.dumps(_hashed(self), sort_keys=True).encode()).hexdigest()[:16]


def _hashed(cfg: Config) -> dict[str, dict[str, Any]]:
    """The part of ``cfg.to_dict()`` that ``Config.hash`` hashes."""
    d, defaults = cfg.to_dict(), _default_dict()
    flat = {f"{section}.{key}": value for section, body in d.items() for key, value in body.items()}
    out: dict[str, dict[str, Any]] = {}
    for sec in fields(Config):
        if sec.metadata["hashed"] == NOT_HASHED:
            continue
        # a section counted only when set (privacy) is not counted where it does not apply
        # (privacy.level = "none"): a changed default of one of its keys must not change the
        # hash of runs that never used it
        if sec.metadata["hashed"] == HASHED_WHEN_SET and not sec.metadata["applies"].holds(flat):
            continue
        body, default_body = {}, {}
        for name, value in d[sec.name].items():
            default = defaults[sec.name][name]
            hashed = _key_metadata(f"{sec.name}.{name}").get("hashed", HASHED)
            if hashed == NOT_HASHED or (hashed == HASHED_WHEN_SET and value == default):
                continue
            body[name], default_body[name] = value, default
        if sec.metadata["hashed"] == HASHED_WHEN_SET and body == default_body:
            continue
        out[sec.name] = body
    return out


def hashed_values(cfg: Config) -> dict[str, Any]:
    """"section.key" -> value of every key that ``Config.hash`` hashes (to name what differs)."""
    return {f"{section}.{key}": value for section, body in _hashed(cfg).items()
            for key, value in body.items()}


_HINTS = typing.get_type_hints(Config)
_SECTION_NAMES = {cls: name for name, cls in _HINTS.items()}


def _default_dict() -> dict[str, dict[str, Any]]:
    return _cached_defaults(registry.generation)


@cache
def _cached_defaults(generation: int) -> dict[str, dict[str, Any]]:
    return Config().to_dict()


def default_of(key: str) -> Any:
    """The default of "section.key"; None for a key fedrun does not know (e.g. one removed)."""
    section_name, _, name = key.partition(".")
    return _default_dict().get(section_name, {}).get(name)


def _registered(key: str) -> registry.Key | None:
    return _registered_keys(registry.generation).get(key)


@cache
def _registered_keys(generation: int) -> dict[str, registry.Key]:
    return {key.dotted: key for key in registry.registered_keys()}


def _key_metadata(key: str) -> Mapping[str, Any]:
    """The facts stored on a key's field (a section's own, or a method's settings)."""
    found = _registered(key)
    if found is not None:
        return found.metadata
    section_name, _, name = key.partition(".")
    if section_name not in _HINTS:
        return {}
    return next((f.metadata for f in fields(_HINTS[section_name]) if f.name == name), {})


def key_facts(key: str) -> KeyFacts:
    """Facts about "section.key", its section's folded in. A key fedrun does not know (from an
    older run) is hashed, may label, always applies and has no off value."""
    return _key_facts(key, registry.generation)


@cache
def _key_facts(key: str, generation: int) -> KeyFacts:
    section_name, _, name = key.partition(".")
    sec = next((f for f in fields(Config) if f.name == section_name), None)
    if sec is None:
        return KeyFacts(HASHED, True, ALWAYS, NO_OFF, None)
    meta = _key_metadata(key)
    hashed = NOT_HASHED if sec.metadata["hashed"] == NOT_HASHED else meta.get("hashed", HASHED)
    applies = meta.get("applies")
    found = _registered(key)
    if found is not None and found.users:  # a method's setting: when one of its choices is chosen
        chooser = found.registry
        chosen = when(chooser.key, *found.users)
        base = chooser.applies if chooser.applies is not None else sec.metadata["applies"]
        applies = base & chosen if applies is None else base & chosen & applies
    elif found is not None:  # a selector
        applies = found.registry.applies
    choices = meta.get("choices")
    return KeyFacts(hashed, sec.metadata["label"] and meta.get("label", True),
                    sec.metadata["applies"] if applies is None else applies,
                    meta.get("off", NO_OFF), None if choices is None else tuple(choices))


def all_keys() -> list[str]:
    """Every "section.key", in config order (a section's own keys, then its registered ones)."""
    return [f"{s}.{name}" for s, body in _default_dict().items() for name in body]


def choices_of(key: str) -> tuple[str, ...] | None:
    """The allowed values of a string key (a registry's choices, or a field's), else None."""
    return key_facts(key).choices


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
    hints = typing.get_type_hints(_HINTS[section])
    out = {f.name: hints[f.name] for f in fields(_HINTS[section])}
    out.update({key.name: key.hint for key in registry.registered_keys(section)})
    return out


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


class Rule(NamedTuple):
    """A combination of keys of different core sections that fedrun refuses: when
    ``refused(cfg)``, the error is ``"<key>: <message>"`` (``message`` may be computed from the
    config). Rules about a method live with the method (its ``check(cfg)``)."""

    refused: Callable[[Config], bool]
    key: str
    message: str | Callable[[Config], str]


def _halvings(cfg: Config) -> int:
    """The factor the U-Net divides the image side by: 2 ** (levels - 1)."""
    return 2 ** (len(cfg.model.channel_mults) - 1)


# In order: the first rule that refuses the config gives the error.
CROSS_SECTION_RULES: tuple[Rule, ...] = (
    Rule(lambda c: c.data.image_size % _halvings(c) != 0, "data.image_size",
         lambda c: f"{c.data.image_size} cannot be halved {len(c.model.channel_mults) - 1} times by the "
                   f"U-Net (model.channel_mults has {len(c.model.channel_mults)} levels); use a multiple "
                   f"of {_halvings(c)} or fewer levels"),
    Rule(lambda c: c.diffusion.guidance > 0 and not (
            c.model.label_dropout > 0 and c.model.class_embed_dim > 0), "diffusion.guidance",
         "classifier-free guidance needs a model trained with a null class: set "
         "model.label_dropout (e.g. 0.1) and model.class_embed_dim > 0, or guidance = 0"),
)


def validate_registered(cfg: Config) -> None:
    """The methods' keys: each registered key's choices and finite numbers, each method's own
    settings (``Settings.validate``, selected or not: a section checks all of its keys); then each
    chosen method checks the whole config (its ``check(cfg)``; a centralized run refuses the
    federated ones), then the checks registered without a choice (``registry.config_check``)."""
    for reg in registry.registries():
        section = getattr(cfg, reg.section)
        for key in reg.keys():
            _check_value(key.dotted, getattr(section, key.name), key.metadata.get("choices"))
        for name in reg:
            settings = reg.settings(cfg, name)
            if settings is not None:
                settings.validate()
    for reg in registry.registries():
        choice = reg.selected(cfg)
        if reg.federated and cfg.run.mode == "centralized" and choice.name != reg.default:
            raise ConfigError(f"{reg.key}: {choice.name!r} is a federated method; set {reg.key} = "
                              f"\"{reg.default}\" for the centralized run")
        check = getattr(choice.target, "check", None)
        if check is not None:
            check(cfg)
    for check in registry.checks():
        check(cfg)


def validate(cfg: Config) -> None:
    """Every section checks its own keys, in config order; then the methods' keys and checks;
    then the cross-section rules of the core."""
    for name in _HINTS:
        getattr(cfg, name).validate()
    validate_registered(cfg)
    for rule in CROSS_SECTION_RULES:
        if rule.refused(cfg):
            message = rule.message if isinstance(rule.message, str) else rule.message(cfg)
            raise ConfigError(f"{rule.key}: {message}")


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
