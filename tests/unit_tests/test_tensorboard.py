"""run.tensorboard: RunLogger writes each round's numbers as TensorBoard scalars (rank 0), next to
metrics.jsonl; without the tensorboard package it stops with one ConfigError line."""

from __future__ import annotations

import json
import sys

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from fedrun.config import load_config
from fedrun.errors import ConfigError
from fedrun.logs import RunLogger, scalars


def _record(round_: int, loss: float, **more) -> dict:
    return {"round": round_, "loss": loss, "img_per_s": 100.0 * round_, "wall_s": 2.5, "wait_s": 0.25,
            "allreduce_bytes": 4096, "clients": [0, 1], "local_train_s_per_rank": [1.0, 1.2], **more}


def _read(folder) -> EventAccumulator:
    acc = EventAccumulator(str(folder))
    acc.Reload()
    return acc


def test_every_numeric_field_of_a_round_becomes_a_scalar(tmp_path):
    log = RunLogger(tmp_path, enabled=True, total_rounds=2, tensorboard=True)
    scores = {"is_mean": 3.0, "fid_train": 9.5, "fid_test": 10.5, "class_acc": 0.75,
              "extractor": "classifier", "per_class": {"fid_test": [1.0, 2.0]}}
    log.end_round(_record(1, 0.5), "round 1")
    log.end_round(_record(2, 0.25, scores=scores, epsilon=1.5), "round 2")
    log.close()

    acc = _read(tmp_path / "tensorboard")
    tags = set(acc.Tags()["scalars"])
    assert {"loss", "img_per_s", "wall_s", "wait_s", "allreduce_bytes", "epsilon", "scores/fid_test",
            "scores/fid_train", "scores/is_mean", "scores/class_acc"} <= tags
    assert not any(t.startswith(("clients", "local_train_s_per_rank", "scores/extractor", "scores/per_class",
                                 "round", "time")) for t in tags)  # lists, strings, the step itself
    assert [(e.step, e.value) for e in acc.Scalars("loss")] == [(1, 0.5), (2, 0.25)]
    assert [(e.step, e.value) for e in acc.Scalars("scores/fid_test")] == [(2, 10.5)]
    assert [(e.step, e.value) for e in acc.Scalars("epsilon")] == [(2, 1.5)]
    # metrics.jsonl stays the record
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in lines] == [0.5, 0.25]


def test_a_resumed_run_replaces_the_rounds_it_trains_again(tmp_path):
    first = RunLogger(tmp_path, enabled=True, total_rounds=3, tensorboard=True)
    for r in (1, 2, 3):
        first.end_round(_record(r, 1.0 / r), f"round {r}")
    first.close()  # as if killed after round 3 with the checkpoint of round 1
    again = RunLogger(tmp_path, enabled=True, total_rounds=3, start_round=1, tensorboard=True)
    for r in (2, 3):
        again.end_round(_record(r, 10.0 * r), f"round {r}")
    again.close()
    acc = _read(tmp_path / "tensorboard")
    assert [(e.step, e.value) for e in acc.Scalars("loss")] == [(1, 1.0), (2, 20.0), (3, 30.0)]


def test_off_by_default_and_quiet_on_other_ranks(tmp_path):
    RunLogger(tmp_path / "a", enabled=True, total_rounds=1).close()
    assert not (tmp_path / "a" / "tensorboard").exists()
    other_rank = RunLogger(tmp_path / "b", enabled=False, total_rounds=1, tensorboard=True)
    other_rank.end_round(_record(1, 0.5), "round 1")
    other_rank.close()
    assert not (tmp_path / "b").exists()
    assert load_config(None, {"run.tensorboard": "true"}).run.tensorboard is True


def test_missing_package_is_a_config_error_on_every_rank(tmp_path, monkeypatch):
    # as if tensorboard were not installed: importing it (and torch's writer) fails in-process
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    for enabled in (True, False):  # rank 0 and the others: all stop before training
        with pytest.raises(ConfigError) as err:
            RunLogger(tmp_path, enabled=enabled, total_rounds=1, tensorboard=True)
        message = str(err.value)
        assert message.startswith("run.tensorboard:") and "pip install tensorboard" in message
        assert "\n" not in message
    RunLogger(tmp_path, enabled=True, total_rounds=1).close()  # off: the package is not needed


def test_scalars_flattens_nested_numbers():
    assert scalars({"round": 3, "time": 1.0, "loss": 1, "ok": True, "name": "x",
                    "scores": {"fid_test": 2.0, "per_class": {"fid_test": [1.0]}, "clients": [{"a": 1}]}}) \
        == {"loss": 1.0, "scores/fid_test": 2.0}
