"""End to end on the embedded digits set: the loss goes down and the outputs are written."""

import json

from PIL import Image

from conftest import as_args, run_cli, tiny_overrides


def test_two_round_digits_run_learns_and_writes_its_outputs(tmp_path):
    o = tiny_overrides(tmp_path, "smoke", fed__rounds=2, fed__local_epochs=3, sample__per_class=3)
    res = run_cli(as_args(o))
    assert res.returncode == 0, res.stderr[-3000:]
    run = tmp_path / "smoke"
    rounds = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == [1, 2]
    assert rounds[1]["loss"] < rounds[0]["loss"]
    for r in rounds:
        assert r["images"] == 3 * 1437 and r["local_train_s"] > 0 and r["allreduce_bytes"] > 0
    # 10 classes x 3 per class, one row per class, 16 px shown at 2x + 1 px padding
    assert Image.open(run / "samples" / "final.png").size == (3 * 33 + 1, 10 * 33 + 1)
    assert (run / "partition.png").exists()
    summary = json.loads((run / "summary.json").read_text())
    assert summary["config"]["fed"]["rounds"] == 2 and summary["final_loss"] == rounds[1]["loss"]
    assert (run / "config.toml").read_text().count("[fed]") == 1
    assert "outputs in" in res.stderr
