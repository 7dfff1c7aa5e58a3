"""A resumed run ends with the same model as an uninterrupted one (bit for bit)."""

import pytest
import torch

from conftest import tiny_overrides
from fedrun import checkpoint
from fedrun.config import load_config
from fedrun.train import train


def final_state(cfg):
    return checkpoint.load_verified(checkpoint.checkpoint_path(cfg.run_dir, cfg.fed.rounds))["model"]


@pytest.mark.parametrize("mode", ["fedavg", "centralized"])
def test_resume_equals_uninterrupted(tmp_path, mode):
    straight = load_config(None, tiny_overrides(tmp_path, "straight", fed__rounds=3, run__mode=mode,
                                                fed__clients_per_round=3))
    train(straight)
    # the same job stopped after round 2, then started again with the full budget
    first = load_config(None, tiny_overrides(tmp_path, "resumed", fed__rounds=2, run__mode=mode,
                                             fed__clients_per_round=3))
    train(first)
    again = load_config(None, tiny_overrides(tmp_path, "resumed", fed__rounds=3, run__mode=mode,
                                             fed__clients_per_round=3))
    train(again)
    a, b = final_state(straight), final_state(again)
    assert all(torch.equal(a[k], b[k]) for k in a)
    lines = (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()
    assert [int(l.split('"round": ')[1].split(",")[0]) for l in lines] == [1, 2, 3]  # round 3 once


def test_checkpoints_keep_the_last_k(tmp_path):
    cfg = load_config(None, tiny_overrides(tmp_path, fed__rounds=4, checkpoint__keep=2))
    train(cfg)
    names = [p.name for p in checkpoint.list_checkpoints(cfg.run_dir)]
    assert names == ["round_0004.pt", "round_0003.pt"]
    state = checkpoint.load_verified(cfg.run_dir / "checkpoints" / "round_0004.pt")
    assert state["round"] == 4 and state["config_hash"] == cfg.hash() and "cpu" in state["rng"]
