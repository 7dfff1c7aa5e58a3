"""FID and IS as pure functions of features and class probabilities (no networks, no files).

The Frechet distance is clean-fid's own formula (``cleanfid.fid.frechet_distance``), so a
number from here equals clean-fid's for the same features.
"""

from __future__ import annotations

import numpy as np
import torch


def feature_stats(feats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance (float64) of a feature set [N, D]: all FID needs of a set."""
    feats = np.asarray(feats, dtype=np.float64)
    if feats.ndim != 2 or len(feats) < 2:
        raise ValueError(f"need at least 2 feature vectors [N, D], got shape {feats.shape}")
    return feats.mean(axis=0), np.cov(feats, rowvar=False)


def frechet_distance_from_stats(mu1: np.ndarray, sigma1: np.ndarray,
                                mu2: np.ndarray, sigma2: np.ndarray) -> float:
    from cleanfid.fid import frechet_distance as cleanfid_frechet_distance  # ~0.7 s: when first used
    return float(cleanfid_frechet_distance(mu1, sigma1, mu2, sigma2))


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
    probs = x.softmax(1) if from_logits else x / x.sum(1, keepdim=True)
    probs = probs[torch.from_numpy(np.random.default_rng(seed).permutation(len(probs)))]
    scores = []
    for part in torch.tensor_split(probs, splits):
        p_y = part.mean(dim=0, keepdim=True)
        # xlogy: 0 log 0 = 0
        kl = (torch.xlogy(part, part) - torch.xlogy(part, p_y)).sum(axis=1).mean()
        scores.append(float(torch.exp(kl)))
    return float(np.mean(scores)), float(np.std(scores))
