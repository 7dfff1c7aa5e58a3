"""``fedrun audit RUN_DIR``: what a trained generator leaks about its training images.

Two measurements on the newest checkpoint of a run (the EMA model when the checkpoint has one):

* **Membership inference** (a loss-threshold attack, Yeom et al. 2018, as applied to diffusion
  models by Matsumoto et al. 2023 and Carlini et al. 2023): the attacker scores an image by the
  model's diffusion loss at a fixed noise level u (fixed noise eps from a seeded generator,
  averaged over a few draws); training images (members: each client's shard) tend to have lower
  loss than unseen ones (non-members: the test split). Reported per level: ROC AUC and the TPR
  at 1% FPR (scikit-learn's ``roc_auc_score`` / ``roc_curve``); the best level (chosen on the
  same data, so an optimistic, i.e. conservative-for-privacy, figure); per client at that level.
  AUC 0.5 = no signal.
* **Memorisation** (Carlini et al., "Extracting Training Data from Diffusion Models", USENIX
  Security 2023): generate samples, find each one's nearest training image (L2 in pixel space,
  [-1, 1]) and the ratio of that distance to the distance to its k-th nearest training image. A
  sample is a near-copy when the ratio is below ``threshold``: it is much closer to one training
  image than to the rest of the set. fedrun uses k = 50 (Carlini et al.'s neighbourhood size)
  and threshold 1/3; their exact criterion divides by alpha = 0.5 times the *mean* distance to
  the 50 nearest, which is stricter; ours is a simple, documented variant. The closest pairs
  are drawn to ``audit_pairs.png`` (generated | nearest training image).

The run is opened by ``fedrun.saved_run.open_run`` (the newest valid checkpoint, or
``--checkpoint``; its EMA when it holds one), the loss is ``Diffusion.per_image_loss`` (the
training objective, per image), and every draw comes from a stream of ``fedrun.seeding``
("audit_members", "audit_member_noise", "audit_non_member_noise", "audit_samples").

Results go to ``RUN_DIR/audit.json``; the top-level keys ``auc``, ``tpr_at_1pct_fpr``,
``near_copies`` and ``num_samples`` are the summary that ``fedrun report`` reads.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .. import seeding
from ..argparsing import ArgParser
from ..config import all_keys, parse_overrides
from ..data import ImageSet, to_uint8
from ..diffusion import Diffusion
from ..errors import ConfigError
from ..evaluation.sampling import eval_labels
from ..saved_run import open_run


@dataclass
class AuditSettings:
    """What ``fedrun audit`` measures and with how much effort (all seeded by run.seed)."""

    levels: tuple[float, ...] = (0.05, 0.1, 0.2, 0.3, 0.5, 0.7)  # u in (0, 1): 0 clean, 1 noise
    draws: int = 4  # noise draws averaged per image and level
    max_members: int = 0  # 0 = every training image; else a seeded subset (large data sets)
    samples: int = 200  # generated images for the memorisation test
    k: int = 50  # the ratio's k-th nearest training image
    threshold: float = 1 / 3  # near-copy: nearest / k-th nearest < threshold
    steps: int = 0  # sampler steps; 0 = eval.steps, else diffusion.sample_steps
    batch: int = 256
    pairs: int = 16  # closest generated/training pairs drawn to audit_pairs.png
    extra: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------
# Membership inference


@torch.no_grad()
def per_image_losses(model: nn.Module, diffusion: Diffusion, images: torch.Tensor, labels: torch.Tensor,
                     levels: Sequence[float], draws: int, noise: Callable[[int, int, int], torch.Generator],
                     batch: int = 256) -> torch.Tensor:
    """[len(levels), N] diffusion losses (``Diffusion.per_image_loss``, the training objective)
    at fixed noise levels, averaged over ``draws`` noise draws. The noise of level j, draw d,
    chunk c comes from the CPU generator ``noise(j, d, c)``, so it depends on nothing but its
    position."""
    was_training = model.training
    model.eval()  # dropout off: the attacker queries the deterministic model
    device = next(model.parameters()).device
    out = torch.zeros(len(levels), len(images), dtype=torch.float64)
    for j, u in enumerate(levels):
        log_snr = diffusion.log_snr(torch.tensor([float(u)], device=device))
        for d in range(draws):
            for c, start in enumerate(range(0, len(images), batch)):
                x = images[start:start + batch].to(device)
                y = labels[start:start + batch].to(device)
                eps = torch.randn(x.shape, generator=noise(j, d, c)).to(device)
                loss = diffusion.per_image_loss(model, x, y, log_snr, eps)
                out[j, start:start + len(x)] += loss.double().cpu() / draws
    model.train(was_training)
    return out


def attack_metrics(member_loss: np.ndarray, nonmember_loss: np.ndarray) -> dict[str, float]:
    """ROC AUC and TPR at 1% FPR of the rule "member if loss < threshold"."""
    from sklearn.metrics import roc_auc_score, roc_curve
    y = np.r_[np.ones(len(member_loss)), np.zeros(len(nonmember_loss))]
    # a diverged model (e.g. client-level DP with heavy noise) gives inf/NaN losses: they rank as
    # the highest losses (least member-like), so the attack still gets a well-defined AUC
    losses = np.nan_to_num(np.r_[member_loss, nonmember_loss].astype(np.float64), nan=np.inf)
    score = -np.clip(losses, None, np.finfo(np.float64).max)  # lower loss = more likely a member
    fpr, tpr, _ = roc_curve(y, score)
    return {"auc": float(roc_auc_score(y, score)), "tpr_at_1pct_fpr": float(tpr[fpr <= 0.01].max())}


def auc_standard_error(auc: float, n_members: int, n_nonmembers: int) -> float:
    """Hanley and McNeil (1982) standard error of an AUC estimate."""
    q1, q2 = auc / (2 - auc), 2 * auc**2 / (1 + auc)
    var = (auc * (1 - auc) + (n_members - 1) * (q1 - auc**2)
           + (n_nonmembers - 1) * (q2 - auc**2)) / (n_members * n_nonmembers)
    return math.sqrt(max(var, 0.0))


def membership_inference(model: nn.Module, diffusion: Diffusion, train: ImageSet, test: ImageSet,
                         shards: Sequence[np.ndarray] | None, settings: AuditSettings,
                         seed: int) -> dict[str, Any]:
    """Members: the clients' training images (every shard; the whole train split without
    shards); non-members: the test split. Per level, per client (at the best level), overall."""
    if shards is None:
        shards = [np.arange(len(train))]
    owner = np.full(len(train), -1)
    for k, s in enumerate(shards):
        owner[np.asarray(s, dtype=int)] = k
    members = np.flatnonzero(owner >= 0)
    if settings.max_members and len(members) > settings.max_members:
        rng = np.random.default_rng(seeding.stream_seed("audit_members", seed=seed))
        members = np.sort(rng.choice(members, settings.max_members, replace=False))
    if len(members) == 0 or len(test) == 0:
        raise ConfigError("audit: needs training images (members) and a test split (non-members); "
                          "check data.* and fed.* of the run's config")
    idx = torch.as_tensor(members)
    m_loss = per_image_losses(
        model, diffusion, train.images[idx], train.labels[idx], settings.levels, settings.draws,
        lambda j, d, c: seeding.stream_generator("cpu", "audit_member_noise", seed=seed, level=j, draw=d,
                                                 chunk=c),
        settings.batch).numpy()
    n_loss = per_image_losses(
        model, diffusion, test.images, test.labels, settings.levels, settings.draws,
        lambda j, d, c: seeding.stream_generator("cpu", "audit_non_member_noise", seed=seed, level=j, draw=d,
                                                 chunk=c),
        settings.batch).numpy()
    per_level = [{"u": float(u), **attack_metrics(m_loss[j], n_loss[j])}
                 for j, u in enumerate(settings.levels)]
    best = max(range(len(per_level)), key=lambda j: per_level[j]["auc"])
    per_client = []
    member_owner = owner[members]
    for k in range(len(shards)):
        mine = member_owner == k
        if not mine.any():
            continue
        row = {"client": k, "members": int(mine.sum()), **attack_metrics(m_loss[best][mine], n_loss[best])}
        by_level = [attack_metrics(m_loss[j][mine], n_loss[j])["auc"] for j in range(len(settings.levels))]
        row["best_level_auc"], row["best_u"] = max(zip(by_level, settings.levels, strict=True))
        per_client.append(row)
    overall = per_level[best]
    return {"auc": overall["auc"], "tpr_at_1pct_fpr": overall["tpr_at_1pct_fpr"], "best_u": overall["u"],
            "auc_standard_error": auc_standard_error(overall["auc"], len(members), len(test)),
            "members": int(len(members)), "non_members": int(len(test)),
            "per_level": per_level, "per_client": per_client}


# --------------------------------------------------------------------------------------------
# Memorisation


@torch.no_grad()
def generate(model: nn.Module, diffusion: Diffusion, labels: torch.Tensor, shape: tuple[int, int, int],
             steps: int, eta: float, seed: int, batch: int = 256) -> torch.Tensor:
    """Samples in [-1, 1] on the CPU, rounded to the uint8 grid (what a PNG of them holds);
    chunk c drawn from the stream "audit_samples" (seed, c)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out = []
    for c, start in enumerate(range(0, len(labels), batch)):
        g = seeding.stream_generator(device, "audit_samples", seed=seed, chunk=c)
        lab = labels[start:start + batch].to(device)
        x = diffusion.sample(model, lab, shape, steps, eta, generator=g)
        out.append(to_uint8(x).cpu().float().div(127.5).sub(1))
    model.train(was_training)
    return torch.cat(out) if out else torch.empty(0, *shape)


@torch.no_grad()
def nearest_neighbours(samples: torch.Tensor, reference: torch.Tensor, k: int,
                       batch: int = 1024) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For each sample: (index of the nearest reference image, its L2 distance, the L2 distance
    to the k-th nearest), by torch.cdist in blocks."""
    ref = reference.reshape(len(reference), -1).float()
    k = min(k, len(ref))
    idx, d1, dk = [], [], []
    for start in range(0, len(samples), batch):
        d = torch.cdist(samples[start:start + batch].reshape(-1, ref.shape[1]).float(), ref)
        top = d.topk(k, dim=1, largest=False)
        idx.append(top.indices[:, 0])
        d1.append(top.values[:, 0])
        dk.append(top.values[:, -1])
    return torch.cat(idx), torch.cat(d1), torch.cat(dk)


def save_pairs(samples: torch.Tensor, reference: torch.Tensor, path: Path, scale: int = 1) -> Path:
    """Rows of (generated | nearest training image) pairs, four pairs per row."""
    from torchvision.utils import save_image
    both = torch.stack([samples, reference], dim=1).flatten(0, 1).float().add(1).div(2).clamp(0, 1)
    if scale > 1:
        both = F.interpolate(both, scale_factor=scale, mode="nearest")
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(both, path, nrow=8, padding=2, pad_value=1.0)
    return path


def memorization(model: nn.Module, diffusion: Diffusion, reference: ImageSet, settings: AuditSettings,
                 steps: int, eta: float, seed: int, pairs_png: Path | None = None,
                 labels: torch.Tensor | None = None) -> dict[str, Any]:
    """Generate ``settings.samples`` images (of ``labels``, default the reference's class shares)
    and count near-copies (nearest / k-th nearest reference-image distance < threshold)."""
    if labels is None:
        labels = eval_labels(reference.labels, reference.num_classes, settings.samples)
    shape = tuple(reference.images.shape[1:])
    samples = generate(model, diffusion, labels, shape, steps, eta, seed, settings.batch)
    samples = torch.nan_to_num(samples, nan=0.0)  # a diverged model's NaN images: grey, not copies
    if len(samples) == 0:
        return {"k": settings.k, "threshold": settings.threshold, "num_samples": 0, "near_copies": 0,
                "sampler_steps": steps, "closest": []}
    nn_idx, d1, dk = nearest_neighbours(samples, reference.images, settings.k)
    ratio = d1 / dk.clamp(min=1e-12)
    near = ratio < settings.threshold
    order = torch.argsort(ratio)
    result = {"k": min(settings.k, len(reference)), "threshold": settings.threshold,
              "num_samples": len(samples), "near_copies": int(near.sum()), "sampler_steps": steps,
              "ratio_min": float(ratio.min()), "ratio_median": float(ratio.median()),
              "nearest_distance_median": float(d1.median()),
              "closest": [{"sample": int(i), "label": int(labels[i]), "train_index": int(nn_idx[i]),
                           "distance": float(d1[i]), "ratio": float(ratio[i])}
                          for i in order[:settings.pairs].tolist()]}
    if pairs_png is not None:
        top = order[:settings.pairs]
        scale = max(1, 64 // shape[-1])
        result["pairs_png"] = str(save_pairs(samples[top], reference.images[nn_idx[top]], pairs_png, scale))
    return result


# --------------------------------------------------------------------------------------------
# The command


def run_audit(run_dir: Path, settings: AuditSettings, out: Path | None = None, device: str = "cpu",
              checkpoint: Path | None = None, overrides: dict[str, str] | None = None) -> dict[str, Any]:
    """Audit a run directory; writes ``out`` (default RUN_DIR/audit.json) and audit_pairs.png.

    ``overrides`` (dotted config keys) change what the run is audited against, e.g.
    ``{"data.name": "digits"}`` audits a model pretrained on public printed digits against the
    private handwritten ones (members: their train split), which it never saw."""
    run_dir = Path(run_dir)
    run = open_run(run_dir, checkpoint, device=device, overrides=overrides)
    cfg, train, test, model, diffusion = run.cfg, run.train, run.test, run.model, run.diffusion
    assert test is not None
    seed = cfg.run.seed
    # members: every client's shard (a centralized run: one shard of the whole train split)
    mia = membership_inference(model, diffusion, train, test, run.shards, settings, seed)
    # the reference set of the memorisation test: every image some client trained on
    used = torch.as_tensor(np.sort(np.concatenate([np.asarray(s, dtype=int) for s in run.shards])))
    reference = ImageSet(train.images[used], train.labels[used], train.num_classes)
    steps = settings.steps or cfg.eval.steps or cfg.diffusion.sample_steps
    out = Path(out) if out is not None else run_dir / "audit.json"
    mem = memorization(model, diffusion, reference, settings, steps, cfg.diffusion.eta, seed,
                       pairs_png=out.with_name("audit_pairs.png"))
    info = {"checkpoint": str(run.checkpoint), "round": run.round, "audited": run.weights}
    result = {"auc": mia["auc"], "tpr_at_1pct_fpr": mia["tpr_at_1pct_fpr"],
              "near_copies": mem["near_copies"], "num_samples": mem["num_samples"],
              "best_u": mia["best_u"], "auc_standard_error": mia["auc_standard_error"],
              "members": mia["members"], "non_members": mia["non_members"], **info,
              "privacy": asdict(cfg.privacy),
              "per_level": mia["per_level"], "per_client": mia["per_client"], "memorization": mem,
              "settings": {k: v for k, v in asdict(settings).items() if k != "extra"}}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    return result


USAGE = ("fedrun audit RUN_DIR [--out FILE] [--checkpoint FILE] [--samples N] [--levels U,U,...] [--draws N] "
         "[--max-members N] [--k K] [--threshold T] [--steps S] [--batch N] [--pairs N] [--device DEV] "
         "[--section.key VALUE ...]")


def noise_levels(text: str) -> tuple[float, ...]:
    """``0.1,0.3,0.5`` -> (0.1, 0.3, 0.5)."""
    return tuple(float(v) for v in text.split(","))


def parse_args(argv: list[str]) -> tuple[Path, Path | None, AuditSettings, str, Path | None, dict[str, str]]:
    """(run directory, audit.json path or None, settings, device, checkpoint or None, --section.key
    overrides of the run's config)."""
    s = AuditSettings()
    parser = ArgParser("audit", USAGE)
    parser.add_argument("run_dir", metavar="RUN_DIR", type=Path)
    parser.add_argument("--out", metavar="file name", type=Path)
    parser.add_argument("--checkpoint", metavar="file name", type=Path)
    parser.add_argument("--device", metavar="device", default="cpu")
    parser.add_argument("--levels", metavar="list of levels", type=noise_levels, default=s.levels)
    for name, cast in (("samples", int), ("draws", int), ("max-members", int), ("k", int),
                       ("threshold", float), ("steps", int), ("batch", int), ("pairs", int)):
        dest = name.replace("-", "_")
        parser.add_argument(f"--{name}", dest=dest, metavar="number", type=cast, default=getattr(s, dest))
    args, rest = parser.parse_known_args(argv)
    overrides = parse_overrides(rest)  # --section.key VALUE: what else the run is audited against
    unknown = [key for key in overrides if key not in all_keys()]
    if unknown:  # no abbreviations of the audit's options either (--max is not --max-members)
        raise ConfigError(f"audit: unrecognized arguments: --{unknown[0]}: neither an option of fedrun "
                          f"audit nor a config key (section.key); usage: {USAGE}")
    settings = AuditSettings(**{k: v for k, v in vars(args).items()
                                if k not in ("run_dir", "out", "checkpoint", "device")})
    if not settings.levels or not all(0 < u < 1 for u in settings.levels):
        raise ConfigError("audit: --levels: noise levels must lie in (0, 1), e.g. --levels 0.1,0.3,0.5")
    s = settings
    if s.draws < 1 or s.samples < 0 or s.k < 2 or not 0 < s.threshold < 1 or s.batch < 1:
        raise ConfigError("audit: need --draws >= 1, --samples >= 0, --k >= 2, 0 < --threshold < 1, "
                          "--batch >= 1")
    return args.run_dir, args.out, settings, args.device, args.checkpoint, overrides


def audit_main(argv: list[str]) -> int:
    """``fedrun audit RUN_DIR ...``: prints the summary and where audit.json is."""
    run_dir, out, settings, device, checkpoint, overrides = parse_args(argv)
    r = run_audit(run_dir, settings, out, device, checkpoint, overrides)
    where = out or run_dir / "audit.json"
    print(f"audit of {r['audited']} at round {r['round']}: membership AUC {r['auc']:.3f} "
          f"(best u = {r['best_u']:g}, +-{r['auc_standard_error']:.3f}), TPR at 1% FPR "
          f"{r['tpr_at_1pct_fpr']:.3f}; near-copies {r['near_copies']} of {r['num_samples']} samples "
          f"(nearest / {r['memorization']['k']}-th nearest < {settings.threshold:.3g}); written to {where}")
    return 0
