"""The result is a function of the config, not of the hardware layout (real torchrun, gloo)."""

import torch

from conftest import as_args, run_cli, tiny_overrides
from fedrun import checkpoint


def final_model(run_dir, round_):
    return checkpoint.load_verified(checkpoint.checkpoint_path(run_dir, round_))["model"]


def test_one_rank_and_two_ranks_give_the_same_global_model(tmp_path):
    # 5 clients, 3 per round: uneven client counts per rank and sampling that changes per round
    extra = dict(fed__num_clients=5, fed__clients_per_round=3, fed__rounds=2, sample__per_class=1)
    one = run_cli(as_args(tiny_overrides(tmp_path, "one", **extra)), nproc=1)
    two = run_cli(as_args(tiny_overrides(tmp_path, "two", **extra)), nproc=2)
    assert one.returncode == 0, one.stderr[-3000:]
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = final_model(tmp_path / "one", 2), final_model(tmp_path / "two", 2)
    diff = max((a[k] - b[k]).abs().max().item() for k in a)
    moved = max((a[k] - final_model(tmp_path / "one", 1)[k]).abs().max().item() for k in a)
    print(f"max |theta_1rank - theta_2rank| = {diff:.3g} (round-2 update size {moved:.3g})")
    assert diff < 1e-5 < moved
    # rank 0 alone logs: one metrics line per round, and the 2-rank run says so
    lines = (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2 and '"world_size": 2' in lines[0]
    assert (tmp_path / "two" / "samples" / "final.png").exists()


def test_more_ranks_than_clients_idle_ranks_add_zeros(tmp_path):
    extra = dict(fed__num_clients=1, fed__clients_per_round=1, fed__rounds=1)
    one = run_cli(as_args(tiny_overrides(tmp_path, "one", **extra)), nproc=1)
    two = run_cli(as_args(tiny_overrides(tmp_path, "two", **extra)), nproc=2)
    assert one.returncode == 0 and two.returncode == 0, two.stderr[-3000:]
    assert "more ranks (2) than clients per round (1)" in two.stderr
    a, b = final_model(tmp_path / "one", 1), final_model(tmp_path / "two", 1)
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
