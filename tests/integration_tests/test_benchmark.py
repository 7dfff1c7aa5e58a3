"""benchmarks/round_throughput.py runs under torchrun and writes complete, consistent figures.

Only the bookkeeping is checked here (fields, sums, counts); speed is the benchmark's business.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from fedrun.flat import buffer_size

from helpers import ROOT, TINY, free_port


@pytest.mark.slow  # ~6 s: a two-rank benchmark
def test_two_rank_benchmark_writes_consistent_json(tmp_path):
    out = tmp_path / "bench.json"
    overrides = {**TINY, "data.name": "synthetic", "data.synthetic_size": "300", "data.num_classes": "4",
                 "fed.rounds": "99", "fed.compress": "int8"}  # --rounds wins over fed.rounds
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
           f"--master_port={free_port()}",
           str(ROOT / "benchmarks" / "round_throughput.py"),
           "--rounds", "2", "--raw-iters", "3", "--out", str(out),
           *[f"--{k}={v}" for k, v in overrides.items()]]
    run = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                         text=True, timeout=240)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "FL efficiency" in run.stdout and "raw all_reduce" in run.stdout

    r = json.loads(out.read_text())
    s = r["summary"]
    assert r["layout"]["world_size"] == 2 and r["setup"]["data"] == "synthetic"
    assert [x["round"] for x in r["rounds"]] == [1, 2] and s["steady_rounds"] == [2]
    for x in r["rounds"]:
        parts = x["local_train_s"] + x["update_chain_s"] + x["aggregate_s"] + x["checkpoint_s"] \
            + x["eval_s"] + x["other_s"]
        assert abs(parts - x["wall_s"]) < 1e-3 and min(x["local_train_s"], x["other_s"] + 1e-3) > 0
        assert x["images"] == 300  # 4 clients x 1 epoch: every image once
        assert len(x["peak_rss_mb_per_rank"]) == 2 and all(m > 0 for m in x["peak_rss_mb_per_rank"])
    # the same bytes on both sides of the ratio: the int64 buffer of the exact sum, P parameters,
    # its statistics and the per-rank slots
    assert r["setup"]["allreduce_bytes"] == 8 * buffer_size(r["setup"]["parameters"], 2)
    for x in r["rounds"]:  # each rank's way to the all_reduce, its wait there, its clients
        assert len(x["ready_s_per_rank"]) == len(x["wait_s_per_rank"]) == 2 and min(x["wait_s_per_rank"]) == 0
        assert sum(x["clients_per_rank"]) == 4 and 0 < x["compute_s"] < x["wall_s"]
    assert 0 <= s["wait_share_of_rank_time"] < 1 and s["overhead_ms_per_client"] > 0
    assert len(s["raw_allreduce_ms_all"]) == 6 and s["raw_allreduce_ms"] > 0
    ratio = s["aggregation_ms"] / s["raw_allreduce_ms"]
    assert s["aggregation_over_raw_allreduce"] == pytest.approx(ratio, rel=0.01)
    assert len(s["plain_img_per_s_per_rank"]) == 2 and 0 < s["fl_efficiency"]
    # int8 compression: its encode + decode is timed, and each client sends ~1/4 of the fp32 model
    assert all(x["update_chain_s"] > 0 and x["bytes_up"] == 4 * s["bytes_up_per_client"] for x in r["rounds"])
    assert 3.9 < s["bytes_down_per_client"] / s["bytes_up_per_client"] < 4
    assert s["bytes_down_per_client"] == 4 * r["setup"]["parameters"]
    assert abs(sum(s["fl_img_per_s_per_rank"]) - s["fl_img_per_s_total"]) < 0.05 * s["fl_img_per_s_total"]
