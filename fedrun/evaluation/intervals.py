"""Confidence intervals of the scores: a bootstrap of the statistics over the features, computed
once, and FID extrapolated to infinite N (Chong and Forsyth, CVPR 2020).

A resample is a vector of multinomial counts per set (``resample_counts``), drawn within each
class where the set has labels (the generated set is drawn with fixed per-class counts; the
test split's classes are kept at their counts too). Every score is then recomputed from the same
features with those counts as weights, by matrix operations over a batch of resamples:

* FID: weighted means and covariances, tr sqrt(S1 S2) from a Cholesky factor and one symmetric
  eigenproblem; in the feature space (d x d) when the sets are larger than d (the classifier's
  128-d features), else from the sets' Gram and cross-Gram matrices (n x m; Inception's 2048-d
  features of a few hundred images), whichever costs fewer flops;
* KID: the unbiased MMD^2 as a weighted U-statistic (pairs of copies of the same vector are
  left out, so a resample's expectation is the estimate itself);
* precision, recall, density, coverage: weighted averages of per-vector indicators, the k-NN
  radii held at those of the full sets (a resample with copies of a vector at distance 0 would
  shrink them), so the intervals leave the manifold estimate's own variation out;
* IS: the same split formula on the resampled rows; class accuracy: a weighted mean.

The interval (``interval``) is the centred bootstrap interval for what the score reads on
average at these set sizes: [s - (q_hi - m*), s - (q_lo - m*)], with s the score, m* the mean
and q the quantiles of the resampled scores (the spread of s around its expectation is taken
to be that of the resampled scores around theirs; a resample's FID carries more of FID's
upward bias at finite N, and only its deviations are used). FID's interval is about the FID at
these N; ``fid_infinity`` estimates the Frechet distance at infinite N from FID at two sizes
(the whole sets and their halves), with an interval from the same resamples. Tests:
tests/unit_tests/test_intervals.py (coverage on Gaussians whose Frechet distance is known in
closed form).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .. import seeding
from .scores import inception_score

# bounds of scores that cannot leave them (an interval is clipped to them)
BOUNDS = {"fid": (0.0, math.inf), "is": (1.0, math.inf), "precision": (0.0, 1.0), "recall": (0.0, 1.0),
          "coverage": (0.0, 1.0), "density": (0.0, math.inf), "class_acc": (0.0, 1.0)}


def bounds(key: str) -> tuple[float, float]:
    """The bounds of a score's interval: FID >= 0 at finite N (FID at infinite N, an
    extrapolation, and KID, an unbiased estimate, may go below 0), IS >= 1, shares in [0, 1]."""
    if key.endswith("_inf") or key.startswith("kid"):
        return (-math.inf, math.inf)
    return BOUNDS.get("fid" if key.startswith("fid") else "is" if key.startswith("is") else key,
                      (-math.inf, math.inf))
_CHUNK_BYTES = 1 << 27  # float64 working set of one batch of resamples


# The ``draw`` part of the stream "eval_bootstrap": which resamples a generator draws.
GENERATED, TEST, TRAIN, SUBSETS, CLIENT0 = 0, 1, 2, 3, 4  # client k's sets: CLIENT0 + k
DRAWS = {GENERATED: "the generated samples", TEST: "the test split", TRAIN: "the train split",
         SUBSETS: "FID at infinite N's subsets", CLIENT0: "client k's sets (``client_draw``)"}


@dataclass(frozen=True)
class Bootstrap:
    """``resamples`` (0 = off) at ``confidence``, each set's resamples from the registered stream
    "eval_bootstrap" at (``seed``, its draw in DRAWS)."""

    resamples: int
    confidence: float = 0.95
    seed: int = 0

    def rng(self, draw: int) -> np.random.Generator:
        return np.random.default_rng(seeding.stream_seed("eval_bootstrap", seed=self.seed, draw=draw))

    def counts(self, draw: int, n_or_labels: int | np.ndarray) -> np.ndarray:
        """[resamples, n] counts of the set of ``draw`` (stratified by class when given labels)."""
        return resample_counts(n_or_labels, self.resamples, self.rng(draw))


def client_draw(client: int, which: int) -> int:
    """The draw of client k's scores: ``which`` 0 = against its own images, 1 = its local model's
    samples against the test split."""
    return CLIENT0 + 2 * client + which


def resample_counts(n_or_labels: int | np.ndarray, resamples: int, rng: np.random.Generator) -> np.ndarray:
    """[resamples, n] multinomial counts: how often each vector is in each resample. With labels,
    each class keeps its own count (a stratified bootstrap)."""
    if isinstance(n_or_labels, (int, np.integer)):
        labels = np.zeros(int(n_or_labels), dtype=np.int64)
    else:
        labels = np.asarray(n_or_labels).astype(np.int64)
    out = np.zeros((resamples, len(labels)), dtype=np.int64)
    for c in np.unique(labels):
        where = np.nonzero(labels == c)[0]
        out[:, where] = rng.multinomial(len(where), np.full(len(where), 1 / len(where)), size=resamples)
    return out


def interval(point: float | None, replicates: np.ndarray, confidence: float = 0.95,
             bounds: tuple[float, float] = (-math.inf, math.inf), reflect: bool = True) -> list[float] | None:
    """The centred bootstrap interval [lo, hi] of ``point`` (see the module docstring), clipped to
    ``bounds``; None without a point or with fewer than 2 finite replicates. ``reflect=False``:
    [s + (q_lo - m*), s + (q_hi - m*)], the replicates' deviations added to the point as they
    are (``fedrun compare``: then a difference and a ratio built from the same deviations leave
    0 and 1 out together)."""
    reps = np.asarray(replicates, dtype=np.float64)
    reps = reps[np.isfinite(reps)]
    if point is None or not math.isfinite(point) or len(reps) < 2:
        return None
    alpha = (1 - confidence) / 2
    q_lo, q_hi = np.quantile(reps - reps.mean(), [alpha, 1 - alpha])
    lo, hi = (point - q_hi, point - q_lo) if reflect else (point + q_lo, point + q_hi)
    return [float(np.clip(lo, *bounds)), float(np.clip(hi, *bounds))]


def _t(x: np.ndarray | torch.Tensor, device: torch.device | str = "cpu") -> torch.Tensor:
    return torch.as_tensor(np.asarray(x), dtype=torch.float64).to(device)


def _batches(resamples: int, per_resample: int) -> list[slice]:
    step = max(1, _CHUNK_BYTES // max(1, 8 * per_resample))
    return [slice(s, min(s + step, resamples)) for s in range(0, resamples, step)]


# --------------------------------------------------------------------------------------------
# FID


@dataclass
class Weighted:
    """A feature set [n, d] and its resamples: counts [B, n]; ``half``: the counts [B, n] of a
    first half of each resample's copies (the second half is the rest), for FID at infinite N."""

    feats: np.ndarray | torch.Tensor
    w: np.ndarray
    half: np.ndarray | None = None


@torch.no_grad()
def fid_weighted(fake: np.ndarray | torch.Tensor, real: np.ndarray | torch.Tensor, w_fake: np.ndarray,
                 w_real: np.ndarray, device: torch.device | str = "cpu") -> np.ndarray:
    """FID of every pair of rows of the weights [B, n] and [B, m]: the Frechet distance between the
    Gaussians fitted (np.cov, divisor count - 1) to ``fake`` and ``real`` with vector i counted
    w[b, i] times. Weights of all ones give ``scores.frechet_distance``."""
    return fid_replicates(Weighted(fake, w_fake), [Weighted(real, w_real)], device)[0][0]


@torch.no_grad()
def fid_replicates(fake: Weighted, reals: Sequence[Weighted], device: torch.device | str = "cpu"
                   ) -> list[tuple[np.ndarray, np.ndarray | None]]:
    """For each reference set: (FID of every resample pair [B], and where both sets have halves
    the mean of FID(first half, first half) and FID(second half, second half), else None). The
    generated set's moments are computed once for all reference sets."""
    f, wf = _t(fake.feats, device), _t(fake.w, device)
    hf = _t(fake.half, device) if fake.half is not None else None
    n, d = f.shape
    largest = max((len(r.feats) for r in reals), default=0)
    batches = _batches(len(wf), (n + largest) * d + 6 * d * d)
    fake_sums: dict[int, tuple[_Sums, _Sums | None]] = {}  # batch -> (whole, first half) sums
    out: list[tuple[np.ndarray, np.ndarray | None]] = []
    outer_f: _Outer | None = None
    for real in reals:
        r, wr = _t(real.feats, device), _t(real.w, device)
        hr = _t(real.half, device) if real.half is not None and hf is not None else None
        if wf.ndim != 2 or wr.ndim != 2 or len(wf) != len(wr):
            raise ValueError(f"need weights [B, n] and [B, m] of one B, got {tuple(wf.shape)}, "
                             f"{tuple(wr.shape)}")
        m = len(r)
        whole, halves = [], []
        if min(n, m) ** 2 * max(n, m) + min(n, m) ** 3 < (n + m) * d * d + 2 * d ** 3:  # fewer flops
            k_f, k_r, cross = f @ f.T, r @ r.T, f @ r.T
            for s in _batches(len(wf), 3 * (n * m + n * n + m * m)):
                whole.append(_fid_gram(k_f, k_r, cross, wf[s], wr[s]))
                if hr is not None:
                    assert hf is not None
                    halves.append((_fid_gram(k_f, k_r, cross, hf[s], hr[s]) +
                                   _fid_gram(k_f, k_r, cross, wf[s] - hf[s], wr[s] - hr[s])) / 2)
        else:
            outer_f, outer_r = outer_f or _Outer(f), _Outer(r)
            for i, s in enumerate(batches):
                if i not in fake_sums:
                    first = outer_f.sums(hf[s]) if hf is not None else None
                    fake_sums[i] = (first + outer_f.sums(wf[s] - hf[s]) if first is not None
                                    else outer_f.sums(wf[s]), first)
                f_all, f_first = fake_sums[i]
                if hr is not None:
                    r_first = outer_r.sums(hr[s])
                    r_all = r_first + outer_r.sums(wr[s] - hr[s])
                    assert f_first is not None
                    halves.append((_fid_features(f_first, r_first) +
                                   _fid_features(f_all - f_first, r_all - r_first)) / 2)
                else:
                    r_all = outer_r.sums(wr[s])
                whole.append(_fid_features(f_all, r_all))
        out.append((torch.cat(whole).cpu().numpy(), torch.cat(halves).cpu().numpy() if halves else None))
    return out


@dataclass
class _Sums:
    """Sums of a batch of weighted sets: total weight [B], sum of w x [B, d], sum of w x x^T [B, d, d]."""

    total: torch.Tensor
    first: torch.Tensor
    second: torch.Tensor

    def __add__(self, other: _Sums) -> _Sums:
        return _Sums(self.total + other.total, self.first + other.first, self.second + other.second)

    def __sub__(self, other: _Sums) -> _Sums:
        return _Sums(self.total - other.total, self.first - other.first, self.second - other.second)

    def moments(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Means [B, d] and covariances [B, d, d] (divisor: total weight - 1, as np.cov)."""
        mu = self.first / self.total[:, None]
        outer = self.total[:, None, None] * mu[:, :, None] * mu[:, None, :]
        return mu, (self.second - outer) / (self.total - 1)[:, None, None]


_OUTER_BYTES = 1 << 28  # the table of x_i x_i^T (upper triangles) of a set, when it fits this


class _Outer:
    """Weighted sums of a set's outer products as one matrix product: the upper triangles of
    x_i x_i^T as the rows of a table [n, d (d + 1) / 2] (when it fits _OUTER_BYTES), so
    sum_i w_i x_i x_i^T of B weight rows is one [B, n] x [n, d (d + 1) / 2] product."""

    def __init__(self, x: torch.Tensor):
        self.x = x
        n, d = x.shape
        self.rows, self.cols = torch.triu_indices(d, d, device=x.device)
        self.table = (x[:, self.rows] * x[:, self.cols]) if n * len(self.rows) * 8 <= _OUTER_BYTES else None

    def sums(self, w: torch.Tensor) -> _Sums:
        x = self.x
        if self.table is None:
            return _Sums(w.sum(1), w @ x, torch.einsum("bn,nd,ne->bde", w, x, x))
        d = x.shape[1]
        second = torch.zeros(len(w), d, d, dtype=x.dtype, device=x.device)
        second[:, self.rows, self.cols] = w @ self.table
        second = second + second.transpose(1, 2)
        second.diagonal(dim1=1, dim2=2).mul_(0.5)  # the diagonal was added twice
        return _Sums(w.sum(1), w @ x, second)


def _fid_features(fake: _Sums, real: _Sums) -> torch.Tensor:
    """tr sqrt(S_f S_r) = the sum of the square roots of the eigenvalues of L^T S_f L, S_r = L L^T
    (a Cholesky factor; S_r^(1/2) from a symmetric eigendecomposition where S_r is singular)."""
    mu_f, s_f = fake.moments()
    mu_r, s_r = real.moments()
    chol, info = torch.linalg.cholesky_ex(s_r)
    if bool((info != 0).any()):
        w, v = torch.linalg.eigh(s_r)
        chol = (v * w.clamp_min(0).sqrt()[:, None, :]) @ v.transpose(1, 2)  # S_r^(1/2), symmetric
    m = chol.transpose(1, 2) @ s_f @ chol
    eig = torch.linalg.eigvalsh((m + m.transpose(1, 2)) / 2).clamp_min(0)
    trace = s_f.diagonal(dim1=1, dim2=2).sum(1) + s_r.diagonal(dim1=1, dim2=2).sum(1)
    return (mu_f - mu_r).pow(2).sum(1) + trace - 2 * eig.sqrt().sum(1)


def _fid_gram(k_f: torch.Tensor, k_r: torch.Tensor, cross: torch.Tensor, wf: torch.Tensor,
              wr: torch.Tensor) -> torch.Tensor:
    """The same from the Gram matrices: with C_f = W_f^(1/2) (F - 1 mu_f^T) / sqrt(n_f - 1) (and
    C_r likewise) S_f = C_f^T C_f, and tr sqrt(S_f S_r) is the sum of the singular values of
    C_f C_r^T, an n x m matrix built from F R^T alone."""
    nf, nr = wf.sum(1), wr.sum(1)
    mf_mf = torch.einsum("bi,ij,bj->b", wf, k_f, wf) / nf ** 2
    mr_mr = torch.einsum("bi,ij,bj->b", wr, k_r, wr) / nr ** 2
    mf_mr = torch.einsum("bi,ij,bj->b", wf, cross, wr) / (nf * nr)
    tr_f = (wf @ k_f.diagonal() - nf * mf_mf) / (nf - 1)
    tr_r = (wr @ k_r.diagonal() - nr * mr_mr) / (nr - 1)
    f_mu_r = (wr @ cross.T) / nr[:, None]  # [B, n]: f_i . mu_r
    mu_f_r = (wf @ cross) / nf[:, None]  # [B, m]: mu_f . r_j
    centred = cross[None] - f_mu_r[:, :, None] - mu_f_r[:, None, :] + mf_mr[:, None, None]
    scale = ((nf - 1) * (nr - 1)).sqrt()[:, None, None]
    c = centred * (wf.sqrt()[:, :, None] * wr.sqrt()[:, None, :]) / scale
    small = c @ c.transpose(1, 2) if c.shape[1] <= c.shape[2] else c.transpose(1, 2) @ c
    eig = torch.linalg.eigvalsh((small + small.transpose(1, 2)) / 2).clamp_min(0)
    return mf_mf + mr_mr - 2 * mf_mr + tr_f + tr_r - 2 * eig.sqrt().sum(1)


def split_halves(counts: np.ndarray, labels: np.ndarray | None, rng: np.random.Generator) -> np.ndarray:
    """The counts [B, n] of a random first half of each row's copies: within each class, half of
    the class's copies (rounded down), drawn without replacement."""
    labels = np.zeros(counts.shape[1], np.int64) if labels is None else np.asarray(labels)
    half = np.zeros_like(counts)
    for c in np.unique(labels):
        cols = np.nonzero(labels == c)[0]
        for b, row in enumerate(counts[:, cols]):
            half[b, cols] = rng.multivariate_hypergeometric(row, int(row.sum()) // 2)
    return half


def fid_infinity(whole: np.ndarray, halves: np.ndarray) -> np.ndarray:
    """FID at infinite N (Chong and Forsyth 2020) from FID at two sizes: FID is close to a line
    in 1/N (N the generated count, with the reference count in proportion), so from the whole
    sets (1/N) and their halves (2/N; the mean of the two halves' FIDs) the line's value at
    1/N = 0 is 2 FID(N) - FID(N/2). Both sets are halved, so the reference set's own 1/M bias
    is extrapolated away too."""
    return 2 * np.asarray(whole) - np.asarray(halves)


# --------------------------------------------------------------------------------------------
# KID, precision / recall / density / coverage, IS, class accuracy


@torch.no_grad()
def kid_weighted(fake: np.ndarray | torch.Tensor, real: np.ndarray | torch.Tensor, w_fake: np.ndarray,
                 w_real: np.ndarray, device: torch.device | str = "cpu") -> np.ndarray:
    """KID's unbiased MMD^2 (cubic kernel (x.y / d + 1)^3) over the whole sets with weights:
    within a set, pairs of copies of one vector are left out. Weights of all ones give the
    U-statistic KID averages over its subsets (``scores.kernel_distance`` when the sets are
    its subsets)."""
    f, r = _t(fake, device), _t(real, device)
    d = f.shape[1]
    wf, wr = _t(w_fake, device), _t(w_real, device)
    k_ff, k_rr, k_fr = (f @ f.T / d + 1) ** 3, (r @ r.T / d + 1) ** 3, (f @ r.T / d + 1) ** 3

    def within(k: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        pairs = w.sum(1) ** 2 - (w * w).sum(1)
        return (torch.einsum("bi,ij,bj->b", w, k, w) - (w * w) @ k.diagonal()) / pairs

    between = torch.einsum("bi,ij,bj->b", wf, k_fr, wr) / (wf.sum(1) * wr.sum(1))
    return (within(k_ff, wf) + within(k_rr, wr) - 2 * between).cpu().numpy()


@torch.no_grad()
def prdc_weighted(real: np.ndarray | torch.Tensor, fake: np.ndarray | torch.Tensor, w_real: np.ndarray,
                  w_fake: np.ndarray, k: int = 5, device: torch.device | str = "cpu"
                  ) -> dict[str, np.ndarray]:
    """Precision, recall, density and coverage (``scores.prdc``'s definitions) for every pair of
    weight rows, the k-NN radii those of the full sets. Weights of all ones give ``prdc``."""
    from .scores import _chunk_rows, kth_neighbour_radii
    r, f = _t(real, device), _t(fake, device)
    wr, wf = _t(w_real, device), _t(w_fake, device)
    r_radii, f_radii = kth_neighbour_radii(r, k), kth_neighbour_radii(f, k)
    b = len(wr)
    precision, density = torch.zeros(b, dtype=torch.float64, device=r.device), 0.0
    holds = torch.zeros(len(r), b, dtype=torch.float64, device=r.device)  # per real: fakes in its ball
    reaches = torch.zeros(len(r), b, dtype=torch.float64, device=r.device)  # per real: fake balls holding it
    step = _chunk_rows(len(r))
    for start in range(0, len(f), step):
        dist = torch.cdist(r, f[start:start + step])  # [real, fake block]
        inside = (dist < r_radii[:, None]).double()
        w_blk = wf[:, start:start + step]  # [B, block]
        balls = wr @ inside  # [B, block]: weighted number of real balls holding each fake
        precision = precision + (w_blk * (balls > 0)).sum(1)
        density = density + (w_blk * balls).sum(1)
        holds += inside @ w_blk.T
        reaches += (dist < f_radii[None, start:start + step]).double() @ w_blk.T
    nf, nr = wf.sum(1), wr.sum(1)
    return {"precision": (precision / nf).cpu().numpy(),
            "recall": ((wr * (reaches.T > 0)).sum(1) / nr).cpu().numpy(),
            "density": (density / (k * nf)).cpu().numpy(),
            "coverage": ((wr * (holds.T > 0)).sum(1) / nr).cpu().numpy()}


def is_weighted(logits: np.ndarray, w: np.ndarray, splits: int = 10, seed: int = 0) -> np.ndarray:
    """``scores.inception_score`` (its mean over splits) of each resample's rows."""
    x = np.asarray(logits)
    return np.array([inception_score(x[np.repeat(np.arange(len(row)), row)], splits=splits,
                                     from_logits=True, seed=seed)[0] for row in w])


def mean_weighted(values: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Weighted means of per-vector values (class accuracy: 1 where the class came out right)."""
    return np.asarray(w, dtype=np.float64) @ np.asarray(values, dtype=np.float64) / np.asarray(w).sum(1)


KID_MAX = 4000  # vectors per set in KID's bootstrap: its kernel matrices are n x n


def spaced(n: int, most: int) -> np.ndarray:
    """At most ``most`` evenly spaced indices of n (sets come in class order: the mix is kept)."""
    return np.arange(n) if n <= most else np.linspace(0, n - 1, most).round().astype(np.int64)


def kid_weighted_capped(fake: np.ndarray, real: np.ndarray, w_fake: np.ndarray, w_real: np.ndarray,
                        device: torch.device | str = "cpu", most: int = KID_MAX) -> np.ndarray:
    """``kid_weighted`` on at most ``most`` evenly spaced vectors of each set (a larger set's
    KID varies less than that: its interval is then wider than it needs to be)."""
    i, j = spaced(len(fake), most), spaced(len(real), most)
    return kid_weighted(fake[i], real[j], w_fake[:, i], w_real[:, j], device)
