"""``fedrun compare``: paired verdicts between runs from their saved generated features.

No training here: each "run" is a folder with a config.toml and the features file an evaluation
writes (``evaluator.save_features``), made from real digits images through the cached proxy
classifier. Two halves of the real train split cannot be told apart (FID "not resolved"); the
same images blurred by noise are resolved as worse.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fedrun.config import Config
from fedrun.data import DataConfig, load_split
from fedrun.errors import ConfigError, MetricsError, ReportError
from fedrun.evaluation import compare
from fedrun.evaluation.evaluator import save_features
from fedrun.evaluation.sampling import eval_labels
from fedrun.evaluation.scorer import Scorer


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """Three run folders: two disjoint draws of real train images ("real_a", "real_b") and the
    second with heavy noise ("noisy"), each 300 images in the test split's class mix."""
    torch.set_num_threads(1)
    data = DataConfig(name="digits", image_size=16, channels=1)
    train, test = load_split(data, "train"), load_split(data, "test")
    scorer = Scorer("classifier", "digits", train, test, cache_dir=os.environ["FEDRUN_CACHE_DIR"])
    labels = eval_labels(test.labels, 10, 300)
    rng = np.random.default_rng(0)
    halves: list[list[int]] = [[], []]
    for c in range(10):
        where = rng.permutation(np.nonzero(train.labels.numpy() == c)[0])
        need = int((labels == c).sum())
        halves[0] += list(where[:need])
        halves[1] += list(where[need:2 * need])
    root = tmp_path_factory.mktemp("runs")
    g = torch.Generator().manual_seed(0)
    out = {}
    draws = (("real_a", halves[0], 0.0), ("real_b", halves[1], 0.0), ("noisy", halves[1], 0.6))
    for name, idx, noise in draws:
        images = train.images[idx]
        images = (images + noise * torch.randn(images.shape, generator=g)).clamp(-1, 1)
        cfg = Config()
        cfg.data = data
        cfg.eval.feature_extractor = "classifier"
        run = root / name
        run.mkdir()
        (run / "config.toml").write_text(cfg.to_toml())
        feats, logits = scorer.features(images)
        save_features(run / "eval" / "round_0100_features.npz", feats, logits, labels, scorer, cfg, 100)
        out[name] = run
    return out


@pytest.mark.slow  # ~20 s with the fixture: features of 900 digits, 2 x 200 resamples
def test_paired_verdicts(runs):
    result = compare.compare([runs["real_a"], runs["real_b"], runs["noisy"]], resamples=200)
    same, noisy = ({r["score"]: r for r in c["scores"]} for c in result["comparisons"])
    # two draws of the same real images: nothing resolved on FID; the intervals hold 0 (and 1)
    assert same["fid_test"]["verdict"] == compare.NOT_RESOLVED
    lo, hi = same["fid_test"]["difference_ci"]
    assert lo < 0 < hi
    ratio = same["fid_test"]["ratio_ci"]
    assert ratio is None or ratio[0] < 1 < ratio[1]
    # noise: FID resolved as worse, by a ratio whose interval leaves 1 far behind
    assert noisy["fid_test"]["verdict"] == "worse" and noisy["fid_test"]["ratio_ci"][0] > 2
    assert noisy["class_acc"]["verdict"] == "worse" and noisy["is_mean"]["verdict"] == "worse"
    for row in noisy.values():  # every interval holds its own difference
        assert row["difference_ci"][0] <= row["difference"] <= row["difference_ci"][1]
    # the reference resample is shared: run A's scores are the same in both comparisons
    assert same["fid_test"]["baseline"] == noisy["fid_test"]["baseline"]


def test_verdict_words():
    assert compare.verdict(-2.0, -1.0, -1) == "better"  # lower FID
    assert compare.verdict(1.0, 2.0, -1) == "worse"
    assert compare.verdict(1.0, 2.0, 1) == "better"  # higher precision
    assert compare.verdict(-1.0, 2.0, 1) == compare.NOT_RESOLVED
    assert compare.verdict(0.1, 0.2, 0) == "higher"  # density has no better side


@pytest.mark.slow  # a subprocess that imports torch and bootstraps
def test_command_line_writes_json_and_errors_are_one_line(runs, tmp_path):
    out = tmp_path / "cmp.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-m", "fedrun", "compare", str(runs["real_a"]), str(runs["noisy"]),
                          "--resamples", "100", "--out", str(out)], capture_output=True, text=True, env=env,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "worse" in res.stdout
    assert json.loads(out.read_text())["comparisons"][0]["run"] == str(runs["noisy"])
    with pytest.raises(ConfigError, match="needs two runs"):
        compare.parse_args([str(runs["real_a"])])
    with pytest.raises(ConfigError, match="--resamples 10 cannot"):
        compare.parse_args([str(runs["real_a"]), str(runs["noisy"]), "--resamples", "10"])
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ReportError, match="fedrun eval"):
        compare.load_generated(empty)


def test_features_of_other_extractors_are_refused(tmp_path):
    meta = {"dataset": "digits", "extractor": "classifier", "tag": "classifier-seed0-v1-aaaaaaaa",
            "test_images": 360, "train_images": 1437}
    for name, tag in (("a", meta["tag"]), ("b", "classifier-seed1-v1-00000000")):
        (tmp_path / name / "eval").mkdir(parents=True)
        np.savez(tmp_path / name / "eval" / "round_0100_features.npz", feats=np.zeros((4, 2)),
                 logits=np.zeros((4, 3)), labels=np.zeros(4, np.int64), meta=json.dumps({**meta, "tag": tag}))
    with pytest.raises(MetricsError, match="tag"):
        compare.check_comparable([compare.load_generated(tmp_path / n) for n in ("a", "b")])
