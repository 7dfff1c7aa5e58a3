"""FID/IS: the formulas, the Inception file handling, and the proxy classifier on real digits."""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn as nn

from fedrun.config import DataConfig
from fedrun.data import load_split, to_uint8
from fedrun.errors import MetricsError
from fedrun.evaluation import classifier, extractors, intervals, scorer, scores

# ---------------------------------------------------------------------------------------------
# Formulas


def test_frechet_distance_is_zero_on_itself_and_grows_with_noise():
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(600, 12)) @ rng.normal(size=(12, 12))  # correlated features
    assert abs(scores.frechet_distance(feats, feats)) < 1e-6
    noise = rng.normal(size=feats.shape)
    dists = [scores.frechet_distance(feats, feats + s * noise) for s in (0.1, 0.3, 1.0, 3.0, 10.0)]
    assert dists[0] > 1e-3
    assert all(a < b for a, b in zip(dists, dists[1:], strict=False)), dists


def test_frechet_distance_of_shifted_mean_is_squared_shift():
    rng = np.random.default_rng(1)
    feats = rng.normal(size=(400, 5))
    assert scores.frechet_distance(feats, feats + 2.0) == pytest.approx(5 * 4.0, rel=1e-6)


@pytest.mark.parametrize("k", [1, 2, 5, 10])
def test_inception_score_of_confident_predictions_counts_classes(k):
    # class-ordered, as conditional samples arrive: without shuffling, each split holds one class
    labels = np.repeat(np.arange(k), 1000 // k)
    logits = np.full((len(labels), 10), -30.0)
    logits[np.arange(len(labels)), labels] = 30.0
    mean, std = scores.inception_score(logits, splits=10)
    assert mean == pytest.approx(k, rel=0.05)
    assert std < 0.1 * k
    probs = torch.from_numpy(logits).softmax(1).numpy()
    assert scores.inception_score(probs)[0] == pytest.approx(mean, rel=1e-6)  # detected as probs


def test_inception_score_of_uniform_predictions_is_one():
    mean, _ = scores.inception_score(np.zeros((200, 10)), splits=10, from_logits=True)
    assert mean == pytest.approx(1.0, abs=1e-9)


def test_to_uint8_range_rounding_and_channels():
    x = torch.tensor([-1.0, 0.0, 1.0, 2.0]).view(1, 1, 2, 2)
    u = to_uint8(x)
    assert u.dtype == torch.uint8 and u.flatten().tolist() == [0, 128, 255, 255]
    rgb = to_uint8(x, rgb=True)
    assert rgb.shape == (1, 3, 2, 2) and torch.equal(rgb[:, 0], rgb[:, 2])
    assert torch.equal(to_uint8(u), u)  # uint8 passes through unchanged


# ---------------------------------------------------------------------------------------------
# Inception weights: located, never downloaded


def test_missing_inception_weights_raise_with_the_fix(tmp_path, monkeypatch):
    missing = tmp_path / "nowhere" / extractors.INCEPTION_FILE
    monkeypatch.setenv("FEDRUN_INCEPTION_WEIGHTS", str(missing))
    with pytest.raises(MetricsError) as err:
        extractors.inception_extractor(device="cpu")
    msg = str(err.value)
    assert "FEDRUN_INCEPTION_WEIGHTS" in msg and str(missing) in msg
    assert extractors.inception_url() in msg and "\n" not in msg
    assert not missing.exists()  # nothing fetched or created

    # the Scorer fails the same way, before any reference statistics are computed
    fake = SimpleNamespace(images=torch.zeros(4, 1, 8, 8), labels=torch.zeros(4, dtype=torch.long),
                           num_classes=2)
    with pytest.raises(MetricsError, match="FEDRUN_INCEPTION_WEIGHTS"):
        scorer.Scorer("inception", "toy", fake, fake, cache_dir=tmp_path / "cache")
    assert not (tmp_path / "cache").exists()


def test_explicit_inception_path_wins_over_env(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDRUN_INCEPTION_WEIGHTS", str(tmp_path))
    with pytest.raises(MetricsError, match="eval.inception_weights"):
        extractors.inception_weights_path(tmp_path / "explicit.pt")


class _StandInInception(nn.Module):
    """Same TorchScript surface as clean-fid's file (``layers``, ``output``); random weights.
    Only checks the wiring (resize to 299, normalisation, feature/logit split) offline."""

    def __init__(self):
        super().__init__()
        self.layers = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(3, 2048, 1))
        self.output = nn.Linear(2048, 1008)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output(self.layers(x).flatten(1))


def test_inception_route_with_a_stand_in_network(tmp_path, monkeypatch):
    torch.jit.script(_StandInInception()).save(str(tmp_path / extractors.INCEPTION_FILE))
    monkeypatch.setenv("FEDRUN_INCEPTION_WEIGHTS", str(tmp_path))  # a folder holding the file
    ext = extractors.inception_extractor(device="cpu")
    images = torch.rand(6, 1, 16, 16) * 2 - 1  # grayscale: repeated to RGB, resized to 299
    feats, logits = ext(images, batch_size=4)
    assert feats.shape == (6, 2048) and logits.shape == (6, 1008)
    assert np.isfinite(feats).all() and feats.std(0).max() > 0


def test_corrupt_inception_file_is_reported(tmp_path):
    bad = tmp_path / extractors.INCEPTION_FILE
    bad.write_text("<html>404</html>")
    with pytest.raises(MetricsError, match="not clean-fid's Inception"):
        extractors.inception_extractor(bad)


# ---------------------------------------------------------------------------------------------
# Proxy classifier on the real digits set


def _digits():
    cfg = DataConfig(name="digits", image_size=16, channels=1)
    return load_split(cfg, "train"), load_split(cfg, "test")


@pytest.fixture(scope="module")
def digits_scorer():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # module scope: the autouse one-thread fixture is per test
    train, test = _digits()
    # the session's cache (conftest.py): the classifier trained here serves every later test
    cache = Path(os.environ["FEDRUN_CACHE_DIR"])
    made = scorer.Scorer("classifier", "digits", train, test, cache_dir=cache, batch_size=256)
    torch.set_num_threads(before)
    return SimpleNamespace(scorer=made, train=train, test=test, cache=cache)


def test_classifier_trains_accurately_and_is_cached(digits_scorer, monkeypatch):
    s = digits_scorer
    assert s.scorer.extractor.info["test_acc"] > 0.9
    path = classifier.classifier_path(s.cache, "digits", 16, 1, 0)
    assert path.is_file()

    monkeypatch.setattr(classifier, "train_classifier", lambda *a, **k: pytest.fail("retrained"))
    again = scorer.Scorer("classifier", "digits", s.train, s.test, cache_dir=s.cache)
    a, _ = s.scorer.extractor(s.test.images[:50])
    b, _ = again.extractor(s.test.images[:50])
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    assert again.stats_path("train") == s.scorer.stats_path("train")  # same weights, same stats


def test_held_out_digits_score_far_better_than_noise(digits_scorer):
    s = digits_scorer
    real = s.scorer.score(s.test.images, s.test.labels)
    noise = s.scorer.score(torch.rand_like(s.test.images) * 2 - 1, s.test.labels)
    assert set(real) >= {"is_mean", "is_std", "fid_train", "fid_test", "num_samples", "class_acc"}
    assert abs(real["fid_test"]) < 1e-3  # the test split against its own statistics
    assert real["fid_train"] * 10 < noise["fid_train"]
    assert real["fid_test"] * 10 < noise["fid_test"]
    assert real["is_mean"] > 6 and real["is_mean"] > 3 * noise["is_mean"]
    assert real["class_acc"] > 0.9 and noise["class_acc"] < 0.5
    assert real["num_samples"] == len(s.test.labels)
    # reference statistics went to the cache, one file per split
    for split in ("train", "test"):
        path = s.scorer.stats_path(split)
        assert path.is_file() and path.parent == s.cache / "stats"
        with np.load(path) as z:
            assert z["mu"].shape == (s.scorer.extractor.feature_dim,)


def test_score_rejects_images_of_the_wrong_size(digits_scorer):
    with pytest.raises(MetricsError, match="data.image_size"):
        digits_scorer.scorer.score(torch.zeros(20, 1, 32, 32))


def test_classifier_training_is_seeded_and_leaves_the_global_rng_alone():
    g = torch.Generator().manual_seed(3)
    tiny = SimpleNamespace(images=torch.rand(64, 1, 8, 8, generator=g) * 2 - 1,
                           labels=torch.randint(0, 3, (64,), generator=g), num_classes=3)
    before = torch.get_rng_state()
    a = classifier.train_classifier(tiny, seed=5, max_epochs=3, target_steps=1)
    assert torch.equal(before, torch.get_rng_state())
    b = classifier.train_classifier(tiny, seed=5, max_epochs=3, target_steps=1)
    c = classifier.train_classifier(tiny, seed=6, max_epochs=3, target_steps=1)
    wa, wb, wc = (m.head.weight for m in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)


@pytest.mark.slow  # ~5 s: three bootstraps against the digits' splits
def test_every_score_gets_its_interval_reproducibly(digits_scorer):
    s = digits_scorer
    boot = scorer.Scorer("classifier", "digits", s.train, s.test, cache_dir=s.cache, bootstrap=40, seed=3)
    labels = s.train.labels[:150]
    feats, logits = boot.features(s.train.images[:150])
    got = boot.score_features(feats, logits, labels)
    keys = ("fid_train", "fid_test", "fid_test_inf", "kid_test", "is_mean", "precision", "recall",
            "density", "coverage", "class_acc")
    for key in keys:  # the centred interval holds its score (the resamples' mean is between their quantiles)
        lo, hi = got[f"{key}_ci"]
        assert lo <= got[key] <= hi, key
    assert got["bootstrap"]["resamples"] == 40 and got["bootstrap_s"] > 0
    assert len(got["per_class"]["fid_test_ci"]) == 10 and all(ci[0] <= f <= ci[1] for ci, f in zip(
        got["per_class"]["fid_test_ci"], got["per_class"]["fid_test"], strict=True))
    assert boot.score_features(feats, logits, labels)["fid_test_ci"] == got["fid_test_ci"]  # seeded
    boot.bootstrap = intervals.Bootstrap(40, 0.95, seed=4)
    assert boot.score_features(feats, logits, labels)["fid_test_ci"] != got["fid_test_ci"]
    # the points are those of the scorer without intervals (KID's subsets follow the seed: not KID)
    plain = s.scorer.score_features(feats, logits, labels)
    assert all(plain[k] == got[k] for k in ("fid_test", "fid_train", "precision", "is_mean", "class_acc"))
    assert "fid_test_ci" not in plain
