"""FID and IS of generated images, scored on rank 0 through clean-fid's code path.

Two feature extractors share one pipeline (uint8 quantisation -> optional clean-fid resize ->
``cleanfid.fid.get_batch_features`` -> Frechet distance with ``cleanfid.fid.frechet_distance``):

* ``"inception"``: clean-fid's TorchScript Inception-v3 (``inception-2015-12-05.pt``, the
  StyleGAN2-ADA export) in clean-fid's "clean" mode: PIL bicubic resize to 299x299 outside the
  network. Pool features (2048) give FID; logits of the same pass (1008 classes, without the
  output bias, as StyleGAN2-ADA's IS) give IS. The paper's numbers are of this kind. The file is
  never downloaded here: compute nodes often have no internet, and a missing file must fail
  loudly rather than yield a made-up score.
* ``"classifier"``: a small CNN trained (seeded) on the data set's own train split. It needs no
  download and suits sets Inception knows nothing about (16x16 digits, CT scans); its numbers are
  comparable between runs of this repo only, never with published FIDs.

Cache layout (``cache_dir``: argument, else $FEDRUN_CACHE_DIR, else ~/.cache/fedrun)::

    <cache>/classifiers/<dataset_key>_<size>px_<C>ch_seed<S>_v1.pt   state_dict + metadata
    <cache>/stats/<dataset_key>_<split>_<size>px_<C>ch_<tag>.npz        mu, sigma, count

with ``tag`` = ``inception`` or ``classifier-seed<S>-v1-<hash of its weights>``. Reference
statistics of a data set split are computed once per extractor and reused by every later run
and round. Nothing is ever written inside site-packages (clean-fid's own stats folder).
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from cleanfid import fid as cleanfid_fid
from cleanfid.downloads_helper import inception_url as INCEPTION_URL
from cleanfid.resize import build_resizer
from scipy.special import xlogy

log = logging.getLogger(__name__)

INCEPTION_FILE = "inception-2015-12-05.pt"
INCEPTION_ENV = "FEDRUN_INCEPTION_WEIGHTS"
CACHE_ENV = "FEDRUN_CACHE_DIR"
CLASSIFIER_VERSION = 1  # bump when the classifier recipe changes: old cache files are then ignored
EXTRACTORS = ("inception", "classifier")


class MetricsError(RuntimeError):
    """Scores cannot be computed (e.g. missing Inception weights). The message says the fix."""


class ImageSetLike(Protocol):
    """What ``fedrun.data.ImageSet`` provides: images float [N,C,H,W] in [-1,1], labels [N]."""

    images: torch.Tensor
    labels: torch.Tensor
    num_classes: int


# --------------------------------------------------------------------------------------------
# Small helpers


def resolve_cache_dir(cache_dir: str | os.PathLike = "") -> Path:
    """The argument, else $FEDRUN_CACHE_DIR, else ~/.cache/fedrun."""
    if cache_dir:
        return Path(cache_dir).expanduser()
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    return Path.home() / ".cache" / "fedrun"


def dataset_key(name: str, detail: str = "") -> str:
    """Cache key of a data set. Built-in sets are named by ``name`` alone; sets whose content
    depends on more (``image_folder``'s root, ``synthetic``'s size) pass that as ``detail`` and
    get a short hash appended, so two different folders never share reference statistics."""
    if not detail:
        return name
    return f"{name}-{hashlib.sha256(detail.encode()).hexdigest()[:8]}"


def to_uint8(images: torch.Tensor, rgb: bool = False) -> torch.Tensor:
    """[-1, 1] float (or uint8) NCHW -> uint8 NCHW in [0, 255]; ``rgb`` repeats 1 channel to 3.

    Scores are computed on quantised images, as they would be read back from PNG files, so the
    real and the generated set pass through the same rounding.
    """
    if images.ndim != 4:
        raise ValueError(f"expected images [N, C, H, W], got shape {tuple(images.shape)}")
    if images.dtype != torch.uint8:
        images = images.detach().float().add(1).mul(127.5).round().clamp(0, 255).to(torch.uint8)
    if rgb and images.shape[1] == 1:
        images = images.repeat(1, 3, 1, 1)
    return images


def _atomic_save(save: Callable[[Path], None], path: Path) -> None:
    """Write to a temporary name then rename: a killed job never leaves a half-written cache file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    save(tmp)
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------------
# The two scores


def feature_stats(feats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance (float64) of a feature set [N, D]: all FID needs of a set."""
    feats = np.asarray(feats, dtype=np.float64)
    if feats.ndim != 2 or len(feats) < 2:
        raise ValueError(f"need at least 2 feature vectors [N, D], got shape {feats.shape}")
    return feats.mean(axis=0), np.cov(feats, rowvar=False)


def frechet_distance_from_stats(mu1: np.ndarray, sigma1: np.ndarray,
                                mu2: np.ndarray, sigma2: np.ndarray) -> float:
    return float(cleanfid_fid.frechet_distance(mu1, sigma1, mu2, sigma2))


def frechet_distance(feats_a: np.ndarray, feats_b: np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to two feature sets (clean-fid's formula)."""
    return frechet_distance_from_stats(*feature_stats(feats_a), *feature_stats(feats_b))


def inception_score(logits_or_probs: np.ndarray | torch.Tensor, splits: int = 10,
                    from_logits: bool | None = None, seed: int = 0) -> tuple[float, float]:
    """IS = exp(E_x KL(p(y|x) || p(y))), mean and std over ``splits`` disjoint parts.

    ``from_logits=None`` decides by looking: rows that are non-negative and sum to 1 are taken as
    probabilities. The rows are shuffled (seeded) before splitting, because class-conditional
    samples usually arrive ordered by class, and a split holding one class would score ~1.
    """
    x = torch.as_tensor(np.asarray(logits_or_probs), dtype=torch.float64)
    if x.ndim != 2 or len(x) < splits:
        raise ValueError(f"need [N, classes] with N >= splits={splits}, got shape {tuple(x.shape)}")
    if from_logits is None:
        sums_to_one = bool(((x.sum(1) - 1).abs() < 1e-4).all())
        from_logits = not (sums_to_one and bool((x >= 0).all()))
    probs = (x.softmax(1) if from_logits else x / x.sum(1, keepdim=True)).numpy()
    probs = probs[np.random.default_rng(seed).permutation(len(probs))]
    scores = []
    for part in np.array_split(probs, splits):
        p_y = part.mean(axis=0, keepdims=True)
        kl = (xlogy(part, part) - xlogy(part, p_y)).sum(axis=1).mean()  # xlogy: 0 log 0 = 0
        scores.append(np.exp(kl))
    return float(np.mean(scores)), float(np.std(scores))


# --------------------------------------------------------------------------------------------
# Feature extractors. Each maps a float batch of uint8 values [0, 255] to features | logits.


@dataclass
class Extractor:
    name: str  # "inception" | "classifier"
    tag: str  # cache tag of the reference statistics it produces
    rgb: bool  # wants 3 channels
    feature_dim: int
    fn: Callable[[torch.Tensor], torch.Tensor]  # [B,C,H,W] in [0,255] -> [B, feature_dim + classes]
    device: torch.device
    resize: Callable[[np.ndarray], np.ndarray] | None = None  # clean-fid per-image HWC resizer
    info: dict[str, Any] | None = None

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, batch_size: int = 500) -> tuple[np.ndarray, np.ndarray]:
        """Features [N, D] (float64) and logits [N, K] of images in [-1,1] or uint8."""
        feats, logits = [], []
        for start in range(0, len(images), batch_size):
            batch = to_uint8(images[start:start + batch_size], rgb=self.rgb).cpu()
            batch = self._resized(batch) if self.resize is not None else batch.float()
            out = cleanfid_fid.get_batch_features(batch, self.fn, self.device)
            feats.append(out[:, :self.feature_dim])
            logits.append(out[:, self.feature_dim:])
        return np.concatenate(feats).astype(np.float64), np.concatenate(logits)

    def _resized(self, batch: torch.Tensor) -> torch.Tensor:
        # clean-fid's "clean" resize works on one HWC float image at a time (PIL, per channel);
        # PIL releases the GIL while resampling, so threads help (~1.5x on 2 cores).
        arrays = batch.permute(0, 2, 3, 1).numpy().astype(np.float32)
        with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
            out = list(pool.map(self.resize, arrays))
        return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).contiguous()


def inception_weights_path(weights: str | os.PathLike = "") -> Path:
    """Where the Inception file must be: the argument, else $FEDRUN_INCEPTION_WEIGHTS, else the
    folder clean-fid itself downloads it to (/tmp, or ./ on Windows). A folder means the file of
    the standard name inside it. Raises MetricsError when the file is not there."""
    if weights:
        where, source = Path(weights), "eval.inception_weights"
    elif os.environ.get(INCEPTION_ENV):
        where, source = Path(os.environ[INCEPTION_ENV]), f"${INCEPTION_ENV}"
    else:
        where = Path("./" if platform.system() == "Windows" else "/tmp")
        source = "clean-fid's default location"
    where = where.expanduser()
    path = where / INCEPTION_FILE if where.is_dir() else where
    if not path.is_file():
        raise MetricsError(
            f"Inception weights not found at {path} ({source}): on a machine with internet fetch "
            f"{INCEPTION_URL} and copy it there, or set {INCEPTION_ENV} / eval.inception_weights to "
            f"the file (or use eval.feature_extractor = \"classifier\")")
    return path


def inception_extractor(weights: str | os.PathLike = "", device: str | torch.device = "cpu") -> Extractor:
    """clean-fid's TorchScript Inception on ``device`` only.

    clean-fid's own ``build_feature_extractor`` downloads when the file is missing and wraps the
    net in DataParallel (which claims every visible GPU), so the network is loaded here instead,
    with the same input normalisation as clean-fid's ``InceptionV3W`` in "clean" mode.
    """
    path = inception_weights_path(weights)
    device = torch.device(device)
    try:
        net = torch.jit.load(str(path), map_location=device).eval()
        layers, out_weight = net.layers, net.output.weight
    except Exception as exc:  # a truncated download, an HTML error page saved as .pt, ...
        raise MetricsError(f"{path} is not clean-fid's Inception TorchScript file ({exc}); "
                           f"fetch {INCEPTION_URL} again") from None

    def fn(x: torch.Tensor) -> torch.Tensor:
        assert x.shape[-2:] == (299, 299), "clean mode resizes to 299x299 before the network"
        feats = layers.forward((x - 128) / 128).reshape(len(x), 2048)
        logits = F.linear(feats, out_weight)  # no output bias, as StyleGAN2-ADA's IS
        return torch.cat([feats, logits], dim=1)

    return Extractor("inception", "inception", rgb=True, feature_dim=2048, fn=fn, device=device,
                     resize=build_resizer("clean"), info={"weights": str(path)})


class SmallCNN(nn.Module):
    """Three conv stages and global average pooling: any square size >= 8 works, and a 16x16
    digits model trains in seconds on two CPU cores. ``features`` is the 4*width-d penultimate
    layer used for the Frechet distance; ``head`` gives the class logits used for IS."""

    def __init__(self, channels: int, num_classes: int, width: int = 32):
        super().__init__()

        def block(cin: int, cout: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

        self.features = nn.Sequential(
            *block(channels, width), *block(width, width), nn.MaxPool2d(2),
            *block(width, 2 * width), *block(2 * width, 2 * width), nn.MaxPool2d(2),
            *block(2 * width, 4 * width), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.head = nn.Linear(4 * width, num_classes)
        self.feature_dim = 4 * width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def classifier_path(cache_dir: Path, key: str, image_size: int, channels: int, seed: int) -> Path:
    return cache_dir / "classifiers" / f"{key}_{image_size}px_{channels}ch_seed{seed}_v{CLASSIFIER_VERSION}.pt"


def train_classifier(train_set: ImageSetLike, seed: int = 0, device: str | torch.device = "cpu",
                     batch_size: int = 128, target_steps: int = 2000, lr: float = 2e-3,
                     max_epochs: int = 8) -> SmallCNN:
    """Seeded training of the proxy classifier on images in [-1, 1].

    About ``target_steps`` updates, in 3 to ``max_epochs`` epochs: CIFAR-10 gets 6 epochs, the
    1,437 digits 8 epochs (96 steps, ~99% test accuracy, ~15 s on one CPU core). The global RNG
    state is left untouched, so scoring in the middle of a run does not change the run's own
    random stream.
    """
    device = torch.device(device)
    x_all, y_all = train_set.images.float().to(device), train_set.labels.long().to(device)
    n = len(y_all)
    steps_per_epoch = max(1, -(-n // batch_size))
    epochs = int(np.clip(-(-target_steps // steps_per_epoch), 3, max_epochs))
    fork_devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=fork_devices):
        torch.manual_seed(seed)
        model = SmallCNN(x_all.shape[1], int(train_set.num_classes)).to(device)
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=5e-4)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * steps_per_epoch)
        gen = torch.Generator().manual_seed(seed)
        model.train()
        for _ in range(epochs):
            order = torch.randperm(n, generator=gen)
            for start in range(0, n, batch_size):
                idx = order[start:start + batch_size].to(device)
                x, y = x_all[idx], y_all[idx]
                loss = F.cross_entropy(model(x), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
    return model.eval()


@torch.no_grad()
def classifier_accuracy(model: nn.Module, data: ImageSetLike, batch_size: int = 500) -> float:
    device = next(model.parameters()).device
    correct = 0
    for start in range(0, len(data.labels), batch_size):
        x = data.images[start:start + batch_size].float().to(device)
        correct += int((model(x).argmax(1).cpu() == data.labels[start:start + batch_size].cpu()).sum())
    return correct / max(1, len(data.labels))


def load_or_train_classifier(key: str, train_set: ImageSetLike, test_set: ImageSetLike | None,
                             cache_dir: str | os.PathLike = "", seed: int = 0,
                             device: str | torch.device = "cpu") -> tuple[SmallCNN, dict[str, Any]]:
    """The cached classifier of (data set, size, channels, seed), training it on first use."""
    _, channels, size, _ = train_set.images.shape
    path = classifier_path(resolve_cache_dir(cache_dir), key, size, channels, seed)
    model = SmallCNN(channels, int(train_set.num_classes))
    if path.is_file():
        blob = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(blob["state_dict"])
        log.info("classifier: loaded %s (test accuracy %.3f)", path, blob["test_acc"])
        return model.to(device).eval(), {"path": str(path), "test_acc": blob["test_acc"]}
    log.info("classifier: training on %d %s images (seed %d)", len(train_set.labels), key, seed)
    model = train_classifier(train_set, seed=seed, device=device)
    test_acc = classifier_accuracy(model, test_set) if test_set is not None else float("nan")
    log.info("classifier: test accuracy %.3f, saved to %s", test_acc, path)
    blob = {"state_dict": {k: v.cpu() for k, v in model.state_dict().items()},
            "test_acc": float(test_acc), "num_classes": int(train_set.num_classes), "version": CLASSIFIER_VERSION}
    _atomic_save(lambda tmp: torch.save(blob, tmp), path)
    return model, {"path": str(path), "test_acc": float(test_acc)}


def classifier_extractor(key: str, train_set: ImageSetLike, test_set: ImageSetLike | None = None,
                         cache_dir: str | os.PathLike = "", seed: int = 0,
                         device: str | torch.device = "cpu") -> Extractor:
    """The proxy classifier as a clean-fid style extractor (input: [0,255] floats, native size)."""
    device = torch.device(device)
    model, info = load_or_train_classifier(key, train_set, test_set, cache_dir, seed, device)

    def fn(x: torch.Tensor) -> torch.Tensor:
        feats = model.features(x / 127.5 - 1)  # back to the [-1, 1] range it was trained on
        return torch.cat([feats, model.head(feats)], dim=1)

    # The weights' hash goes into the statistics' tag: a classifier retrained after its cache
    # file was deleted (same seed, other hardware) differs slightly, and must not be scored
    # against statistics of the old one.
    digest = hashlib.sha256()
    for tensor in model.state_dict().values():
        digest.update(tensor.detach().cpu().numpy().tobytes())
    tag = f"classifier-seed{seed}-v{CLASSIFIER_VERSION}-{digest.hexdigest()[:8]}"
    return Extractor("classifier", tag, rgb=False, feature_dim=model.feature_dim, fn=fn,
                     device=device, info=info)


# --------------------------------------------------------------------------------------------
# Scoring against cached reference statistics


class Scorer:
    """Holds one extractor and a data set's reference statistics; ``score`` is then cheap.

    Build it once on rank 0 before training starts: a missing Inception file raises
    MetricsError here, not after hours of training. Reference statistics are computed lazily
    (first ``score`` call) and cached on disk.
    """

    def __init__(self, extractor: str, key: str, train_set: ImageSetLike, test_set: ImageSetLike,
                 cache_dir: str | os.PathLike = "", device: str | torch.device = "cpu",
                 inception_weights: str | os.PathLike = "", batch_size: int = 500,
                 classifier_seed: int = 0):
        if extractor not in EXTRACTORS:
            raise MetricsError(f"eval.feature_extractor: got {extractor!r}; choose one of {', '.join(EXTRACTORS)}")
        self.key, self.batch_size = key, batch_size
        self.cache_dir = resolve_cache_dir(cache_dir)
        self.sets = {"train": train_set, "test": test_set}
        if extractor == "inception":
            self.extractor = inception_extractor(inception_weights, device)
        else:
            self.extractor = classifier_extractor(key, train_set, test_set, self.cache_dir, classifier_seed, device)
        self._stats: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def stats_path(self, split: str) -> Path:
        _, c, h, _ = self.sets[split].images.shape
        return self.cache_dir / "stats" / f"{self.key}_{split}_{h}px_{c}ch_{self.extractor.tag}.npz"

    def reference_stats(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        """(mu, sigma) of the whole ``split``, from the cache or computed and cached now."""
        if split not in self._stats:
            path, data = self.stats_path(split), self.sets[split]
            stats = _load_stats(path, len(data.labels))
            if stats is None:
                log.info("reference statistics: %s %s (%d images, %s)", self.key, split,
                         len(data.labels), self.extractor.name)
                feats, _ = self.extractor(data.images, self.batch_size)
                stats = feature_stats(feats)
                _save_stats(path, *stats, count=len(feats))
            self._stats[split] = stats
        return self._stats[split]

    def score(self, fake_images: torch.Tensor, fake_labels: torch.Tensor | None = None,
              splits: int = 10) -> dict[str, Any]:
        """Scores of generated images (float [-1,1] or uint8, NCHW, same size/channels as the data).

        Keys: ``is_mean``, ``is_std`` (IS over ``splits`` parts), ``fid_train``, ``fid_test``
        (FD to the whole train / test split), ``num_samples``, ``extractor`` and ``class_acc``
        (classifier only: share of samples classified as the label they were conditioned on;
        None for Inception or when no labels are given).
        """
        real = self.sets["train"].images
        if tuple(fake_images.shape[1:]) != tuple(real.shape[1:]):
            raise MetricsError(f"generated images have shape {tuple(fake_images.shape[1:])}, the data set "
                               f"{tuple(real.shape[1:])}; sample at data.image_size and data.channels")
        feats, logits = self.extractor(fake_images, self.batch_size)
        is_mean, is_std = inception_score(logits, splits=min(splits, len(logits)), from_logits=True)
        mu, sigma = feature_stats(feats)
        out: dict[str, Any] = {
            "is_mean": is_mean,
            "is_std": is_std,
            "fid_train": frechet_distance_from_stats(mu, sigma, *self.reference_stats("train")),
            "fid_test": frechet_distance_from_stats(mu, sigma, *self.reference_stats("test")),
            "num_samples": int(len(feats)),
            "extractor": self.extractor.name,
            "class_acc": None,
        }
        if self.extractor.name == "classifier" and fake_labels is not None:
            pred = torch.from_numpy(logits.argmax(1))
            out["class_acc"] = float((pred == fake_labels.cpu().long()).float().mean())
        return out


def _load_stats(path: Path, count: int) -> tuple[np.ndarray, np.ndarray] | None:
    if not path.is_file():
        return None
    with np.load(path) as z:
        if int(z["count"]) != count:  # the split changed (e.g. a different image folder)
            log.warning("%s holds statistics of %d images, the split has %d; recomputing",
                        path, int(z["count"]), count)
            return None
        return z["mu"], z["sigma"]


def _save_stats(path: Path, mu: np.ndarray, sigma: np.ndarray, count: int) -> None:
    def save(tmp: Path) -> None:
        with tmp.open("wb") as f:  # a file object: np.savez would append ".npz" to a name
            np.savez(f, mu=mu, sigma=sigma, count=count)
    _atomic_save(save, path)


def compute_scores(fake_images: torch.Tensor, fake_labels: torch.Tensor | None, key: str,
                   train_set: ImageSetLike, test_set: ImageSetLike, extractor: str = "inception",
                   cache_dir: str | os.PathLike = "", device: str | torch.device = "cpu",
                   inception_weights: str | os.PathLike = "", batch_size: int = 500,
                   classifier_seed: int = 0) -> dict[str, Any]:
    """One-shot form of ``Scorer(...).score(...)``; see ``Scorer.score`` for the keys."""
    scorer = Scorer(extractor, key, train_set, test_set, cache_dir=cache_dir, device=device,
                    inception_weights=inception_weights, batch_size=batch_size,
                    classifier_seed=classifier_seed)
    return scorer.score(fake_images, fake_labels)
