"""Evaluation wired into training and `fedrun eval`: scores, grids, world-size independence.
(Missing Inception weights: tests/unit_tests/test_bad_inputs.py and test_scoring.py.)"""

import json

import pytest

from helpers import as_args, run_cli, tiny_overrides


@pytest.mark.slow  # ~35 s: trains, scores and evaluates again on two ranks
def test_training_scores_grids_and_two_rank_eval_reproduce_them(tmp_path):
    o = tiny_overrides(tmp_path, "scored", fed__rounds=2, eval__enabled="true",
                       eval__feature_extractor="classifier", eval__num_samples=40, eval__batch_size=16,
                       sample__per_class=2, fed__clients_per_round=3, eval__client_samples=20,
                       eval__local_models_at="1,2")
    res = run_cli(as_args(o))
    assert res.returncode == 0, res.stderr[-3000:]
    run = tmp_path / "scored"
    rounds = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert "scores" not in rounds[0]  # eval.every = 0: only at the end
    scores = rounds[-1]["scores"]
    assert scores["num_samples"] == 40 and scores["extractor"] == "classifier"
    assert scores["fid_train"] > 0 and scores["fid_test"] > 0 and 1 <= scores["is_mean"] <= 10
    assert scores["is_extractor"] == "classifier" and scores["kid_test"] is not None
    assert 0 <= scores["precision"] <= 1 and 0 <= scores["coverage"] <= 1
    assert len(scores["per_class"]["fid_test"]) == 10 and sum(scores["per_class"]["count"]) == 40
    assert [c["client"] for c in scores["clients"]] == [0, 1, 2, 3]  # global model vs each client's data
    # each client of rounds 1 and 2, right after its local training, against its data and the test split
    for r in rounds:
        assert [c["client"] for c in r["client_scores"]] == r["clients"]
        assert all(c["fid_own"] > 0 and c["fid_test"] > 0 and len(c["per_class_fid_test"]) == 10
                   for c in r["client_scores"])
        assert r["client_score_s"] > 0 and r["eval_s"] >= r["client_score_s"]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["scores"]["fid_test"] == scores["fid_test"]
    assert summary["client_scores"]["2"] == rounds[-1]["client_scores"]
    assert (run / "samples" / "round_0002.png").exists()
    # each client sampled in the last round drew its own grid (personalization)
    assert sorted(p.name for p in (run / "clients" / "round_0002").iterdir()) == \
        [f"client_{k:02d}.png" for k in rounds[-1]["clients"]]

    # the same checkpoint scored again on 2 ranks: the sharded samples are the same images
    res2 = run_cli(["eval", str(run)], nproc=2)
    assert res2.returncode == 0, res2.stderr[-3000:]
    again = json.loads((run / "eval" / "round_0002.json").read_text())
    # the same model built the same way (fedrun.models.build), the same seeded chunks, one thread:
    # the same images bit for bit, hence the same scores exactly
    for key in ("fid_test", "fid_train", "is_mean", "class_acc", "kid_test", "precision", "recall",
                "per_class", "clients"):
        assert again[key] == scores[key], key

    # per-client scores do not depend on which rank trained the client: round 1 on 2 ranks
    # (every client starts from the same initial model, one thread per process)
    two = tiny_overrides(tmp_path, "scored2", **{**{k.replace(".", "__"): v for k, v in o.items()
                                                   if k.startswith(("eval.", "sample.", "fed."))},
                                                 "fed__rounds": 1, "eval__local_models_at": "1"})
    res3 = run_cli(as_args(two), nproc=2)
    assert res3.returncode == 0, res3.stderr[-3000:]
    first = json.loads((tmp_path / "scored2" / "metrics.jsonl").read_text().splitlines()[0])
    assert first["client_scores"] == rounds[0]["client_scores"]
