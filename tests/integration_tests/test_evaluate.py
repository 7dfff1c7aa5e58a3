"""Evaluation wired into training and `fedrun eval`: scores, grids, world-size independence.
(Missing Inception weights: tests/unit_tests/test_bad_inputs.py and test_scoring.py.)"""

import json

from helpers import as_args, run_cli, tiny_overrides


def test_training_scores_grids_and_two_rank_eval_reproduce_them(tmp_path):
    o = tiny_overrides(tmp_path, "scored", fed__rounds=2, eval__enabled="true",
                       eval__feature_extractor="classifier", eval__num_samples=40, eval__batch_size=16,
                       sample__per_class=2, fed__clients_per_round=3)
    res = run_cli(as_args(o))
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
    res2 = run_cli(["eval", str(run)], nproc=2)
    assert res2.returncode == 0, res2.stderr[-3000:]
    again = json.loads((run / "eval" / "round_0002.json").read_text())
    # the same model built the same way (fedrun.models.build), the same seeded chunks, one thread:
    # the same images bit for bit, hence the same scores exactly
    for key in ("fid_test", "fid_train", "is_mean", "class_acc"):
        assert again[key] == scores[key], key
