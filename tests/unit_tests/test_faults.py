"""Fault hooks (fedrun/faults.py) and what training does with non-finite client updates,
in-process: the plan that FEDRUN_FAULT_AT would give is set on the module directly.

One bad client on another rank is tested with real ranks in
tests/integration_tests/test_nonfinite_rank1.py; kill -9 in test_fault_resume.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fedrun import faults
from fedrun.__main__ import main
from fedrun.config import ConfigError, ModelConfig
from fedrun.models import build_model

from helpers import as_args, model_at, same_bits, tiny_overrides


def metrics(run_dir: Path) -> dict[int, dict]:
    return {r["round"]: r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}


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


def test_a_nan_plan_poisons_only_its_round_client_and_first_step(monkeypatch):
    small = ModelConfig(base_channels=4, channel_mults=[1, 2], blocks_per_level=1, mid_blocks=2)
    model = build_model(small, 1, 3)
    first = next(model.parameters())
    monkeypatch.setattr(faults, "PLAN", faults.parse("nan:2:1"))
    for round_, client, step in [(1, 1, 1), (2, 0, 1), (2, 1, 2), (3, 1, 1)]:
        faults.at_step(model, round_, client, step)
        assert torch.isfinite(first).all(), (round_, client, step)
    faults.at_step(model, 2, 1, 1)
    assert torch.isnan(first).all()


def test_a_round_with_every_client_bad_keeps_the_global_model(tmp_path, monkeypatch):
    monkeypatch.setattr(faults, "PLAN", faults.parse("nan:2:*"))
    o = tiny_overrides(tmp_path, "all_bad", fed__rounds=3, checkpoint__keep=3)
    with pytest.warns(UserWarning, match="round 2: no usable client update; the global model is unchanged"):
        assert main(as_args(o)) == 0
    run = tmp_path / "all_bad"
    m = metrics(run)
    assert (m[1]["clients_skipped"], m[1]["clients_trained"]) == (0, 4)
    assert (m[2]["clients_skipped"], m[2]["clients_trained"]) == (4, 0)
    assert (m[3]["clients_skipped"], m[3]["clients_trained"]) == (0, 4)
    assert same_bits(model_at(run, 2), model_at(run, 1))  # bit for bit: round 2 changed nothing
    assert not same_bits(model_at(run, 3), model_at(run, 2))  # and training went on in round 3


def test_max_bad_rounds_in_a_row_stops_with_one_clear_line_and_exit_code_7(tmp_path, monkeypatch, capfd):
    monkeypatch.setattr(faults, "PLAN", faults.parse("nan:*:*"))
    o = tiny_overrides(tmp_path, "hopeless", fed__rounds=5, fed__max_bad_rounds=2)
    with pytest.warns(UserWarning, match="no usable client update"):
        assert main(as_args(o)) == 7
    errors = [line for line in capfd.readouterr().err.splitlines() if line.startswith("fedrun: error:")]
    assert len(errors) == 1 and "fed.max_bad_rounds: 2 rounds in a row" in errors[0]
    assert "optim.lr" in errors[0]  # says what to change
    m = metrics(tmp_path / "hopeless")
    assert sorted(m) == [1] and m[1]["clients_skipped"] == 4  # stopped in round 2, before logging it
