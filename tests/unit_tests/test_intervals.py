"""The scores' bootstrap (fedrun/evaluation/intervals.py): every resampled statistic equals the
score computed on the resample itself, and the 95 % intervals cover what they claim to.

Coverage is checked on Gaussians, where the Frechet distance of the two distributions is known
in closed form: ||mu1 - mu2||^2 + sum_i (s1_i + s2_i - 2 sqrt(s1_i s2_i)) for diagonal
covariances s1, s2. Over T independent trials the number of intervals holding the true value is
Binomial(T, coverage); a test accepts when the count is not below the 0.1 % quantile of
Binomial(T, 0.95) (a correct 95 % interval fails it once in a thousand seeds), and the same test
sees the naive percentile interval fail, so it can fail.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from fedrun.evaluation import intervals as iv
from fedrun.evaluation import scores


def _sets(rng: np.random.Generator, n: int, m: int, d: int, shift: float = 0.3
          ) -> tuple[np.ndarray, np.ndarray]:
    return rng.standard_normal((n, d)), rng.standard_normal((m, d)) * 1.2 + shift


@pytest.mark.parametrize("n, m, d", [(30, 35, 40), (300, 200, 8)])  # Gram route, feature route
def test_resampled_fid_is_the_fid_of_the_resample(n: int, m: int, d: int):
    rng = np.random.default_rng(0)
    fake, real = _sets(rng, n, m, d)
    w_f, w_r = iv.resample_counts(n, 4, rng), iv.resample_counts(m, 4, rng)
    h_f, h_r = iv.split_halves(w_f, None, rng), iv.split_halves(w_r, None, rng)
    (whole, halves), = iv.fid_replicates(iv.Weighted(fake, w_f, h_f), [iv.Weighted(real, w_r, h_r)])
    for b in range(4):
        expand = lambda x, w: np.repeat(x, w, axis=0)  # noqa: E731
        assert whole[b] == pytest.approx(scores.frechet_distance(expand(fake, w_f[b]), expand(real, w_r[b])),
                                         rel=1e-6)
        first = scores.frechet_distance(expand(fake, h_f[b]), expand(real, h_r[b]))
        second = scores.frechet_distance(expand(fake, w_f[b] - h_f[b]), expand(real, w_r[b] - h_r[b]))
        assert halves[b] == pytest.approx((first + second) / 2, rel=1e-6)
    ones = iv.fid_weighted(fake, real, np.ones((1, n), np.int64), np.ones((1, m), np.int64))[0]
    assert ones == pytest.approx(scores.frechet_distance(fake, real), rel=1e-6)


def test_resampled_kid_leaves_out_pairs_of_copies_and_equals_kid_on_the_whole_sets():
    rng = np.random.default_rng(1)
    fake, real = _sets(rng, 30, 30, 5)
    assert iv.kid_weighted(fake, real, np.ones((1, 30)), np.ones((1, 30)))[0] == \
        pytest.approx(scores.kernel_distance(fake, real), rel=1e-9)
    w_f, w_r = iv.resample_counts(30, 1, rng), iv.resample_counts(30, 1, rng)

    def within(x: np.ndarray, w: np.ndarray) -> float:  # pairs of distinct vectors, counted w_i w_j times
        k = (x @ x.T / 5 + 1) ** 3
        pair = np.outer(w, w) * (1 - np.eye(len(w)))
        return float((k * pair).sum() / pair.sum())

    between = float((np.outer(w_f[0], w_r[0]) * (fake @ real.T / 5 + 1) ** 3).sum() / (30 * 30))
    expected = within(fake, w_f[0]) + within(real, w_r[0]) - 2 * between
    assert iv.kid_weighted(fake, real, w_f, w_r)[0] == pytest.approx(expected, rel=1e-9)


def test_resampled_prdc_keeps_the_radii_and_averages_over_the_copies():
    rng = np.random.default_rng(2)
    fake, real = _sets(rng, 60, 50, 3)
    whole = iv.prdc_weighted(real, fake, np.ones((1, 50)), np.ones((1, 60)), k=3)
    assert {k: v[0] for k, v in whole.items()} == pytest.approx(scores.prdc(real, fake, k=3))
    w_r, w_f = iv.resample_counts(50, 1, rng), iv.resample_counts(60, 1, rng)
    got = iv.prdc_weighted(real, fake, w_r, w_f, k=3)
    dist = np.linalg.norm(real[:, None] - fake[None], axis=2)  # [real, fake]
    r_rad = np.sort(np.linalg.norm(real[:, None] - real[None], axis=2), 1)[:, 3]
    f_rad = np.sort(np.linalg.norm(fake[:, None] - fake[None], axis=2), 1)[:, 3]
    inside = dist < r_rad[:, None]
    present_r, present_f = w_r[0] > 0, w_f[0] > 0
    assert got["precision"][0] == pytest.approx((w_f[0] * inside[present_r].any(0)).sum() / 60)
    assert got["density"][0] == pytest.approx((w_f[0] * (w_r[0] @ inside)).sum() / (3 * 60))
    assert got["coverage"][0] == pytest.approx((w_r[0] * inside[:, present_f].any(1)).sum() / 50)
    recalled = (dist < f_rad[None])[:, present_f].any(1)
    assert got["recall"][0] == pytest.approx((w_r[0] * recalled).sum() / 50)


def test_resampled_inception_score_and_accuracy():
    rng = np.random.default_rng(3)
    logits = rng.standard_normal((50, 4))
    assert iv.is_weighted(logits, np.ones((1, 50), np.int64), splits=5)[0] == \
        pytest.approx(scores.inception_score(logits, splits=5, from_logits=True)[0])
    right = rng.random(50) < 0.8
    w = iv.resample_counts(50, 3, rng)
    expected = [right[np.repeat(np.arange(50), row)].mean() for row in w]
    assert iv.mean_weighted(right, w) == pytest.approx(expected)


def test_stratified_resamples_keep_each_class_count_and_halves_split_them():
    rng = np.random.default_rng(4)
    labels = np.repeat([0, 1, 2], [5, 7, 9])
    w = iv.resample_counts(labels, 50, rng)
    for c, count in ((0, 5), (1, 7), (2, 9)):
        assert (w[:, labels == c].sum(1) == count).all()
    half = iv.split_halves(w, labels, rng)
    assert (half <= w).all() and (half >= 0).all()
    for c, count in ((0, 5), (1, 7), (2, 9)):
        assert (half[:, labels == c].sum(1) == count // 2).all()
    assert len({tuple(row) for row in w}) > 40  # they differ from resample to resample


def test_the_interval_is_centred_on_the_score_and_clipped_to_its_bounds():
    reps = np.array([10.0, 11.0, 12.0, 13.0, 14.0] * 20)  # mean 12
    lo, hi = iv.interval(5.0, reps, 0.9)
    q_lo, q_hi = np.quantile(reps - 12, [0.05, 0.95])
    assert (lo, hi) == pytest.approx((5 - q_hi, 5 - q_lo))
    assert iv.interval(0.05, reps / 10, 0.9, (0.0, 1.0))[0] == 0.0
    assert iv.interval(None, reps) is None and iv.interval(1.0, np.array([np.nan, 1.0])) is None


def _true_fd(shift: float, scale: float, d: int) -> float:
    """Frechet distance of N(0, I) and N(shift (1, ..., 1), scale^2 I), in closed form."""
    return d * shift ** 2 + d * (1 + scale ** 2 - 2 * scale)


def _least_hits(trials: int, coverage: float = 0.95) -> int:
    """The fewest hits a correct interval shows: Binomial(trials, coverage) falls below this
    with probability < 0.1 %."""
    least = int(stats.binom.ppf(0.001, trials, coverage))
    assert stats.binom.cdf(least - 1, trials, coverage) < 0.001
    return least


def _coverage_trials(trials: int, resamples: int, n: int, d: int, shift: float, scale: float
                     ) -> dict[str, float]:
    """Hits over ``trials`` of: FID at infinite N's centred interval on the population FD ("inf"),
    the naive percentile interval of the FID replicates on it ("naive"), FID's interval on FID's
    own expectation at n ("at_n", from 400 fresh draws); and FID at infinite N's mean interval
    width over the width 2 x 1.96 x sd of its point over the trials ("width")."""
    rng = np.random.default_rng(5)
    true = _true_fd(shift, scale, d)
    draws = [scores.frechet_distance_fast(rng.standard_normal((n, d)),
                                          rng.standard_normal((n, d)) * scale + shift) for _ in range(400)]
    at_n = float(np.mean(draws))
    hits = {"inf": 0, "naive": 0, "at_n": 0}
    points, widths = [], []
    for _ in range(trials):
        fake, real = rng.standard_normal((n, d)), rng.standard_normal((n, d)) * scale + shift
        w = np.vstack([iv.resample_counts(n, resamples, rng), np.ones((8, n), np.int64)])
        v = np.vstack([iv.resample_counts(n, resamples, rng), np.ones((8, n), np.int64)])
        (whole, halves), = iv.fid_replicates(iv.Weighted(fake, w, iv.split_halves(w, None, rng)),
                                             [iv.Weighted(real, v, iv.split_halves(v, None, rng))])
        inf = iv.fid_infinity(whole, halves)
        points.append(float(inf[resamples:].mean()))
        lo, hi = iv.interval(points[-1], inf[:resamples])
        hits["inf"] += lo <= true <= hi
        widths.append(hi - lo)
        p_lo, p_hi = np.quantile(whole[:resamples], [0.025, 0.975])
        hits["naive"] += p_lo <= true <= p_hi
        lo, hi = iv.interval(float(whole[-1]), whole[:resamples])
        hits["at_n"] += lo <= at_n <= hi
    return {**hits, "width": float(np.mean(widths) / (2 * 1.96 * np.std(points)))}


@pytest.mark.parametrize("trials, resamples, n",
                         [(50, 60, 150), pytest.param(100, 100, 200, marks=pytest.mark.slow)])
def test_fid_intervals_cover_the_true_distance_at_their_rate(trials: int, resamples: int, n: int):
    """FID at infinite N's interval holds the closed-form distance, FID's interval its own
    expectation at N, each in >= 95 % of trials up to the binomial margin, and FID at infinite N's
    interval is not wider than its point's spread asks for (within the 100 trials' error of a
    standard deviation, ~7 %, and the interval's own Monte Carlo error); the naive percentile
    interval of FID (which ignores FID's bias at finite N) does not hold the distance."""
    got = _coverage_trials(trials, resamples, n=n, d=8, shift=0.3, scale=1.2)
    assert got["inf"] >= _least_hits(trials), got
    assert got["at_n"] >= _least_hits(trials), got
    assert 0.75 <= got["width"] <= 1.3, got
    assert got["naive"] < _least_hits(trials), got  # the check can fail


def test_kid_interval_covers_its_expectation():
    """KID is unbiased: its interval holds E[KID] (from 300 fresh draws) at the 95 % rate."""
    rng = np.random.default_rng(6)
    n, d, trials = 200, 8, 80

    def draw() -> tuple[np.ndarray, np.ndarray]:
        return rng.standard_normal((n, d)), rng.standard_normal((n, d)) * 1.3 + 0.4

    expected = float(np.mean([scores.kernel_distance(*draw()) for _ in range(300)]))
    hits = 0
    for _ in range(trials):
        fake, real = draw()
        w_f, w_r = iv.resample_counts(n, 100, rng), iv.resample_counts(n, 100, rng)
        lo, hi = iv.interval(scores.kernel_distance(fake, real), iv.kid_weighted(fake, real, w_f, w_r))
        hits += lo <= expected <= hi
    assert hits >= _least_hits(trials), hits


def test_config_refuses_too_few_resamples_for_the_confidence():
    from fedrun.config import load_config
    from fedrun.errors import ConfigError
    one_line = r"^eval.bootstrap: 20 resamples cannot place .* use 0 .* or >= 40$"
    with pytest.raises(ConfigError, match=one_line):
        load_config(None, {"eval.bootstrap": "20"})
    with pytest.raises(ConfigError, match="eval.confidence"):
        load_config(None, {"eval.confidence": "1.0"})
    assert load_config(None, {"eval.bootstrap": "0"}).eval.bootstrap == 0
