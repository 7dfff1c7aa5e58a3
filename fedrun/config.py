"""Job configuration: dataclass defaults, TOML files, dotted CLI overrides, validation.

The defaults are the paper authors' settings (CIFAR-10, 32x32, R=300 rounds of E=5 local epochs,
10 clients, Dirichlet alpha 0.5, Adam 2e-4 re-created per client per round, batch 512). A TOML file
only lists what differs; CLI overrides use one convention, ``--section.key value`` (or
``--section.key=value``), and are applied last. Every check runs here, before any process group or
GPU is touched, and every error names the key that is wrong and how to fix it.

Each key is a dataclass field with its docstring under it (README "Config reference" is the
user-facing copy). What other code needs to know about a key is kept once, on the field
(``setting(...)``'s metadata, read through ``key_facts``):

* ``hashed``: does the key change the trained model (``Config.hash``, which decides whether a run
  dir may be resumed)? ``"when set"`` marks keys added after runs existed: they count only when
  they differ from their default, so that older run dirs keep their hash.
* ``label``: may the key tell runs apart in ``fedrun report``? (Names, paths, places and schedules
  of a run never do.)
* ``applies``: when the key means anything (``fed.prox_mu`` only when ``fed.drift = "fedprox"``).
* ``off``: the value that switches a method off (``fed.drift = "none"``).
* ``choices``: the allowed values of a string key.

A section's own fields are checked by its ``validate()``; the few rules that span sections are
one table, ``CROSS_SECTION_RULES``, that ``validate(cfg)`` walks after the sections.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
import typing
from collections.abc import Callable, Mapping
from dataclasses import MISSING, asdict, dataclass, field, fields
from functools import cache
from pathlib import Path
from typing import Any, NamedTuple

from .errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

__all__ = ["Config", "ConfigError", "load_config", "parse_overrides", "config_from_dict", "key_facts",
           "validate"]


# --------------------------------------------------------------------------------------------
# Facts about keys, kept on the fields


HASHED, HASHED_WHEN_SET, NOT_HASHED = "always", "when set", "never"
NO_OFF = object()  # ``off`` of a key that is no on/off switch


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
    """Base of the config sections: the checks every field gets from its type and metadata."""

    def validate(self) -> None:
        """Allowed choices and finite numbers; each section adds its own rules after this."""
        name = _SECTION_NAMES[type(self)]
        for f in fields(self):  # type: ignore[arg-type]  # every subclass is a dataclass
            key, value = f"{name}.{f.name}", getattr(self, f.name)
            allowed = f.metadata.get("choices")
            if allowed is not None:
                _require(value in allowed, key, f"got {value!r}; choose one of {', '.join(allowed)}")
            if isinstance(value, float):
                _require(math.isfinite(value), key, f"must be a finite number, got {value}")


def _require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {message}")


EMA_SIGMA_REL_MAX = 0.5 / math.sqrt(3)  # the power-function EMA's widest profile (gamma -> 0)
DATASETS = ("cifar10", "fashion_mnist", "svhn", "image_folder", "digits", "printed_digits", "synthetic")
STATEFUL_DRIFT = ("scaffold", "feddyn")  # drift terms that keep state per client between rounds
COMPRESSORS = ("none", "bf16", "int8", "topk", "sign")  # fed.compress
PLACEMENTS = ("auto", "cost", "size", "on_demand")  # fed.placement (fedrun/federated/placement.py)


# --------------------------------------------------------------------------------------------
# The sections


@dataclass
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
    tensorboard: bool = setting(False, hashed=NOT_HASHED, label=False)
    """Rank 0 also writes every round's numbers as TensorBoard scalars to ``<run dir>/tensorboard/``
    (metrics.jsonl stays the record); needs ``pip install tensorboard``."""

    def validate(self) -> None:
        super().validate()
        _require(bool(self.name) and "/" not in self.name, "run.name", "must be a non-empty name without '/'")
        _require(self.threads >= 0, "run.threads", "must be >= 0 (0 = automatic)")
        _require(0 <= self.seed < 2**32, "run.seed",
                 f"must be in [0, 2**32) (one 32-bit word of every derived seed), got {self.seed}")


@dataclass
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


@dataclass
class ModelConfig(Section):
    """The residual U-Net (the authors': attention-free, class-conditional)."""

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
    trainable: str = setting("all", hashed=HASHED_WHEN_SET, off="all",
                             choices=("all", "lora", "norms_biases"))
    """Which weights train (fedrun/adapters.py): "all" | "lora" (low-rank adapters on the
    convolutions and linear layers; the embeddings and output layers train in full, the rest is
    frozen) | "norms_biases" (biases, norms and embeddings). Only what trains travels, is clipped
    and gets noise. A model setting, not a federated one: the centralized run honours it too."""
    lora_rank: int = setting(4, hashed=HASHED_WHEN_SET, applies=when("model.trainable", "lora"))
    """LoRA: rank r of every adapter (at most the smallest adapted layer's out / fan-in). 4 keeps
    the digits default's trained part under 1/10 of its weights (8.2 %; r = 8: 16 %)."""
    lora_alpha: float = setting(4.0, hashed=HASHED_WHEN_SET, applies=when("model.trainable", "lora"))
    """LoRA: the update is scaled by lora_alpha / lora_rank (Hu et al.: alpha = the first r tried,
    then fixed while r varies)."""

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
        _require(self.lora_rank >= 1, "model.lora_rank",
                 f"must be >= 1 (the rank of every adapter), got {self.lora_rank}")
        _require(self.lora_alpha > 0, "model.lora_alpha",
                 f"must be > 0 (the adapters' update is scaled by alpha / rank), got {self.lora_alpha}")


@dataclass
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


@dataclass
class FedConfig(Section):
    """The federation: rounds, clients, partition, server rule, client drift. Its keys apply to
    federated runs only (``Config.fed``), except the two that set a centralized run's epochs."""

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
    server_opt: str = setting("fedavg", off="fedavg",
                              choices=("fedavg", "fedavgm", "fedadam", "fedyogi", "fedadagrad"))
    """Server rule: "fedavg" | "fedavgm" (server momentum) | "fedadam" | "fedyogi" | "fedadagrad"
    (Reddi et al. 2021)."""
    server_lr: float = setting(1.0, applies=FEDERATED & unless("fed.server_opt", "fedavg"))
    """Server learning rate (all but fedavg)."""
    server_momentum: float = setting(0.9, applies=FEDERATED & unless("fed.server_opt", "fedavg"))
    """fedavgm's momentum; beta1 of fedadam / fedyogi / fedadagrad."""
    server_beta2: float = setting(0.99, applies=FEDERATED & when("fed.server_opt", "fedadam", "fedyogi"))
    """Second-moment decay of fedadam / fedyogi."""
    server_tau: float = setting(1e-3, applies=FEDERATED & when("fed.server_opt", "fedadam", "fedyogi",
                                                               "fedadagrad"))
    """Adaptivity of fedadam / fedyogi / fedadagrad: x -= lr * m / (sqrt(v) + tau)."""
    max_bad_rounds: int = 3
    """Stop after this many rounds in a row where every client failed."""
    drift: str = setting("none", hashed=HASHED_WHEN_SET, off="none",
                         choices=("none", "fedprox", "scaffold", "feddyn"))
    """Client drift correction: "none" | "fedprox" (Li et al. 2020) | "scaffold" (Karimireddy et
    al. 2020) | "feddyn" (Acar et al. 2021)."""
    prox_mu: float = setting(0.01, hashed=HASHED_WHEN_SET, applies=FEDERATED & when("fed.drift", "fedprox"))
    """FedProx: weight of (mu / 2) ||theta - theta_global||^2."""
    client_optimizer: str = setting("reset", hashed=HASHED_WHEN_SET, off="reset", choices=("reset", "keep"))
    """"reset": fresh Adam per client per round (authors) | "keep": each client keeps its Adam
    moments across rounds."""
    feddyn_alpha: float = setting(0.01, hashed=HASHED_WHEN_SET,
                                  applies=FEDERATED & when("fed.drift", "feddyn"))
    """FedDyn: weight alpha of the quadratic term (alpha / 2) ||theta - theta_global||^2 of each
    client's dynamic regulariser; must be > 0."""
    compress: str = setting("none", hashed=HASHED_WHEN_SET, off="none", choices=COMPRESSORS)
    """Compression of each client's update theta_k - theta before the sum (fedrun/federated/
    compression.py): "none" | "bf16" | "int8" (stochastic rounding, an fp32 scale per tensor or
    per block) | "topk" (the largest fed.compress_density share of entries) | "sign" (1 bit per
    entry and an fp32 scale per tensor). The simulation sums the decompressed values; metrics
    report the bytes a real client would send."""
    compress_density: float = setting(0.01, hashed=HASHED_WHEN_SET,
                                      applies=FEDERATED & when("fed.compress", "topk"))
    """topk: share of the update's entries sent, in (0, 1] (each as an fp32 value and an int32
    index: 8 bytes)."""
    compress_block: int = setting(0, hashed=HASHED_WHEN_SET, applies=FEDERATED & when("fed.compress", "int8"))
    """int8: entries per fp32 scale; 0 = one scale per tensor."""
    error_feedback: bool = setting(True, hashed=HASHED_WHEN_SET,
                                   applies=FEDERATED & unless("fed.compress", "none"))
    """Error feedback (Seide et al. 2014; Karimireddy et al. 2019): what compression dropped from
    a client's update is kept in its state (on its home rank, in checkpoints) and added to its
    next update. false: the dropped part is lost."""
    placement: str = setting("auto", hashed=NOT_HASHED, label=False, choices=PLACEMENTS)
    """Which rank trains which client (fedrun/federated/placement.py): "auto" ("on_demand", or home
    ranks by cost when clients keep state) | "cost" (each client's cost from its steps, images and
    set-up, balanced per round) | "size" (image counts) | "on_demand" (each free rank takes the
    next client, largest cost first, from a counter in the rendezvous store; not with per-client
    state). Not hashed: the round's sum is exact, so the model does not depend on it."""
    cost_step_share: float = setting(0.15, hashed=NOT_HASHED, label=False)
    """Placement's cost model: the share of a full batch's step that any step costs, whatever its
    size (the rest scales with its images). Measured: 0.15 for the digits model on a CPU core; a
    GPU, where a short batch costs a full step, wants 1."""
    client_overhead_steps: float = setting(0.2, hashed=NOT_HASHED, label=False)
    """Placement's cost model: each client's set-up, in full steps (measured: 0.17 on the digits
    default on a CPU core)."""
    availability: float = setting(1.0, hashed=HASHED_WHEN_SET, off=1.0)
    """Simulated federation: probability that a selected client reports in a round (drawn from
    (seed, round, client)); 1 = always."""
    availability_trace: str = setting("", hashed=HASHED_WHEN_SET, off="")
    """A text file, one row per client, T columns of probabilities (0/1 for on/off) used in turn
    (round r: column (r - 1) mod T); replaces fed.availability. "" = none."""
    speed_sigma: float = setting(0.0, hashed=HASHED_WHEN_SET, off=0.0)
    """Stragglers: each client's simulated speed factor is exp(sigma z), z ~ N(0, 1) from (seed,
    client); 0 = every client as fast."""
    speed_trace: str = setting("", hashed=HASHED_WHEN_SET, off="")
    """A text file, one row per client, T columns of positive speed factors (round r: column
    (r - 1) mod T); replaces fed.speed_sigma. "" = none."""
    deadline_s: float = setting(0.0, hashed=HASHED_WHEN_SET, off=0.0)
    """Simulated seconds a round waits for reports; later ones are dropped. 0 = no deadline."""
    over_select: float = setting(1.0, hashed=HASHED_WHEN_SET, off=1.0)
    """Select ceil(over_select x clients_per_round) clients and keep the clients_per_round
    fastest reports (Bonawitz et al. 2019); 1 = no over-selection."""
    sim_step_s: float = setting(1.0, hashed=HASHED_WHEN_SET)
    """Simulated seconds one local step takes on a device of speed 1."""
    sim_client_s: float = setting(0.0, hashed=HASHED_WHEN_SET)
    """Simulated seconds each participant spends besides its steps (download, upload), times its speed."""
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
        _require(self.server_lr > 0, "fed.server_lr", "must be > 0")
        _require(0 <= self.server_momentum < 1, "fed.server_momentum", "must be in [0, 1)")
        _require(0 <= self.server_beta2 < 1, "fed.server_beta2", "must be in [0, 1)")
        _require(self.server_tau > 0, "fed.server_tau", "must be > 0 (it keeps 1 / (sqrt(v) + tau) finite)")
        _require(self.max_bad_rounds >= 1, "fed.max_bad_rounds", "must be >= 1")
        _require(self.prox_mu >= 0, "fed.prox_mu", f"must be >= 0 (the proximal weight), got {self.prox_mu}")
        _require(self.feddyn_alpha > 0, "fed.feddyn_alpha",
                 f"must be > 0 (FedDyn's regulariser weight), got {self.feddyn_alpha}")
        _require(0 < self.compress_density <= 1, "fed.compress_density",
                 f"must be in (0, 1] (the share of entries top-k sends), got {self.compress_density}")
        _require(self.compress_block >= 0, "fed.compress_block",
                 f"must be >= 0 (entries per int8 scale; 0 = one per tensor), got {self.compress_block}")
        _require(0 <= self.cost_step_share <= 1, "fed.cost_step_share",
                 f"must be in [0, 1] (the share of a full step any step costs), got {self.cost_step_share}")
        _require(self.client_overhead_steps >= 0, "fed.client_overhead_steps",
                 f"must be >= 0 (a client's set-up cost in local steps), got {self.client_overhead_steps}")
        _require(0 <= self.availability <= 1, "fed.availability",
                 f"must be a probability in [0, 1] (1 = every selected client reports), got "
                 f"{self.availability}")
        _require(self.availability == 1 or not self.availability_trace, "fed.availability",
                 "give either fed.availability or fed.availability_trace, not both")
        _require(self.speed_sigma >= 0, "fed.speed_sigma",
                 f"must be >= 0 (0 = no stragglers), got {self.speed_sigma}")
        _require(self.speed_sigma == 0 or not self.speed_trace, "fed.speed_sigma",
                 "give either fed.speed_sigma or fed.speed_trace, not both")
        _require(self.deadline_s >= 0, "fed.deadline_s",
                 f"must be >= 0 (0 = no deadline), got {self.deadline_s}")
        _require(self.over_select >= 1, "fed.over_select",
                 f"must be >= 1 (the share of clients selected per client needed), got {self.over_select}")
        _require(self.sim_step_s > 0, "fed.sim_step_s", f"must be > 0, got {self.sim_step_s}")
        _require(self.sim_client_s >= 0, "fed.sim_client_s", f"must be >= 0, got {self.sim_client_s}")
        _require(self.client_state_memory_mb >= 0, "fed.client_state_memory_mb",
                 f"must be >= 0 (0 = no limit), got {self.client_state_memory_mb}")
        stateful = self.client_optimizer == "keep" or self.drift in STATEFUL_DRIFT or (
            self.compress != "none" and self.error_feedback)
        _require(not (self.placement == "on_demand" and stateful), "fed.placement",
                 "'on_demand' hands a client to whichever rank is free, but this run keeps per-client "
                 "state (kept Adam, SCAFFOLD, FedDyn or error feedback) on each client's home rank; set "
                 "fed.placement = \"cost\"")


@dataclass
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


@dataclass
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


@dataclass
class PrivacyConfig(Section):
    """Differential privacy: per image (DP-SGD in every client) or per client (DP-FedAvg). Its
    keys apply only when privacy.level is set (``Config.privacy``)."""

    level: str = setting("none", applies=ALWAYS, off="none", choices=("none", "sample", "client"))
    """"none" | "sample" (DP-SGD with Opacus: the image is the unit) | "client" (DP-FedAvg: the site)."""
    clip: float = 1.0
    """sample: L2 bound of each per-sample gradient; client: L2 bound of each client's update."""
    noise_multiplier: float = 1.0
    """Gaussian noise std divided by the sensitivity (clip). 0 = solve it: the smallest noise
    multiplier that keeps the planned run within privacy.target_epsilon (the worst client at
    sample level), printed before training and used everywhere (DP-SGD, DP-FedAvg's noise, the
    ledger, summary.json); a resume must solve the same value."""
    delta: float = 1e-5
    """The delta of (epsilon, delta)-DP; should be well below 1 / (number of units protected)."""
    target_epsilon: float = 0.0
    """0 = no budget; else a run whose planned epsilon exceeds it is refused before training."""
    accountant: str = setting("prv", hashed=HASHED_WHEN_SET, choices=("rdp", "prv"))
    """Opacus accountant: "prv" (privacy random variables, Gopi et al. 2021: the tightest Opacus
    offers) | "rdp" (Renyi DP, Mironov 2017; the default before "prv", hence hashed only when set:
    run dirs written with "rdp" keep their hash)."""
    multiplicity: int = setting(1, hashed=HASHED_WHEN_SET, off=1, applies=when("privacy.level", "sample"))
    """DP-SGD: K noise levels and noise draws per image, their losses averaged inside the image's
    per-sample gradient before clipping (Dockhorn et al. 2023, DPDM): less gradient variance at
    the same epsilon (each image is still one sample), K times the rows. 1 = off."""

    def validate(self) -> None:
        super().validate()
        _require(self.clip > 0, "privacy.clip", f"must be > 0 (an L2 norm bound), got {self.clip}")
        _require(self.noise_multiplier > 0 or (self.noise_multiplier == 0 and self.target_epsilon > 0),
                 "privacy.noise_multiplier", f"must be > 0 (no noise, no privacy), or 0 to solve the "
                 f"smallest one that fits privacy.target_epsilon (then set that > 0); got "
                 f"{self.noise_multiplier}")
        _require(0 < self.delta < 1, "privacy.delta", f"must be in (0, 1), e.g. 1e-5; got {self.delta}")
        _require(self.target_epsilon >= 0, "privacy.target_epsilon", "must be >= 0 (0 = no budget)")
        _require(self.multiplicity >= 1, "privacy.multiplicity",
                 f"must be >= 1 (noise draws per image; 1 = off), got {self.multiplicity}")
        _require(self.multiplicity == 1 or self.level == "sample", "privacy.multiplicity",
                 f"averages noise draws inside DP-SGD's per-sample gradients: it needs privacy.level = "
                 f"\"sample\" (got {self.level!r}); set privacy.multiplicity = 1")


@dataclass
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


@dataclass
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


@dataclass
class SampleConfig(Section):
    """The sample grids (never hashed, never a label)."""

    per_class: int = 10
    """Images per class in samples/final.png and the client grids (0 = none)."""
    steps: int = 0
    """Sampler steps for the grids; 0 = diffusion.sample_steps."""

    def validate(self) -> None:
        super().validate()
        _require(self.per_class >= 0, "sample.per_class", "must be >= 0 (0 = no final grid)")
        _require(self.steps >= 0, "sample.steps", "must be >= 0 (0 = diffusion.sample_steps)")


@dataclass
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
    # how often a run checkpoints, samples or scores must not stop it from resuming
    checkpoint: CheckpointConfig = section(CheckpointConfig, hashed=NOT_HASHED, label=False)
    sample: SampleConfig = section(SampleConfig, hashed=NOT_HASHED, label=False)
    eval: EvalConfig = section(EvalConfig, hashed=NOT_HASHED)

    @property
    def run_dir(self) -> Path:
        return Path(self.run.out_dir) / self.run.name

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

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
        for f in fields(_HINTS[sec.name]):
            value, default = d[sec.name][f.name], defaults[sec.name][f.name]
            hashed = f.metadata.get("hashed", HASHED)
            if hashed == NOT_HASHED or (hashed == HASHED_WHEN_SET and value == default):
                continue
            body[f.name], default_body[f.name] = value, default
        if sec.metadata["hashed"] == HASHED_WHEN_SET and body == default_body:
            continue
        out[sec.name] = body
    return out


_HINTS = typing.get_type_hints(Config)
_SECTION_NAMES = {cls: name for name, cls in _HINTS.items()}


@cache
def _default_dict() -> dict[str, dict[str, Any]]:
    return Config().to_dict()


def default_of(key: str) -> Any:
    """The default of "section.key"; None for a key fedrun does not know (e.g. one removed)."""
    section_name, _, name = key.partition(".")
    return _default_dict().get(section_name, {}).get(name)


@cache
def key_facts(key: str) -> KeyFacts:
    """Facts about "section.key", its section's folded in. A key fedrun does not know (from an
    older run) is hashed, may label, always applies and has no off value."""
    section_name, _, name = key.partition(".")
    sec = next((f for f in fields(Config) if f.name == section_name), None)
    if sec is None:
        return KeyFacts(HASHED, True, ALWAYS, NO_OFF, None)
    meta: Mapping[str, Any] = next((f.metadata for f in fields(_HINTS[section_name]) if f.name == name), {})
    hashed = NOT_HASHED if sec.metadata["hashed"] == NOT_HASHED else meta.get("hashed", HASHED)
    applies = meta.get("applies")
    return KeyFacts(hashed, sec.metadata["label"] and meta.get("label", True),
                    sec.metadata["applies"] if applies is None else applies,
                    meta.get("off", NO_OFF), meta.get("choices"))


def all_keys() -> list[str]:
    """Every "section.key", in config order."""
    return [f"{s}.{f.name}" for s, cls in _HINTS.items() for f in fields(cls)]


CHOICES: dict[str, tuple[str, ...]] = {k: c for k in all_keys() if (c := key_facts(k).choices) is not None}


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
    return {f.name: hints[f.name] for f in fields(_HINTS[section])}


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
    """A combination of keys of different sections that fedrun refuses: when ``refused(cfg)``,
    the error is ``"<key>: <message>"`` (``message`` may be computed from the config)."""

    refused: Callable[[Config], bool]
    key: str
    message: str | Callable[[Config], str]


def _halvings(cfg: Config) -> int:
    """The factor the U-Net divides the image side by: 2 ** (levels - 1)."""
    return 2 ** (len(cfg.model.channel_mults) - 1)


def _dp(cfg: Config) -> bool:
    return cfg.privacy.level != "none"


# In order: the first rule that refuses the config gives the error.
CROSS_SECTION_RULES: tuple[Rule, ...] = (
    Rule(lambda c: c.data.image_size % _halvings(c) != 0, "data.image_size",
         lambda c: f"{c.data.image_size} cannot be halved {len(c.model.channel_mults) - 1} times by the "
                   f"U-Net (model.channel_mults has {len(c.model.channel_mults)} levels); use a multiple "
                   f"of {_halvings(c)} or fewer levels"),
    Rule(lambda c: c.train.clients_at_once > 1 and not (
            c.model.label_dropout == 0 and c.fed.drift == "none" and c.optim.lr_schedule == "constant"),
         "train.clients_at_once", "the experimental grouped trainer has no label dropout, drift term or "
         "learning-rate schedule; set train.clients_at_once = 1"),
    Rule(lambda c: c.diffusion.guidance > 0 and not (
            c.model.label_dropout > 0 and c.model.class_embed_dim > 0), "diffusion.guidance",
         "classifier-free guidance needs a model trained with a null class: set "
         "model.label_dropout (e.g. 0.1) and model.class_embed_dim > 0, or guidance = 0"),
    # per-client state lives on the client's home rank; the grouped trainer has none
    Rule(lambda c: c.fed.drift in STATEFUL_DRIFT and c.train.clients_at_once != 1, "train.clients_at_once",
         lambda c: f"fed.drift = {c.fed.drift!r} keeps per-client state, which the experimental grouped "
                   f"trainer does not; set train.clients_at_once = 1"),
    Rule(lambda c: c.fed.client_optimizer == "keep" and c.train.clients_at_once != 1, "train.clients_at_once",
         "fed.client_optimizer = 'keep' keeps per-client state, which the experimental grouped trainer "
         "does not; set train.clients_at_once = 1"),
    # the drift terms add to raw gradients; under fp16 the GradScaler has scaled them
    Rule(lambda c: c.fed.drift == "scaffold" and c.train.precision == "fp16", "train.precision",
         "SCAFFOLD corrects unscaled gradients; fp16's GradScaler scales them: use bf16 (or auto), or "
         "another fed.drift"),
    Rule(lambda c: c.fed.drift == "feddyn" and c.train.precision == "fp16", "train.precision",
         "FedDyn adds its terms to unscaled gradients; fp16's GradScaler scales them: use bf16 (or auto), "
         "or another fed.drift"),
    Rule(lambda c: c.run.mode == "centralized" and c.fed.drift != "none", "fed.drift",
         "client drift correction is a federated setting; set fed.drift = \"none\" for the centralized run"),
    Rule(lambda c: c.run.mode == "centralized" and c.fed.client_optimizer != "reset", "fed.client_optimizer",
         "the centralized run keeps its one Adam for the whole run already; set "
         "fed.client_optimizer = \"reset\""),
    # compression edits the client's update before the sum; what else travels is not compressed
    Rule(lambda c: c.run.mode == "centralized" and c.fed.compress != "none", "fed.compress",
         "compression of client updates is a federated setting; set fed.compress = \"none\" for the "
         "centralized run"),
    Rule(lambda c: c.fed.compress != "none" and c.fed.drift == "scaffold", "fed.compress",
         "SCAFFOLD's control variates (one more model-sized vector per client and round) would travel "
         "uncompressed next to the compressed update; use fed.drift = \"none\", \"fedprox\" or "
         "\"feddyn\" with compression, or fed.compress = \"none\""),
    Rule(lambda c: c.fed.compress != "none" and c.train.clients_at_once != 1, "train.clients_at_once",
         "the experimental grouped trainer does not compress client updates or keep their error "
         "feedback; set train.clients_at_once = 1 (or fed.compress = \"none\")"),
    Rule(lambda c: _dp(c) and c.run.mode != "fedavg", "privacy.level",
         "differential privacy is implemented for federated runs; use run.mode = \"fedavg\" or "
         "privacy.level = \"none\""),
    Rule(lambda c: _dp(c) and c.fed.drift == "scaffold", "fed.drift",
         "SCAFFOLD's control variates travel without noise and would leak what DP protects; use "
         "fed.drift = \"none\" or \"fedprox\" with privacy"),
    # DP-FedAvg weighs clients uniformly and clips their updates; FedDyn's server correction
    # assumes the data-size-weighted sum of unclipped updates
    Rule(lambda c: c.privacy.level == "client" and c.fed.drift == "feddyn", "fed.drift",
         "FedDyn's server correction assumes the data-weighted sum of unclipped client updates, which "
         "DP-FedAvg (privacy.level = \"client\") replaces by clipped, uniformly weighted ones; use "
         "fed.drift = \"none\" or \"fedprox\", or privacy.level = \"sample\""),
    Rule(lambda c: c.model.trainable != "all" and c.train.clients_at_once != 1, "train.clients_at_once",
         lambda c: f"the experimental grouped trainer stacks and trains every parameter; model.trainable = "
                   f"{c.model.trainable!r} freezes some: set train.clients_at_once = 1 (or model.trainable = "
                   f"\"all\")"),
    Rule(lambda c: _dp(c) and c.train.clients_at_once != 1, "train.clients_at_once",
         "DP training runs one client at a time; set train.clients_at_once = 1"),
    Rule(lambda c: c.privacy.level == "sample" and c.train.precision == "fp16", "train.precision",
         "DP-SGD clips per-sample gradients that fp16's GradScaler would scale; use bf16 (or auto) or fp32"),
    Rule(lambda c: c.privacy.level == "sample" and c.train.compile, "train.compile",
         "Opacus's per-sample gradient hooks do not go through torch.compile; set train.compile = false"),
    Rule(lambda c: c.privacy.level == "client" and bool(c.eval.local_models_at or c.eval.client_samples),
         "eval.local_models_at", "client-level DP protects only the noised global model; local models and "
         "their samples are not private: set eval.local_models_at = [] and eval.client_samples = 0"),
    Rule(lambda c: c.fed.placement == "on_demand" and c.train.clients_at_once != 1, "fed.placement",
         "the experimental grouped trainer plans its groups before the round; 'on_demand' hands clients "
         "out during it: set fed.placement = \"cost\" or train.clients_at_once = 1"),
    # dropouts thin the sample independently per client (the accountant's epsilon stays an upper
    # bound); keeping the fastest reports makes one client's participation depend on the others'
    Rule(lambda c: _dp(c) and c.fed.over_select > 1, "fed.over_select",
         "over-selection keeps the fastest reports, so whether one client counts depends on the others: "
         "the accountant's (Poisson or uniform) sampling no longer holds; set fed.over_select = 1 "
         "(availability and deadlines are allowed with privacy)"),
)


def validate(cfg: Config) -> None:
    """Every section checks its own keys, in config order; then the cross-section rules."""
    for name in _HINTS:
        getattr(cfg, name).validate()
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
