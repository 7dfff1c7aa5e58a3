"""A non-finite client update on rank 1 is left out of the average, and the skip is counted
across the all_reduce (rank 0 logs it). In-process cases (every client bad, max_bad_rounds) are
in tests/unit_tests/test_faults.py."""

from __future__ import annotations

import json

import pytest
import torch

from helpers import as_args, clients_of_rank, model_at, run_cli, same_bits, tiny_overrides

RANKS = clients_of_rank(2)


def metrics(run_dir):
    return {r["round"]: r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}


@pytest.mark.slow  # ~6 s: torchrun, two ranks
def test_one_nan_client_on_rank_1_is_skipped_and_the_round_goes_on(tmp_path):
    bad = RANKS[1][0]  # a client that rank 1 trains: the skip count must cross the all_reduce
    o = tiny_overrides(tmp_path, "one_bad", fed__rounds=2, eval__enabled="false")
    res = run_cli(as_args(o), nproc=2, env={"FEDRUN_FAULT_AT": f"nan:2:{bad}"})
    assert res.returncode == 0, res.stderr[-3000:]
    m = metrics(tmp_path / "one_bad")
    assert (m[1]["clients_skipped"], m[1]["clients_trained"]) == (0, 4)
    assert (m[2]["clients_skipped"], m[2]["clients_trained"]) == (1, 3)
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in m.values())
    final, before = model_at(tmp_path / "one_bad", 2), model_at(tmp_path / "one_bad", 1)
    assert all(torch.isfinite(v).all() for v in final.values())
    assert not same_bits(final, before)  # the three good clients still moved the model
    # rank 1's warnings are silenced by design; rank 0's round line still reports the skip
    round_2 = [line for line in res.stderr.splitlines() if line.startswith("round    2/2")]
    assert len(round_2) == 1 and "  skipped 1" in round_2[0]
