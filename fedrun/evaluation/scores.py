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


@torch.no_grad()
def frechet_distance_fast(feats_a: np.ndarray | torch.Tensor, feats_b: np.ndarray | torch.Tensor,
                          device: torch.device | str = "cpu") -> float:
    """The same Frechet distance as ``frechet_distance``, from the features, without a d x d
    matrix square root (scipy's sqrtm of a 2048 x 2048 matrix takes ~17 s on one CPU core).

    tr sqrt(S1 S2) is the sum of the square roots of the eigenvalues of S1 S2, which are those
    of A^T S2 A for S1 = A A^T (A: the smaller set, centred, / sqrt(n - 1)): a symmetric
    n x n eigenproblem when that set has n <= d vectors (per-class and per-client sets), else
    R S2 R with R = S1^(1/2) from one symmetric eigendecomposition. float64 on ``device``.
    """
    a, b = _as_tensor(feats_a, device), _as_tensor(feats_b, device)
    if min(len(a), len(b)) < 2:
        raise ValueError(f"need at least 2 feature vectors per set, got {len(a)} and {len(b)}")
    if len(a) > len(b):
        a, b = b, a
    mu_a, mu_b = a.mean(0), b.mean(0)
    ca = (a - mu_a) / (len(a) - 1) ** 0.5  # S_a = ca^T ca
    cb = (b - mu_b) / (len(b) - 1) ** 0.5
    if len(a) <= a.shape[1]:
        m = (ca @ cb.T) @ (cb @ ca.T)  # A^T S_b A with A = ca^T: [n_a, n_a]
    else:
        w, v = torch.linalg.eigh(ca.T @ ca)
        root = (v * w.clamp_min(0).sqrt()) @ v.T  # S_a^(1/2)
        m = root @ (cb.T @ cb) @ root
    eig = torch.linalg.eigvalsh((m + m.T) / 2).clamp_min(0)
    trace = (ca * ca).sum() + (cb * cb).sum() - 2 * eig.sqrt().sum()
    return float((mu_a - mu_b).pow(2).sum() + trace)


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


# --------------------------------------------------------------------------------------------
# KID (Binkowski et al. 2018) and precision / recall / density / coverage (Kynkaenniemi et al.
# 2019; Naeem et al. 2020), in the same feature space as FID


def _as_tensor(feats: np.ndarray | torch.Tensor, device: torch.device | str) -> torch.Tensor:
    return torch.as_tensor(np.asarray(feats), dtype=torch.float64).to(device)


def kid_subset_size(n_a: int, n_b: int, max_subset_size: int = 1000) -> int:
    """clean-fid's subset size: both sets, capped at ``max_subset_size``."""
    return min(n_a, n_b, max_subset_size)


@torch.no_grad()
def kernel_distance(feats1: np.ndarray | torch.Tensor, feats2: np.ndarray | torch.Tensor,
                    num_subsets: int = 100, max_subset_size: int = 1000, seed: int = 0,
                    device: torch.device | str = "cpu") -> float:
    """KID: the unbiased MMD^2 with the cubic polynomial kernel (x.y / d + 1)^3, averaged over
    ``num_subsets`` random subsets of m = min(n1, n2, max_subset_size) vectors of each set.

    The formula and the order of the subset draws are clean-fid's ``kernel_distance`` (same
    argument order); the draws come from ``RandomState(seed)`` instead of numpy's global state,
    so the same features give the same number on 1 or N ranks. It runs in float64 on
    ``device``. When m equals both set sizes every subset is the whole set (the sum does not
    depend on the order): it is computed once.
    """
    a, b = _as_tensor(feats1, device), _as_tensor(feats2, device)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"need two feature sets [N, D] of the same D, got {tuple(a.shape)} and "
                         f"{tuple(b.shape)}")
    d = a.shape[1]
    m = kid_subset_size(len(a), len(b), max_subset_size)
    if m < 2:
        raise ValueError(f"KID needs subsets of at least 2 vectors, got {len(a)} and {len(b)}")
    rs = np.random.RandomState(seed)
    whole = m == len(a) == len(b)
    t = 0.0
    for _ in range(1 if whole else num_subsets):
        x = b if whole else b[torch.from_numpy(rs.choice(len(b), m, replace=False)).to(b.device)]
        y = a if whole else a[torch.from_numpy(rs.choice(len(a), m, replace=False)).to(a.device)]
        k_xx = (x @ x.T / d + 1) ** 3
        k_yy = (y @ y.T / d + 1) ** 3
        k_xy = (x @ y.T / d + 1) ** 3
        off_diag = k_xx.sum() - k_xx.diagonal().sum() + k_yy.sum() - k_yy.diagonal().sum()
        t += float(off_diag / (m - 1) - k_xy.sum() * 2 / m)
    return t / (1 if whole else num_subsets) / m


def _chunk_rows(n_cols: int, budget: int = 1 << 24) -> int:
    return max(1, budget // max(1, n_cols))  # rows of an [rows, n_cols] distance block


@torch.no_grad()
def kth_neighbour_radii(feats: torch.Tensor, k: int) -> torch.Tensor:
    """Distance of every vector to its k-th nearest neighbour in the same set (itself excluded)."""
    out = []
    step = _chunk_rows(len(feats))
    for start in range(0, len(feats), step):
        dist = torch.cdist(feats[start:start + step], feats)
        out.append(dist.topk(k + 1, dim=1, largest=False).values[:, -1])  # k+1: itself is at 0
    return torch.cat(out)


@torch.no_grad()
def prdc(real: np.ndarray | torch.Tensor, fake: np.ndarray | torch.Tensor, k: int = 5,
         device: torch.device | str = "cpu") -> dict[str, float]:
    """Precision, recall (Kynkaenniemi et al. 2019), density and coverage (Naeem et al. 2020).

    The definitions of the ``prdc`` package (same k-NN radii, strict ``<``), computed in float64
    blocks of at most 16M distances on ``device`` instead of three full N x N matrices in host
    memory (three 10,000 x 10,000 float64 matrices are 2.4 GB; 50,000 would be 60 GB):

    * precision: share of fake vectors inside the k-NN ball of some real vector;
    * recall: share of real vectors inside the k-NN ball of some fake vector;
    * density: mean over fake vectors of (number of real balls containing it) / k;
    * coverage: share of real vectors whose ball contains at least one fake vector.
    """
    r, f = _as_tensor(real, device), _as_tensor(fake, device)
    if min(len(r), len(f)) <= k:
        raise ValueError(f"precision/recall with k={k} need more than {k} vectors per set, "
                         f"got {len(r)} real and {len(f)} fake")
    r_radii, f_radii = kth_neighbour_radii(r, k), kth_neighbour_radii(f, k)
    in_real_ball = torch.zeros(len(f), dtype=torch.float64, device=r.device)  # per fake: balls holding it
    covered = torch.zeros(len(r), dtype=torch.bool, device=r.device)
    recalled = torch.zeros(len(r), dtype=torch.bool, device=r.device)
    step = _chunk_rows(len(r))
    for start in range(0, len(f), step):
        dist = torch.cdist(r, f[start:start + step])  # [real, fake block]
        inside = dist < r_radii[:, None]
        in_real_ball[start:start + step] = inside.sum(0, dtype=torch.float64)
        covered |= dist.min(1).values < r_radii
        recalled |= (dist < f_radii[None, start:start + step]).any(1)
    return {
        "precision": float((in_real_ball > 0).double().mean()),
        "recall": float(recalled.double().mean()),
        "density": float(in_real_ball.mean() / k),
        "coverage": float(covered.double().mean()),
    }
