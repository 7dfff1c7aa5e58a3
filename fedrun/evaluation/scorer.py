"""Scoring generated images against a data set's cached reference statistics (rank 0 only).

Cache layout (``cache_dir``: argument, else $FEDRUN_CACHE_DIR, else ~/.cache/fedrun)::

    <cache>/classifiers/<dataset_key>_<size>px_<C>ch_seed<S>_v1.pt   state_dict + metadata
    <cache>/stats/<dataset_key>_<split>_<size>px_<C>ch_<tag>.npz        mu, sigma, count

with ``tag`` = ``inception`` or ``classifier-seed<S>-v1-<hash of its weights>``. Reference
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

from ..data import ImageSet
from ..errors import MetricsError
from .cache import atomic_save, resolve_cache_dir
from .extractors import EXTRACTORS, classifier_extractor, inception_extractor
from .scores import feature_stats, frechet_distance_from_stats, inception_score

log = logging.getLogger(__name__)


class Scorer:
    """Holds one extractor and a data set's reference statistics; ``score`` is then cheap.

    Build it once on rank 0 before training starts: a missing Inception file raises
    MetricsError here, not after hours of training. Reference statistics are computed lazily
    (first ``score`` call) and cached on disk.
    """

    def __init__(self, extractor: str, key: str, train_set: ImageSet, test_set: ImageSet,
                 cache_dir: str | os.PathLike = "", device: str | torch.device = "cpu",
                 inception_weights: str | os.PathLike = "", batch_size: int = 500,
                 classifier_seed: int = 0):
        if extractor not in EXTRACTORS:
            raise MetricsError(f"eval.feature_extractor: got {extractor!r}; choose one of "
                               f"{', '.join(EXTRACTORS)}")
        self.key, self.batch_size = key, batch_size
        self.cache_dir = resolve_cache_dir(cache_dir)
        self.sets = {"train": train_set, "test": test_set}
        if extractor == "inception":
            self.extractor = inception_extractor(inception_weights, device)
        else:
            self.extractor = classifier_extractor(key, train_set, test_set, self.cache_dir, classifier_seed,
                                                  device)
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
