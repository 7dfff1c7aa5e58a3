"""Evaluation wired into training and `fedrun eval`: scores, grids, world-size independence."""

import json

import pytest
import torch

from conftest import as_args, run_cli, tiny_overrides
from fedrun.evaluate import eval_labels


def test_eval_labels_follow_the_test_split():
    test_labels = torch.tensor([0] * 50 + [1] * 30 + [2] * 20)
    assert torch.bincount(eval_labels(test_labels, 3, 100)).tolist() == [50, 30, 20]
    assert torch.bincount(eval_labels(test_labels, 3, 10)).tolist() == [5, 3, 2]
    labels = eval_labels(test_labels, 3, 7)
    assert len(labels) == 7 and torch.all(labels[1:] >= labels[:-1])  # class order


def test_training_scores_grids_and_two_rank_eval_reproduce_them(tmp_path):
    env = {}
    o = tiny_overrides(tmp_path, "scored", fed__rounds=2, eval__enabled="true",
                       eval__feature_extractor="classifier", eval__num_samples=40, eval__batch_size=16,
                       sample__per_class=2, fed__clients_per_round=3)
    res = run_cli(as_args(o), env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    run = tmp_path / "scored"
    rounds = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert "scores" not in rounds[0]  # eval.every = 0: only at the end
    scores = rounds[-1]["scores"]
    assert scores["num_samples"] == 40 and scores["extractor"] == "classifier"
    assert scores["fid_train"] > 0 and scores["fid_test"] > 0 and 1 <= scores["is_mean"] <= 10
    summary = json.loads((run / "summary.json").read_text())
    assert summary["scores"]["fid_test"] == scores["fid_test"]
    assert (run / "samples" / "round_0002.png").exists()
    # each client sampled in the last round drew its own grid (personalization)
    assert sorted(p.name for p in (run / "clients" / "round_0002").iterdir()) == \
        [f"client_{k:02d}.png" for k in rounds[-1]["clients"]]

    # the same checkpoint scored again on 2 ranks: the sharded samples are the same images
    res2 = run_cli(["eval", str(run)], nproc=2, env=env)
    assert res2.returncode == 0, res2.stderr[-3000:]
    again = json.loads((run / "eval" / "round_0002.json").read_text())
    assert again["fid_test"] == pytest.approx(scores["fid_test"], rel=1e-6)
    assert again["is_mean"] == pytest.approx(scores["is_mean"], rel=1e-6)


def test_missing_inception_weights_fail_before_training(tmp_path, monkeypatch):
    missing = tmp_path / "nowhere" / "inception-2015-12-05.pt"
    o = tiny_overrides(tmp_path, "noweights", eval__enabled="true", eval__feature_extractor="inception",
                       eval__inception_weights=missing)
    res = run_cli(as_args(o))
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "FEDRUN_INCEPTION_WEIGHTS" in res.stderr and str(missing) in res.stderr
    assert not (tmp_path / "noweights" / "metrics.jsonl").exists()
