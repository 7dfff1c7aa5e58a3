"""End to end on the embedded digits set, with the network blocked: the default job (evaluation
with the offline classifier included, made tiny) learns, writes its outputs, and never tries
to open a socket. Under torchrun the ranks talk over loopback only (test_world_size.py)."""

import json
import subprocess
import sys

import pytest
from PIL import Image

from helpers import as_args, guarded_processes, network_attempts, offline_env, run_cli, tiny_overrides


def test_the_blocker_blocks(tmp_path):
    env = offline_env(tmp_path)
    code = "import urllib.request\nurllib.request.urlopen('http://example.com', timeout=5)"
    res = subprocess.run([sys.executable, "-c", code], env={**env, "PATH": "/usr/bin:/bin"},
                         capture_output=True, text=True, timeout=60)
    assert res.returncode != 0 and "network access blocked by the fedrun test" in res.stderr
    assert "example.com" in network_attempts(env)


@pytest.mark.slow  # ~10 s; README line 1 is the same run at full length
def test_two_round_digits_run_learns_and_writes_its_outputs_offline(tmp_path):
    env = offline_env(tmp_path)
    o = tiny_overrides(tmp_path, "smoke", fed__rounds=2, fed__local_epochs=3, sample__per_class=3,
                       eval__enabled="true", eval__num_samples=40)
    res = run_cli(as_args(o), env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    assert guarded_processes(env) == 1
    assert network_attempts(env) == ""  # not even an attempt that was caught and ignored
    run = tmp_path / "smoke"
    rounds = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == [1, 2]
    assert rounds[1]["loss"] < rounds[0]["loss"]
    for r in rounds:
        assert r["images"] == 3 * 1437 and r["local_train_s"] > 0 and r["allreduce_bytes"] > 0
    # 10 classes x 3 per class, one row per class, 16 px shown at 2x + 1 px padding
    assert Image.open(run / "samples" / "final.png").size == (3 * 33 + 1, 10 * 33 + 1)
    assert (run / "partition.png").exists()
    # the last round's client grids are evaluation, not training: timed as such
    assert rounds[0]["eval_s"] == 0 and rounds[1]["eval_s"] > 0
    assert sorted(p.name for p in (run / "clients" / "round_0002").iterdir()) == \
        [f"client_{k:02d}.png" for k in rounds[-1]["clients"]]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["config"]["fed"]["rounds"] == 2 and summary["final_loss"] == rounds[1]["loss"]
    assert summary["scores"]["num_samples"] == 40 and summary["scores"]["fid_test"] > 0  # scored, offline
    assert (run / "config.toml").read_text().count("[fed]") == 1
    assert "outputs in" in res.stderr
