"""Non-finite client updates (injected with FEDRUN_FAULT_AT=nan:ROUND:CLIENT) are left out.

One bad client: the round goes on without it and metrics.jsonl counts it in clients_skipped.
Every client bad: the global model stays as it was. fed.max_bad_rounds such rounds in a row:
the run stops with one clear line and exit code 2.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import as_args, run_cli, tiny_overrides
from fedrun import checkpoint, faults
from fedrun.config import ConfigError
from test_fault_resume import RANKS


def metrics(run_dir: Path) -> dict[int, dict]:
    return {r["round"]: r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}


def model_at(run_dir: Path, round_: int) -> dict[str, torch.Tensor]:
    return checkpoint.load_verified(checkpoint.checkpoint_path(run_dir, round_))["model"]


def same(a: dict, b: dict) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a)


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
    assert not same(final, before)  # the three good clients still moved the model
    # rank 1's warnings are silenced by design; rank 0's round line still reports the skip
    round_2 = [line for line in res.stderr.splitlines() if line.startswith("round    2/2")]
    assert len(round_2) == 1 and "  skipped 1" in round_2[0]


def test_a_round_with_every_client_bad_keeps_the_global_model(tmp_path):
    o = tiny_overrides(tmp_path, "all_bad", fed__rounds=3, checkpoint__keep=3,
                       eval__enabled="false")
    res = run_cli(as_args(o), env={"FEDRUN_FAULT_AT": "nan:2:*"})
    assert res.returncode == 0, res.stderr[-3000:]
    m = metrics(tmp_path / "all_bad")
    assert (m[2]["clients_skipped"], m[2]["clients_trained"]) == (4, 0)
    assert (m[3]["clients_skipped"], m[3]["clients_trained"]) == (0, 4)
    run = tmp_path / "all_bad"
    assert same(model_at(run, 2), model_at(run, 1))  # bit for bit: round 2 changed nothing
    assert not same(model_at(run, 3), model_at(run, 2))  # and training went on in round 3
    assert "round 2: no usable client update; the global model is unchanged" in res.stderr


def test_max_bad_rounds_in_a_row_stops_with_one_clear_line(tmp_path):
    o = tiny_overrides(tmp_path, "hopeless", fed__rounds=5, fed__max_bad_rounds=2,
                       eval__enabled="false")
    res = run_cli(as_args(o), env={"FEDRUN_FAULT_AT": "nan:*:*"})
    assert res.returncode == 2, res.stderr[-3000:]
    assert "Traceback" not in res.stderr
    errors = [line for line in res.stderr.splitlines() if line.startswith("fedrun: error:")]
    assert len(errors) == 1 and "fed.max_bad_rounds: 2 rounds in a row" in errors[0]
    assert "optim.lr" in errors[0]  # says what to change
    assert sorted(metrics(tmp_path / "hopeless")) == [1]  # stopped in round 2, before logging it


@pytest.mark.parametrize("spec, plan", [
    ("2:1:3", faults.FaultPlan("kill", 2, 1, 3, marker="m")),
    ("ckpt:4", faults.FaultPlan("ckpt", 4, marker="m")),
    ("nan:*:0", faults.FaultPlan("nan", faults.ANY, 0)),
    ("", None),
])
def test_fault_specs_parse(spec, plan):
    assert faults.parse(spec, marker="m") == plan


@pytest.mark.parametrize("spec", ["2:1", "nan:2", "kill:1:2:3", "2:x:1", "ckpt:-1"])
def test_a_bad_fault_spec_is_a_clear_error(spec):
    with pytest.raises(ConfigError, match="FEDRUN_FAULT_AT"):
        faults.parse(spec)


def test_the_hooks_are_off_without_the_variable():
    assert faults.PLAN is None  # the test process has no FEDRUN_FAULT_AT
